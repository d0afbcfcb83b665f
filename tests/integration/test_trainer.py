"""The training loop on a tiny random model: every algorithm learns something, deterministically."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gspo.config import load_config
from gspo.trainer.old_logprobs import plan_old_logprobs
from gspo.trainer.trainer import Trainer

ALGORITHMS = ["gspo", "gspo_token", "grpo", "dapo"]


def _trainer(overrides, *extra):
    return Trainer.from_config(load_config(None, [*overrides, *extra]), run_dir=None)


def _comparable(*trainers):
    """Runs that differ by float rounding only: Adam's default eps (1e-8) turns that noise in a gradient element
    near zero into a step of up to the learning rate (one weight of 1024 moved 3e-5 at lr 1e-3); a larger eps
    compares the gradients, not Adam's scaling of noise."""
    for trainer in trainers:
        for group in trainer.parts.optimizer.param_groups:
            group["eps"] = 1e-4


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_steps_change_every_trainable_parameter(tiny_overrides, algorithm):
    trainer = _trainer(tiny_overrides, f"algorithm={algorithm}")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    for _ in range(2):
        metrics = trainer.train_step()
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"{algorithm}: parameters not updated: {unchanged}"
    assert trainer.state.step == 2
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))


def test_seeded_run_is_bit_for_bit_reproducible(tiny_overrides):
    runs = []
    for _ in range(2):
        trainer = _trainer(tiny_overrides)
        trainer.train_step()
        trainer.train_step()
        runs.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    for name, tensor in runs[0].items():
        assert torch.equal(tensor, runs[1][name]), name


def test_different_seed_gives_a_different_run(tiny_overrides):
    a, b = _trainer(tiny_overrides, "seed=1"), _trainer(tiny_overrides, "seed=2")
    a.train_step(), b.train_step()
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


@pytest.mark.parametrize("extra,source", [
    ((), "rollout"),  # auto, float32 sampler = the training module: the pass would only reproduce it
    (("rollout.engine_dtype=bfloat16",), "recompute"),  # a lower-precision sampler: recompute
    (("optim.dtype=bfloat16",), "recompute"),  # training in bfloat16 autocast: pi_old in that precision
    (("rollout.decoder=hf", "loss.old_logprobs=recompute"), "recompute"),  # explicit choices are kept
    (("optim.dtype=bfloat16", "loss.old_logprobs=rollout"), "rollout"),
])
def test_auto_old_logprobs_source(tiny_overrides, extra, source):
    trainer = _trainer(tiny_overrides, *extra)
    assert trainer.old_logprobs_plan.source == source
    metrics = trainer.train_step()
    # both ways the sampler/trainer mismatch is reported: from the no-grad pass, or from the on-policy forward
    assert {"mismatch/token_abs_mean", "mismatch/token_std", "mismatch/seq_std"} <= metrics.keys()


@pytest.mark.parametrize("source", ["recompute", "rollout"])
def test_rollout_and_recomputed_old_logprobs_agree(tiny_overrides, source):
    trainer = _trainer(tiny_overrides, f"loss.old_logprobs={source}")
    metrics = trainer.train_step()
    assert metrics["mismatch/token_abs_mean"] > 0  # measured, not a placeholder (float rounding differs)
    # the sampler (KV cache, incremental) and the trainer (one full forward) see the same weights
    assert metrics["mismatch/token_abs_mean"] < 1e-5
    assert metrics["mismatch/seq_std"] < 1e-5


def test_rollout_logprobs_mode_trains_like_recompute(tiny_overrides):
    a = _trainer(tiny_overrides, "loss.old_logprobs=recompute")
    b = _trainer(tiny_overrides, "loss.old_logprobs=rollout")
    _comparable(a, b)  # the two pi_old differ by float rounding
    a.train_step(), b.train_step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_later_minibatches_are_off_policy(tiny_overrides):
    trainer = _trainer(tiny_overrides, "optim.minibatches=4", "algorithm=grpo")
    trainer.train_step()
    first, *later = trainer.last_updates
    assert first["minibatch"] == 0
    assert first["logratio/token_std"] < 1e-6 and abs(first["ratio/max"] - 1) < 1e-5  # on-policy: ratio 1
    assert any(abs(m["ratio/max"] - 1) > 1e-6 or abs(m["ratio/min"] - 1) > 1e-6 for m in later)
    assert len(trainer.last_updates) == 4


def test_kl_to_reference_is_zero_at_start_and_grows(tiny_overrides):
    trainer = _trainer(tiny_overrides, "loss.beta=0.1")
    assert trainer.parts.reference is not None
    trainer.train_step()
    first = trainer.last_updates[0]
    assert abs(first["kl/ref"]) < 1e-6  # policy == reference before the first update
    trainer.train_step()
    assert trainer.last_updates[-1]["kl/ref"] > 0


def test_epochs_multiply_optimizer_steps(tiny_overrides):
    trainer = _trainer(tiny_overrides, "optim.epochs=2")
    trainer.train_step()
    assert len(trainer.last_updates) == 2 * 2


