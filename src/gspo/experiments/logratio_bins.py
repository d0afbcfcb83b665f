"""Token vs sequence log-ratio spread, binned by response length (GSPO sections 4.1 and 5.4).

GSPO's argument against token-level ratios: each token ratio is a single-sample importance weight
whose noise does not average out, while the sequence ratio's log, ``(1/|y|) sum_t log w_t`` (eq. 7),
averages it over the response. If token log-ratios were independent, the sequence log-ratio's std
would shrink like ``token_std / sqrt(|y|)``. This accumulator measures both spreads per response
length from the log-probabilities a loss actually saw, separately for the on-policy (first) and
off-policy (later) minibatches. Pure torch; running sums in float64 so memory stays constant.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

PHASES = ("onpolicy", "offpolicy")


class _Moments:
    """Count, sum and sum of squares of a stream of numbers; population std."""

    def __init__(self) -> None:
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        self.n += v.numel()
        self.s += float(v.sum())
        self.ss += float(v.square().sum())

    def std(self) -> float:
        if self.n < 2:
            return float("nan")
        mean = self.s / self.n
        return math.sqrt(max(self.ss / self.n - mean * mean, 0.0))


class LogRatioBins:
    """Spread of token and sequence log-ratios per (phase, response length)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, int], _Moments] = defaultdict(_Moments)
        self.sequences: dict[tuple[str, int], _Moments] = defaultdict(_Moments)
        self.calls = 0  # loss forwards seen since the last start_step()

    def start_step(self) -> None:
        """Call before each rollout batch's update: the next forward is the on-policy minibatch."""
        self.calls = 0

    def add(self, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> None:
        """One minibatch: logprobs, old_logprobs, mask all (b, T); padding is ignored."""
        phase = PHASES[0] if self.calls == 0 else PHASES[1]
        self.calls += 1
        mask = mask.bool()
        log_ratio = torch.where(mask, logprobs.detach().float() - old_logprobs.float(), 0.0)  # (b, T)
        lengths = mask.sum(dim=1)  # (b,)
        seq = log_ratio.sum(dim=1) / lengths.clamp_min(1)  # (b,) log s_i of eq. 7
        for length in lengths.unique().tolist():
            if length == 0:
                continue
            rows = lengths == length  # (b,)
            self.tokens[(phase, length)].add(log_ratio[rows][mask[rows]])
            self.sequences[(phase, length)].add(seq[rows])

    def to_dict(self) -> dict:
        """Plain, JSON-able moments: {"tokens"|"sequences": [[phase, length, n, sum, sum_sq], ...]}."""
        return {name: [[p, length, m.n, m.s, m.ss] for (p, length), m in sorted(store.items())]
                for name, store in (("tokens", self.tokens), ("sequences", self.sequences))}

    @classmethod
    def merged(cls, dicts: list[dict]) -> "LogRatioBins":
        """The bins of several runs pooled (e.g. every seed of one arm)."""
        bins = cls()
        for d in dicts:
            for name, store in (("tokens", bins.tokens), ("sequences", bins.sequences)):
                for phase, length, n, s, ss in d[name]:
                    m = store[(phase, length)]
                    m.n, m.s, m.ss = m.n + n, m.s + s, m.ss + ss
        return bins

    def table(self, phase: str = "offpolicy") -> list[dict]:
        """One row per length: responses, token std, sequence std, and token_std / sqrt(length)."""
        rows = []
        for (p, length), seq in sorted(self.sequences.items(), key=lambda kv: kv[0][1]):
            if p != phase:
                continue
            token_std = self.tokens[(p, length)].std()
            rows.append({"length": length, "responses": seq.n, "token_std": token_std, "seq_std": seq.std(),
                         "iid_seq_std": token_std / math.sqrt(length)})
        return rows
