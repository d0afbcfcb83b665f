"""The rollout-engine interface is the whole boundary: a scripted engine trains, nothing else is reached.

Like TRL's tests with mocked generation, a fake engine returns fixed completions (ending at EOS, or
truncated at the generation limit); the trainer must use only ``info``, ``generate``, ``sync_weights``
and ``close``, and no module above the engines imports a concrete engine except the assembly point.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from gspo.config import load_config
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams
from gspo.trainer.trainer import Trainer

INTERFACE = {"info", "generate", "sync_weights", "close"}
SRC = Path(__file__).resolve().parents[2] / "src" / "gspo"


class ScriptedEngine:
    """Answers every prompt with scripted completions, cycling through ``script`` row by row."""

    def __init__(self, tokenizer, script: list[str], logprob: float = -0.5) -> None:
        object.__setattr__(self, "accessed", set())
        self._tok, self._script, self._logprob = tokenizer, script, logprob
        self._calls = 0
        self.syncs = 0

    def __getattribute__(self, name):
        if not name.startswith("_") and name not in ("accessed", "syncs"):
            object.__getattribute__(self, "accessed").add(name)
        return object.__getattribute__(self, name)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(name="scripted test engine", exact_logprobs=False, weight_sync="reload")

    def generate(self, prompts, params: SamplingParams, generator=None, *, row_seeds=None, record_routing=False):
        assert not record_routing
        eos = self._tok.eos_token_id
        texts = [self._script[(self._calls + i) % len(self._script)] for i in range(len(prompts))]
        self._calls += len(prompts)
        completions = []
        for text in texts:
            ids = self._tok(text, add_special_tokens=False)["input_ids"] + [eos]
            completions.append(ids[: params.max_new_tokens])
        width_p, width_t = max(map(len, prompts)), max(map(len, completions))
        pad = self._tok.pad_token_id
        prompt_ids = torch.full((len(prompts), width_p), pad)
        prompt_mask = torch.zeros((len(prompts), width_p), dtype=torch.bool)
        completion_ids = torch.full((len(prompts), width_t), pad)
        completion_mask = torch.zeros((len(prompts), width_t), dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            prompt_ids[i, width_p - len(p):], prompt_mask[i, width_p - len(p):] = torch.tensor(p), True
            completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), True
        truncated = torch.tensor([c[-1] != eos for c in completions])
        logprobs = torch.where(completion_mask, torch.full(completion_mask.shape, self._logprob), 0.0)
        return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs, truncated)

    def sync_weights(self, model) -> None:
        self.syncs += 1

    def close(self) -> None:
        pass


def _trainer(overrides, script, *extra):
    config = load_config(None, [*overrides, *extra])
    from gspo.models.load import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(config.model))
    engine = ScriptedEngine(tokenizer, script)
    return Trainer.from_config(config, None, engine=engine), engine


def test_scripted_engine_trains_through_the_interface_alone(tiny_overrides):
    # "11" scores 0.5 with the test reward `ones`, "2" scores 0: every group of 4 has signal
    trainer, engine = _trainer(tiny_overrides, ["11", "2", "1111111", "2"], "rollout.max_new_tokens=4")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert engine.accessed <= INTERFACE, f"the trainer reached past the engine interface: {engine.accessed - INTERFACE}"
    assert engine.syncs == 1  # weights pushed after the update
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    # the completion "1111111" + EOS is cut at 4 tokens: truncated, 4 tokens in its mask; "11" + EOS ends at EOS
    assert metrics["response/truncated_frac"] == pytest.approx(0.25)
    assert metrics["response/length_max"] == 4
    # not the float32 training module: pi_old is recomputed, and the scripted -0.5 log-probs show as mismatch
    assert trainer.old_logprobs_plan.source == "recompute"
    assert metrics["mismatch/token_abs_mean"] > 0.1
    assert metrics["reward/zero_std_frac"] == 0.0


def test_scripted_engine_completions_are_scored_as_scripted(tiny_overrides):
    trainer, _ = _trainer(tiny_overrides, ["11", "2", "11", "2"], "rollout.max_new_tokens=4")
    batch = trainer.collector.collect(trainer._take_shard(), seed=0)
    assert batch.completions[:4] == ["11", "2", "11", "2"]  # EOS is part of the mask, not of the text
    assert batch.rewards[:4].tolist() == [0.5, 0.0, 0.5, 0.0]
    assert batch.rollout.lengths[:4].tolist() == [3, 2, 3, 2]  # the EOS token counts in the response
    assert not bool(batch.rollout.truncated.any())
    torch.testing.assert_close(batch.advantages[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]) * 0.8660254,
                               rtol=1e-4, atol=1e-4)  # (r - 0.25) / std([.5, 0, .5, 0]) with Bessel


def test_no_signal_is_said_once_and_logged_every_step(tiny_overrides):
    trainer, _ = _trainer(tiny_overrides, ["2"], "steps=6")  # every reward 0: no group has any signal
    for _ in range(6):
        metrics = trainer.train_step()
        assert metrics["reward/zero_std_frac"] == 1.0
    assert len(trainer.notes) == 1 and "no learning signal" in trainer.notes[0]
    assert "reward function" in trainer.notes[0] and "answer_column" in trainer.notes[0]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_only_the_assembly_point_names_a_concrete_engine():
    concrete = ("gspo.rollout.hf", "gspo.rollout.native", "gspo.rollout.vllm")
    offenders = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC).as_posix()
        if relative.startswith("rollout/") or relative == "trainer/build.py":
            continue
        hits = sorted(n for n in _imports(path) if n.startswith(concrete))
        if hits:
            offenders.append(f"{relative}: {', '.join(hits)}")
    assert not offenders, "modules above the engines import a concrete engine:\n" + "\n".join(offenders)


def test_models_load_and_lora_do_not_import_each_other():
    load, lora = _imports(SRC / "models" / "load.py"), _imports(SRC / "models" / "lora.py")
    assert not any(n.startswith("gspo.models.load") for n in lora)
