"""Group-relative advantages (GSPO paper eq. 6; GRPO, DAPO and GSPO share them).

A_i = (r_i - mean_group(r)) / (std_group(r) + eps), sample std (Bessel), eps = 1e-6: the TRL / verl
convention. Variants: the batch std instead of the group std, or no scaling (Dr. GRPO, arXiv 2503.20783).
"""

from __future__ import annotations

import torch

from gspo.algorithms.catalogue import ADVANTAGE_SCALES as SCALES


def check_groups(rewards: torch.Tensor, group_size: int) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (N,), laid out group by group; got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"number of rewards ({rewards.numel()}) is not a multiple of group_size ({group_size})")


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6,
    batch_std: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Advantages (N,) for rewards (N,) laid out group by group (eq. 6).

    scale="group": divide by each group's sample std + eps (default, as in the paper);
    scale="batch": divide by the sample std of all N rewards + eps (centred still by the group mean);
        ``batch_std`` replaces that std when the batch is larger than ``rewards`` (a data-parallel
        process's share: :func:`batch_std_from_moments` of every process's :func:`reward_moments`);
    scale="none": only centre by the group mean (Dr. GRPO; not GSPO's choice).
    A group whose rewards are all equal gets exactly 0. Computed in float32 (float64 for float64 input);
    call it on the whole rollout batch, before splitting into minibatches.
    """
    check_groups(rewards, group_size)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    groups = rewards.to(dtype).view(-1, group_size)  # (N / G, G)
    centred = groups - groups.mean(dim=-1, keepdim=True)  # (N / G, G)
    if scale == "group":
        centred = centred / (groups.std(dim=-1, keepdim=True) + eps)  # (N / G, G)
    elif scale == "batch":
        std = groups.std() if batch_std is None else torch.as_tensor(batch_std, dtype=dtype)
        centred = centred / (std + eps)  # (N / G, G)
    # Exact zeros for all-equal groups: the float mean of equal values need not equal them.
    flat = (groups == groups[:, :1]).all(dim=-1, keepdim=True)  # (N / G, 1)
    return torch.where(flat, torch.zeros_like(centred), centred).view(-1)  # (N,)


def reward_moments(rewards: torch.Tensor) -> torch.Tensor:
    """(3,) float64 [count, sum, sum of squares] of rewards (N,): summed over processes, they give the whole
    batch's std (:func:`batch_std_from_moments`) without gathering the rewards."""
    r = rewards.to(torch.float64)
    return torch.stack([r.new_tensor(float(r.numel())), r.sum(), (r * r).sum()])


def batch_std_from_moments(moments: torch.Tensor) -> torch.Tensor:
    """The sample std (N - 1 in the denominator, as ``Tensor.std``) from (3,) [count, sum, sum of squares]."""
    n, total, squares = moments.unbind()
    variance = (squares - total * total / n) / (n - 1)
    return variance.clamp(min=0.0).sqrt()


def global_batch_std(rewards: torch.Tensor, sum_over_processes=lambda t: t) -> torch.Tensor:
    """The sample std of the whole batch whose share on this process is ``rewards`` (N,): the moments of
    every share, summed by ``sum_over_processes`` (e.g. an all-reduce), for ``group_advantages(batch_std=)``."""
    return batch_std_from_moments(sum_over_processes(reward_moments(rewards)))
