"""The policy as a module whose forward returns per-token log-probabilities.

This is what DDP / FSDP2 wrap: their gradient synchronisation hangs on the wrapped module's
forward, and the trainer's forward is "log-probabilities of these completion tokens", computed with a
chunked LM head (:func:`gspo.logprobs.token_logprobs`), not the model's full logits.
"""

from __future__ import annotations

import torch

from gspo.logprobs import token_logprobs


class PolicyLogprobs(torch.nn.Module):
    """``top_k`` / ``top_p``: the sampler's truncation; log-probabilities are then over the same support
    (the behaviour policy is the truncated distribution, so an untruncated trainer would bias every ratio).
    ``share_prompts``: each distinct prompt of a forward runs once (``optim.share_prompts``,
    :func:`gspo.logprobs.shared_prompt_hidden`)."""

    def __init__(self, model: torch.nn.Module, *, top_k: int = 0, top_p: float = 1.0,
                 share_prompts: bool = False) -> None:
        super().__init__()
        self.model = model
        self.top_k, self.top_p = top_k, top_p
        self.share_prompts = share_prompts

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                num_completion_tokens: int = 0, temperature: float = 1.0, *, routed: bool = False, run=None):
        """(B, T) log pi(y_t | x, y_<t) of the last ``num_completion_tokens`` positions.

        ``routed``: a MoE routing capture or replay block is around this call; its hooks record (B, L)
        tensors, so the batch must go through the model in one forward as laid out (no prompt sharing).
        ``run``: instead, ``run()`` (a function of no arguments) inside this module's call: as an FSDP2 root,
        its parameters (embeddings, final norm, head) are gathered around it; the built-in sampler samples
        through the shards this way (``rollout.sampler_weights=shards``, :func:`gspo.trainer.fsdp_load.sample_through`).
        """
        if run is not None:
            return run()
        return token_logprobs(self.model, input_ids, attention_mask, num_completion_tokens, temperature=temperature,
                              top_k=self.top_k, top_p=self.top_p, share_prompts=self.share_prompts and not routed)


class ModelCall(torch.nn.Module):
    """``fn(model, *args)`` as this module's forward: an FSDP2 root for a model that functions use through
    its parts (the decoder body, then the LM head's weight, as :func:`token_logprobs` does), so that the
    root's parameters (embeddings, final norm, head) are gathered around the call. The sharded KL reference."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)