def test_micro_batches_give_the_same_update(tiny_overrides):
    a = _trainer(tiny_overrides)
    b = _trainer(tiny_overrides, "optim.micro_batch_size=2")
    _comparable(a, b)
    a.train_step(), b.train_step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("epochs", [1, 2])
def test_onpolicy_rows_reuse_the_first_forward_like_a_full_recompute(tiny_overrides, epochs):
    # The no-grad old-log-probability pass skips the first minibatch's rows; the first optimizer step fills
    # them in from its own forward (same weights), and later epochs must keep those values.
    reuse = _trainer(tiny_overrides, f"optim.epochs={epochs}")
    full = _trainer(tiny_overrides, f"optim.epochs={epochs}")
    whole_pass = full.parts.old_logprobs  # the public hook: a pass over every row, no on-policy reuse
    full.parts.old_logprobs = lambda batch, onpolicy=None, minibatches=None: whole_pass(batch, minibatches=minibatches)
    for _ in range(2):
        a, b = reuse.train_step(), full.train_step()
    assert a["ratio/outside_band_frac"] == pytest.approx(b["ratio/outside_band_frac"], abs=1e-6)
    for p, q in zip(reuse.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bfloat16_training_recomputes_old_logprobs_in_its_own_precision(tiny_overrides):
    # float32 old log-probabilities against bfloat16 training forwards would put rounding noise (~1e-3 per
    # token) into GSPO's sequence ratios, whose clip band is only 3e-4 / 4e-4 wide.
    trainer = _trainer(tiny_overrides, "optim.dtype=bfloat16")
    batch = trainer.collector.collect(trainer._take_shard(), seed=0)
    with trainer.updater.autocast("cpu"):
        inputs, _ = trainer.parts.old_logprobs(batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = trainer.policy(inputs.input_ids, inputs.attention_mask, inputs.completion_mask.shape[1])
    torch.testing.assert_close(inputs.old_logprobs, logprobs.float(), rtol=0, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_update(tiny_overrides):
    plain, checkpointed = _trainer(tiny_overrides), _trainer(tiny_overrides, "optim.gradient_checkpointing=true")
    layers = checkpointed.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(layer.gradient_checkpointing for layer in plain.model.model.layers)
    _comparable(plain, checkpointed)
    for _ in range(2):
        plain.train_step(), checkpointed.train_step()
    for p, q in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_shared_prompt_forwards_give_the_same_update_with_fewer_prompt_rows(tiny_overrides):
    # optim.share_prompts (default on): each distinct prompt of a minibatch runs once; the update is the
    # one-forward-per-response update up to float rounding.
    shared, plain = _trainer(tiny_overrides), _trainer(tiny_overrides, "optim.share_prompts=false")
    rows = {"shared": [], "plain": []}
    for name, trainer in (("shared", shared), ("plain", plain)):
        trainer.model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs, seen=rows[name]: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    _comparable(shared, plain)
    for _ in range(2):
        shared.train_step(), plain.train_step()
    for p, q in zip(shared.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # 16 responses of 4 prompts in 2 minibatches of 8: the plain run's training forwards are 8 rows each,
    # the shared run's first forward of each minibatch holds at most its 4 distinct prompts
    assert set(rows["plain"]) == {8}
    assert max(rows["shared"][0::2]) <= 4 and set(rows["shared"][1::2]) == {8}


def test_pi_old_and_the_reference_are_the_deterministic_policy_under_dropout(tiny_overrides, tiny_model_dir, tmp_path):
    # With dropout (the model's attention dropout and LoRA's) the no-grad passes run in eval mode, as verl's
    # compute_log_prob and TRL's reference model do: pi_old is the policy the engine samples from (eval mode),
    # not one dropout sample per pass; only training forwards drop out.
    model_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    overrides = [o for o in tiny_overrides if not o.startswith("model=")]
    trainer = _trainer(overrides, f"model={model_dir}", "lora.rank=4", "lora.dropout=0.5", "loss.beta=0.1",
                       "loss.old_logprobs=recompute")
    assert not trainer.old_logprobs_plan.reuse_onpolicy  # a train-mode forward is a dropout sample, not pi_old
    batch = trainer.collector.collect(trainer._take_shard(), seed=0)
    mask = batch.rollout.completion_mask
    first, _ = trainer.parts.old_logprobs(batch, onpolicy=torch.arange(len(mask)) % 2 == 0)
    second, _ = trainer.parts.old_logprobs(batch)
    assert first.reuse_old is None  # every row recomputed
    assert torch.equal(first.old_logprobs, second.old_logprobs) and torch.equal(first.ref_logprobs, second.ref_logprobs)
    torch.testing.assert_close(first.old_logprobs[mask], batch.rollout.logprobs[mask], rtol=0, atol=1e-5)
    assert trainer.model.training  # training forwards still drop out
    # auto: the float32 sampler's log-probabilities are pi_old's; the first training forward measures nothing
    auto = plan_old_logprobs("auto", engine=trainer.parts.engine.info, training_dtype="float32", dropout=True,
                             moe=False)
    assert auto.source == "rollout" and not auto.measure_onpolicy
