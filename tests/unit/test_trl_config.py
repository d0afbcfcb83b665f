"""gspo.trl's GRPOConfig: TRL's names and defaults, and what each becomes in gspo's config (no model needed)."""

from __future__ import annotations

import pytest

from gspo.config.load import load_config
from gspo.errors import ConfigError
from gspo.trl.config import GRPOConfig
from gspo.trl.mapping import plan

GSPO_RECIPE = dict(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4)


def test_defaults_are_trls():  # TRL 1.16's GRPOConfig on transformers 5 (trl/trainer/grpo_config.py)
    args = GRPOConfig()
    assert (args.num_generations, args.learning_rate, args.max_completion_length, args.epsilon) == (8, 1e-6, 512, 0.2)
    assert (args.loss_type, args.importance_sampling_level, args.scale_rewards, args.beta) == ("dapo", "token",
                                                                                               "group", 0.0)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed) == (8, 1, 42)
    assert (args.gradient_checkpointing, args.logging_steps, args.lr_scheduler_type) == (True, 10, "linear")
    assert args.output_dir == "trainer_output"
    # TRL's derived batch: steps_per_generation defaults to gradient_accumulation_steps
    assert (args.steps_per_generation, args.generation_batch_size) == (1, 8)


def test_trls_batch_checks():
    args = GRPOConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert (args.steps_per_generation, args.generation_batch_size) == (2, 8)
    with pytest.raises(ConfigError, match="divisible by num_generations"):
        GRPOConfig(per_device_train_batch_size=6, num_generations=4)
    with pytest.raises(ConfigError, match="both"):
        GRPOConfig(generation_batch_size=16, steps_per_generation=2)
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"


def test_an_unknown_field_is_named_with_the_closest_one():
    with pytest.raises(ConfigError, match="num_generation.*Did you mean 'num_generations'"):
        GRPOConfig(num_generation=8)
    with pytest.raises(ConfigError, match="use_liger_kernel.*gspo_config"):
        GRPOConfig(use_liger_kernel=True)


def test_the_gspo_recipe_maps_to_gspo_with_trls_step_units():
    args = GRPOConfig(**GSPO_RECIPE, num_generations=8, per_device_train_batch_size=16, steps_per_generation=4,
                      num_iterations=2, max_steps=80, logging_steps=8, save_steps=40, learning_rate=1e-4)
    p = plan(args, train_rows=1000)
    o = p.overrides
    assert o["algorithm"] == "gspo" and (o["loss.clip_low"], o["loss.clip_high"]) == (3e-4, 4e-4)
    # 16 x 4 = 64 completions = 8 prompts x 8; 4 optimizer steps per batch, twice over: 8 TRL steps per gspo step
    assert (o["rollout.prompts_per_step"], o["rollout.group_size"], o["optim.minibatches"], o["optim.epochs"]) == \
        (8, 8, 4, 2)
    assert (p.updates_per_step, o["steps"], o["log.every"], o["checkpoint.every"]) == (8, 10, 1, 5)
    assert o["optim.micro_batch_size"] == 0 and o["optim.lr"] == 1e-4 and o["seed"] == 42
    assert not p.warnings
    config = load_config(None, [f"{k}={_text(v)}" for k, v in o.items() if k != "run_dir"])
    assert config.algorithm == "gspo" and config.steps == 10  # gspo's own validation accepts the result


def test_gradient_accumulation_becomes_micro_batches():
    o = plan(GRPOConfig(per_device_train_batch_size=8, gradient_accumulation_steps=4, max_steps=10),
             train_rows=100).overrides
    assert (o["rollout.prompts_per_step"], o["optim.minibatches"], o["optim.micro_batch_size"]) == (4, 1, 8)
    with pytest.raises(ConfigError, match="multiple of gradient_accumulation_steps"):
        plan(GRPOConfig(gradient_accumulation_steps=2, steps_per_generation=3, max_steps=3), train_rows=100)


def test_dapo_with_sequence_ratios_warns_and_runs_exact_gspo():
    p = plan(GRPOConfig(importance_sampling_level="sequence", max_steps=4), train_rows=100)  # TRL's default dapo
    assert p.overrides["algorithm"] == "gspo"
    text = " ".join(p.warnings)
    assert "length" in text and "algorithm=gspo" in text and "loss_type='grpo'" in text
    assert "3e-4" in text  # TRL's epsilon=0.2 on a sequence ratio: the clip the GSPO recipe uses instead


