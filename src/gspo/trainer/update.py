"""The policy update: one rollout batch -> ``minibatches`` optimizer steps (docs/objectives.md, "The training step").

The first minibatch is on-policy; later ones see a policy that has already moved, which is why
ratios and clipping exist. Every loss receives the *global* normaliser of its minibatch (responses or
response tokens summed over every process and micro-batch), so the gradient does not depend on how
the batch is split (docs/objectives.md, misreading 6).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from gspo import distributed as dist
from gspo.algorithms import LossOutput, get_objective, in_support, rollout_correction
from gspo.errors import TrainingDiverged
from gspo.moe import ReplayStats, RoutingRecord, capture_routing, expert_volatility, replay_routing
from gspo.trainer.micro import split_minibatch, trim_padding
from gspo.trainer.minibatches import Minibatch, assign, split
from gspo.trainer.recast import autocast, recast_weights

# Consecutive optimizer steps with a non-finite loss or gradient after which the run stops: one bad
# step is skipped and logged, a streak means the policy itself has diverged.
MAX_NONFINITE_STREAK = 3


@dataclass
class UpdateInputs:
    """Everything the update needs about one rollout batch (B responses, T completion positions)."""

    input_ids: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T) bool
    completion_mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor  # (B,)
    old_logprobs: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor | None  # (B, T) or None
    routing: RoutingRecord | None = None  # MoE: experts chosen under the behaviour policy, (B, P + T, k)
    # (B,) bool or None: rows of the first (on-policy) minibatch whose old_logprobs were not recomputed; the
    # first optimizer step fills them in from its own forward, detached (pi_old is still the policy then).
    reuse_old: torch.Tensor | None = None
    # (B,) bool or None: rows whose old_logprobs are the sampler's and whose first training forward is still
    # pi_old's (the on-policy minibatch): that forward measures the sampler/trainer mismatch for free.
    measure_old: torch.Tensor | None = None
    # (B, T) the rollout engine's own log-probabilities, kept apart from pi_old (rollout corrections)
    rollout_logprobs: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "UpdateInputs":
        def pick(t):
            return t[index] if t is not None else None

        routing = self.routing.select(index) if self.routing is not None else None
        return UpdateInputs(self.input_ids[index], self.attention_mask[index], self.completion_mask[index],
                            self.advantages[index], self.old_logprobs[index], pick(self.ref_logprobs), routing,
                            pick(self.reuse_old), pick(self.measure_old), pick(self.rollout_logprobs))

    def narrow(self) -> "UpdateInputs":
        """These rows cut to their own width (no all-padding column; token micro-batches, trainer/micro.py).
        Unchanged with a routing record, whose (B, P + T, k) layout is replayed as recorded."""
        if self.routing is not None:
            return self
        columns, kept = trim_padding(self.attention_mask, self.completion_mask.shape[1])

        def cut(t):  # (m, T) per-token tensors keep their first ``kept`` columns; (m,) ones stay
            return t[:, :kept] if t is not None and t.dim() == 2 else t

        return UpdateInputs(self.input_ids[:, columns], self.attention_mask[:, columns], cut(self.completion_mask),
                            cut(self.advantages), cut(self.old_logprobs), cut(self.ref_logprobs), None,
                            self.reuse_old, self.measure_old, cut(self.rollout_logprobs))

    def with_padding(self, real: torch.Tensor) -> "UpdateInputs":
        """A copy whose rows outside ``real`` ((b,) bool) are padding: no response tokens and advantage 0,
        so every loss, its gradient and every metric ignore them (gspo.trainer.minibatches)."""
        if bool(real.all()):
            return self

        def keep(t):
            return t & real if t is not None else None

        return UpdateInputs(self.input_ids, self.attention_mask, self.completion_mask & real[:, None],
                            torch.where(real, self.advantages, torch.zeros_like(self.advantages)),
                            self.old_logprobs, self.ref_logprobs, self.routing, keep(self.reuse_old),
                            keep(self.measure_old), self.rollout_logprobs)


@dataclass
class Updater:
    """Runs the minibatch loop for one objective with fixed loss settings.

    ``algorithm`` names a registered objective (:mod:`gspo.algorithms.registry`); ``hyperparameters`` are
    its keywords (paper defaults unless configured); ``max_length`` is the generation budget for the
    objectives that normalise by it (Dr. GRPO). ``correction`` / ``correction_thresholds``: the rollout
    correction between pi_old and the engine's probabilities (docs/objectives.md), ``none`` by default.
    """

    algorithm: str
    hyperparameters: dict = field(default_factory=dict)
    max_length: int = 0
    correction: str = "none"
    correction_thresholds: dict = field(default_factory=dict)
    beta: float = 0.0
    kl_estimator: str = "k3"
    temperature: float = 1.0
    minibatches: int = 4
    epochs: int = 1
    micro_batch_size: int = 0
    micro_batch_tokens: int = 0  # token budget per micro-batch (trainer/micro.py); wins over micro_batch_size
    forward_overhead: int = 0  # > 0: length-sorted least-padding micro-batches (trainer/micro.py, padding mode)
    max_grad_norm: float = 1.0
    autocast_dtype: torch.dtype | None = None
    routing_replay: bool = False  # MoE: force the behaviour policy's experts (Routing Replay)
    # Public hook for experiments: called with every loss forward's (b, T) log-probabilities (detached), the
    # old log-probabilities the loss uses and the completion mask (e.g. the MoE study's log-ratio bins).
    on_logprobs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    nonfinite_streak: int = 0
    # (trainer log-probs, sampler log-probs, mask) of the rows in UpdateInputs.measure_old, per micro-batch
    onpolicy_pairs: list = field(default_factory=list)

    def plan(self, generator: torch.Generator, size: int, *, offset: int = 0,
             total: int | None = None) -> list[list[Minibatch]]:
        """This process's rows of every optimizer step: one list of ``minibatches`` entries per epoch.

        The batch is this process's rows ``offset .. offset + size`` of a global batch of ``total``
        responses (every process holds ``size`` of them). The split is drawn on the global batch
        (``generator`` is seeded identically on every process), so minibatch i holds the same responses
        whatever the number of processes; every process's share of a minibatch has the same length, padded
        with zero-weight rows where the shares cannot be equal (:mod:`gspo.trainer.minibatches`).
        """
        total = total or size
        return [split(assign(generator, total, self.minibatches), self.minibatches, rank=offset // size,
                      world_size=total // size) for _ in range(self.epochs)]

    def update(self, policy, optimizer, scheduler, inputs: UpdateInputs, generator: torch.Generator | None = None, *,
               offset: int = 0, total: int | None = None, plan: list[list[Minibatch]] | None = None) -> list[dict]:
        """All optimizer steps for one rollout batch; returns one metrics dict per step.

        ``policy``: the :class:`~gspo.trainer.policy.PolicyLogprobs` module, possibly DDP/FSDP-wrapped.
        ``plan``: the minibatches from :meth:`plan`; without it, drawn here from ``generator``, ``offset``
        and ``total`` (same meaning as in :meth:`plan`). The metrics are the whole (global) minibatch's.
        """
        check_device(inputs, policy_device(policy))
        if plan is None:
            plan = self.plan(generator, len(inputs.advantages), offset=offset, total=total)
        self.onpolicy_pairs = []
        history = []
        for epoch in plan:
            for mb, minibatch in enumerate(epoch):
                metrics = self._step(policy, optimizer, scheduler, inputs, minibatch)
                metrics["minibatch"] = mb
                history.append(metrics)
        return history

    def _step(self, policy, optimizer, scheduler, inputs: UpdateInputs, step: Minibatch) -> dict:
        index = step.index  # (S,) the same S on every process
        minibatch = inputs.rows(index).with_padding(step.real)
        normaliser = self._global_normaliser(minibatch.completion_mask)
        optimizer.zero_grad(set_to_none=True)
        parts, volatility, replayed = [], [], []
        micros = self.micro_batches(minibatch.attention_mask, minibatch.completion_mask.shape[1])
        model = _inner_model(policy)
        for i, micro in enumerate(micros):
            rows = minibatch.rows(micro)
            if self.trims:
                rows = rows.narrow()
            sync = contextlib.nullcontext() if i == len(micros) - 1 else dist.no_sync(policy)
            replay, capture = self._routing_contexts(model, rows)
            with sync, replay as stats:
                with capture as live:  # the forward only: a checkpointed backward runs every router again
                    out = self._loss(policy, rows, normaliser)
                # backward inside the replay: a recomputing backward must replay too
                (out.loss * dist.gradient_scale()).backward()
            real = step.real[micro]  # (m,) write back real rows only: a padding row copies a real one
            if rows.reuse_old is not None and bool(rows.reuse_old.any()):  # keep what _loss filled in (epochs > 1)
                inputs.old_logprobs[index[micro][real], : rows.old_logprobs.shape[1]] = rows.old_logprobs[real]
                inputs.reuse_old[index[micro][real]] = False
            if rows.measure_old is not None:
                inputs.measure_old[index[micro][real]] = False  # measured once, by the on-policy forward
            parts.append(out)
            if not bool(real.any()):  # padding only: nothing to measure
                continue
            if stats is not None:
                replayed.append(_replay_changed(rows, stats))
            if live is not None:
                volatility.append(_volatility(rows, live))
        grad_norm = self._clip_and_check(policy)
        metrics = _merge_metrics(parts)
        if inputs.routing is not None:  # the same keys on every process (a padding-only share measured nothing)
            # Routing Replay on: the share of expert sets it held fixed against the live routers
            key = "moe/replay_changed_frac" if self.routing_replay else "moe/volatility"
            metrics[key] = dist.mean_of_all(replayed if self.routing_replay else volatility)
        metrics["optim/grad_norm"] = grad_norm
        metrics["optim/lr"] = optimizer.param_groups[0]["lr"]
        if math.isfinite(grad_norm):
            optimizer.step()
            self.nonfinite_streak = 0
            metrics["optim/skipped"] = 0.0
        else:
            self.nonfinite_streak += 1
            metrics["optim/skipped"] = 1.0
            if self.nonfinite_streak >= MAX_NONFINITE_STREAK:
                raise TrainingDiverged(
                    f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient; "
                    "the last good checkpoint is kept. Lower optim.lr or check the rewards for extreme values"
                )
        # Freed once applied, not at the next minibatch: after a batch's last step they would otherwise be held
        # through the next rollout, beside the sampler's weights and cache (2.4 GB at the Qwen3-0.6B shape).
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return metrics

    def micro_batches(self, attention_mask: torch.Tensor, num_completion: int) -> list[torch.Tensor]:
        """A minibatch's micro-batches, (m,) row indices each (trainer/micro.py); no-grad passes split alike."""
        return split_minibatch(attention_mask, num_completion, rows=self.micro_batch_size,
                               tokens=self.micro_batch_tokens, overhead=self.forward_overhead)

    @property
    def trims(self) -> bool:
        """Whether micro-batches are length-sorted and cut to their own width (token or padding mode)."""
        return not self.micro_batch_size and bool(self.micro_batch_tokens or self.forward_overhead)

    def _routing_contexts(self, model, rows: UpdateInputs) -> tuple:
        """(replay, capture) around a micro-batch: replay the behaviour policy's experts (forward and
        backward), or capture the live ones to measure volatility (forward only); unused ones are no-ops."""
        if rows.routing is None:
            return contextlib.nullcontext(), contextlib.nullcontext()
        if self.routing_replay:  # the record crosses to the device once per micro-batch, not per layer and pass
            return replay_routing(model, rows.routing.to(rows.input_ids.device)), contextlib.nullcontext()
        return contextlib.nullcontext(), capture_routing(model)

    def _loss(self, policy, rows: UpdateInputs, normaliser: torch.Tensor):
        num_completion = rows.completion_mask.shape[1]
        # the policy's device (update() checked the batch crossed to it); the layers' weight casts are recast in
        # the backward, not kept through it (gspo.trainer.recast: the step's peak is the end of this forward)
        with self.autocast(rows.input_ids.device.type), recast_weights():
            logprobs = policy(rows.input_ids, rows.attention_mask, num_completion, self.temperature,
                              routed=rows.routing is not None)  # (b, T)
        if rows.reuse_old is not None and bool(rows.reuse_old.any()):
            # On-policy rows not recomputed (see UpdateInputs.reuse_old): this forward is pi_old's. Written
            # into ``rows`` so that _step can keep them for later epochs.
            rows.old_logprobs = torch.where(rows.reuse_old[:, None], logprobs.detach().float(), rows.old_logprobs)
        if rows.measure_old is not None and bool(rows.measure_old.any()):
            m = rows.measure_old
            self.onpolicy_pairs.append((logprobs.detach().float()[m], rows.old_logprobs[m], rows.completion_mask[m]))
        if self.on_logprobs is not None:
            self.on_logprobs(logprobs.detach(), rows.old_logprobs, rows.completion_mask)
        objective = get_objective(self.algorithm)
        extra = {"max_length": self.max_length} if objective.needs_max_length else {}
        weights, correction = None, None
        corrected = self.correction not in ("none", "bypass") and rows.rollout_logprobs is not None
        # tokens outside a top-k / top-p support (-inf on either side) are left out of the loss and the
        # correction alike, so both count the same tokens (gspo.algorithms.in_support)
        mask = in_support(rows.completion_mask, logprobs, rows.old_logprobs, rows.ref_logprobs,
                          rows.rollout_logprobs if corrected else None)  # (b, T)
        if corrected:
            opsm = {"logprobs": logprobs.detach().float(), "advantages": rows.advantages} if self.correction == "opsm" else {}
            correction = rollout_correction(rows.old_logprobs, rows.rollout_logprobs, mask,
                                            mode=self.correction, **opsm, **self.correction_thresholds)
            weights = correction.weights  # (b, T) detached, 0 where masked
        out = objective.loss(
            logprobs.float(), rows.old_logprobs, rows.advantages, mask,
            ref_logprobs=rows.ref_logprobs, beta=self.beta, kl_estimator=self.kl_estimator, correction=weights,
            **self.hyperparameters, **extra, **{objective.normaliser: normaliser},
        )
        dropped = (rows.completion_mask & ~mask).sum().to(out.loss.dtype)  # 0-d
        metrics = {**out.metrics, **(correction.metrics if correction else {}),
                   "count/out_of_support_tokens": dropped}
        reductions = {**out.reductions, **(correction.reductions if correction else {}),
                      "count/out_of_support_tokens": "sum"}
        return LossOutput(out.loss, metrics, reductions)

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """The training forward's precision: bfloat16 autocast with ``optim.dtype=bfloat16``, else float32.

        Old (and reference) log-probabilities are recomputed under the same context: with float32 old
        log-probabilities, bfloat16 rounding alone moved ~half of the on-policy sequence ratios of a
        17M-parameter model outside GSPO's 3e-4 / 4e-4 band (benchmarks/README.md). Autocast's weight cache is
        off (gspo.trainer.recast): every linear is called once per forward, so it saved no cast, while it kept
        them all alive to the end of the forward.
        """
        return autocast(device_type, self.autocast_dtype)

    def _global_normaliser(self, completion_mask: torch.Tensor) -> torch.Tensor:
        """Responses (with >= 1 token) or response tokens in this minibatch over all processes."""
        lengths = completion_mask.sum(dim=1)  # (b,)
        count = lengths.sum() if get_objective(self.algorithm).normaliser == "num_tokens" else (lengths > 0).sum()
        return dist.all_reduce_sum(count.to(torch.float64).reshape(1)).squeeze(0)

    def _clip_and_check(self, policy) -> float:
        params = [p for p in policy.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=False)
        return float(norm)


