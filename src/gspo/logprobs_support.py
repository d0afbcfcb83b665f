"""Log-probabilities of one model over another model's top-k / top-p support: the KL reference.

With a truncating sampler the policy's log-probabilities are those of its truncated, renormalised
distribution (:func:`gspo.logprobs.token_logprobs` with ``top_k`` / ``top_p``). A reference taken over the
full vocabulary differs from them by log(kept mass) even where the two are the same model, so KL(pi_theta
|| pi_ref) would have a floor; one truncated by its *own* support would be -inf (an infinite KL) on every
token the policy keeps and the reference drops. The reference is therefore renormalised over the
policy's support S: log pi_ref(y) - log sum_{v in S} pi_ref(v). :func:`truncation_support` records S
for a batch (one no-grad forward of the policy), :func:`token_logprobs_on_support` evaluates the
reference over it, chunk by chunk as the chunked LM head does (same kernels, same order: bit for bit
the policy's own numbers when the reference is the policy).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from gspo.logprobs.chunked_head import _chunk_logits, _exp_shifted_, _wide, default_chunk_tokens, supports_chunked
from gspo.logprobs.layout import position_ids_from_mask
from gspo.logprobs.truncation import truncation_mask


@dataclass(frozen=True)
class Support:
    """One model's top-k / top-p support at the N real completion positions of a batch (row-major order
    of the completion mask), from its tempered logits: :func:`truncation_support` makes it,
    :func:`token_logprobs_on_support` renormalises another model's distribution over it (the KL
    reference over the policy's support). Holds the model's (N, H) final hidden states and its output
    layer, so each chunk's (C, V) mask is recomputed when needed; or, for a model without the chunked
    path, the (N, V) mask itself."""

    temperature: float
    top_k: int
    top_p: float
    hidden: torch.Tensor | None = None  # (N, H)
    weight: torch.Tensor | None = None  # (V, H)
    bias: torch.Tensor | None = None  # (V,)
    keep: torch.Tensor | None = None  # (N, V) bool

    def mask(self, start: int, end: int) -> torch.Tensor:
        """(C, V) bool, True on the kept tokens of positions ``start .. end``."""
        if self.keep is not None:
            return self.keep[start:end]
        logits = _chunk_logits(self.hidden[start:end], self.weight, self.bias, self.temperature)  # (C, V)
        return truncation_mask(logits, self.top_k, self.top_p)


@torch.no_grad()
def truncation_support(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       num_completion_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, chunked: bool | None = None, **forward_kwargs) -> Support:
    """``model``'s top-k / top-p support at every real completion position (see :class:`Support`); one
    no-grad forward, same layout and arguments as :func:`gspo.logprobs.token_logprobs`."""
    mask = attention_mask[:, -num_completion_tokens:].bool()  # (B, T)
    if supports_chunked(model) if chunked is None else chunked:
        hidden = _completion_hidden(model, input_ids, attention_mask, num_completion_tokens, forward_kwargs)
        head = model.get_output_embeddings()
        return Support(temperature, top_k, top_p, hidden=hidden[mask], weight=head.weight, bias=head.bias)
    logits = _completion_logits(model, input_ids, attention_mask, num_completion_tokens, temperature,
                                forward_kwargs)  # (B, T, V)
    return Support(temperature, top_k, top_p, keep=truncation_mask(logits[mask], top_k, top_p))


@torch.no_grad()
def token_logprobs_on_support(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              num_completion_tokens: int, support: Support, *,
                              chunk_size: int | None = None, chunked: bool | None = None,
                              **forward_kwargs) -> torch.Tensor:
    """(B, T) log-probabilities of ``model``'s tempered distribution renormalised over ``support`` (another
    model's top-k / top-p support, :func:`truncation_support`), -inf off it, 0 on padding; no gradient.

    The KL reference of a truncating sampler: log pi_ref(y) - log sum_{v in S} pi_ref(v), with S the
    policy's support, so KL(pi_theta || pi_ref) compares the two distributions on the tokens the policy can
    sample and is 0 where they are the same model. The chunked path computes exactly what
    :func:`gspo.logprobs.token_logprobs` computes for the same model and support (same kernels, same order).
    """
    num_tokens = num_completion_tokens
    chunk_size = chunk_size or default_chunk_tokens(input_ids.device)  # the policy's chunks (token_logprobs)
    mask = attention_mask[:, -num_tokens:].bool()  # (B, T)
    targets = input_ids[:, -num_tokens:][mask]  # (N,)
    if supports_chunked(model) if chunked is None else chunked:
        hidden = _completion_hidden(model, input_ids, attention_mask, num_tokens, forward_kwargs)[mask]  # (N, H)
        head = model.get_output_embeddings()
        out = torch.empty(hidden.shape[0], dtype=_wide(hidden.dtype), device=hidden.device)  # (N,)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = _chunk_logits(hidden[start:end], head.weight, head.bias, support.temperature)  # (C, V)
            logits.masked_fill_(~support.mask(start, end), float("-inf"))
            picked = logits.gather(1, targets[start:end, None]).squeeze(1)  # (C,)
            out[start:end] = picked - _exp_shifted_(logits)[0]
    else:
        logits = _completion_logits(model, input_ids, attention_mask, num_tokens, support.temperature,
                                    forward_kwargs)[mask]  # (N, V)
        logits = logits.masked_fill(~support.mask(0, logits.shape[0]), float("-inf"))
        out = logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)  # (N,)
    logprobs = out.new_zeros(mask.shape)  # (B, T)
    logprobs[mask] = out
    return logprobs


def _completion_hidden(model, input_ids, attention_mask, num_tokens, forward_kwargs) -> torch.Tensor:
    """(B, T, H) final hidden states that predict the last T tokens (the decoder body, one forward)."""
    body_out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                                   **forward_kwargs)
    return body_out[0][:, -num_tokens - 1 : -1]  # (B, T, H)


def _completion_logits(model, input_ids, attention_mask, num_tokens, temperature, forward_kwargs) -> torch.Tensor:
    """(B, T, V) tempered logits (float32 or wider) that predict the last T tokens, from the full forward."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs = {**forward_kwargs, "logits_to_keep": num_tokens + 1}
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                   **forward_kwargs).logits[:, -num_tokens - 1 : -1]  # (B, T, V)
    return logits.to(_wide(logits.dtype)) / temperature
