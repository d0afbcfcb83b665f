"""The objective registry (gspo.algorithms.registry): names, paper defaults, the calling convention the
trainer relies on, and the error for an unknown name."""

from __future__ import annotations

import inspect

import pytest
import torch

from gspo import OBJECTIVES, Objective, get_objective
from gspo.algorithms.registry import COMMON_KEYWORDS, NORMALISERS

PAPER_DEFAULTS = {
    "gspo": ("num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4}),
    "gspo_token": ("num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4}),
    "grpo": ("num_sequences", {"clip_low": 0.2, "clip_high": 0.2}),
    "dapo": ("num_tokens", {"clip_low": 0.2, "clip_high": 0.28}),
    "dr_grpo": ("num_sequences", {"clip_low": 0.2, "clip_high": 0.2}),
    "cispo": ("num_tokens", {"clip_low": 1.0, "clip_high": 3.0}),
    "sapo": ("num_sequences", {"tau_pos": 1.0, "tau_neg": 1.05}),
    "gmpo": ("num_sequences", {"clip_low": 0.4, "clip_high": 0.4}),
    "dppo_tv": ("num_tokens", {"delta_low": 0.2, "delta_high": 0.2, "max_ratio": 10.0}),
    "dppo_kl": ("num_tokens", {"delta_low": 0.05, "delta_high": 0.05, "max_ratio": 10.0}),
    "luspo": ("num_sequences", {"clip_low": 3e-4, "clip_high": 4e-4}),
}


def test_the_table_holds_every_objective_with_its_paper_defaults():
    assert list(OBJECTIVES) == list(PAPER_DEFAULTS)
    for name, (normaliser, hyperparameters) in PAPER_DEFAULTS.items():
        objective = get_objective(name)
        assert isinstance(objective, Objective) and objective.name == name
        assert objective.normaliser == normaliser in NORMALISERS
        assert dict(objective.hyperparameters) == hyperparameters, name
        assert objective.paper and objective.summary and "\n" not in objective.summary
    assert [n for n, o in OBJECTIVES.items() if o.dynamic_sampling] == ["dapo"]
    assert [n for n, o in OBJECTIVES.items() if o.needs_max_length] == ["dr_grpo"]
    with pytest.raises(TypeError):
        OBJECTIVES["gspo"].hyperparameters["clip_low"] = 0.2  # read-only
    with pytest.raises(TypeError):
        OBJECTIVES["x"] = OBJECTIVES["gspo"]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_loss_takes_the_common_keywords_and_only_declared_tunables(name):
    objective = OBJECTIVES[name]
    params = inspect.signature(objective.loss).parameters
    keyword_only = {k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    expected = {*objective.hyperparameters, objective.normaliser, *COMMON_KEYWORDS}
    if objective.needs_max_length:
        expected.add("max_length")
    assert keyword_only == expected
    assert params["correction"].default is None and params["ref_logprobs"].default is None
    assert params["beta"].default == 0.0 and params["kl_estimator"].default == "k3"
    assert params[objective.normaliser].default is None
    assert list(params)[:4] == ["logprobs", "old_logprobs", "advantages", "mask"]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_calling_through_the_registry_with_the_trainer_inputs(name):
    """What the lead's trainer does: hyperparameters + global normaliser + reference + correction."""
    objective = OBJECTIVES[name]
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(4)[None, :] < torch.tensor([4, 2, 0])[:, None]  # (B, T)
    old = -torch.rand(3, 4, generator=g) - 0.1
    logprobs = (old + 0.05 * torch.randn(3, 4, generator=g)).requires_grad_()
    counts = {"num_sequences": int(mask.any(-1).sum()), "num_tokens": int(mask.sum())}
    kwargs = {**objective.hyperparameters, objective.normaliser: counts[objective.normaliser],
              "ref_logprobs": old, "beta": 0.01, "correction": mask.float()}
    if objective.needs_max_length:
        kwargs["max_length"] = 4
    advantages = torch.tensor([1.0, -1.0, 0.0])
    out = objective.loss(logprobs, old, advantages, mask, **kwargs)
    default = objective.loss(logprobs, old, advantages, mask,
                             **{k: v for k, v in kwargs.items() if k not in objective.hyperparameters})
    assert torch.equal(out.loss, default.loss)  # registry defaults == the function's own defaults
    out.loss.backward()
    assert torch.isfinite(logprobs.grad).all() and bool((logprobs.grad[~mask] == 0).all())
    assert "loss/kl" in out.metrics
    token_adv = advantages[:, None].expand(3, 4)
    if objective.token_advantages:
        torch.testing.assert_close(objective.loss(logprobs, old, token_adv, mask, **kwargs).loss, out.loss)
    else:
        with pytest.raises(ValueError, match="advantages has shape"):
            objective.loss(logprobs, old, token_adv, mask, **kwargs)


def test_unknown_names_list_the_allowed_ones_and_the_closest():
    with pytest.raises(ValueError, match=r"unknown objective 'gpso'.*gspo, gspo_token.*did you mean 'gspo'\?"):
        get_objective("gpso")
    with pytest.raises(ValueError, match="did you mean 'dppo_tv'"):
        get_objective("dppo-tv")
    with pytest.raises(ValueError, match="allowed") as info:
        get_objective("zzz")
    assert "did you mean" not in str(info.value)
