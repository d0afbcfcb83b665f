"""Shared prompts (gspo.logprobs.shared_prompt_hidden): each distinct prompt runs once, value and gradient
unchanged.

The reference is the one-forward path of the same function (itself checked against full logits in
test_logprobs.py), in float64. transformers' RMSNorm computes in float32 whatever the model's dtype, so
gradients (whose sums run in a different order: a prompt's gradient is summed over its responses by the
cache expansion) agree to float32 rounding, ~1e-7 of their size; a missing or doubled response would be
off by whole multiples of a response's share.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from gspo.logprobs import shared_prompt_hidden, token_logprobs

VOCAB, PROMPT_LEN, COMPLETION_LEN = 32, 6, 7


def tiny_qwen3(**overrides) -> transformers.Qwen3ForCausalLM:
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config).double()


def grouped_batch(groups: int = 3, group_size: int = 4, seed: int = 0):
    """(B, P + T) ids and mask of ``groups`` prompts x ``group_size`` responses, rows shuffled: prompts of
    different lengths (left padding), completions of different lengths (right padding, the last column
    padding in every row), junk token ids under the padding."""
    gen = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for g in range(groups):
        prompt_len = PROMPT_LEN - g  # ragged prompts: 6, 5, 4 tokens
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=gen)
        for _ in range(group_size):
            ids = torch.randint(1, VOCAB, (PROMPT_LEN + COMPLETION_LEN,), generator=gen)  # junk everywhere
            mask = torch.zeros(PROMPT_LEN + COMPLETION_LEN, dtype=torch.bool)
            ids[PROMPT_LEN - prompt_len : PROMPT_LEN] = prompt
            mask[PROMPT_LEN - prompt_len : PROMPT_LEN] = True
            length = int(torch.randint(1, COMPLETION_LEN, (1,), generator=gen))  # < T: a trailing padding column
            mask[PROMPT_LEN : PROMPT_LEN + length] = True
            rows.append(ids)
            masks.append(mask)
    order = torch.randperm(len(rows), generator=gen)
    return torch.stack(rows)[order], torch.stack(masks)[order]


def value_and_grads(model, ids, mask, **kwargs):
    model.zero_grad()
    logprobs = token_logprobs(model, ids, mask, COMPLETION_LEN, temperature=0.7, **kwargs)  # (B, T)
    weights = torch.linspace(-1.0, 2.0, logprobs.numel(), dtype=logprobs.dtype).view_as(logprobs)
    (logprobs * weights).sum().backward()
    return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def prompt_rows_seen(model, fn):
    """Row counts of every decoder-body forward that ``fn`` runs."""
    seen = []
    handle = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_shared_prompts_match_one_forward_in_value_and_gradient():
    model = tiny_qwen3()
    ids, mask = grouped_batch()
    plain, plain_grads = value_and_grads(model, ids, mask)
    shared, shared_grads = value_and_grads(model, ids, mask, share_prompts=True)
    torch.testing.assert_close(shared, plain, rtol=0, atol=1e-10)
    assert (shared[~mask[:, -COMPLETION_LEN:]] == 0).all()
    assert shared_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(shared_grads[name], plain_grads[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_each_distinct_prompt_runs_once_and_only_used_columns_run():
    model = tiny_qwen3()
    ids, mask = grouped_batch(groups=3, group_size=4)
    seen = prompt_rows_seen(model, lambda: token_logprobs(model, ids, mask, COMPLETION_LEN, share_prompts=True))
    used_t = int(mask[:, PROMPT_LEN:].any(dim=0).nonzero().max()) + 1
    assert seen == [torch.Size([3, PROMPT_LEN]), torch.Size([12, used_t])]  # 3 prompts, then 12 completions
    assert used_t < COMPLETION_LEN


def test_leading_padding_columns_are_dropped():
    model = tiny_qwen3()
    ids, mask = grouped_batch()
    pad = 3  # every row gets three more padding columns in front
    wide_ids = torch.cat([torch.randint(1, VOCAB, (len(ids), pad)), ids], dim=1)
    wide_mask = torch.cat([torch.zeros(len(ids), pad, dtype=torch.bool), mask], dim=1)
    seen = prompt_rows_seen(model, lambda: token_logprobs(model, wide_ids, wide_mask, COMPLETION_LEN, share_prompts=True))
    assert seen[0] == torch.Size([3, PROMPT_LEN])
    torch.testing.assert_close(token_logprobs(model, wide_ids, wide_mask, COMPLETION_LEN, share_prompts=True),
                               token_logprobs(model, ids, mask, COMPLETION_LEN), rtol=0, atol=1e-10)


def test_distinct_prompts_fall_back_to_one_forward():
    model = tiny_qwen3()
    ids, mask = grouped_batch(groups=3, group_size=1)  # nothing to share
    assert shared_prompt_hidden(model, ids, mask, COMPLETION_LEN) is None
    seen = prompt_rows_seen(model, lambda: token_logprobs(model, ids, mask, COMPLETION_LEN, share_prompts=True))
    assert seen == [torch.Size([3, PROMPT_LEN + COMPLETION_LEN])]


def test_activation_checkpointing_falls_back():
    model = tiny_qwen3()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask = grouped_batch()
    assert shared_prompt_hidden(model, ids, mask, COMPLETION_LEN) is None


def test_sliding_window_attention_falls_back():
    model = tiny_qwen3(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    if all(t == "full_attention" for t in model.config.layer_types):
        pytest.skip("this transformers version builds no sliding-window layers for this config")
    ids, mask = grouped_batch()
    assert shared_prompt_hidden(model, ids, mask, COMPLETION_LEN) is None
    torch.testing.assert_close(token_logprobs(model, ids, mask, COMPLETION_LEN, share_prompts=True),
                               token_logprobs(model, ids, mask, COMPLETION_LEN), rtol=0, atol=0)
