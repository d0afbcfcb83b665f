"""Where pi_old comes from: one decision per run, then one pass per rollout batch.

The behaviour policy's log-probabilities (``old_logprobs``, the anchor of every clipped ratio) come
either from the rollout engine itself or from a no-grad pass of the training module over the sampled
tokens (docs/objectives.md, "The training step"; GSPO paper section 5.4). :func:`plan_old_logprobs` makes that
choice once, from immutable facts about the run, and names its reason; :class:`OldLogprobs` then turns
each scored batch into the update's inputs (old and reference log-probabilities, routing records) and
the sampler-vs-trainer mismatch metrics. Nothing here is read or written inside the update loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from gspo.algorithms import in_support
from gspo.models.modes import eval_mode
from gspo.moe import RoutingRecord, capture_routing, replay_routing
from gspo.rollout.base import EngineInfo
from gspo.trainer.collect import ScoredBatch
from gspo.trainer.micro import trim_padding
from gspo.trainer.minibatches import Minibatch
from gspo.trainer.update import UpdateInputs

SOURCES = ("auto", "recompute", "rollout")


@dataclass(frozen=True)
class OldLogprobPlan:
    """The run's answer to "where does pi_old come from?", taken before the first step.

    source: ``rollout`` (the engine's log-probabilities) or ``recompute`` (a training-module pass).
    setting: the configured ``loss.old_logprobs`` (``auto`` is resolved into ``source``).
    reason: one phrase saying why (shown in the run's start line).
    capture_routing: record the experts of the old-policy pass (MoE: R2 replay or volatility diagnostics).
    routing_from_rollout: R3, the experts recorded by the rollout engine.
    reuse_onpolicy: dense recompute: the first (on-policy) minibatch's old log-probabilities are taken,
        detached, from its own first training forward instead of a separate pass.
    measure_onpolicy: engine log-probabilities used as pi_old: the first training forward measures how far
        they are from the trainer's (the ``mismatch/*`` metrics) at no extra cost.
    """

    source: str
    setting: str
    reason: str
    capture_routing: bool = False
    routing_from_rollout: bool = False
    reuse_onpolicy: bool = False
    measure_onpolicy: bool = False

    def describe(self) -> str:
        text = {"rollout": "from the sampler", "recompute": "recomputed"}[self.source]
        if self.setting != "auto":
            return text
        return text + (" (auto)" if self.source == "rollout" else f" (auto: {self.reason})")


def plan_old_logprobs(setting: str, *, engine: EngineInfo, training_dtype: str, dropout: bool, moe: bool,
                      routing_replay: str = "off", diagnostics: bool = False,
                      correction: str = "none") -> OldLogprobPlan:
    """Resolve ``loss.old_logprobs`` (auto | recompute | rollout) for one run.

    ``auto`` takes the engine's log-probabilities when a recomputation could only reproduce them to float
    rounding: the engine declares ``exact_logprobs`` (the training module's own float32 weights), training
    runs in float32 and the model is dense (an MoE's old-policy pass records the experts for R2 and the
    volatility diagnostics). Dropout does not block it: pi_old is the deterministic (eval-mode) policy the
    engine samples from, and the recompute pass runs in eval mode too (:class:`OldLogprobs`). With
    ``dropout`` the first training forward (train mode, a dropout sample) is neither reused as pi_old nor
    taken as the on-policy mismatch measurement. An inference engine that declares ``behaviour_logprobs``
    (vLLM: the sampled distribution's float32 log-probabilities, ~1e-5 from the trainer's) is taken the
    same way: the GSPO paper's section 5.4 setting. A rollout correction (``correction``) needs both
    channels, so it recomputes.
    """
    if setting not in SOURCES:
        raise ValueError(f"old log-probabilities source must be one of {', '.join(SOURCES)}, got {setting!r}")
    if setting == "auto":
        blockers = [why for why, present in (
            ("the sampler is not the float32 policy", not (engine.exact_logprobs or engine.behaviour_logprobs)),
            (f"correction.mode={correction}", correction not in ("none", "bypass")),
            (f"{training_dtype} training", training_dtype != "float32"),
            ("MoE routing record", moe)) if present]
        source = "recompute" if blockers else "rollout"
        reason = blockers[0] if blockers else "the sampler is the float32 training module"
    else:
        source, reason = setting, "configured"
    capture = moe and (routing_replay == "r2" or (routing_replay == "off" and diagnostics))
    return OldLogprobPlan(
        source=source, setting=setting, reason=reason, capture_routing=capture,
        routing_from_rollout=routing_replay == "r3",
        reuse_onpolicy=source == "recompute" and not moe and not dropout,
        measure_onpolicy=source == "rollout" and not moe and not dropout,
    )


def has_dropout(model: torch.nn.Module) -> bool:
    """True when any dropout is active in training forwards (modules or attention/hidden config)."""
    config = getattr(model, "config", None)
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or any(
        float(getattr(config, name, 0.0) or 0.0) > 0 for name in ("attention_dropout", "hidden_dropout"))


# (ids, attention, num_completion_tokens, routed=False) -> (B, T) log-probabilities under the module given;
# ``routed``: the call runs inside a routing capture (one plain forward, see PolicyLogprobs.forward)
LogprobFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class OldLogprobs:
    """Computes one batch's :class:`UpdateInputs` according to a plan.

    policy: (ids, attention, T, routed=False) -> (B, T) training-module log-probabilities (no grad is taken here).
    reference: a context manager yielding the KL reference's log-probability function, or None.
    chunk_rows: rows per no-grad forward when no minibatches are given (a training step's rows, so
        this pass never holds more activations than a training step); 0 = one pass.
    routed_model: the Hugging Face model inside ``policy``. Every pass here runs it in eval mode (pi_old and
        the reference are the deterministic policy, as verl's ``compute_log_prob`` and TRL's reference do;
        dropout only in training forwards), and its routers are recorded (MoE R2 / diagnostics) or replayed
        from the rollout engine's record (R3, so that pi_old and every training forward use the same experts).
    micro_batches: the update's split of a minibatch ((m, P + T) attention, T) -> row indices
        (:meth:`Updater.micro_batches`); given the update's ``minibatches``, every no-grad pass runs the update's
        own micro-batches (padding rows included), so pi_old comes from a forward of exactly the batch each
        response is trained in.
    trim: cut each micro-batch to its own width, as the update does in token mode (trainer/micro.py).
    """

    plan: OldLogprobPlan
    policy: LogprobFn
    reference: Callable[[], ContextManager[LogprobFn]] | None = None
    chunk_rows: int = 0
    routed_model: torch.nn.Module | None = None
    micro_batches: Callable[[torch.Tensor, int], list[torch.Tensor]] | None = None
    trim: bool = False

    @torch.no_grad()
    def __call__(self, batch: ScoredBatch, onpolicy: torch.Tensor | None = None,
                 minibatches: list[Minibatch] | None = None) -> tuple[UpdateInputs, dict[str, float]]:
        """``onpolicy``: (B,) bool, the rows of the first minibatch (trained with the sampling weights).
        ``minibatches``: the first epoch's minibatches (:meth:`Updater.plan`), the same count on every process."""
        with eval_mode(self.routed_model) if self.routed_model is not None else contextlib.nullcontext():
            return self._inputs(batch, onpolicy, minibatches)

    def _inputs(self, batch: ScoredBatch, onpolicy: torch.Tensor | None,
                minibatches: list[Minibatch] | None) -> tuple[UpdateInputs, dict[str, float]]:
        rollout, plan = batch.rollout, self.plan
        ids, attn, num_t = rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
        mask = rollout.completion_mask  # (B, T)
        metrics: dict[str, float] = {}
        routing, reuse, measure = None, None, None
        if plan.source == "recompute":
            # with the update's layout (minibatches), minibatch 0 is skipped on every process alike (the same
            # forwards everywhere); without it, every process still runs the pass on at least one row
            if plan.reuse_onpolicy and onpolicy is not None and (self._aligned(minibatches) or not bool(onpolicy.all())):
                reuse = onpolicy.clone()  # (B,)
                keep = (~reuse).nonzero().squeeze(1)  # (b,)
                old = self._passes(self.policy, ids, attn, num_t, minibatches, skip=reuse)  # (B, T) reused rows: 0,
                metrics.update(mismatch_metrics(old[keep], rollout.logprobs[keep], mask[keep]))  # filled by the update
            elif self._routed:  # R3: the engine's experts, as in every training forward; R2: record them
                old, routing = self._routed_passes(rollout, minibatches)  # (B, T), record or None
                metrics.update(mismatch_metrics(old, rollout.logprobs, mask))
            else:
                old = self._passes(self.policy, ids, attn, num_t, minibatches)  # (B, T)
                metrics.update(mismatch_metrics(old, rollout.logprobs, mask))
        else:
            old = rollout.logprobs  # (B, T) the engine's
            if plan.capture_routing:  # MoE diagnostics / R2 still need the old-policy experts
                if self._routed:
                    recomputed, routing = self._routed_passes(rollout, minibatches)  # (B, T), record or None
                else:
                    recomputed = self._passes(self.policy, ids, attn, num_t, minibatches)  # (B, T)
                metrics.update(mismatch_metrics(recomputed, rollout.logprobs, mask))
            elif plan.measure_onpolicy and onpolicy is not None:
                measure = onpolicy.clone()  # (B,) the first update's forward compares trainer and sampler
        if plan.routing_from_rollout:
            routing = rollout.routing
        ref = None
        if self.reference is not None:
            with self.reference() as reference:  # LoRA: the base model, adapter disabled
                ref = self._passes(reference, ids, attn, num_t, minibatches)  # (B, T)
        return UpdateInputs(ids, attn, mask, batch.advantages, old, ref, routing, reuse, measure,
                            rollout_logprobs=rollout.logprobs), metrics

    @property
    def _routed(self) -> bool:
        """The pass runs inside a routing capture or replay (per forward: no prompt sharing, no trimming)."""
        return (self.plan.capture_routing or self.plan.routing_from_rollout) and self.routed_model is not None

    def _routed_passes(self, rollout, minibatches: list[Minibatch] | None) -> tuple[torch.Tensor, RoutingRecord | None]:
        """(B, T) policy log-probabilities with the MoE routers replayed from the engine's record (R3) or
        recorded (R2 / diagnostics), one forward per micro-batch as :meth:`_passes` runs them, each at the
        batch's full width (the update replays a routing record uncut); and the (B, P + T, k) record of the
        experts these passes chose (None under R3, whose record is the engine's)."""
        ids, attn, num_t = rollout.input_ids, rollout.attention_mask, rollout.completion_ids.shape[1]
        out = attn.new_zeros((ids.shape[0], num_t), dtype=torch.float32)  # (B, T)
        layers: list[torch.Tensor] | None = None  # per MoE layer: (B, P + T, k) expert ids
        for micro, real in self._layout(attn, num_t, minibatches, None):
            if self.plan.routing_from_rollout:
                routing = replay_routing(self.routed_model, rollout.routing.select(micro).to(ids.device))
            else:
                routing = capture_routing(self.routed_model)
            with routing as record:
                values = self.policy(ids[micro], attn[micro], num_t, routed=True).float()  # (m, T)
            rows = micro[real]  # a padding row repeats a real one: written where it is real
            out[rows] = values[real]
            if isinstance(record, RoutingRecord):
                if layers is None:
                    layers = [part.new_zeros((ids.shape[0], *part.shape[1:])) for part in record.indices]
                for whole, part in zip(layers, record.indices):
                    whole[rows] = part[real]
        return out, RoutingRecord(layers) if layers is not None else None

    def _passes(self, fn: LogprobFn, ids: torch.Tensor, attn: torch.Tensor, num_t: int,
                minibatches: list[Minibatch] | None, skip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) log-probabilities of ``fn``, 0 on the ``skip`` rows ((B,) bool), one forward per micro-batch:
        the update's own (per minibatch, padding rows included), else chunks of ``chunk_rows`` rows."""
        out = attn.new_zeros((ids.shape[0], num_t), dtype=torch.float32)  # (B, T)
        for micro, real in self._layout(attn, num_t, minibatches, skip):
            sub_ids, sub_attn, t = ids[micro], attn[micro], num_t
            if self.trim and not self.plan.routing_from_rollout:  # R3 replays the recorded layout uncut, as the update
                columns, t = trim_padding(sub_attn, num_t)
                sub_ids, sub_attn = sub_ids[:, columns], sub_attn[:, columns]
            values = fn(sub_ids, sub_attn, t).float()  # (m, T')
            out[micro[real], :t] = values[real]  # a padding row repeats a real one: written where it is real
        return out

    def _layout(self, attn: torch.Tensor, num_t: int, minibatches: list[Minibatch] | None,
                skip: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The forwards of a no-grad pass: (m,) row indices into the batch and (m,) which of them are real."""
        rows = torch.arange(attn.shape[0])  # (B,)
        if not self._aligned(minibatches):
            kept = rows if skip is None else rows[~skip]
            chunks = kept.split(self.chunk_rows) if self.chunk_rows else [kept]
            return [(chunk, torch.ones(len(chunk), dtype=torch.bool)) for chunk in chunks]
        out = []
        # the update's order; with ``skip`` (the on-policy minibatch 0), its first forward is pi_old's
        for step in minibatches[1 if skip is not None else 0:]:
            for micro in self.micro_batches(attn[step.index], num_t):
                out.append((step.index[micro], step.real[micro]))
        return out

    def _aligned(self, minibatches: list[Minibatch] | None) -> bool:
        """The passes follow the update's minibatches and micro-batches."""
        return minibatches is not None and self.micro_batches is not None


def mismatch_metrics(recomputed: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the sampler's log-probabilities are from the trainer's (GSPO paper section 5.4).

    A sampled token outside the trainer's top-k / top-p support (its log-probability -inf: a bfloat16 or
    vLLM sampler kept a boundary token the float32 nucleus drops) is counted in
    ``mismatch/out_of_support_tokens`` and left out of the other metrics, which stay finite.
    """
    kept = in_support(mask, recomputed, sampler)  # (B, T)
    diff = torch.where(kept, recomputed - sampler, torch.zeros_like(recomputed))  # (B, T)
    lengths = kept.sum(1).clamp_min(1)
    seq = diff.sum(1) / lengths  # (B,) sequence log-ratio of trainer vs sampler
    tokens = diff[kept]
    return {"mismatch/token_abs_mean": float(tokens.abs().mean()) if tokens.numel() else 0.0,
            "mismatch/token_std": float(tokens.std()) if tokens.numel() > 1 else 0.0,
            "mismatch/seq_std": float(seq.std()) if seq.numel() > 1 else 0.0,
            "mismatch/out_of_support_tokens": float((mask & ~kept).sum())}


def onpolicy_mismatch(pairs: list) -> dict[str, float]:
    """:func:`mismatch_metrics` over the on-policy rows an update measured (all keys, even if none)."""
    if not pairs:
        return mismatch_metrics(torch.zeros(0, 1), torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.bool))
    return mismatch_metrics(*(torch.cat(parts) for parts in zip(*pairs)))
