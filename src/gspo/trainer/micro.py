"""How a (local) minibatch is split into micro-batches: by rows, or by a token budget.

Row mode (``optim.micro_batch_size``) cuts the minibatch in order into equal row counts, as before.
Token mode (``optim.micro_batch_tokens``) sorts the minibatch's responses by length and packs them so that
each micro-batch's rows x padded length (its longest prompt + its longest response) stays within the
budget; each micro-batch is then cut to its own width (:func:`trim_padding`), so no column is all padding
and memory follows the tokens, not rows x the generation limit. A response longer than the budget gets
a micro-batch of its own.

Padding mode (the default when neither is set, for models where it pays): the same length-sorted split,
chosen to cost the least, counting each micro-batch as its padded tokens plus a fixed per-forward cost in
token-equivalents (:func:`forward_overhead_tokens`, from the model's size). Uneven response lengths then
cost their own tokens, not rows x the longest (verl's dynamic batch size does the same without sorting);
a tiny model, whose forwards cost mostly Python, keeps one micro-batch. With a token budget as well, the
least-cost split within the budget.

Both the update and every no-grad pass (pi_old recompute, KL reference) use :func:`split_minibatch` with
the same arguments, so a response's pi_old comes from a forward of exactly the batch it is trained in
(same rows, same padding, same kernels): under bfloat16 the on-policy ratio is then exactly 1.

The loss does not depend on the split: every objective gets its minibatch's global normaliser
(docs/objectives.md, misreading 6) and padded positions are masked.

Under data parallelism every process must run the same number of forwards (FSDP2 gathers shards in
each): the count is the largest greedy count over the processes (one small all-gather of ints per
minibatch, gloo), capped by the smallest local minibatch, and each process packs its rows into exactly
that many micro-batches, balanced by padded tokens.
"""

from __future__ import annotations

import torch

from gspo import distributed as dist


# The fixed cost of one more micro-batch (forward + backward + loss: Python, kernel launches, the LM head's
# chunk loop), in FLOPs of 6·N per token. On the 1M-parameter embedded model a 1-row forward + backward
# costs 6 ms of a 32-row (~2,200-token) one's 40 ms, i.e. ~375 of its tokens, about 2.3e9 "FLOPs" at its
# 6·N; rounded up, so a tiny model keeps one micro-batch unless hundreds of padded tokens go.
FORWARD_OVERHEAD_FLOP = 3e9
# What one more forward + backward costs a large model whatever its tokens, in tokens: every weight streamed
# again (its compute-dtype cast, the backward's recast, the gradient's cast and accumulation in float32) and
# GEMMs of fewer rows further below the matrix units' peak. Qwen3-0.6B shape, bfloat16, 2-core Xeon with AMX:
# minibatches of 4 x ~135 tokens in two forwards each instead of one made the update 11-15 s slower per
# rollout batch, ~2.7 s per extra forward, ~900 tokens' worth at the measured GEMM peak. Counted as 256, so
# a forward is still split off where it saves more padding than that (uneven response lengths).
FORWARD_OVERHEAD_TOKENS = 256


def forward_overhead_tokens(num_params: int) -> int:
    """One more micro-batch's fixed cost in trained tokens (6·N FLOPs each) for a model of ``num_params``."""
    return round(FORWARD_OVERHEAD_FLOP / (6 * max(num_params, 1))) + FORWARD_OVERHEAD_TOKENS


def split_minibatch(attention_mask: torch.Tensor, num_completion: int, *, rows: int = 0, tokens: int = 0,
                    overhead: int = 0) -> list[torch.Tensor]:
    """Micro-batches of a minibatch as (m,) row-index tensors into it, every row exactly once.

    ``attention_mask``: (b, P + T) ``[left-padded prompt | right-padded completion]``; ``num_completion``: T.
    ``rows``: rows per micro-batch (row mode, wins); ``tokens``: the token budget (token mode);
    ``overhead``: one forward's fixed cost in tokens (> 0: padding mode, the least-cost length-sorted split,
    within ``tokens`` if given). None of them: one micro-batch.
    """
    b = attention_mask.shape[0]
    if rows or not (tokens or overhead):
        return list(torch.split(torch.arange(b), rows or max(b, 1)))
    prompt, completion = row_lengths(attention_mask, num_completion)  # (b,), (b,)
    order = _length_order(prompt, completion)  # (b,)
    if overhead:
        pieces = _least_cost(order, prompt, completion, overhead, tokens)
    else:
        pieces = _greedy(order, prompt, completion, tokens)
    if dist.is_initialized():  # every process, even one without rows here: the same forwards everywhere
        counts = dist.all_gather_object((len(pieces), b))
        # a forward needs a row (transformers cannot run 0 rows): at most the smallest minibatch's rows
        count = max(1, min(max(n for n, _ in counts), min(rows for _, rows in counts)))
        if count != len(pieces) and b:
            pieces = _balanced(order, prompt, completion, count)
    return pieces or [torch.arange(0)]


