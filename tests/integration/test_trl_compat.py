"""TRL scripts on gspo (gspo.trl): the examples run unchanged but for the import, and the compat entry
point keeps TRL's contracts (batched rewards, callbacks with state/control, save_model)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gspo
from gspo.errors import ConfigError
from gspo.trl import GRPOConfig, GRPOTrainer, TRLCompatWarning

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY_ARITH = Path(gspo.__file__).parent / "assets" / "tiny-arith"
FAST = dict(num_generations=4, per_device_train_batch_size=8, max_completion_length=6, learning_rate=1e-3,
            bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1)
ROWS = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "level": a % 3} for a in range(8) for b in range(6)]


def _run_example(name: str, tmp_path: Path, monkeypatch, steps: int) -> dict:
    monkeypatch.setenv("GRPO_MAX_STEPS", str(steps))
    monkeypatch.setenv("GRPO_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def _changed(before: dict, after: dict) -> int:
    return sum(not torch.equal(before[k], after[k]) for k in before)


def test_quickstart_trains_logs_rewards_and_saves_a_loadable_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    scope = _run_example("trl_grpo_quickstart.py", tmp_path, monkeypatch, steps=8)  # 2 rollout batches x 4
    trainer, out = scope["trainer"], tmp_path / "out"
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert trainer.state.global_step == 8 and [h["step"] for h in logs] == [4, 8]  # TRL's optimizer steps
    assert all(0.0 <= h["reward"] <= 1.0 and "rewards/exact_sum/mean" in h for h in logs)
    assert trainer.config.algorithm == "gspo" and trainer.config.optim.minibatches == 4
    base, saved = load_file(TINY_ARITH / "model.safetensors"), load_file(out / "model.safetensors")
    assert _changed(base, saved) > len(base) // 2  # most tensors moved
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache  # the saved model generates with a cache, whatever training used
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 8
    assert (out / "gspo" / "metrics.jsonl").exists() and (out / "gspo" / "config.json").exists()


def test_lora_script_with_two_rewards_callback_and_adapter(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    scope = _run_example("trl_grpo_lora_callbacks.py", tmp_path, monkeypatch, steps=4)
    trainer, out, watch = scope["trainer"], tmp_path / "out", scope["trainer"].callbacks[0]
    assert [s for s, _ in watch.history] == [2, 4]  # on_log every logging_steps=2 optimizer steps
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert {"rewards/correct/mean", "rewards/close/mean", "numeric_fraction"} <= set(logs[-1])  # log_metric too
    assert trainer.config.lora.rank == 8 and trainer.config.lora.target_modules == ["k_proj", "o_proj", "q_proj",
                                                                                      "v_proj"]
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(TINY_ARITH)
    merged = PeftModel.from_pretrained(base, out).merge_and_unload()
    original = load_file(TINY_ARITH / "model.safetensors")
    assert _changed(original, {k: v for k, v in merged.state_dict().items() if k in original}) > 0


def test_loaded_model_list_dataset_and_eval_set(tmp_path, monkeypatch):
    scope = _run_example("trl_grpo_loaded_model.py", tmp_path, monkeypatch, steps=2)
    trainer = scope["trainer"]
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert [h["step"] for h in evals][:1] == [0] and len(evals) >= 2  # before and after training
    assert trainer.config.loss.beta == 0.01 and trainer.config.eval.size == 32
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_rewards_are_called_once_per_batch_with_trls_arguments(tiny_model_dir, tmp_path, capfd):
    calls = []

    def reward(prompts, completions, completion_ids, trainer_state, level, answer, **kwargs):
        calls.append((len(prompts), trainer_state.global_step, list(level), completion_ids))
        assert {"log_metric", "log_extra"} <= set(kwargs) and len(completion_ids) == len(completions)
        return [None if i % 4 == 0 else float(len(c)) / 6 for i, c in enumerate(completions)]

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=2, **FAST)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=reward, args=args, train_dataset=ROWS)
    trainer.train()
    assert [(n, step) for n, step, _, _ in calls] == [(8, 0), (8, 1)]  # one call per rollout batch of 2 x 4
    assert all(isinstance(v, int) for _, _, levels, _ in calls for v in levels)  # columns arrive as lists
    assert all(isinstance(ids, list) and all(isinstance(t, int) for t in ids) for *_, batch in calls for ids in batch)
    said = capfd.readouterr().err  # no eval_dataset: no held-out accuracy (of 0%) reported; where the run went is
    assert "accuracy" not in said and f"trained 2 steps (no held-out rows to evaluate)  ->  {tmp_path}" in said


def test_conversational_prompts_reach_rewards_as_messages(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    seen = {}

    def reward(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [0.0] * len(completions)

    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in ROWS]
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, **FAST)
    GRPOTrainer(model=str(tiny_model_dir), processing_class=tokenizer, reward_funcs=reward, args=args,
                train_dataset=rows).train()
    assert seen["prompt"][0]["role"] == "user" and seen["completion"][0]["role"] == "assistant"


def test_callbacks_get_state_and_control_and_can_stop_training(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback, TrainerControl, TrainerState

    events = []

    class Stopper(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            events.append(("begin", state.global_step, model is not None))

        def on_step_end(self, args, state, control, **kwargs):
            assert isinstance(state, TrainerState) and isinstance(control, TrainerControl)
            events.append(("step", state.global_step))
            control.should_training_stop = state.global_step >= 2

        def on_save(self, args, state, control, **kwargs):
            events.append(("save", state.global_step))

        def on_train_end(self, args, state, control, **kwargs):
            events.append(("end", state.global_step))

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=6, **FAST)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=lambda prompts, completions, **_: [1.0] *
                          len(completions), args=args, train_dataset=ROWS, callbacks=[Stopper])
    result = trainer.train()
    assert events == [("begin", 0, True), ("step", 1), ("step", 2), ("save", 2), ("end", 2)]
    assert result.global_step == 2 and trainer.summary["steps"] == 2  # stopped after step 2 of 6, saved


def test_refusals_name_the_argument(tiny_model_dir, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, **FAST)

    def ok(prompts, completions, **_):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match="max_prompt_length=3"):
        GRPOTrainer(model=str(tiny_model_dir), reward_funcs=ok, train_dataset=ROWS,
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, max_prompt_length=3, **FAST))
    with pytest.raises(ConfigError, match="local directories only"):
        GRPOTrainer(model=str(tiny_model_dir), reward_funcs="org/reward-model", args=args, train_dataset=ROWS)
    with pytest.raises(ConfigError, match="tools"):
        GRPOTrainer(model=str(tiny_model_dir), reward_funcs=ok, args=args, train_dataset=ROWS, tools=[print])
    with pytest.warns(TRLCompatWarning, match="not GSPO"):
        GRPOTrainer(model=str(tiny_model_dir), reward_funcs=ok, train_dataset=ROWS,
                    args=GRPOConfig(output_dir=str(tmp_path), max_steps=1, importance_sampling_level="sequence",
                                    epsilon=3e-4, epsilon_high=4e-4, **FAST))  # TRL's default loss_type="dapo"


def test_a_reward_model_directory_scores_with_a_function(tiny_model_dir, tmp_path):
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from gspo.models.tiny import build_char_tokenizer

    tokenizer, rm = build_char_tokenizer(), tmp_path / "rm"
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    Qwen3ForSequenceClassification(config).save_pretrained(rm)
    tokenizer.save_pretrained(rm)

    def one(prompts, completions, **_):
        return [1.0] * len(completions)

    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, reward_weights=[1.0, 0.5], **FAST)
    trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=[one, str(rm)], args=args, train_dataset=ROWS)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reward" in h][-1]
    assert logs["rewards/one/mean"] == 1.0 and "rewards/rm/mean" in logs  # named by its directory, as TRL
    assert logs["reward"] == pytest.approx(1.0 + 0.5 * logs["rewards/rm/mean"], abs=1e-5)


def test_a_second_run_into_the_same_output_dir_starts_afresh_unless_resumed(tiny_model_dir, tmp_path):
    def one(prompts, completions, **_):
        return [1.0] * len(completions)

    def run(steps, resume=None):
        args = GRPOConfig(output_dir=str(tmp_path), max_steps=steps, **{**FAST, "save_strategy": "steps",
                                                                           "save_steps": 1})
        trainer = GRPOTrainer(model=str(tiny_model_dir), reward_funcs=one, args=args, train_dataset=ROWS)
        trainer.train(resume_from_checkpoint=resume)
        return sorted(p.name for p in (tmp_path / "gspo" / "checkpoints").glob("step-*"))

    assert run(3) == ["step-00000002", "step-00000003"]  # keep_last=2
    with pytest.warns(TRLCompatWarning, match="replacing the previous run"):
        assert run(1) == ["step-00000001"]  # no step 2 or 3 of the old run left to resume from by mistake
    assert run(2, resume=True) == ["step-00000001", "step-00000002"]
