"""Top-k / top-p sampling must not bias the ratio: the trainer's log-probabilities are those of the
truncated, renormalised distribution the sampler drew from (gspo.logprobs.truncated_log_softmax)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from gspo.logprobs import (
    _ChunkedLinearLogprobs,
    token_logprobs,
    token_logprobs_reference,
    truncated_log_softmax,
    truncation_mask,
)
from gspo.logprobs_support import token_logprobs_on_support, truncation_support

VOCAB, PROMPT_LEN, COMPLETION_LEN, TEMPERATURE = 32, 4, 6, 0.8
SETTINGS = [(5, 1.0), (0, 0.8), (8, 0.9)]


def tiny_qwen3(seed: int = 0) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    torch.manual_seed(seed)
    return transformers.Qwen3ForCausalLM(config)


@torch.no_grad()
def sample(model, top_k, top_p, seed=0):
    """(B, P + T) ids sampled token by token from the truncated distribution, and the sampler's (B, T)
    log-probabilities of them (the same helper the engine should call)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (3, PROMPT_LEN), generator=g)  # (B, P)
    sampler_logprobs = []
    for _ in range(COMPLETION_LEN):
        logits = model(input_ids=ids).logits[:, -1].float() / TEMPERATURE  # (B, V)
        log_probs = truncated_log_softmax(logits, top_k, top_p)  # (B, V)
        tokens = torch.multinomial(log_probs.exp(), 1, generator=g)  # (B, 1)
        sampler_logprobs.append(log_probs.gather(1, tokens))
        ids = torch.cat([ids, tokens], dim=1)
    return ids, torch.cat(sampler_logprobs, dim=1)  # (B, L), (B, T)


@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_truncation_mask_is_the_samplers_support(top_k, top_p):
    from gspo.rollout.hf import _filtered_logits
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, VOCAB, generator=g) * 2  # (B, V)
    kept = torch.isfinite(_filtered_logits(logits.clone(), top_k, top_p))
    assert torch.equal(truncation_mask(logits, top_k, top_p), kept)
    assert bool((kept.sum(-1) < VOCAB).all())  # the truncation bites
    log_probs = truncated_log_softmax(logits, top_k, top_p)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(16))  # renormalised over the support
    assert bool(torch.isinf(log_probs[~kept]).all())


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_on_policy_ratio_is_one_with_truncation_and_biased_without(top_k, top_p, chunked):
    model = tiny_qwen3()
    ids, sampler = sample(model, top_k, top_p)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        trainer = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, top_k=top_k,
                                 top_p=top_p, chunked=chunked)
        full = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, chunked=chunked)
    torch.testing.assert_close(torch.exp(trainer - sampler), torch.ones_like(sampler), rtol=0, atol=1e-5)
    assert float((sampler - full).min()) > 1e-3  # the full-vocabulary log-softmax is biased low everywhere


@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_gradient_is_the_truncated_policys(top_k, top_p):
    """d log p_S(y) / dz = (onehot(y) - p_S) / tau on the support S, 0 off it; float64."""
    g = torch.Generator().manual_seed(2)
    z = (torch.randn(5, VOCAB, generator=g, dtype=torch.float64) * 2).requires_grad_()
    keep = truncation_mask(z.detach() / TEMPERATURE, top_k, top_p)  # (B, V)
    targets = keep.double().multinomial(1, generator=g).squeeze(1)  # (B,) inside the support
    logp = truncated_log_softmax(z / TEMPERATURE, top_k, top_p).gather(1, targets[:, None]).squeeze(1)  # (B,)
    (grad,) = torch.autograd.grad(logp.sum(), z)
    p_s = torch.where(keep, torch.softmax(z.detach() / TEMPERATURE, -1), 0.0)
    p_s = p_s / p_s.sum(-1, keepdim=True)
    expected = (F.one_hot(targets, VOCAB).double() - p_s) / TEMPERATURE
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert bool((grad[~keep] == 0).all())


