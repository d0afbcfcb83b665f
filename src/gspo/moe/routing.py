"""Router capture and Routing Replay for Hugging Face MoE models (GSPO paper, section 5.3).

After one gradient update about 10% of the experts a Mixture-of-Experts model activates for the same
tokens change, which makes token-level importance ratios noisy. *Routing Replay* caches the experts
activated under pi_old and forces the same experts when computing pi_theta for the ratio; the gate
weights are still computed from the live router logits, so the router keeps its gradient. The paper
calls replay from the training model's own old-policy pass R2, and replay from the rollout engine's
pass R3. Both are the same two calls here:

    with capture_routing(model) as routing:      # old-policy pass (R2) or sampling pass (R3)
        model(input_ids)
    with replay_routing(model, routing):         # training forward (autograd on)
        logits = model(input_ids).logits

Both context managers add forward hooks to the routers of THAT model instance and remove them on
exit, exceptions included: no class, global or config is touched, and the hooks fire whether the
model is called through its CausalLM wrapper or its decoder body (``model.get_decoder()(...)``).
Two threads must not run the same model instance inside these contexts at once (hooks are per
instance, not per thread).

Supported architectures (transformers v5 top-k routers, whose forward maps flattened hidden states
``(B*S, H)`` to ``(router_logits (B*S, E), weights (B*S, k), indices (B*S, k))``): Qwen3-MoE,
Qwen2-MoE, Mixtral and OLMoE. Hook points, per MoE layer: a forward pre-hook on the sparse MoE block
(the router's parent, which sees ``(B, S, H)``) reads the batch shape; a forward hook on the router
(``block.gate``) records or replaces its indices and weights.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class _RouterSpec:
    """How one architecture turns router logits into gate weights (to recompute them in replay)."""

    module: str  # transformers.models.<module>.modeling_<module>
    router_class: str
    always_normalise: bool  # Mixtral renormalises the top-k probabilities without a config flag
    cast_to_logits_dtype: bool  # Qwen/OLMoE cast weights back to the logits dtype; Mixtral keeps fp32


_ROUTER_SPECS = {
    "qwen3_moe": _RouterSpec("qwen3_moe", "Qwen3MoeTopKRouter", False, True),
    "qwen2_moe": _RouterSpec("qwen2_moe", "Qwen2MoeTopKRouter", False, True),
    "mixtral": _RouterSpec("mixtral", "MixtralTopKRouter", True, False),
    "olmoe": _RouterSpec("olmoe", "OlmoeTopKRouter", False, True),
}
SUPPORTED_ARCHITECTURES = tuple(_ROUTER_SPECS)


@dataclass
class RoutingRecord:
    """The top-k expert indices each MoE layer chose, for every position of a ``(B, S)`` batch.

    ``indices[l]`` is a ``(B, S, k)`` integer tensor for the l-th MoE layer in module order; positions are
    those of the forward's ``input_ids`` (the trainer's ``[left-padded prompt | right-padded
    completion]`` layout). Padding positions are routed too; mask them out where it matters. Captures
    store the smallest dtype that holds the expert ids (:func:`index_dtype`: uint8 up to 256 experts, an
    eighth of int64's bytes at long lengths); use ``.long()`` before indexing or gathering with them.
    """

    indices: list[torch.Tensor] = field(default_factory=list)  # per MoE layer: (B, S, k) integer

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int]:
        """(B, S) of the captured batch."""
        self._require_nonempty()
        batch, seq, _ = self.indices[0].shape
        return batch, seq

    @property
    def top_k(self) -> int:
        self._require_nonempty()
        return self.indices[0].shape[-1]

    def select(self, index: torch.Tensor | slice) -> RoutingRecord:
        """The batch rows ``index`` (long / bool tensor or slice), as a new record."""
        return RoutingRecord([layer[index] for layer in self.indices])

    def narrow(self, start: int, length: int) -> RoutingRecord:
        """Positions ``start : start + length`` of the sequence dimension, as a new record."""
        return RoutingRecord([layer.narrow(1, start, length) for layer in self.indices])

    def pad_to(self, seq_len: int) -> RoutingRecord:
        """Right-pad the sequence dimension to ``seq_len`` with experts ``0..k-1``.

        For records captured during KV-cached generation, which never forward the last sampled token:
        the filler only affects positions at or after it, which are masked completion padding.
        """
        batch, seq = self.shape
        if seq_len < seq:
            raise ValueError(f"pad_to({seq_len}) is shorter than the record's {seq} positions")
        filler = torch.arange(self.top_k, device=self.indices[0].device, dtype=self.indices[0].dtype)
        filler = filler.expand(batch, seq_len - seq, self.top_k)  # (B, S' - S, k)
        return RoutingRecord([torch.cat([layer, filler], dim=1) for layer in self.indices])

    def to(self, device: torch.device | str) -> RoutingRecord:
        return RoutingRecord([layer.to(device) for layer in self.indices])

    @staticmethod
    def cat(records: list[RoutingRecord], dim: int = 0) -> RoutingRecord:
        """Concatenate records along the batch (``dim=0``) or sequence (``dim=1``) dimension."""
        layers = {record.num_layers for record in records}
        if len(layers) != 1:
            raise ValueError(f"cannot concatenate records with different MoE layer counts {sorted(layers)}")
        return RoutingRecord([torch.cat(group, dim=dim) for group in zip(*(r.indices for r in records))])

    def _require_nonempty(self) -> None:
        if not self.indices:
            raise ValueError("empty RoutingRecord: no MoE forward ran inside capture_routing()")


@dataclass(frozen=True)
class _MoeLayer:
    block: nn.Module  # sparse MoE block: forward((B, S, H)) -> (B, S, H)
    router: nn.Module  # block.gate: forward((B*S, H)) -> (logits, weights, indices)
    spec: _RouterSpec


def _find_moe_layers(model: nn.Module) -> list[_MoeLayer]:
    """The MoE layers of ``model`` in module order; a ValueError naming the architecture if none."""
    router_types = {_router_class(spec): spec for spec in _ROUTER_SPECS.values()}
    router_types.pop(None, None)  # architectures this transformers version lacks
    layers = []
    for name, module in model.named_modules():
        spec = next((s for cls, s in router_types.items() if isinstance(module, cls)), None)
        if spec is not None:
            parent = model.get_submodule(name.rpartition(".")[0])
            layers.append(_MoeLayer(block=parent, router=module, spec=spec))
    if not layers:
        config = getattr(model, "config", None)
        arch = getattr(config, "model_type", None) or type(model).__name__
        supported = ", ".join(f"{key} ({spec.router_class})" for key, spec in _ROUTER_SPECS.items())
        raise ValueError(
            f"routing capture/replay: no supported MoE router in {type(model).__name__} "
            f"(architecture {arch!r}). Supported architectures: {supported} (transformers>=5 routers)."
        )
    return layers


def supports_routing(model: nn.Module) -> bool:
    """Whether ``model`` has MoE layers that :func:`capture_routing` / :func:`replay_routing` handle."""
    try:
        _find_moe_layers(model)
    except ValueError:
        return False
    return True


def _router_class(spec: _RouterSpec) -> type | None:
    """The router class, or None if this transformers version has none (v4 routed with nn.Linear)."""
    # Imported lazily so that importing gspo.moe does not import every modeling file.
    try:
        module = importlib.import_module(f"transformers.models.{spec.module}.modeling_{spec.module}")
    except ImportError:
        return None
    return getattr(module, spec.router_class, None)


@contextlib.contextmanager
def _hooks(register) -> Iterator[None]:
    """Run ``register(handles)``, which appends hook handles; remove them all on exit, even on error."""
    handles = []
    try:
        register(handles)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def capture_routing(
    model: nn.Module, concat: Literal["batch", "sequence"] = "batch"
) -> Iterator[RoutingRecord]:
    """Record the top-k experts of every MoE layer during the forwards run inside the block.

    Yields a :class:`RoutingRecord` that is filled in as each forward runs. Several forwards in one
    block are concatenated: along the batch for ``concat="batch"`` (micro-batches of equal length),
    along the sequence for ``concat="sequence"`` (KV-cached generation, where each forward extends
    the sequence: the R3 source for an in-process engine). Captures what the experts actually used,
    so inside a :func:`replay_routing` block it records the replayed experts. Run capture under
    ``torch.no_grad()``, or call ``backward()`` after the block: gradient-checkpoint recomputation would
    fire the hooks a second time.
    """
    if concat not in ("batch", "sequence"):
        raise ValueError(f"concat must be 'batch' or 'sequence', got {concat!r}")
    layers = _find_moe_layers(model)
    record = RoutingRecord()
    dim = 0 if concat == "batch" else 1

    def register(handles: list) -> None:
        for position, layer in enumerate(layers):
            shape: dict[str, tuple[int, int]] = {}  # (B, S) of this layer's current forward
            handles.append(layer.block.register_forward_pre_hook(_remember_shape(shape)))
            handles.append(layer.router.register_forward_hook(_record_hook(record, position, shape, dim)))

    with _hooks(register):
        yield record


@dataclass
class ReplayStats:
    """What a replay block overrode: per forward and MoE layer, a ``(B, S)`` bool tensor that is True where
    the live router's own top-k set differed from the replayed one (the routing that replay held fixed)."""

    changed: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def replay_routing(model: nn.Module, record: RoutingRecord) -> Iterator[ReplayStats]:
    """Force every MoE layer to use ``record``'s experts during the forwards run inside the block.

    Routing Replay (GSPO section 5.3): the expert set of each token and layer comes from ``record``
    (R2: the old-policy pass; R3: the rollout engine's pass) instead of the router's own top-k; the
    gate weights are recomputed from the LIVE router logits over those experts with the
    architecture's own formula (softmax over all experts, gather, renormalise if it does), so the
    router still gets a gradient. Every forward in the block must have the record's ``(B, S)``;
    slice micro-batches with ``record.select(rows)``. With gradient checkpointing, call
    ``backward()`` inside the block so the recomputed forward replays too. Yields a :class:`ReplayStats`
    saying where the live routers would have chosen other experts.
    """
    layers = _find_moe_layers(model)
    if record.num_layers != len(layers):
        raise ValueError(
            f"routing record has {record.num_layers} MoE layers but the model has {len(layers)}"
        )
    if any(layer.router.top_k != record.top_k for layer in layers):
        raise ValueError(f"routing record has top-k {record.top_k} but the model's routers use another")

    stats = ReplayStats()

    def register(handles: list) -> None:
        for layer, indices in zip(layers, record.indices):
            handles.append(layer.block.register_forward_pre_hook(_check_shape(indices.shape[:2])))
            # prepend: any capture hook on the same router then sees the replayed output.
            hook = _replay_hook(indices, layer.spec, stats)
            handles.append(layer.router.register_forward_hook(hook, prepend=True))

    with _hooks(register):
        yield stats


def _remember_shape(shape: dict):
    def pre_hook(block: nn.Module, args: tuple) -> None:
        shape["bs"] = tuple(args[0].shape[:2])  # hidden_states: (B, S, H)

    return pre_hook


def index_dtype(num_experts: int) -> torch.dtype:
    """The smallest integer dtype that holds expert ids ``0 .. num_experts - 1``."""
    return torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32


def _record_hook(record: RoutingRecord, position: int, shape: dict, dim: int):
    def hook(router: nn.Module, args: tuple, output: tuple) -> None:
        flat = output[2].detach().to(index_dtype(output[0].shape[-1]))  # (B*S, k) compact expert ids
        indices = flat.reshape(*shape["bs"], flat.shape[-1])  # (B, S, k)
        if position == len(record.indices):  # first forward of the block
            record.indices.append(indices)
            return
        previous = record.indices[position]
        other = 1 - dim
        if previous.shape[other] != indices.shape[other]:
            raise ValueError(
                f"capture_routing: forwards of shape {tuple(previous.shape[:2])} and "
                f"{tuple(indices.shape[:2])} cannot be concatenated along dim {dim}; "
                "use one capture block per forward (and RoutingRecord.cat if needed)"
            )
        record.indices[position] = torch.cat([previous, indices], dim=dim)

    return hook


def _check_shape(expected: torch.Size):
    def pre_hook(block: nn.Module, args: tuple) -> None:
        actual = tuple(args[0].shape[:2])  # hidden_states: (B, S, H)
        if actual != tuple(expected):
            raise ValueError(
                f"replay_routing: the forward has (batch, seq) = {actual} but the routing record "
                f"was captured on {tuple(expected)}; select/narrow the record to match the batch"
            )

    return pre_hook


def _replay_hook(indices: torch.Tensor, spec: _RouterSpec, stats: ReplayStats):
    def hook(router: nn.Module, args: tuple, output: tuple) -> tuple:
        router_logits = output[0]  # (B*S, E), live: carries the router's gradient
        cached = indices.reshape(-1, indices.shape[-1]).to(router_logits.device).long()  # (B*S, k)
        live = output[2].detach()  # (B*S, k) the router's own choice, which replay replaces
        changed = (live.sort(dim=-1).values != cached.sort(dim=-1).values).any(dim=-1)  # (B*S,) as sets
        stats.changed.append(changed.reshape(indices.shape[:2]))  # (B, S)
        return router_logits, replay_weights(router_logits, cached, router, spec), cached

    return hook


def replay_weights(
    router_logits: torch.Tensor, indices: torch.Tensor, router: nn.Module, spec: _RouterSpec
) -> torch.Tensor:
    """Gate weights ``(N, k)`` of the cached experts ``indices`` under the live ``router_logits``.

    The same formula as the architecture's own router, with the top-k replaced by a gather:
    ``w = softmax(logits)[indices]``, then ``w / sum(w)`` where the architecture renormalises.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E) float32, as every router does
    weights = probs.gather(-1, indices)  # (N, k)
    if spec.always_normalise or router.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype) if spec.cast_to_logits_dtype else weights
