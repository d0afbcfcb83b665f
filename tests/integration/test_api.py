"""The Python API a TRL user recognises: in-memory data, lambda and batched rewards, callbacks, resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import gspo
from gspo.errors import ConfigError, RunInterrupted


def _config(tiny_overrides, tmp_path, **extra):
    keep = [o for o in tiny_overrides if not o.startswith(("reward.", "model="))]
    config = dict(o.split("=", 1) for o in keep)
    config.update({"run_dir": str(tmp_path / "run"), "eval.size": 4, **extra})
    return config


ROWS = [{"question": f"{a}+{b}=", "target": str(a + b)} for a in range(6) for b in range(5)]


def test_in_memory_rows_lambda_and_batched_rewards_and_callbacks(tiny_model_dir, tiny_overrides, tmp_path):
    seen = {"steps": [], "evals": [], "saves": [], "batch_columns": set()}

    def ones_batched(prompts, completions, **columns):  # TRL's convention: lists in, a list out
        seen["batch_columns"].update(columns)
        return [c.count("1") / 4.0 for c in completions]

    class Recorder:
        def on_step(self, trainer, step, metrics):
            seen["steps"].append((step, metrics["reward/mean"]))

        def on_eval(self, trainer, step, metrics):
            seen["evals"].append(step)

        def on_save(self, trainer, step, path):
            seen["saves"].append(path)

    prompts = []
    trainer = gspo.Trainer(
        model=str(tiny_model_dir), train_dataset=ROWS, prompt_column="question", answer_column="target",
        rewards=[ones_batched, lambda prompt, completion, answer, **_: prompts.append(prompt) or 0.0],
        reward_weights=[1.0, 0.5], config=_config(tiny_overrides, tmp_path, steps=2), callbacks=[Recorder()])
    summary = trainer.train()
    assert [s for s, _ in seen["steps"]] == [1, 2] and seen["evals"] == [0, 2]
    assert seen["saves"] and all(p.exists() for p in seen["saves"])
    assert {"answer", "target"} <= seen["batch_columns"]  # every column of the rows, as lists
    assert set(prompts) <= {r["question"] for r in ROWS}  # the prompt text, in training and evaluation alike
    assert summary["steps"] == 2 and (tmp_path / "run" / "summary.json").exists()
    held_out = {r["prompt"] for r in trainer._replace["task"].eval_rows}  # held out, never trained on
    assert len(held_out) == 4
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and not any(s["prompt"] in held_out for s in samples)
    assert set(trainer.evaluate()) >= {"eval/accuracy", "eval/greedy_accuracy"}


def test_a_loaded_model_and_tokenizer_train_in_memory(tiny_model_dir, tiny_overrides, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = gspo.Trainer(model=model, tokenizer=tokenizer, train_dataset=ROWS, prompt_column="question",
                           answer_column="target", rewards=[lambda prompt, completion, **_: completion.count("1") / 4],
                           config=_config(tiny_overrides, tmp_path, steps=1))
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the object itself trained


def test_a_loaded_model_without_its_tokenizer_is_a_clear_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match="needs its tokenizer"):
        gspo.Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_ctrl_c_in_a_notebook_saves_and_raises_instead_of_exiting(tiny_model_dir, tiny_overrides, tmp_path):
    class Interrupt:
        def on_step(self, trainer, step, metrics):
            if step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # as a notebook's stop button does

    config = _config(tiny_overrides, tmp_path, steps=3)
    trainer = gspo.Trainer(model=str(tiny_model_dir), train_dataset=ROWS, prompt_column="question",
                           answer_column="target", rewards=[lambda prompt, completion, **_: completion.count("1") / 4],
                           config=config, callbacks=[Interrupt()])
    with pytest.raises(RunInterrupted) as stop:  # a KeyboardInterrupt, never SystemExit
        trainer.train()
    assert isinstance(stop.value, KeyboardInterrupt) and stop.value.exit_code == 130
    assert "Resume with: trainer.train(resume=True)" in str(stop.value) and "gspo train" not in str(stop.value)
    assert trainer.train(resume=True)["steps"] == 3  # the same object resumes
    resumed = gspo.Trainer(model=str(tiny_model_dir), train_dataset=ROWS, prompt_column="question",
                           answer_column="target",
                           rewards=[lambda prompt, completion, **_: completion.count("1") / 4], config=config)
    assert resumed.train(resume=True)["steps"] == 3  # so does a new one on the run directory (nothing left to do)


def test_config_forms_agree(tmp_path):
    from gspo.api import make_config

    nested = make_config({"algorithm": "grpo", "rollout": {"group_size": 4}})
    dotted = make_config({"algorithm": "grpo", "rollout.group_size": 4})
    listed = make_config(["algorithm=grpo", "rollout.group_size=4"])
    assert nested == dotted == listed
    with pytest.raises(ConfigError, match="grpo"):
        make_config({"algorithm": "gpro"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["list", "datasets.Dataset"])
def test_a_reward_named_by_string_with_in_memory_rows_resolves_at_once(form, tiny_model_dir, tmp_path, monkeypatch):
    """A ``module:function`` or built-in name resolves without building (or streaming) any task's rows; it
    once built the default arithmetic task with eval_size=0, whose held-out scan never ended."""
    monkeypatch.chdir(tmp_path)  # my_rewards.py beside the user, as the README's own-data walkthrough has it
    (tmp_path / "my_rewards.py").write_text("def exact(prompt, completion, answer, **_):\n"
                                            "    return float(completion.strip() == answer)\n")
    rows = [{"prompt": f"{a}+1=", "answer": str(a + 1)} for a in range(20)]
    if form != "list":
        rows = pytest.importorskip("datasets").Dataset.from_list(rows)
    trainer = gspo.Trainer(model=str(tiny_model_dir), train_dataset=rows, rewards=["my_rewards:exact", "exact_match"],
                           reward_weights=[1.0, 0.5], config={"run_dir": str(tmp_path / "run")})
    rewards = trainer._replace["rewards"]
    assert [(r.name, r.weight) for r in rewards] == [("my_rewards:exact", 1.0), ("exact_match", 0.5)]
    assert rewards[0].fn("1+1=", " 2", answer="2") == 1.0


@pytest.mark.timeout(30)
def test_a_reward_name_without_a_dataset_resolves_against_the_default_task_without_its_rows():
    from gspo.tasks.base import first_distinct
    import itertools

    assert first_distinct(itertools.repeat({"prompt": "x"}), 0) == []  # an endless stream, nothing to take
    trainer = gspo.Trainer(rewards=["exact_answer"])
    assert [r.name for r in trainer._replace["rewards"]] == ["exact_answer"]
