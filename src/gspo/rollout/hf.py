"""In-process rollout engine for any Hugging Face causal LM.

One prefill over the left-padded prompts, then batched decoding with a KV cache in a hand-written loop
(not ``model.generate``): for small models the per-token Python overhead dominates, so the loop keeps
per-token work to the model call plus a few tensor ops on preallocated output buffers, and stops as
soon as every sequence has emitted EOS (unless ``ignore_eos``).

Cost follows the tokens actually generated: each distinct prompt is prefilled once and its KV cache
expanded to the rows that share it (a group's G responses; :func:`gspo.logprobs.distinct_prompts`, as
the training forward's :func:`gspo.logprobs.shared_prompt_hidden` does), and a row that emitted EOS
leaves the decode batch with its cache rows before the next step (compaction); outputs are written
into place by original row. Every row draws from its own uniform stream, indexed by its original row,
so neither changes a token: the tests compare with and without compaction.

Log-probabilities returned with the rollout are the sampler's: ``log_softmax(logits / temperature)`` of
the sampled token, over the top-k / top-p support renormalised when those are on (the behaviour policy
is the truncated distribution); the trainer computes its log-probabilities over the same support
(``gspo.logprobs.token_logprobs(..., temperature=T, top_k=k, top_p=p)``), so the ratio is not biased by
the kept mass. With temperature 0 (greedy) the log-probabilities are untempered (temperature 1).

Decode step: for Llama-family models (Llama, Mistral, Qwen2, Qwen3) the engine runs gspo's own
prefill and decode step (:mod:`gspo.rollout.native`: fused projections, a preallocated cache, grouped
attention in two matrix products), which computes the same logits in a fraction of transformers'
per-token operator count; other models, MoE models and PEFT-wrapped ones run transformers' forward.
``decoder="hf"`` forces transformers' forward (``rollout.decoder=hf``).

Precision: with ``dtype`` equal to the model's (or None) the engine samples with the training module
itself. With a different ``dtype`` (e.g. bfloat16 for a float32 policy, standing in for a lower-precision
inference engine, GSPO paper section 5.4) it keeps its own copy of the weights in that dtype, refreshed
in place by :meth:`HFEngine.sync_weights`. Buffers (e.g. rotary inverse frequencies) stay in their
original dtype, as inference engines keep them. Except where the native decoder prepacks its weights (a
CPU in bfloat16, :func:`gspo.rollout.native.prepacked_linear_supported`): it casts and packs the training
module's own weights at every rollout, the same values a copy would hold, so no copy is kept (1.1 GB at
the Qwen3-0.6B shape, held through every training step before).

Lockstep (:class:`Lockstep`): a model whose forward is a collective over processes (FSDP2 shards, each
layer gathered as it runs) is sampled from directly, through transformers' forward, with every process
running the same number of forwards: decoding goes on until every process's rows have finished.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import DynamicCache, StaticCache

from gspo.errors import ConfigError
from gspo.logprobs import distinct_prompts, truncated_log_softmax, truncation_mask
from gspo.models.modes import eval_mode
from gspo.moe import capture_routing, supports_routing
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams, check_request, full_weights, request_seeds
from gspo.rollout.native import CACHE_BLOCK, NativeDecoder, native_support, prepacked_linear_supported

DECODERS = ("auto", "native", "hf")


@dataclass(frozen=True)
class Lockstep:
    """How to sample with a model whose forward is a collective over processes (each process holds a shard of
    the weights, gathered layer by layer while the model runs), so every process must run as many forwards.

    ``call(fn)``: ``fn()`` run where the model can run (inside its wrapper's call, autograd off; not under
    inference mode: the wrapper's gather buffers, once made there, could not be written outside it).
    ``total(n)``: ``n`` summed over the processes (a collective): decoding stops when every process's rows
    have finished.
    """

    call: Callable
    total: Callable[[int], int]


class HFEngine:
    """Samples completions from a Hugging Face causal LM with a KV cache (see module docstring).

    Attributes (the engine's own business: the trainer sees only :attr:`info` and the interface):
        model: the module sampled from: the policy itself, or the engine's own copy in ``dtype``.
        shares_model: True when ``model`` is the policy (``sync_weights`` is then a no-op).
        static_cache: use transformers' StaticCache rather than DynamicCache (None, the default where the
            model supports it: for rollouts of at most :data:`CACHE_BLOCK` prompt + new tokens); settable,
            e.g. to compare the two in benchmarks/bench_sampling.py.
        compact: finished rows leave the decode batch (True); settable to False only for tests and
            benchmarks, which compare the two (the same tokens and log-probabilities either way).
        native: the :class:`NativeDecoder` used for sampling, or None when transformers' forward is.
        native_reason: why the native decoder is not used (None when it is).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_token_id: int,
        eos_token_id: int | list[int],
        dtype: torch.dtype | None = None,
        decoder: str = "auto",
        copy: bool = False,
        lockstep: Lockstep | None = None,
    ) -> None:
        """``dtype``: sample from a copy in this dtype (None: the model's). ``copy``: keep an own copy even
        in the model's dtype (the policy is about to be sharded by FSDP2 and cannot be sampled from).
        ``lockstep``: sample from ``model`` itself, a collective over processes (:class:`Lockstep`); ``dtype``
        is then the dtype it computes in under ``lockstep.call`` (no copy is made)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.lockstep = lockstep
        self.pad_token_id = int(pad_token_id)
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long)  # (E,)
        model_dtype = next(model.parameters()).dtype
        # A lower-precision sampler on a CPU with prepacked weights (gspo.rollout.native) decodes from the model's
        # own weights, cast and packed at every rollout: no copy of the model in the sampler's dtype is kept
        self.packs_from_model = (lockstep is None and not copy and dtype not in (None, model_dtype)
                                 and decoder != "hf" and native_support(model) is None
                                 and prepacked_linear_supported(next(model.parameters()).device, dtype))
        self.shares_model = lockstep is not None or ((dtype is None or dtype == model_dtype) and not copy) or (
            self.packs_from_model)
        self.model = model if self.shares_model else _copy_in_dtype(model, dtype or model_dtype)
        # A PEFT (LoRA) wrapper's forward hides the keyword but passes it through to the model it wraps.
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        forward_params = inspect.signature(inner.forward).parameters
        self._keeps_last_logits = "logits_to_keep" in forward_params
        # transformers >= 5.2x names the KV cache argument `cache` (`past_key_values` is removed in 5.40)
        self._cache_keyword = "cache" if "cache" in forward_params else "past_key_values"
        # StaticCache writes keys/values in place into buffers preallocated for P + max_new_tokens;
        # DynamicCache re-allocates (torch.cat) every layer's cache at every step. On the CPU, 128
        # sequences, the static cache measured 3-10% faster (it attends over the full preallocated
        # length, which costs more at batch 1, where dynamic was ~10% faster). Since it also allocates and
        # attends over the whole budget from the first step, it is used only for rollouts of at most
        # CACHE_BLOCK columns (None: that policy; True / False force it). Models that declare they cannot
        # run with a static cache keep the dynamic one.
        self.static_cache: bool | None = None if getattr(self.model, "_can_compile_fullgraph", False) else False
        self.compact = True  # finished rows leave the decode batch; False only to test that nothing changes
        self.native_reason = native_support(self.model) if decoder != "hf" else "rollout.decoder=hf"
        if lockstep is not None:  # the native step reads weights outside the modules' forwards, ungathered
            self.native_reason = "the weights are gathered only inside the modules' own forwards (lockstep)"
        if decoder == "native" and self.native_reason is not None:  # a ConfigError: the CLI shows one line
            raise ConfigError(f"rollout.decoder=native cannot sample this model: {self.native_reason}; "
                              "use rollout.decoder=auto (falls back to transformers' forward)")
        self.native = None
        if self.native_reason is None:
            self.native = NativeDecoder(self.model, dtype=dtype if self.packs_from_model else None)
        self._decoder = self.native if self.native is not None else _TransformersDecoder(self)
        engine_dtype = dtype if (lockstep is not None or self.packs_from_model) and dtype is not None else next(
            self.model.parameters()).dtype
        self._info = EngineInfo(
            name=("native decode step" if self.native is not None else "transformers' forward")
            + ("" if engine_dtype == torch.float32 else f", {str(engine_dtype).removeprefix('torch.')}"),
            # the training module's own float32 weights (or an exact float32 copy refreshed every step)
            exact_logprobs=engine_dtype == model_dtype == torch.float32,
            records_routing=supports_routing(self.model),
            weight_sync="shared" if self.shares_model else "copy",
        )

    @property
    def info(self) -> EngineInfo:
        return self._info

    def close(self) -> None:
        self._decoder.release()

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s parameters (and buffers) into the engine's copy, in place.

        A no-op when the engine samples with ``model`` itself.
        """
        if getattr(model, "module", model) is self.model:
            return
        targets = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        seen = set()
        for name, tensor in full_weights(model):  # gathers FSDP2 shards (every process iterates)
            if name not in targets:
                raise ValueError(f"sync_weights: the policy's '{name}' has no counterpart in the engine's copy")
            targets[name].copy_(tensor)  # casts to the engine's dtype, no re-allocation
            seen.add(name)
        if seen != targets.keys():
            missing = sorted(targets.keys() - seen)[:3]
            raise ValueError(f"sync_weights: the policy has no {', '.join(missing)} (engine copy differs)")

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None, *,
        row_seeds: list[int] | None = None, record_routing: bool = False,
    ) -> Rollout:
        """Sample one completion per prompt (token-id lists, unpadded) in one batch.

        Every row draws its randomness from its own stream: uniforms drawn on the CPU from the row's
        seed, sampled by inverse CDF on the model's device (so no generator ever has to live on the
        model's device). ``row_seeds``: one seed per prompt, so a row's sample does not depend on which
        other rows share the batch (the same response whether sampled by 1 process or as part of a
        shard); without them the row seeds are drawn from ``generator`` (a CPU generator, or torch's
        global one when None).
        """
        check_request(prompts, params)
        device = next(self.model.parameters()).device
        prompt_ids, prompt_mask = _left_pad(prompts, self.pad_token_id, device)
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {len(prompts)} prompts")
        seeds = row_seeds if row_seeds is not None else request_seeds(len(prompts), None, generator)
        uniforms = None
        if params.temperature > 0:
            uniforms = torch.stack([torch.rand(params.max_new_tokens, generator=torch.Generator().manual_seed(s))
                                    for s in seeds]).to(device)  # (B, N) drawn on the CPU
        if record_routing and not self._info.records_routing:
            raise ValueError("record_routing needs a Mixture-of-Experts model (engine.info.records_routing)")
        recorder = capture_routing(self.model, concat="sequence") if record_routing else contextlib.nullcontext()
        no_grad = torch.inference_mode() if self.lockstep is None else contextlib.nullcontext()  # lockstep: call's

        def sample():
            return self._sample(prompt_ids, prompt_mask, params, uniforms, reshape=not record_routing)

        with eval_mode(self.model), no_grad, recorder as routing:
            try:
                out = sample() if self.lockstep is None else self.lockstep.call(sample)
            finally:
                self._decoder.release()  # no cache or fused weights held between rollouts
        # Clone out of inference mode so the trainer may use these tensors in autograd graphs.
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=out["completion_ids"].clone(),
            completion_mask=out["completion_mask"].clone(),
            logprobs=out["logprobs"].clone(),
            truncated=out["truncated"].clone(),
            routing=routing.pad_to(prompt_ids.shape[1] + out["completion_ids"].shape[1]) if record_routing else None,
            timings=out["timings"],
        )

    def _sample(self, prompt_ids, prompt_mask, params: SamplingParams, uniforms: torch.Tensor | None,
                reshape: bool = True) -> dict:
        """The prefill + decode loop; returns completion tensors and timings (see :meth:`_decode_batch`).

        ``reshape`` (False only with MoE routing records, which need every row in every forward): prefill
        each distinct prompt once and let finished rows leave the decode batch.
        """
        batch, prompt_len = prompt_ids.shape
        max_new, device = params.max_new_tokens, prompt_ids.device
        completion_ids = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=device)
        completion_mask = torch.zeros((batch, max_new), dtype=torch.bool, device=device)
        logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, P)
        eos_ids = self.eos_ids.to(device)
        compact = reshape and self.compact

        start = time.perf_counter()
        logits = self._prefill(prompt_ids, prompt_mask, positions, prompt_len + max_new, share=reshape)  # (B, V)
        prefill_s = time.perf_counter() - start
        # Decode batch: `rows` are the original rows still in it, `alive` those of them not yet finished
        # (always all of them when compacting: a finished row leaves before the next step).
        rows = torch.arange(batch, device=device)  # (b,)
        where = slice(None)  # `rows` as an index: a plain slice (a view, no gather) until the first compaction
        alive = torch.ones(batch, dtype=torch.bool, device=device)  # (b,)
        next_position = positions[:, -1:] + 1  # (b, 1) position of the next completion token
        tokens = None
        steps = 0
        remaining = batch  # rows of this process not finished (lockstep: others' may still be decoding)
        for step in range(max_new):
            if remaining:
                steps = step + 1
            if step > 0:
                logits = self._decoder.step(tokens[:, None], next_position)  # (b, V)
                next_position += 1
            uniform = uniforms[where, step] if uniforms is not None else None  # (b,) each row's own stream
            tokens, token_logprobs = sample_next_token(logits, params, uniform)  # (b,), (b,)
            completion_ids[where, step] = tokens.masked_fill(~alive, self.pad_token_id)
            logprobs[where, step] = token_logprobs.masked_fill_(~alive, 0.0)
            completion_mask[where, step] = alive
            if params.ignore_eos:
                continue
            alive &= ~torch.isin(tokens, eos_ids)
            remaining = int(alive.sum())  # the loop's one host sync per step
            if (remaining if self.lockstep is None else self.lockstep.total(remaining)) == 0:
                break
            if compact and remaining < len(rows) and step + 1 < max_new:  # finished rows leave the batch
                # (b',); lockstep: one finished row stays while other processes decode (a forward each step)
                keep = alive.nonzero().squeeze(1) if remaining else rows.new_zeros(1)
                rows, alive, tokens, next_position = rows[keep], alive[keep], tokens[keep], next_position[keep]
                where = rows
                self._decoder.select(keep)
        decode_s = time.perf_counter() - start - prefill_s
        truncated = torch.zeros(batch, dtype=torch.bool, device=device)  # (B,) rows that left had finished
        truncated[where] = True if params.ignore_eos else alive
        return {
            "completion_ids": completion_ids[:, :steps],
            "completion_mask": completion_mask[:, :steps],
            "logprobs": logprobs[:, :steps],
            "truncated": truncated,
            "timings": {"sample/prefill_s": prefill_s, "sample/decode_s": decode_s},
        }

    def _prefill(self, prompt_ids, prompt_mask, positions, max_len: int, share: bool) -> torch.Tensor:
        """Start the decoder on the (B, P) prompts; (B, V) logits. ``share``: each distinct prompt (a
        group's G responses share one) is run once and its cache rows repeated for the rows that share it."""
        rep, inverse = distinct_prompts(prompt_ids, prompt_mask) if share else (None, None)  # (u,), (B,)
        if rep is None or len(rep) == len(inverse):
            return self._decoder.start(prompt_ids, prompt_mask, positions, max_len)  # (B, V)
        logits = self._decoder.start(prompt_ids[rep], prompt_mask[rep], positions[rep], max_len)  # (u, V)
        self._decoder.select(inverse)
        return logits[inverse]  # (B, V)


class _TransformersDecoder:
    """:class:`NativeDecoder`'s interface (start / step / select / release) over the model's own forward and a
    transformers KV cache: the path for every model the native step does not cover."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.release()

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor,
              max_len: int) -> torch.Tensor:
        """Prefill (B, P) left-padded prompts into a fresh cache of ``max_len`` tokens; (B, V) logits."""
        batch, prompt_len = prompt_ids.shape
        config = self.engine.model.config
        static = self.engine.static_cache  # read per rollout: benchmarks switch it
        self.static = max_len <= CACHE_BLOCK if static is None else static
        self.cache = StaticCache(config=config, max_cache_len=max_len) if self.static else DynamicCache(config=config)
        # Attention mask over [prompt | completion]: completion columns are all True; a finished row keeps
        # attending to its own pad tokens, which is harmless since its later outputs are discarded.
        self.attention = torch.ones((batch, max_len), dtype=torch.bool, device=prompt_ids.device)  # (B, P + N)
        self.attention[:, :prompt_len] = prompt_mask
        self.length = prompt_len
        return self._forward(prompt_ids, positions)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row ((B, 1) ids at (B, 1) positions); (B, V) logits."""
        self.length += 1
        return self._forward(tokens, positions)

    def select(self, index: torch.Tensor) -> None:
        """Keep the decode-batch rows ``index`` ((b,) long, repeats allowed) of the cache and the mask."""
        self.cache.reorder_cache(index)  # index_select on every layer, static or dynamic
        self.attention = self.attention.index_select(0, index)  # (b, P + N)

    def release(self) -> None:
        self.cache = self.attention = None
        self.length = 0

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, V) float32 logits of the last position, extending the cache."""
        # A static cache always attends over its full length (causality hides the unwritten part).
        mask = self.attention if self.static else self.attention[:, : self.length]  # (B, P + N or length)
        kwargs = {"logits_to_keep": 1} if self.engine._keeps_last_logits else {}
        kwargs[self.engine._cache_keyword] = self.cache
        out = self.engine.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                use_cache=True, **kwargs)
        return out.logits[:, -1].float()  # (B, V)


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, uniform: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from (B, V) float32 ``logits``; return (B,) tokens and (B,) log-probs.

    The log-probabilities are those of the distribution actually sampled: ``log_softmax(logits /
    temperature)``, truncated to the top-k / top-p support and renormalised when those are on
    (:func:`gspo.logprobs.truncated_log_softmax`, which the trainer applies to its own logits too, so the
    on-policy ratio is 1); untempered for greedy. ``logits`` is overwritten. The token is the inverse
    CDF of each row's distribution at its own ``uniform`` draw ((B,) in [0, 1), on the logits' device;
    unused when greedy).
    """
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)  # (B,)
        logprobs = logits.log_softmax(dim=-1)  # (B, V)
        return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
    if params.temperature != 1.0:
        logits.div_(params.temperature)
    logprobs = truncated_log_softmax(logits, params.top_k, params.top_p)  # (B, V), -inf outside the support
    if uniform is None:
        raise ValueError("sampling at temperature > 0 needs one uniform draw per row")
    cdf = logprobs.exp().cumsum(dim=-1)  # (B, V)
    target = (uniform * cdf[:, -1]).unsqueeze(1)  # (B, 1) scaled to the row's total mass
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=cdf.shape[-1] - 1)  # (B,)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _filtered_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) tempered logits with everything outside the top-k / top-p support set to -inf."""
    return logits.masked_fill(~truncation_mask(logits, top_k, top_p), float("-inf"))


def _left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt ids and (B, P) bool mask from unpadded token-id lists."""
    prompt_len = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), prompt_len), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), prompt_len), dtype=torch.bool)  # (B, P)
    for row, prompt in enumerate(prompts):
        ids[row, prompt_len - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, prompt_len - len(prompt) :] = True
    return ids.to(device), mask.to(device)


def _copy_in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen deep copy of ``model`` with floating-point parameters cast to ``dtype`` (buffers kept)."""
    engine_model = copy.deepcopy(model)
    for param in engine_model.parameters():  # tied weights appear once, so stay tied
        param.grad = None
        param.requires_grad_(False)
        if param.is_floating_point():
            param.data = param.data.to(dtype)
    return engine_model