def row_lengths(attention_mask: torch.Tensor, num_completion: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt tokens, completion extent) per row, (b,) each: the extent is up to the last attended column."""
    prompt = attention_mask[:, :-num_completion].sum(dim=1)  # (b,) left-padded: its real tokens are its width
    attended = attention_mask[:, -num_completion:].bool()  # (b, T)
    positions = torch.arange(1, num_completion + 1)  # (T,)
    extent = torch.where(attended, positions, torch.zeros_like(positions)).amax(dim=1)  # (b,)
    return prompt, extent


def padded_tokens(index: torch.Tensor, prompt: torch.Tensor, completion: torch.Tensor) -> int:
    """Tokens of a micro-batch cut to its own width: rows x (longest prompt + longest completion)."""
    if not len(index):
        return 0
    return len(index) * (int(prompt[index].max()) + max(int(completion[index].max()), 1))


def _length_order(prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """Rows by (completion, prompt) length, longest first; ties keep their order (deterministic)."""
    if not len(prompt):
        return torch.arange(0)
    key = completion * (int(prompt.max()) + 1) + prompt  # (b,)
    return torch.sort(key, descending=True, stable=True).indices


def _greedy(order: torch.Tensor, prompt: torch.Tensor, completion: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Consecutive runs of ``order`` whose padded tokens stay within ``budget`` (one row at least each)."""
    pieces, start = [], 0
    for end in range(1, len(order) + 1):
        if end - start > 1 and padded_tokens(order[start:end], prompt, completion) > budget:
            pieces.append(order[start:end - 1])
            start = end - 1
    if start < len(order):
        pieces.append(order[start:])
    return pieces


def _least_cost(order: torch.Tensor, prompt: torch.Tensor, completion: torch.Tensor, overhead: int,
                budget: int = 0) -> list[torch.Tensor]:
    """Consecutive runs of ``order`` (longest completion first) minimising sum(padded tokens + ``overhead``),
    each within ``budget`` padded tokens when > 0 (a single row may exceed it). Exact, by dynamic programming
    over the split points: O(b^2) on (b,) vectors."""
    b = len(order)
    if b == 0:
        return []
    p = prompt[order].double()  # (b,) in sorted order
    c = completion[order].clamp(min=1).double()  # (b,) non-increasing
    best = torch.zeros(b + 1, dtype=torch.float64)  # best[i]: least cost of the first i rows
    cut = torch.zeros(b + 1, dtype=torch.long)  # cut[i]: where the last piece of that split starts
    for i in range(1, b + 1):
        widest_prompt = torch.flip(torch.cummax(torch.flip(p[:i], (0,)), 0).values, (0,))  # (i,) max p[j:i]
        rows = torch.arange(i, 0, -1, dtype=torch.float64)  # (i,) i - j
        padded = rows * (widest_prompt + c[:i])  # (i,) piece j..i-1: its longest completion is row j's
        cost = best[:i] + padded + overhead
        if budget:
            cost = torch.where((padded > budget) & (rows > 1), torch.inf, cost)
        j = int(torch.argmin(cost))  # the first minimum: ties prefer fewer, longer pieces
        best[i], cut[i] = cost[j], j
    pieces, i = [], b
    while i > 0:
        pieces.append(order[int(cut[i]):i])
        i = int(cut[i])
    return pieces[::-1]


def _balanced(order: torch.Tensor, prompt: torch.Tensor, completion: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Exactly ``count`` consecutive runs of ``order`` (count <= rows), the largest as small as greedy can make it."""
    low, high = 1, padded_tokens(order, prompt, completion)
    while low < high:  # the smallest budget whose greedy split needs at most ``count`` pieces
        mid = (low + high) // 2
        if len(_greedy(order, prompt, completion, mid)) <= count:
            high = mid
        else:
            low = mid + 1
    pieces = _greedy(order, prompt, completion, low)
    while len(pieces) < count:  # fewer than asked: halve the costliest piece with more than one row
        splittable = [i for i, p in enumerate(pieces) if len(p) > 1]
        i = max(splittable, key=lambda j: padded_tokens(pieces[j], prompt, completion))
        half = len(pieces[i]) // 2
        pieces[i:i + 1] = [pieces[i][:half], pieces[i][half:]]
    return pieces


def trim_padding(attention_mask: torch.Tensor, num_completion: int) -> tuple[slice, int]:
    """(column slice of the (m, P + T) inputs, kept completion columns T') cutting all-padding columns.

    Left: prompt columns no row attends (left padding). Right: completion columns past the longest
    response. The first T' completion columns are kept, so (m, T) per-token tensors are cut with ``[:, :T']``.
    """
    width = attention_mask.shape[1] - num_completion
    if not attention_mask.shape[0]:
        return slice(0, width + num_completion), num_completion  # no rows: nothing to cut
    prompt, extent = row_lengths(attention_mask, num_completion)
    left = width - int(prompt.max())
    kept = max(int(extent.max()), 1)
    return slice(left, width + kept), kept
