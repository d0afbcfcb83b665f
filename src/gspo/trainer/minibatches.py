"""Which rows each optimizer step trains on, on every process (README, "Several processes and machines").

A rollout batch of ``total`` responses gives ``minibatches`` optimizer steps per epoch. The split is
drawn on the *global* batch from a generator seeded identically on every process, so minibatch i holds
the same responses whatever the number of processes, and N processes end with the weights of one.

The split is stratified by position: the global batch is cut into aligned blocks of ``minibatches``
consecutive responses, and each block gives one response to each minibatch (a fresh random permutation
per block). Responses are laid out prompt by prompt and each process holds a contiguous, group-aligned
slice of them, so

- when ``minibatches`` divides a process's share (the usual case), every process holds exactly
  share / minibatches rows of every minibatch: no padding, no idle process;
- otherwise (e.g. 8 responses, 4 processes, 4 minibatches: 2 rows per process for 4 steps) the shares
  differ by a row or two, and each process pads its share of a minibatch to the largest one with
  zero-weight rows (:meth:`UpdateInputs.with_padding <gspo.trainer.update.UpdateInputs.with_padding>`:
  no tokens, so no loss, gradient or metric). Every process then runs the same number of rows,
  micro-batches and collective forwards (FSDP2), and never a 0-row forward.

With ``minibatches`` dividing the group size, every minibatch gets the same number of responses of
every prompt (responses of one prompt are exchangeable: which ones go together carries no information).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Minibatch:
    """This process's rows of one optimizer step; ``index`` has the same length on every process."""

    index: torch.Tensor  # (S,) long: rows of this process's batch
    real: torch.Tensor  # (S,) bool: False on padding rows (zero weight: they only keep the shapes equal)

    def rows(self, num_rows: int) -> torch.Tensor:
        """(num_rows,) bool: the rows of this process's batch that this step trains on (padding excluded)."""
        selected = torch.zeros(num_rows, dtype=torch.bool)
        selected[self.index[self.real]] = True
        return selected


def assign(generator: torch.Generator, total: int, minibatches: int) -> torch.Tensor:
    """(total,) the minibatch of each response of the global batch.

    Each aligned block of ``minibatches`` responses is a random permutation of 0 .. minibatches - 1, so
    every aligned slice whose length ``minibatches`` divides holds each minibatch equally often.
    ``total`` must be a multiple of ``minibatches`` (config validation).
    """
    blocks = [torch.randperm(minibatches, generator=generator) for _ in range(total // minibatches)]
    return torch.cat(blocks)  # (total,)


def split(assignment: torch.Tensor, minibatches: int, *, rank: int, world_size: int) -> list[Minibatch]:
    """Process ``rank``'s share of each minibatch, padded to the largest share of any process.

    ``assignment``: (total,) from :func:`assign`; process r holds global rows r * B .. (r + 1) * B - 1
    with B = total / world_size. Every process computes every share from the same assignment, so all
    agree on the padded sizes without communicating. Padding rows point at row 0 (any row would do).
    """
    shares = assignment.view(world_size, -1)  # (W, B) the minibatch of each process's rows
    counts = torch.nn.functional.one_hot(shares, minibatches).sum(dim=1)  # (W, M)
    sizes = counts.amax(dim=0)  # (M,) rows every process runs per step
    out = []
    for mb in range(minibatches):
        rows = (shares[rank] == mb).nonzero().squeeze(1)  # (b,)
        padding = int(sizes[mb]) - len(rows)
        index = torch.cat([rows, rows.new_zeros(padding)])  # (S,)
        out.append(Minibatch(index, torch.arange(len(index)) < len(rows)))
    return out
