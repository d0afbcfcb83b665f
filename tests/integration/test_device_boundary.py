"""G2: one device boundary. The scored batch (rollout, routing, rewards, advantages) crosses to the policy's
device once, after scoring, and every tensor entering the update lives there.

This CPU-only torch cannot hold CUDA tensors, but ``FakeTensorMode`` makes ``cuda:0`` fake tensors (shapes
and devices, no data) and raises on an op that mixes devices: the batches are built by the real collectors
on the CPU, as on a GPU machine (rewards and bookkeeping on the CPU; vLLM and agent rollouts wholly on the
CPU), then cross the boundary and meet a loss computed on ``cuda:0``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from torch._subclasses.fake_tensor import FakeTensorMode

from gspo.algorithms import group_advantages
from gspo.algorithms._inputs import prepare
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams
from gspo.rollout.hf import HFEngine
from gspo.rollout.vllm.convert import Completion, to_rollout
from gspo.tasks.rewards import WeightedReward
from gspo.trainer.collect import Collector, ScoredBatch
from gspo.trainer.update import UpdateInputs, check_device

CUDA = torch.device("cuda", 0)  # FakeTensorMode needs the index ("cuda" alone asks the driver)
PAD, EOS = 0, 1
ROWS = [{"prompt": "12*3=", "answer": "36"}, {"prompt": "14*5=", "answer": "70"}]
GROUP = 2


def _reward(prompt, completion, **row):
    return float(len(completion) % 3) / 2  # any spread: nonzero advantages


REWARDS = [WeightedReward("spread", _reward, 1.0)]


def _hf_batch() -> ScoredBatch:
    config = transformers.Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=PAD)
    torch.manual_seed(0)
    engine = HFEngine(transformers.Qwen3ForCausalLM(config), pad_token_id=PAD, eos_token_id=EOS)
    collector = Collector(engine, render=lambda row: [5 + len(row["prompt"]), 6, 7], decode=str, rewards=REWARDS,
                          params=SamplingParams(max_new_tokens=6), group_size=GROUP, overlong_buffer=2)
    return collector.collect(ROWS, seed=3)


def _vllm_batch() -> ScoredBatch:
    """vLLM's outputs as its converter receives them (token ids, log-probs, routed experts per request)."""
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [8, 9]]
    completions = [Completion([10 + i, 11, EOS], [-0.5, -0.25, -0.125], np.zeros((3 + 2 + (i % 2), 2, 2), int))
                   for i in range(4)]
    rollout = to_rollout(prompts, completions, SamplingParams(max_new_tokens=4), pad_token_id=PAD, eos_ids=[EOS])
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5])
    return ScoredBatch(rollout, ROWS * 2, ["a"] * 4, rewards, group_advantages(rewards, GROUP), rewards > 0.5)