@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_chunked_backward_matches_autograd_of_the_truncated_log_softmax(top_k, top_p):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(VOCAB, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        keep = truncation_mask(F.linear(hidden, weight, bias) / TEMPERATURE, top_k, top_p)
    targets = keep.double().multinomial(1, generator=g).squeeze(1)  # (N,)
    out = _ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, TEMPERATURE, 3, (top_k, top_p))
    ref = truncated_log_softmax(F.linear(hidden, weight, bias) / TEMPERATURE, top_k, top_p)
    ref = ref.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(-1, 2, 7, dtype=torch.float64)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight, bias))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight, bias))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_and_full_logits_paths_agree_with_truncation():
    model = tiny_qwen3(seed=4)
    ids, _ = sample(model, 8, 0.9, seed=4)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, -2:] = False  # a completion that ended early
    a = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, top_k=8, top_p=0.9, chunk_size=4)
    b = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, top_k=8, top_p=0.9, chunked=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert bool((a[~mask[:, -COMPLETION_LEN:]] == 0).all())


@pytest.mark.parametrize("support_chunked", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("top_k, top_p", SETTINGS)
def test_reference_over_the_policys_support(top_k, top_p, chunked, support_chunked):
    """The KL reference (review D9): renormalised over the policy's support it equals the policy's own
    truncated log-probabilities when it is the same model (bit for bit on the same path: kl/ref = 0), and
    for another model it is finite on every token the policy can sample, and normalised over that support."""
    policy, other = tiny_qwen3(seed=5), tiny_qwen3(seed=6)
    ids, _ = sample(policy, top_k, top_p, seed=5)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, -3:] = False  # a completion that ended early
    kwargs = {"temperature": TEMPERATURE, "top_k": top_k, "top_p": top_p}
    with torch.no_grad():
        support = truncation_support(policy, ids, mask, COMPLETION_LEN, chunked=support_chunked, **kwargs)
        own = token_logprobs(policy, ids, mask, COMPLETION_LEN, chunked=chunked, **kwargs)
        same = token_logprobs_on_support(policy, ids, mask, COMPLETION_LEN, support, chunk_size=4, chunked=chunked)
        ref = token_logprobs_on_support(other, ids, mask, COMPLETION_LEN, support, chunked=chunked)
        own_ref = token_logprobs(other, ids, mask, COMPLETION_LEN, chunked=chunked, **kwargs)
    if chunked == support_chunked:
        assert torch.equal(same, own)
    torch.testing.assert_close(same, own, rtol=0, atol=1e-6)
    real = mask[:, -COMPLETION_LEN:]
    assert bool(torch.isfinite(ref).all()) and bool((ref[~real] == 0).all())
    assert bool((ref[real] < 0).all()) and not torch.equal(ref, own_ref)
    # normalised over the policy's support: the chosen token's value from a full-vocabulary softmax
    logits = other(input_ids=ids, attention_mask=mask).logits[:, -COMPLETION_LEN - 1:-1].float() / TEMPERATURE
    keep = truncation_mask(policy(input_ids=ids, attention_mask=mask).logits[:, -COMPLETION_LEN - 1:-1].float()
                           / TEMPERATURE, top_k, top_p)  # (B, T, V) the policy's support
    expected = logits.masked_fill(~keep, float("-inf")).log_softmax(-1).gather(-1, ids[:, -COMPLETION_LEN:, None])
    torch.testing.assert_close(ref[real], expected.squeeze(-1)[real], rtol=1e-5, atol=1e-5)


def test_defaults_are_bit_identical_and_bad_values_rejected():
    model = tiny_qwen3(seed=5)
    ids, _ = sample(model, 0, 1.0, seed=5)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        plain = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE)
        off = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE, top_k=0, top_p=1.0)
        ref = token_logprobs_reference(model, ids, mask, COMPLETION_LEN, temperature=TEMPERATURE)
    assert torch.equal(plain, off)
    torch.testing.assert_close(plain, ref)
    with pytest.raises(ValueError, match="top_p must be in"):
        token_logprobs(model, ids, mask, COMPLETION_LEN, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        truncated_log_softmax(torch.zeros(2, VOCAB), top_k=-1)
