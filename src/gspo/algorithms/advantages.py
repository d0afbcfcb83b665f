"""Group-relative advantages (GSPO paper eq. 6; GRPO, DAPO and GSPO share them).

A_i = (r_i - mean_group(r)) / (std_group(r) + eps), sample std (Bessel), eps = 1e-6: the TRL / verl
convention. Variants: the batch std instead of the group std, or no scaling (Dr. GRPO, arXiv 2503.20783).
Multi-turn episodes: :func:`turn_group_advantages`, the same per turn on the returns-to-go.
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


def turn_group_advantages(
    returns: torch.Tensor, present: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6,
    batch_std: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-turn group-relative advantages (N, K) for multi-turn episodes laid out group by group.

    ``returns`` (N, K): G_{i,k}, episode i's return-to-go from its turn k (the rewards of turns k, k+1, ...
    and the final reward); ``present`` (N, K) bool: episode i has a turn k. Each turn is baselined against
    the same turn of the other episodes of its group (eq. 6 applied per turn, the group-normalised returns
    of GTPO, Ding et al., arXiv 2511.14846, with discount 1):

        A_{i,k} = (G_{i,k} - mean_{j in S_k} G_{j,k}) / s_k,   S_k = the group's episodes with a turn k,

    s_k = the sample std of {G_{j,k}, j in S_k} + eps (scale="group"); ``batch_std`` + eps (scale="batch";
    default: the sample std of the episode returns G_{.,0} of this call); 1 (scale="none"). A turn whose
    returns are equal across S_k (a single episode included) gets exactly 0, as does every absent turn.
    Turn 0 is eq. 6 on the episode returns. float32 (float64 for float64 input).
    """
    if returns.dim() != 2 or present.shape != returns.shape:
        raise ValueError(f"returns and present must be (N, K) alike; got {tuple(returns.shape)}, "
                         f"{tuple(present.shape)}")
    check_groups(returns[:, 0], group_size)
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dtype = torch.float64 if returns.dtype == torch.float64 else torch.float32
    k = returns.shape[1]
    present = present.bool().view(-1, group_size, k)  # (N / G, G, K)
    values = torch.where(present, returns.to(dtype).view(-1, group_size, k), 0.0)  # (N / G, G, K)
    count = present.sum(dim=1, keepdim=True)  # (N / G, 1, K) |S_k|
    mean = values.sum(dim=1, keepdim=True) / count.clamp_min(1)  # (N / G, 1, K)
    centred = torch.where(present, values - mean, 0.0)  # (N / G, G, K)
    if scale == "group":
        variance = (centred * centred).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1)  # (N / G, 1, K)
        centred = centred / (variance.sqrt() + eps)
    elif scale == "batch":
        std = returns[:, 0].to(dtype).std() if batch_std is None else torch.as_tensor(batch_std, dtype=dtype)
        centred = centred / (std + eps)
    # Exact zeros where S_k's returns are all equal (one episode included): no signal
    high = torch.where(present, values, float("-inf")).amax(dim=1, keepdim=True)  # (N / G, 1, K)
    low = torch.where(present, values, float("inf")).amin(dim=1, keepdim=True)  # (N / G, 1, K)
    return torch.where(present & (high > low), centred, 0.0).view(-1, k)  # (N, K)