class _OneTurnEngine:
    info = EngineInfo("scripted")

    def generate(self, prompts, params, generator=None, *, row_seeds=None, record_routing=False) -> Rollout:
        from gspo.agents.calculator import build_calc_tokenizer

        tok = build_calc_tokenizer()
        answers = [tok("70" if i % 2 else "36", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for i in range(len(prompts))]
        width = max(map(len, answers))
        ids = torch.full((len(prompts), width), tok.pad_token_id)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, a in enumerate(answers):
            ids[i, : len(a)], mask[i, : len(a)] = torch.tensor(a), True
        p = max(map(len, prompts))
        return Rollout(torch.ones((len(prompts), p), dtype=torch.long), torch.ones((len(prompts), p), dtype=torch.bool),
                       ids, mask, torch.where(mask, -0.5, 0.0), torch.zeros(len(prompts), dtype=torch.bool))

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


def _agent_batch() -> ScoredBatch:
    from gspo.agents.calculator import build_calc_tokenizer, calculator_environment
    from gspo.agents.collect import EpisodeCollector
    from gspo.agents.episode import EpisodeRunner
    from gspo.agents.format import MessageFormat
    from gspo.tasks.arithmetic import exact_answer_reward

    tok = build_calc_tokenizer()
    runner = EpisodeRunner(_OneTurnEngine(), calculator_environment(), MessageFormat(tok),
                           lambda ids: tok.decode(ids, skip_special_tokens=True), tok.pad_token_id, 64)
    collector = EpisodeCollector(runner, lambda row: tok(row["prompt"], add_special_tokens=False)["input_ids"],
                                 [WeightedReward("exact", exact_answer_reward, 1.0)], SamplingParams(max_new_tokens=8),
                                 GROUP, advantages="turn")
    return collector.collect(ROWS, seed=1)


BATCHES = {"hf": _hf_batch, "vllm": _vllm_batch, "agent": _agent_batch}


def _inputs(batch: ScoredBatch) -> UpdateInputs:
    """What the trainer's pi_old stage hands the update when pi_old is the engine's (no forward)."""
    r = batch.rollout
    return UpdateInputs(r.input_ids, r.attention_mask, r.completion_mask, batch.advantages, r.logprobs, None,
                        r.routing, rollout_logprobs=r.logprobs)


def _loss_inputs(inputs: UpdateInputs):
    """The losses' shared preparation (``algorithms._inputs.prepare``: where the advantages first meet the
    mask), with the policy's log-probabilities made on ``cuda:0``. Not the whole loss: this CPU build of
    torch aborts on autograd and some indexing of CUDA tensors, even fake ones."""
    logprobs = torch.zeros(inputs.old_logprobs.shape, device=CUDA)  # (B, T) the policy's forward
    return prepare(logprobs, inputs.old_logprobs, inputs.advantages, inputs.completion_mask,
                   token_advantages=inputs.advantages.dim() == 2)


@pytest.mark.parametrize("source", sorted(BATCHES))
def test_the_scored_batch_crosses_to_the_policy_device_once(source):
    batch = BATCHES[source]()
    assert batch.rewards.device.type == "cpu"  # collection builds on the CPU
    if source == "vllm":
        assert batch.rollout.routing is not None  # R3's routing record crosses too
    if source == "agent":
        assert batch.advantages.dim() == 2 and batch.rollout.completion_attention is not None
    with FakeTensorMode(allow_non_fake_inputs=True):
        moved = batch.to(CUDA)  # the boundary
        inputs = _inputs(moved)
        check_device(inputs, CUDA)
        tensors = [v for v in vars(moved.rollout).values() if isinstance(v, torch.Tensor)]
        tensors += [moved.rewards, moved.advantages, moved.correct]
        tensors += moved.rollout.routing.indices if moved.rollout.routing is not None else []
        assert all(t.device == CUDA for t in tensors)
        prepared = _loss_inputs(inputs)  # raises FakeTensorDeviceMismatchError if anything stayed on the CPU
        assert prepared.advantages.device == prepared.lengths.device == CUDA


def test_without_the_boundary_the_update_refuses_mixed_devices():
    """Today's GPU path: the built-in engine's rollout on the model's device, the rewards and advantages the
    collector built on the CPU. The update's check names the tensor; the loss itself would fail."""
    batch = _vllm_batch()
    with FakeTensorMode(allow_non_fake_inputs=True):
        mixed = ScoredBatch(batch.rollout.to(CUDA), batch.rows, batch.completions, batch.rewards, batch.advantages,
                            batch.correct)
        with pytest.raises(ValueError, match="'advantages' is on cpu"):
            check_device(_inputs(mixed), CUDA)
        with pytest.raises(RuntimeError, match="devices"):
            _loss_inputs(_inputs(mixed))


def test_train_step_moves_the_batch_to_the_policy_device_before_the_update(tiny_overrides, monkeypatch):
    """The trainer calls the boundary once per step with the policy's device, and the update receives the
    moved batch's tensors (every path returns its batch through Trainer._collect)."""
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, [*tiny_overrides, "steps=1"]))
    moves, seen = [], []
    original_to, original_update = ScoredBatch.to, trainer.updater.update

    def spy_to(self, device):
        moved = original_to(self, device)
        moves.append((torch.device(device), moved))
        return moved

    def spy_update(policy, optimizer, scheduler, inputs, **kw):
        seen.append(inputs)
        return original_update(policy, optimizer, scheduler, inputs, **kw)

    monkeypatch.setattr(ScoredBatch, "to", spy_to)
    monkeypatch.setattr(trainer.updater, "update", spy_update)
    trainer.train_step()
    assert [device for device, _ in moves] == [next(trainer.policy.parameters()).device]
    assert seen[0].advantages is moves[0][1].advantages


def test_the_update_checks_its_inputs_device(tiny_overrides):
    from gspo.config import load_config
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, [*tiny_overrides, "steps=1"]))
    inputs = _inputs(_vllm_batch())
    inputs.advantages = inputs.advantages.to("meta")
    with pytest.raises(ValueError, match="'advantages' is on meta"):
        trainer.updater.update(trainer.policy, trainer.parts.optimizer, trainer.parts.scheduler, inputs,
                               torch.Generator().manual_seed(0))