def policy_device(policy: torch.nn.Module) -> torch.device:
    """Where the policy's parameters (for FSDP2, this process's shards) live."""
    return next(policy.parameters()).device


def check_device(inputs: UpdateInputs, device: torch.device) -> None:
    """Every tensor entering the update lives on the policy's ``device`` (the batch crossed the trainer's
    device boundary, :meth:`gspo.trainer.collect.ScoredBatch.to`); raise naming the first that does not."""
    tensors = {f.name: getattr(inputs, f.name) for f in fields(inputs)}
    if inputs.routing is not None:
        tensors.update({f"routing[{i}]": t for i, t in enumerate(inputs.routing.indices)})
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and not _same_device(tensor.device, device):
            raise ValueError(f"update input '{name}' is on {tensor.device}, the policy on {device}: the scored "
                             "batch must cross the device boundary (ScoredBatch.to) before the update")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the index is not given."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _inner_model(policy: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a (DDP-wrapped) PolicyLogprobs."""
    return getattr(policy, "module", policy).model


def _replay_changed(rows: UpdateInputs, stats: ReplayStats) -> float:
    """Share of (position, MoE layer) expert sets where the live router disagreed with the replayed one, over
    the positions whose output predicts a response token (position t predicts token t + 1; the last token's
    own routing feeds nothing, and R3's engine never routed it)."""
    if not stats.changed:
        return 0.0
    positions = torch.zeros_like(rows.attention_mask)  # (b, P + T) bool
    num_t = rows.completion_mask.shape[1]
    positions[:, -num_t - 1 : -1] = rows.completion_mask
    per_layer = [changed[positions].float().mean() for changed in stats.changed if changed.shape == positions.shape]
    return float(torch.stack(per_layer).mean()) if per_layer and positions.any() else 0.0


def _volatility(rows: UpdateInputs, live: RoutingRecord) -> float:
    """Share of activated experts that differ between behaviour and current policy on response tokens."""
    positions = torch.zeros_like(rows.attention_mask)  # (b, P + T) bool
    positions[:, -rows.completion_mask.shape[1]:] = rows.completion_mask
    mean, _ = expert_volatility(rows.routing, live, mask=positions)
    return float(mean) if torch.isfinite(mean) else 0.0


def _merge_metrics(parts: list) -> dict:
    """Micro-batch metrics -> the whole minibatch's, over every process: each metric with its own reduction
    (loss terms and counts summed, means weighted by their token or sequence counts; ``reduce_metrics``)."""
    from gspo.algorithms import reduce_metrics

    reductions = parts[0].reductions
    local = reduce_metrics([p.metrics for p in parts], reductions)  # this process's share
    reduced = reduce_metrics(dist.gather_scalars(local), reductions)
    return {k: float(v) for k, v in reduced.items()}