def test_token_level_losses_map_to_their_algorithms():
    def algorithm(**kw):
        return plan(GRPOConfig(max_steps=1, **kw), train_rows=100).overrides

    assert algorithm()["algorithm"] == "dapo" and algorithm()["loss.dynamic_sampling"] is False
    assert algorithm(loss_type="grpo")["algorithm"] == "grpo"
    assert algorithm(loss_type="dr_grpo")["algorithm"] == "dr_grpo"
    sapo = algorithm(loss_type="sapo", sapo_temperature_neg=2.0)
    assert sapo["algorithm"] == "sapo" and "tau_neg=2.0" in sapo["loss.params"] and "loss.clip_low" not in sapo
    cispo = algorithm(loss_type="cispo", epsilon_high=5.0)
    assert (cispo["loss.clip_low"], cispo["loss.clip_high"]) == (1.0, 4.0)  # weight in [0, 5], TRL's cap
    with pytest.raises(ConfigError, match="epsilon_high"):
        algorithm(loss_type="cispo")  # TRL would cap every weight at epsilon=0.2
    with pytest.raises(ConfigError, match="vespo"):
        algorithm(loss_type="vespo")
    with pytest.raises(ConfigError, match="sequence-level sapo"):
        algorithm(loss_type="sapo", importance_sampling_level="sequence")


@pytest.mark.parametrize("field, value, words", [
    ("min_p", 0.1, "min_p"), ("repetition_penalty", 1.1, "biased"), ("mask_truncated_completions", True,
                                                                      "overlong_buffer"),
    ("top_entropy_quantile", 0.2, "entropy"), ("fp16", True, "float16"), ("optim", "sgd", "AdamW"),
    ("lr_scheduler_type", "polynomial", "optim.schedule"), ("report_to", "comet_ml", "comet_ml"),
    ("shuffle_dataset", False, "shuffled"), ("delta", 1.5, "two-sided")])
def test_what_has_no_equivalent_is_refused_with_the_reason(field, value, words):
    with pytest.raises(ConfigError, match=f"{field}.*{words}|{words}.*{field}"):
        plan(GRPOConfig(max_steps=1, **{field: value}), train_rows=100)


def test_epochs_sampling_logging_and_vllm():
    p = plan(GRPOConfig(num_train_epochs=2, per_device_train_batch_size=16, temperature=0.7, top_k=20,
                        report_to=["tensorboard"], use_vllm=True, vllm_mode="server",
                        vllm_server_base_url="http://h:1", bf16=True), train_rows=50)
    o = p.overrides
    assert o["steps"] == 2 * (50 // 2)  # two passes over 50 prompts in rollout batches of 2 prompts
    assert (o["rollout.temperature"], o["rollout.top_k"], o["log.trackers"]) == (0.7, 20, ["tensorboard"])
    assert (o["rollout.engine"], o["rollout.server_url"], o["optim.dtype"]) == ("vllm-server", "http://h:1", "bfloat16")
    assert o["correction.mode"] == "seq_mis" and o["correction.high"] == 3.0  # TRL's default vLLM correction
    assert any("trl vllm-serve" in w for w in p.warnings)
    # TRL's 0.3 is not forced on gspo's sleeping engine: unset, gspo's auto share; a value is passed on
    assert "rollout.vllm_gpu_memory" not in o
    given = plan(GRPOConfig(max_steps=1, use_vllm=True, vllm_gpu_memory_utilization=0.5), train_rows=8)
    assert given.overrides["rollout.vllm_gpu_memory"] == 0.5
    assert plan(GRPOConfig(max_steps=1), train_rows=8).overrides["optim.dtype"] == "float32"  # bf16=None on a CPU
    # TRL's checkpointing (default on) is kept as given, not left to gspo's auto
    assert plan(GRPOConfig(max_steps=1), train_rows=8).overrides["optim.gradient_checkpointing"] == "true"
    off = plan(GRPOConfig(max_steps=1, gradient_checkpointing=False), train_rows=8)
    assert off.overrides["optim.gradient_checkpointing"] == "false"
    with pytest.raises(ConfigError, match="max_steps"):
        plan(GRPOConfig(), train_rows=None)


def test_gspo_config_applies_last():
    o = plan(GRPOConfig(max_steps=1, gspo_config={"loss.overlong_buffer": 4, "optim.lr": 3e-5}), train_rows=8)
    assert o.overrides["loss.overlong_buffer"] == 4 and o.overrides["optim.lr"] == 3e-5


@pytest.mark.parametrize("key, gspo_key", [("num_generations", "rollout.group_size"), ("learning_rate", "optim.lr"),
                                           ("rollout.max_completion_length", "rollout.max_new_tokens")])
def test_trl_names_in_gspos_config_point_at_gspos_keys(key, gspo_key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}=8"])
    leaf = key.rsplit(".", 1)[-1]
    assert f"Did you mean '{gspo_key}' (TRL's {leaf})?" in str(info.value)


def _text(value):
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "none" if value is None else str(value)
