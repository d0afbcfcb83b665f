"""Agents with a real model: the embedded tiny-calc checkpoint through the HF engine and the trainer.

Token fidelity (assembled ids = sampled ids + tokenized environment messages; the trainer's
recomputed log-probabilities equal the sampler's on the model's tokens), split invariance of
seeded episodes (what makes 2 processes equal 1, and resume exact), and the trainer / evaluator /
resume wiring for ``data.task=calculator``.
"""

from __future__ import annotations

import json

import pytest
import torch

from gspo.agents.calculator import CONTEXT, CalculatorTask, calculator_environment
from gspo.agents.episode import EpisodeRunner, assemble
from gspo.agents.format import MessageFormat
from gspo.config import load_config
from gspo.errors import ConfigError
from gspo.logprobs import token_logprobs
from gspo.models.load import load_model, load_tokenizer, resolve_model_path
from gspo.rollout.base import SamplingParams
from gspo.rollout.hf import HFEngine
from gspo.trainer.trainer import Trainer

AGENT = ["model=tiny-calc", "data.task=calculator", "rollout.max_new_tokens=48", "rollout.prompts_per_step=4",
         "rollout.group_size=4", "optim.minibatches=2", "eval.size=8", "eval.samples=2", "eval.every=0",
         "log.tensorboard=false", "log.progress=false", "checkpoint.every=0"]


@pytest.fixture(scope="module")
def calc_model():
    path = resolve_model_path("tiny-calc")
    return load_model(path, dtype=torch.float32, device=torch.device("cpu")).eval(), load_tokenizer(path)


class Recording:
    """Wraps an engine and keeps every turn's raw output (what the sampler produced)."""

    def __init__(self, engine) -> None:
        self.engine, self.outputs = engine, []
        self.info = engine.info

    def generate(self, prompts, params, generator=None, **kw):
        out = self.engine.generate(prompts, params, generator, **kw)
        self.outputs.append((prompts, out))
        return out

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


def make_runner(engine, tokenizer) -> EpisodeRunner:
    return EpisodeRunner(engine, calculator_environment(), MessageFormat(tokenizer),
                         lambda ids: tokenizer.decode(ids, skip_special_tokens=True), tokenizer.pad_token_id, CONTEXT)


def episodes_for(engine, tokenizer, rows, seeds, temperature=1.0):
    prompts = [list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    episodes, _ = make_runner(engine, tokenizer).run(prompts, rows, SamplingParams(48, temperature), seeds)
    return episodes


def test_token_fidelity_with_the_real_sampler(calc_model):
    model, tokenizer = calc_model
    rows = CalculatorTask(seed=3).eval_rows(12)
    engine = Recording(HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    episodes = episodes_for(engine, tokenizer, rows, list(range(100, 112)))
    fmt = MessageFormat(tokenizer)
    assert any(e.num_turns >= 2 for e in episodes) and any(e.num_turns == 1 for e in episodes)
    # rebuild each episode from the sampler's raw outputs and the tokenized environment messages
    for e in episodes:
        expected, context, k = [], e.prompt, 0
        for prompts, out in engine.outputs:  # one generate call per turn
            if context not in prompts:
                continue  # the episode had ended
            j = prompts.index(context)
            sampled = out.completion_ids[j][out.completion_mask[j]].tolist()
            cut, eos = fmt.turn_end(sampled), not bool(out.truncated[j])
            if cut is not None and cut < len(sampled) - int(eos):
                sampled, eos = sampled[:cut], False
            assert sampled == e.ids[len(expected) : len(expected) + len(sampled)]  # the sampled ids, verbatim
            expected += sampled
            if len(expected) < len(e.ids):
                expected += fmt.message_ids(_reply(e, k), ended_with_eos=eos)  # the tokenized env message
            k, context = k + 1, e.prompt + expected
        assert expected == e.ids and k == e.num_turns
    rollout = assemble(episodes, tokenizer.pad_token_id)
    recomputed = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1],
                                temperature=1.0)  # (B, T) the trainer's
    mask = rollout.completion_mask
    assert torch.allclose(recomputed[mask], rollout.logprobs[mask], atol=2e-4)
    assert (rollout.logprobs[~mask] == 0).all()


