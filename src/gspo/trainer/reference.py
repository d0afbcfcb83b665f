"""The KL reference: which module it is (a frozen copy, or the LoRA policy with its adapter disabled) and its
log-probabilities, over the policy's truncated support under top-k / top-p (gspo.logprobs_support)."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Iterator

import torch

from gspo.logprobs import token_logprobs
from gspo.logprobs_support import token_logprobs_on_support, truncation_support
from gspo.trainer.fsdp_load import call_reference

if TYPE_CHECKING:
    from gspo.trainer.build import Components


@contextlib.contextmanager
def reference_logprobs_fn(parts: "Components", temperature: float):
    """The KL reference's log-probabilities; with top-k / top-p, over the policy's support (the sampling
    weights, ``parts.model``, read before the reference context: under LoRA that disables the adapter),
    so that kl/ref is 0 while the policy is the reference (gspo.logprobs_support)."""
    r = parts.config.rollout
    if not (r.top_k > 0 or r.top_p < 1.0):
        with reference_policy(parts) as reference:
            yield lambda ids, attn, num_t: call_reference(parts.reference_root, reference, token_logprobs, ids, attn,
                                                           num_t, temperature=temperature)
        return

    def on_support(ids, attn, num_t):
        support = truncation_support(parts.model, ids, attn, num_t, temperature=temperature,
                                     top_k=r.top_k, top_p=r.top_p)
        with reference_policy(parts) as reference:
            return call_reference(parts.reference_root, reference, token_logprobs_on_support, ids, attn, num_t, support)
    yield on_support


@contextlib.contextmanager
def reference_policy(parts: "Components") -> Iterator[torch.nn.Module]:
    """The module whose log-probabilities are the KL reference, for the duration of the block.

    Full fine-tuning: the frozen copy. LoRA: the policy with its adapter disabled, i.e. the base model,
    without a second copy of the weights in memory.
    """
    from gspo.models.lora import is_peft

    if parts.reference is parts.model and is_peft(parts.model):
        with parts.model.disable_adapter():
            yield parts.model
    else:
        yield parts.reference


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A detached, frozen copy of the policy (the KL reference)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference
