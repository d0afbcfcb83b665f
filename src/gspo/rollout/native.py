"""gspo's own prefill and decode step for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3).

Why: on a CPU, sampling a small model is bound by per-operator overhead, not by FLOPs. A decode step
through transformers' forward runs a few hundred small operators (mask construction, cache bookkeeping,
attention dispatch; CPU flash attention tiles for long queries and costs ~1.5 ms per call with a single
query row); with 128 sequences and a 1M-parameter model that is ~16 ms per token, against ~2 ms of
matrix products. This module runs the same mathematics in about a dozen operators per layer:

- the Q/K/V projections (and the MLP's gate/up pair) as one fused matrix product each, with the fused
  weights rebuilt from the live modules at every :meth:`NativeDecoder.start` (so training updates are
  always seen; the rebuild is one copy of the weights, negligible next to a rollout). Only for models up
  to :data:`FUSE_MAX_PARAMS` parameters, where per-operator overhead matters, or where the weights are
  prepacked anyway (next); larger models otherwise keep their separate projections rather than hold a
  transient copy of most of their weights;
- on a CPU in bfloat16, every projection and the LM head through a copy prepacked in oneDNN's blocked
  layout for the rollout (:class:`_Proj`): a small-batch ``F.linear`` reorders its weight on every call.
  Same values (bit for bit on the CPUs measured); a decode step of the Qwen3-0.6B shape with 16 rows reads its weights once.
  Fused and prepacked weights, and the cache, are released by :meth:`NativeDecoder.release` when a
  rollout ends;
- a key/value cache in the sampler's dtype, ``(B, H_kv, S, D)`` each; since prompts are left-padded,
  every row writes the same column at the same step. Sizing policy: it holds the prompt plus the first :data:`CACHE_BLOCK` new
  tokens, and grows by whole blocks (one copy of the written part) only when a decode step needs the
  next column, never beyond ``P + N``: a batch that stops early never pays for its token budget.
  :meth:`NativeDecoder.select` keeps (or repeats) rows of the cache, which is how finished rows leave
  the decode batch and how a prompt prefilled once is expanded to its group;
- attention as one ``scaled_dot_product_attention`` call per layer with grouped queries kept grouped
  (no ``repeat_kv``: each KV head's ``group`` query heads are its query rows) and one additive key mask.
  PyTorch's fused kernel streams the cache in blocks with float32 accumulation; two batched matrix
  products measured the same up to ~512 cached columns and 4-5x slower beyond in bfloat16 on a CPU
  (a decode step's attention at 1,024 columns, Qwen3-0.6B shape, 16 rows: 880 ms against 186 ms);
- rotary cos/sin gathered from a table built once per rollout by the model's own rotary module (so
  every static RoPE variant the model supports is reproduced, including its attention scaling).

The weights are the HF modules' own parameters (nothing is copied but the fused or prepacked projections and,
decoding float32 weights in bfloat16, the norms' casts), so
checkpoints, LoRA merging and weight sync are untouched. Output equals the HF forward up to float
rounding (tests compare logits and log-probabilities within 1e-5). Architectures or settings it does not
reproduce exactly (sliding windows, dynamic RoPE, MoE layers, PEFT wrappers, extra logit processing)
are refused by :func:`native_support`, and the engine falls back to transformers' forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FUSE_MAX_PARAMS = 200_000_000  # above this, fusing would copy GBs per rollout for a negligible gain
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")  # inv_freq fixed for a run
# KV-cache growth step in tokens: few enough re-allocations (a 2k-token answer grows 8 times, each a copy of
# the written part, next to the 2k steps that each read all of it), little unused tail (< 256 columns).
CACHE_BLOCK = 256


def native_support(model: torch.nn.Module) -> str | None:
    """None if :class:`NativeDecoder` reproduces ``model`` exactly, else the reason it does not."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if hasattr(model, "get_base_model") or hasattr(model, "peft_config"):
        return "a PEFT-wrapped model (its adapters live in the modules' forwards)"
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        return "the model has no .model.layers decoder body and linear .lm_head"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "only SiLU-gated MLPs without tensor-parallel slicing are reproduced"
    if getattr(config, "use_sliding_window", False) or (
        model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    ):
        return "sliding-window attention"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention is reproduced)"
    rotary = getattr(body, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return f"RoPE type {getattr(rotary, 'rope_type', None)!r} (only static RoPE tables are reproduced)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None or 2 * inv_freq.numel() != head_dim:
        return "partial rotary embeddings (RoPE over part of each head)"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        needed += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear for m in needed):
            return "a decoder layer whose projections are not plain nn.Linear modules"
    return None


@dataclass
class _Norm:
    """An HF RMSNorm's weight in the decoder's dtype and its epsilon (``weight * x * rsqrt(mean(x^2) + eps)``)."""

    weight: torch.Tensor  # (n,)
    eps: float

    @classmethod
    def of(cls, module: torch.nn.Module, dtype: torch.dtype) -> "_Norm":
        return cls(module.weight.to(dtype), getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """HF's RMSNorm, normalised in float32, as one fused operator."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)  # HF's rounding order


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as HF applies it: ``x * cos + rotate_half(x) * sin``; x (B, h, L, D), cos/sin (B, 1, L, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (B, h, L, D)
    return torch.addcmul(x * cos, rotated, sin)


def prepacked_linear_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode GEMMs on ``device`` in ``dtype`` use oneDNN's prepacked weights (:class:`_Proj`): a CPU,
    bfloat16, and a oneDNN build that runs bfloat16 natively (AVX512-BF16 or AMX; not an AVX2-only CPU)."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return bool(ops._is_mkldnn_bf16_supported()) and hasattr(ops, "_reorder_linear_weight") and hasattr(
            ops, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


# Rows the prepacked layout is blocked for (a hint: any row count gives the same result, bit for bit).
PACK_ROWS_HINT = 16


class _Proj:
    """One linear map of the decode loop: ``F.linear(x, weight, bias)``, or the same product through a
    weight prepacked in oneDNN's blocked layout (:func:`prepacked_linear_supported`).

    Why prepack: with 1-64 rows a bfloat16 ``F.linear`` on a CPU reorders the weight into oneDNN's layout on
    every call, so a decode step reads every weight twice and writes it once; prepacked, it reads it once.
    Measured on an AMD EPYC with AVX512-BF16 (2 threads): the 151,936 x 1,024 LM head with 16 rows 25.8 -> 15.6
    ms, a 6,144 x 1,024 gate/up pair 1.16 -> 0.58 ms. The result equals ``F.linear``'s bit for bit (the same
    oneDNN kernel) for every row count, so rows leaving the batch do not change the others' values.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool) -> None:
        self.bias = bias
        self.weight = None if pack else weight  # (out, in)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT) if pack else None

    @classmethod
    def of(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dtype: torch.dtype,
           pack: bool) -> "_Proj":
        """One map over the concatenated ``weights`` (fused projections), cast to ``dtype`` (a no-op in the
        model's own), prepacked when ``pack``; the bias concatenated likewise (zeros for one without)."""
        weight = torch.cat([w.to(dtype) for w in weights]) if len(weights) > 1 else weights[0].to(dtype)
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([(b if b is not None else w.new_zeros(w.shape[0])).to(dtype) for w, b in zip(weights, biases)])
        return cls(weight, bias, pack)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@dataclass
class _Layer:
    """One decoder layer's modules and its projections for this rollout (rebuilt at every start)."""

    module: torch.nn.Module
    qkv: _Proj | None  # (q + 2 kv, hidden) fused Q/K/V; None: the module's separate projections
    gate_up: _Proj | None  # (2 I, hidden) fused gate/up; None: separate projections
    o: _Proj | None = None  # (hidden, q); None: the module's own o_proj
    down: _Proj | None = None  # (hidden, I); None: the module's own down_proj
    input_norm: _Norm | None = None
    post_norm: _Norm | None = None  # before the MLP
    q_norm: _Norm | None = None  # Qwen3's per-head RMSNorms; None elsewhere
    k_norm: _Norm | None = None
    k_cache: torch.Tensor | None = None  # (B, H_kv, S, D)
    v_cache: torch.Tensor | None = None  # (B, H_kv, S, D)