def _reply(episode, turn: int) -> str:
    """The environment's message after ``turn``, replayed on a fresh environment (it is deterministic)."""
    env = calculator_environment()
    state = env.reset(episode.state.row)
    reply = None
    for text in episode.state.turns[: turn + 1]:
        state.turns.append(text)
        reply = env.step(state, text)
    return reply.message


def test_seeded_episodes_do_not_depend_on_the_batch_split(calc_model):
    model, tokenizer = calc_model
    rows = CalculatorTask(seed=5).eval_rows(8)
    seeds = list(range(200, 208))
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    whole = episodes_for(engine, tokenizer, rows, seeds)
    halves = episodes_for(engine, tokenizer, rows[:3], seeds[:3]) + episodes_for(engine, tokenizer, rows[3:], seeds[3:])
    assert [e.ids for e in whole] == [e.ids for e in halves]
    for a, b in zip(whole, halves):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_trainer_runs_agent_steps_with_metrics_and_resumes_exactly(tmp_path):
    from gspo.trainer.run import train

    t = Trainer.from_config(load_config(None, [*AGENT, "steps=1"]), run_dir=None)
    metrics = t.train_step()
    for key in ("agent/tool_call_ok_frac", "agent/turns_mean", "agent/tool_use_frac", "reward/accuracy"):
        assert key in metrics
    assert 1.0 <= metrics["agent/turns_mean"] <= 3.0
    evaluation = t.evaluate()
    assert set(evaluation) >= {"eval/accuracy", "eval/greedy_accuracy"}

    overrides = [*AGENT, "checkpoint.every=1", "eval.greedy=false"]
    train(load_config(None, [*overrides, "steps=2"]), tmp_path / "straight")
    train(load_config(None, [*overrides, "steps=1"]), tmp_path / "resumed")
    train(load_config(None, [*overrides, "steps=2"]), tmp_path / "resumed", resume=True)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "checkpoints" / "step-00000002" / "model.safetensors")
            for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "agent/tool_call_ok_frac" in x] == [1, 2]


@pytest.mark.parametrize("extra, fragment", [
    (["agent.advantages=turn"], "agent.advantages=turn"),
    (["algorithm=dapo"], "dynamic_sampling"),
])
def test_unsupported_agent_settings_are_config_errors(extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        t = Trainer.from_config(load_config(None, [*AGENT, *extra, "steps=1"]), run_dir=None)
        t.train_step()


def test_turn_advantages_train_with_gspo_token():
    t = Trainer.from_config(load_config(None, [*AGENT, "algorithm=gspo_token", "agent.advantages=turn", "steps=1"]),
                            run_dir=None)
    metrics = t.train_step()
    assert "agent/turns_mean" in metrics


def test_dr_grpo_normalises_agent_episodes_by_the_episode_budget():
    # review D7: an episode's model tokens span its turns, so Dr. GRPO's constant L is the episode's budget
    # (turns x rollout.max_new_tokens, within the context), not one turn's 8 tokens
    fast = [o for o in AGENT if not o.startswith(("rollout.max_new_tokens", "rollout.prompts_per_step"))]
    t = Trainer.from_config(load_config(None, [*fast, "algorithm=dr_grpo", "rollout.max_new_tokens=8",
                                               "rollout.prompts_per_step=2", "steps=1"]), run_dir=None)
    turns = calculator_environment().max_turns
    assert t.updater.max_length == min(turns * 8, CONTEXT)
    metrics = t.train_step()
    assert torch.isfinite(torch.tensor(metrics["loss/policy"]))
