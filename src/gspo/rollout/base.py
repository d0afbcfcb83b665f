"""The rollout-engine interface: what the trainer asks of any sampler.

The trainer only ever talks to a :class:`RolloutEngine`: ``generate``, ``sync_weights``, ``close`` and
the declared :class:`EngineInfo`; nothing else of an engine (its model, its EOS ids, its decoder) is
visible above this interface. The in-process Hugging Face engine (:mod:`gspo.rollout.hf`) and vLLM
(:mod:`gspo.rollout.vllm`) implement it; the trainer's assembly point (:mod:`gspo.trainer.build`) is
the only code that names a concrete engine. The engine knows nothing about tasks or rewards: it maps
token ids to token ids (plus the sampler's log-probabilities).

Layout convention shared by every engine and by log-probability recomputation:
``[left-padded prompt | right-padded completion]``. Position ids always come from the attention mask
(cumulative sum), so a left-padded prompt sees the same positions as an unpadded one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from gspo import distributed as dist


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one rollout batch."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    top_k: int = 0  # 0 disables top-k filtering
    ignore_eos: bool = False  # fixed-length generation (benchmarks): never stop at EOS


@dataclass
class Rollout:
    """A batch of sampled completions, in the shared ``[prompt | completion]`` layout.

    Shapes: B responses, P prompt positions (left-padded), T completion positions (right-padded).
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded with the pad id
    prompt_mask: torch.Tensor  # (B, P) bool, True on real prompt tokens
    completion_ids: torch.Tensor  # (B, T) long, right-padded with the pad id
    completion_mask: torch.Tensor  # (B, T) bool, True on generated tokens (EOS included)
    logprobs: torch.Tensor  # (B, T) float32: sampler's log pi(y_t | ...) under logits / temperature; 0 on padding
    truncated: torch.Tensor  # (B,) bool: reached max_new_tokens without emitting EOS
    routing: Any = None  # optional MoE routing record over all P + T positions (see gspo.moe.routing)
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent per phase, for metrics
    # (B, T) bool or None: real tokens of the completion segment. None = completion_mask. Multi-turn
    # episodes put environment tokens (tool results, feedback) between the model's turns: they are
    # attended (True here) but carry no loss and no sampler log-probability (False in completion_mask).
    completion_attention: torch.Tensor | None = None
    policy_version: int = -1  # the weights version that sampled this batch (pipelined sampling), -1 = current

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + T) the full sequences."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + T) bool: real tokens of prompt and completion (environment tokens included)."""
        completion = self.completion_mask if self.completion_attention is None else self.completion_attention
        return torch.cat([self.prompt_mask, completion], dim=1)

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of completion tokens of each response."""
        return self.completion_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "Rollout":
        """This rollout with every tensor (the routing record included) on ``device``: the trainer's
        device boundary (:meth:`gspo.trainer.collect.ScoredBatch.to`)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor) or f.name == "routing" and self.routing is not None}
        return replace(self, **moved)

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` (a 1-D long tensor) of this rollout, as a new Rollout."""
        routing = self.routing.select(index) if self.routing is not None else None
        return Rollout(
            prompt_ids=self.prompt_ids[index],
            prompt_mask=self.prompt_mask[index],
            completion_ids=self.completion_ids[index],
            completion_mask=self.completion_mask[index],
            logprobs=self.logprobs[index],
            truncated=self.truncated[index],
            routing=routing,
            timings=dict(self.timings),
            completion_attention=self.completion_attention[index] if self.completion_attention is not None else None,
            policy_version=self.policy_version,
        )


@dataclass(frozen=True)
class EngineInfo:
    """What an engine declares about itself: everything the trainer may know of it.

    name: how it samples, for the run's start line ("native decode step", "vLLM 0.x in-process").
    exact_logprobs: its log-probabilities are those of a float32 forward of the training module itself
        (same weights, same precision, same kernels up to float rounding, ~1e-7 per token), so a
        recomputation of pi_old could only reproduce them (``loss.old_logprobs=auto`` then skips it).
        False for a lower-precision copy, another inference engine, or a remote server.
    records_routing: ``generate(..., record_routing=True)`` returns the experts each MoE layer chose at
        every position (Routing Replay R3).
    weight_sync: how ``sync_weights`` moves weights: "shared" (samples with the training module
        itself: nothing to move), "copy" (an in-process copy refreshed in place), "reload" (the engine
        loads new weights from memory or a path).
    reproducible: honours ``row_seeds``, so a seeded run samples the same tokens whatever the batch
        split or the number of processes.
    behaviour_logprobs: another inference engine (vLLM) whose float32 log-probabilities are those of the
        distribution it sampled (temperature, top-k / top-p applied) from weights synced after every
        update: the GSPO paper's section 5.4 setting, where ``auto`` trains on them without recomputation.
    """

    name: str
    exact_logprobs: bool = False
    records_routing: bool = False
    weight_sync: str = "copy"
    reproducible: bool = True
    behaviour_logprobs: bool = False


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompts into sampled completions with per-token log-probabilities."""

    @property
    def info(self) -> EngineInfo:
        """The engine's declared properties (constant over its lifetime)."""
        ...

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None, *,
        row_seeds: list[int] | None = None, record_routing: bool = False,
    ) -> Rollout:
        """Sample one completion per entry of ``prompts`` (token-id lists, unpadded).

        Repeat a prompt G times in ``prompts`` to get a group of G responses. ``row_seeds`` (one per
        prompt) makes each row's sample independent of the rest of the batch, which is what lets N
        processes reproduce a 1-process run (``info.reproducible`` says whether the engine honours it).
        ``record_routing`` (MoE, only when ``info.records_routing``): fill ``Rollout.routing`` with the
        experts chosen at every prompt and completion position.
        Every response ends at its first EOS (kept, inside ``completion_mask``) or after
        ``params.max_new_tokens`` tokens (``truncated``); padding is the engine's pad id, masked out.
        """
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights.

        Called on every process after every update with the training module, possibly wrapped (DDP)
        or sharded (FSDP2): engines that keep their own weights read them with :func:`full_weights`,
        which is a collective under FSDP2, so every process calls this. A no-op for an engine that
        samples with the training module itself.
        """
        ...

    def close(self) -> None:
        """Release what the engine holds (a server process, caches). Idempotent."""
        ...


SEED_RANGE = 2**31 - 1  # vLLM seeds are int32 on the server's JSON path; every engine draws in this range


def row_seed(seed: int, prompt_index: int, sample: int) -> int:
    """A per-response seed (a fixed mixing of the three numbers into 63 bits): response ``sample`` of
    prompt ``prompt_index`` gets the same seed whatever the batch split or the process count."""
    return (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) % (1 << 63)


def request_seeds(count: int, row_seeds: list[int] | None, generator: torch.Generator | None) -> list[int]:
    """One seed per request: ``row_seeds`` when given, else drawn from ``generator`` (a CPU generator).

    Every engine samples each row from its own seed, so no engine ever needs a generator on its own
    device (a CPU ``torch.Generator`` cannot drive ``torch.multinomial`` on CUDA probabilities), and
    vLLM never samples from the host's global RNG (in-process, its unseeded requests would shift the
    trainer's own stream).
    """
    if row_seeds is not None:
        if len(row_seeds) != count:
            raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {count} prompts")
        return [int(s) % SEED_RANGE for s in row_seeds]
    return torch.randint(0, SEED_RANGE, (count,), generator=generator).tolist()


def check_request(prompts: list[list[int]], params: SamplingParams) -> None:
    """Reject empty prompts and sampling parameters outside their ranges, naming the field."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if params.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {params.top_k}")


def full_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for every parameter and buffer of the policy, named as in its Hugging Face
    state dict: wrappers (DDP's ``module.``, FSDP's ``_fsdp_wrapped_module.``) removed, FSDP2 shards
    gathered (a collective: every process must consume the whole iterator)."""
    model = getattr(model, "module", model)
    for kind in ("named_parameters", "named_buffers"):
        for name, tensor in getattr(model, kind)():
            yield name.replace("_fsdp_wrapped_module.", ""), dist.full_tensor(tensor)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int = 0) -> Rollout:
    """Stack rollouts row-wise, re-padding prompts on the left and completions on the right."""
    width_p = max(r.prompt_ids.shape[1] for r in rollouts)
    width_t = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(t: torch.Tensor, width: int, left: bool, value) -> torch.Tensor:
        extra = width - t.shape[1]
        return torch.nn.functional.pad(t, (extra, 0) if left else (0, extra), value=value)

    routing = None
    if rollouts[0].routing is not None:
        raise NotImplementedError("concatenating rollouts that carry MoE routing records is not supported")
    attention = None
    if any(r.completion_attention is not None for r in rollouts):
        attention = torch.cat([pad(r.completion_attention if r.completion_attention is not None else r.completion_mask,
                                   width_t, False, False) for r in rollouts])
    return Rollout(
        prompt_ids=torch.cat([pad(r.prompt_ids, width_p, True, pad_token_id) for r in rollouts]),
        prompt_mask=torch.cat([pad(r.prompt_mask, width_p, True, False) for r in rollouts]),
        completion_ids=torch.cat([pad(r.completion_ids, width_t, False, pad_token_id) for r in rollouts]),
        completion_mask=torch.cat([pad(r.completion_mask, width_t, False, False) for r in rollouts]),
        logprobs=torch.cat([pad(r.logprobs, width_t, False, 0.0) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        routing=routing,
        timings={k: sum(r.timings.get(k, 0.0) for r in rollouts) for k in rollouts[0].timings},
        completion_attention=attention,
        policy_version=min(r.policy_version for r in rollouts),
    )