class NativeDecoder:
    """Prefill and decode for one rollout over a Llama-family HF model (see module docstring).

    Usage: ``logits = dec.start(prompt_ids, prompt_mask, positions, max_len)`` then, for each new
    token, ``logits = dec.step(tokens, positions)``. Both return (B, V) float32 logits of the last
    position. ``dec.select(index)`` between steps keeps (or repeats) rows of the decode batch. Call under
    ``torch.inference_mode()``.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        """``dtype``: decode in this dtype from ``model``'s own weights of another (float32 master weights sampled
        in bfloat16 without a bfloat16 copy of the model): only where the weights are prepacked (every matrix is
        cast and packed at :meth:`start`; norms and embeddings are cast as read). None: the model's dtype."""
        reason = native_support(model)
        if reason is not None:
            raise ValueError(f"NativeDecoder cannot reproduce this model: {reason}")
        self.model = model
        weight = model.lm_head.weight
        self.dtype = dtype or weight.dtype
        self.pack = prepacked_linear_supported(weight.device, self.dtype)
        if self.dtype != weight.dtype and not self.pack:
            raise ValueError(f"NativeDecoder decodes a {weight.dtype} model in {self.dtype} only through prepacked "
                             "weights, which this device / build does not have")
        config = model.config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        # Fusing pays where per-operator overhead matters; the parameter count is fixed for the model's life.
        self.fuse = sum(p.numel() for p in model.parameters()) <= FUSE_MAX_PARAMS
        self.layers: list[_Layer] = []
        self.head: _Proj | None = None  # the prepacked LM head, where weights are prepacked
        self.norm: _Norm | None = None  # the final norm
        self.length = 0  # columns of the cache written so far
        self.capacity = 0  # columns allocated (see the module docstring's sizing policy)
        self.max_len = 0  # columns the rollout may need at most (P + N)
        self._key_bias: torch.Tensor | None = None  # (B, 1, 1, S) 0 or -inf per key column
        self._cos = self._sin = None  # (max_len, D) rotary tables

    def _fuse_weights(self) -> None:
        """Each layer's projections and norms from the live modules, in the decoder's dtype: Q/K/V and gate/up
        fused (small models, or wherever weights are prepacked: packing copies them anyway), every one prepacked
        where supported."""
        self.layers = []
        dtype, pack = self.dtype, self.pack
        head = self.model.lm_head
        self.head = _Proj.of([head.weight], [head.bias], dtype, pack) if pack else None
        self.norm = _Norm.of(self.model.model.norm, dtype)
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)  # Qwen3: per-head RMSNorm
            norms = dict(input_norm=_Norm.of(layer.input_layernorm, dtype),
                         post_norm=_Norm.of(layer.post_attention_layernorm, dtype),
                         q_norm=_Norm.of(q_norm, dtype) if q_norm is not None else None,
                         k_norm=_Norm.of(k_norm, dtype) if k_norm is not None else None)
            if not (self.fuse or pack):
                self.layers.append(_Layer(module=layer, qkv=None, gate_up=None, **norms))
                continue
            qkv, gate_up = (a.q_proj, a.k_proj, a.v_proj), (m.gate_proj, m.up_proj)
            self.layers.append(_Layer(
                module=layer,
                qkv=_Proj.of([p.weight for p in qkv], [p.bias for p in qkv], dtype, pack),
                gate_up=_Proj.of([p.weight for p in gate_up], [p.bias for p in gate_up], dtype, pack),
                o=_Proj.of([a.o_proj.weight], [a.o_proj.bias], dtype, True) if pack else None,
                down=_Proj.of([m.down_proj.weight], [m.down_proj.bias], dtype, True) if pack else None,
                **norms,
            ))

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor,
              max_len: int) -> torch.Tensor:
        """Prefill (B, P) left-padded prompts into a fresh cache for at most ``max_len`` columns; (B, V) logits."""
        batch, prompt_len = prompt_ids.shape
        self._fuse_weights()
        dtype = self.dtype
        device = prompt_ids.device
        self.max_len, self.capacity = max_len, min(max_len, prompt_len + CACHE_BLOCK)
        for layer in self.layers:  # unwritten columns are never read (attention reads [:length])
            layer.k_cache = torch.empty((batch, self.num_kv_heads, self.capacity, self.head_dim), dtype=dtype,
                                        device=device)
            layer.v_cache = torch.empty((batch, self.num_kv_heads, self.capacity, self.head_dim), dtype=dtype,
                                        device=device)
        table_positions = torch.arange(max_len, device=device)[None]  # (1, S)
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = self.model.model.rotary_emb(probe, table_positions)  # (1, S, D) each
        self._cos, self._sin = cos[0], sin[0]  # (S, D)
        key_bias = torch.zeros((batch, 1, 1, self.capacity), dtype=dtype, device=device)  # (B, 1, 1, S)
        key_bias[:, 0, 0, :prompt_len].masked_fill_(~prompt_mask, float("-inf"))
        self._key_bias = key_bias
        # Prefill mask: causal over the prompt, padded keys hidden; each query always sees itself so
        # that rows of left padding stay finite (their outputs are never used).
        causal = torch.ones((prompt_len, prompt_len), dtype=torch.bool, device=device).tril()  # (P, P)
        allowed = causal & prompt_mask[:, None, :]  # (B, P, P)
        allowed |= torch.eye(prompt_len, dtype=torch.bool, device=device)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        self.length = 0
        return self._forward(prompt_ids, positions, bias[:, None])  # (B, 1, P, P) bias

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row ((B, 1) ids at (B, 1) positions); (B, V) logits."""
        end = self.length + 1
        if end > self.capacity:
            self._grow(min(self.max_len, self.capacity + CACHE_BLOCK))
        return self._forward(tokens, positions, self._key_bias[..., :end])  # (B, 1, 1, end) bias

    def select(self, index: torch.Tensor) -> None:
        """Keep the decode-batch rows ``index`` ((b,) long, repeats allowed): the cache and key mask follow."""
        for layer in self.layers:
            layer.k_cache = layer.k_cache.index_select(0, index)  # (b, H_kv, S, D)
            layer.v_cache = layer.v_cache.index_select(0, index)  # (b, H_kv, S, D)
        self._key_bias = self._key_bias.index_select(0, index)  # (b, 1, 1, S)

    def _grow(self, capacity: int) -> None:
        """Re-allocate the cache with ``capacity`` columns, copying the written ones."""
        for layer in self.layers:
            for name in ("k_cache", "v_cache"):
                old = getattr(layer, name)  # (B, H_kv, S, D)
                new = old.new_empty((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(layer, name, new)
        key_bias = self._key_bias.new_zeros((*self._key_bias.shape[:3], capacity))  # completion columns: 0
        key_bias[..., : self.capacity] = self._key_bias
        self._key_bias, self.capacity = key_bias, capacity

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Run ids (B, L) through every layer, appending their keys/values at ``self.length``."""
        body = self.model.model
        x = body.embed_tokens(ids).to(self.dtype)  # (B, L, hidden): a lookup, so casting after it is exact
        cos = self._cos[positions].unsqueeze(1)  # (B, 1, L, D)
        sin = self._sin[positions].unsqueeze(1)  # (B, 1, L, D)
        batch, length = ids.shape
        start, end = self.length, self.length + length
        # Grouped queries stay grouped: each kv head's (group * L) query rows, ordered (group, L), so the key
        # mask is repeated over the group, once for every layer: (B, 1, L, S) -> (B, 1, group * L, S) (a view
        # when L = 1).
        group = self.num_heads // self.num_kv_heads
        mask = bias.unsqueeze(2).expand(batch, 1, group, length, end).reshape(batch, 1, group * length, end)
        for layer in self.layers:
            x = x + self._attention(layer, layer.input_norm(x), cos, sin, mask, start, end)
            x = x + self._mlp(layer, layer.post_norm(x))
        self.length = end
        last = self.norm(x[:, -1:])  # (B, 1, hidden): the head sees HF's (B, L, hidden) layout
        head = self.head if self.head is not None else self.model.lm_head
        return head(last)[:, -1].float()  # (B, V)

    def _attention(self, layer: _Layer, x: torch.Tensor, cos, sin, mask, start: int, end: int) -> torch.Tensor:
        batch, length, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        attn = layer.module.self_attn
        if layer.qkv is not None:
            qkv = layer.qkv(x)  # (B, L, (h + 2 hkv) d)
            q, k, v = qkv.view(batch, length, h + 2 * hkv, d).split((h, hkv, hkv), dim=2)  # (B, L, heads, D)
        else:
            q = attn.q_proj(x).view(batch, length, h, d)  # (B, L, h, D)
            k = attn.k_proj(x).view(batch, length, hkv, d)  # (B, L, hkv, D)
            v = attn.v_proj(x).view(batch, length, hkv, d)  # (B, L, hkv, D)
        if layer.q_norm is not None:  # Qwen3: RMSNorm over each head's vector
            q, k = layer.q_norm(q), layer.k_norm(k)
        q = _rotate(q.transpose(1, 2), cos, sin)  # (B, h, L, D)
        k = _rotate(k.transpose(1, 2), cos, sin)  # (B, hkv, L, D)
        layer.k_cache[:, :, start:end] = k
        layer.v_cache[:, :, start:end] = v.transpose(1, 2)
        keys, values = layer.k_cache[:, :, :end], layer.v_cache[:, :, :end]  # (B, hkv, S, D) each
        q = q.reshape(batch, hkv, (h // hkv) * length, d)  # each kv head's query rows (the mask's order)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)  # (B, hkv, gL, D)
        out = out.view(batch, h, length, d).transpose(1, 2).reshape(batch, length, h * d)  # (B, L, h D)
        return (layer.o or attn.o_proj)(out)  # (B, L, hidden)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        mlp = layer.module.mlp
        if layer.gate_up is not None:
            gate, up = layer.gate_up(x).chunk(2, dim=-1)  # (B, L, I) each
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)  # (B, L, I) each
        return (layer.down or mlp.down_proj)(F.silu(gate).mul_(up))  # (B, L, hidden)

    def release(self) -> None:
        """Drop the rollout's cache, fused weights and rotary tables (nothing is held between rollouts)."""
        self.layers, self.head, self.norm = [], None, None
        self._key_bias = self._cos = self._sin = None
        self.length = self.capacity = self.max_len = 0
