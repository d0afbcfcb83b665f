"""A tied input embedding whose backward hands the LM head's gradient sparse rows, not a second (V, H) matrix.

With tied weights (Qwen3-0.6B/1.7B/4B, Llama-3.2-1B/3B, gspo's own models) the LM head and the input embedding
are one parameter. Its gradient is the head's, a dense (V, H) matrix, plus the embedding's, which is nonzero
only in the rows of the tokens the batch holds. PyTorch's embedding backward still makes that second term a
dense (V, H) matrix (zero-filled, the looked-up rows added in), which autograd then adds into the head's
before the sum reaches ``.grad``: at the Qwen3-0.6B shape a 622 MB temporary at the end of every backward, where
a 128-token step's live heap peaks (7.45 GiB, 0.58 of it this temporary; docs/memory.md), and a zero fill plus
a (V, H) addition per micro-batch.

:func:`use_sparse_tied_gradient` makes the embedding's contribution a sparse (tokens, H) tensor instead
(``F.embedding(..., sparse=True)``). Autograd adds it into the head's dense gradient in place (its input
buffer adds a sparse gradient into a dense one it holds alone; PyTorch's CPU kernel splits the (V, H) rows
among its threads, so repeated tokens add in a fixed order), and what reaches ``.grad`` and the optimizer
is dense as before: the same gradient up to float rounding (the per-token rows are added into the head's
sum one by one instead of being summed apart first).

Only where that holds: the embedding is a plain ``nn.Embedding`` whose weight is the head's, a trainable
plain parameter (not a LoRA base, not an FSDP2 shard: there the head's gradient is not a dense local
tensor), on the CPU (the only device it has run on; a GPU keeps PyTorch's dense backward until one has).
Anywhere else the model is left as it is. The module's ``sparse`` attribute stays False, so DDP
still expects (and gets) a dense gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SparseTiedEmbedding(torch.nn.Embedding):
    """``nn.Embedding`` whose lookup has a sparse backward (see the module docstring); same forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # (...) ids -> (..., H)
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, sparse=True)


def use_sparse_tied_gradient(model: torch.nn.Module) -> bool:
    """Give ``model``'s input embedding a sparse backward where its weight is the LM head's (module docstring);
    True if it did. Call before wrapping the model for data parallelism; never under FSDP2."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return False
    embedding, head = get_in(), get_out()
    if type(embedding) is not torch.nn.Embedding or head is None or embedding.max_norm is not None:
        return False
    weight = embedding.weight
    if weight is not getattr(head, "weight", None) or type(weight) is not torch.nn.Parameter:
        return False
    if not weight.requires_grad or weight.device.type != "cpu":
        return False
    embedding.__class__ = SparseTiedEmbedding
    return True
