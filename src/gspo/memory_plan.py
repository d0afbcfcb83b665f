"""What the memory estimate decides before the model loads: ``auto`` settings, and the refusal.

:func:`plan` resolves ``optim.gradient_checkpointing`` (auto | true | false), ``optim.micro_batch_tokens``
(auto | 0 | N) and, under FSDP2, ``rollout.sampler_weights`` (auto | copy | shards) from :func:`gspo.memory.estimate` against the memory available (CPU: ``MemAvailable``,
shared by the processes, the pipelined mode's sampler process included; CUDA: the GPU's free memory), and
refuses a run that cannot fit with a
:class:`~gspo.errors.ConfigError` naming the knobs that make it fit (:func:`refusal`). Pure arithmetic
over the two shapes: fast, no model, no torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from gspo.memory import GB, Estimate, ModelShape, RunShape, estimate, sampler_estimate

def available_bytes(device: str) -> int:
    """What a new run can still use: CUDA free device memory, else the OS's available RAM."""
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


# (knob, what to change) tried one at a time by the refusal, cheapest in compute first
def _knobs(run: RunShape) -> list[tuple[str, RunShape]]:
    out = []
    if not run.micro_tokens or run.micro_tokens > run.sequence_tokens:
        one_row = replace(run, micro_tokens=run.sequence_tokens, micro_rows=0)
        out.append((f"optim.micro_batch_tokens={run.sequence_tokens}", one_row))
    if not run.checkpointing:
        out.append(("optim.gradient_checkpointing=true", replace(run, checkpointing=True)))
    if run.compute == "float32":
        out.append(("optim.dtype=bfloat16", replace(run, compute="bfloat16", sampler="bfloat16")))
    if run.processes > 1 and run.strategy != "fsdp":
        out.append(("distributed.strategy=fsdp", replace(run, strategy="fsdp")))
    if run.sampler_can_shard and run.sampler_weights == "copy":
        out.append(("rollout.sampler_weights=shards", replace(run, sampler_weights="shards")))
    if run.sampler_process and run.engine == "hf":  # the sampler's process and its copy go, the trainer samples
        out.append(("rollout.max_staleness=0", replace(run, sampler_process=False)))
    if not run.lora_rank:
        out.append(("lora.rank=16", replace(run, lora_rank=16, reference=False)))
    if run.responses > 1:
        half = max(1, run.responses // 2)
        out.append(("half the responses (rollout.prompts_per_step or rollout.group_size)",
                    replace(run, responses=half, minibatch_rows=max(1, run.minibatch_rows // 2))))
    return out


def refusal(model: ModelShape, run: RunShape, available: int) -> str | None:
    """None when the estimate fits in ``available`` bytes, else the message naming what makes it fit."""
    need, sampler = estimate(model, run), sampler_estimate(model, run)
    if _machine_total(model, run) <= available:
        return None
    fixes = [(knob, _machine_total(model, changed)) for knob, changed in _knobs(run)]
    alone = [f"{knob} ({total / GB:.1f} GB)" for knob, total in fixes if total <= available]
    if alone:
        advice = "any one of these fits: " + "; ".join(alone)
    else:
        together, names = run, []  # every knob but fewer responses (the batch is the experiment's)
        for knob, changed in _knobs(run):
            moved = {f: getattr(changed, f) for f in ("micro_tokens", "micro_rows", "checkpointing", "compute",
                                                      "sampler", "strategy", "lora_rank", "reference",
                                                      "sampler_weights", "sampler_process")
                     if getattr(changed, f) != getattr(run, f)}
            if moved:
                together, names = replace(together, **moved), [*names, knob]
        total = _machine_total(model, together)
        if total <= available:
            advice = f"no single knob fits; together {', '.join(names)} fit ({total / GB:.1f} GB)"
        else:
            more = "more GPUs with distributed.strategy=fsdp" if run.device == "cuda" else "a machine with more memory"
            advice = (f"no single knob fits, and together {', '.join(names)} still need {total / GB:.1f} GB: "
                      f"fewer responses per step, shorter rollout.max_new_tokens, {more} or a smaller model")
    where = "free GPU memory" if run.device == "cuda" else "available RAM"
    processes = f" x {run.processes} processes" if _shares_ram(run) else " per process"
    if sampler is not None:
        processes = f" in the trainer + {sampler.describe()} in the sampler process (rollout.max_staleness > 0)"
    return (f"this run needs about {need.describe()}{processes} at its peak, more than the {available / GB:.1f} GB "
            f"of {where}; {advice}")


def _shares_ram(run: RunShape) -> bool:
    return run.device != "cuda" and run.processes > 1


def _machine_total(model: ModelShape, run: RunShape) -> int:
    """What must fit in the memory checked: CPU processes share the RAM (the pipelined mode's sampler process
    too), GPUs have one each."""
    sampler = sampler_estimate(model, run)
    return (estimate(model, run).total * (run.processes if _shares_ram(run) else 1)
            + (sampler.total if sampler is not None and run.device != "cuda" else 0))


def check_memory(model: ModelShape, run: RunShape, available: int | None = None) -> Estimate:
    """Raise :class:`~gspo.errors.ConfigError` if ``run`` cannot fit; returns the estimate otherwise."""
    from gspo.errors import ConfigError

    available = available_bytes(run.device) if available is None else available
    message = refusal(model, run, available)
    if message:
        raise ConfigError(message)
    return estimate(model, run)


# ``auto`` decisions leave this share of the available memory free: the estimate is within ~20% of measured
# peaks (docs/memory.md), and other processes' memory moves while the run starts
AUTO_MARGIN = 0.9
# The host heap kept for reuse (gspo.host_memory) leaves holes the estimate does not itemise: CPU peaks
# measured 0.22-0.87x the largest transient above the estimate (docs/memory.md; 0.87 at the 0.6B shape with
# 1,024-token responses once the heap was no longer trimmed between phases: 16.3 GiB against 13.1 + 3.7)
HEAP_REUSE_ALLOWANCE = 0.9
# Auto's token budget shrinks to leave room for the kept heap only down to this many tokens per forward: the
# layers' GEMMs run at ~85% of the bfloat16 peak from ~512 rows (a 0.6B step's [540, 1024] x [1024, 3072]
# products: ~386 GFLOP/s), while the kept heap made the 1,024-token training half 1.49x faster
HEAP_REUSE_MIN_TOKENS = 512
# On CUDA, ``optim.gradient_checkpointing=auto`` is on from this many parameters whatever the estimate (TRL's
# default is on): a GPU's memory is better spent on larger micro-batches and the sampler's KV cache.
CUDA_CHECKPOINT_PARAMS = 1_000_000_000


@dataclass(frozen=True)
class MemoryPlan:
    """What the memory check decided: activation checkpointing, the token budget (0 = off), the estimate of
    the run so configured, the memory it was compared with, and why (``notes``, for the start line)."""

    checkpointing: bool
    micro_batch_tokens: int
    estimate: Estimate
    available: int
    device: str = "cpu"
    notes: tuple = ()
    sampler_weights: str = "copy"  # FSDP2's built-in sampler: copy (a whole copy) or shards (rollout.sampler_weights)
    sampler: Estimate | None = None  # the pipelined mode's sampler process (gspo.memory.sampler_estimate)

    def describe(self) -> str:
        """``memory: ~3.3 of 20.1 GB available RAM, checkpointing off, token budget off`` (the start line's part;
        pipelined, ``~3.3 + 0.9 (sampler process) of ...``)."""
        where = "free GPU memory" if self.device == "cuda" else "available RAM"
        side = f" + {self.sampler.total / GB:.1f} (sampler process)" if self.sampler is not None else ""
        text = (f"memory: ~{self.estimate.total / GB:.1f}{side} of {self.available / GB:.1f} GB {where}, checkpointing "
                f"{'on' if self.checkpointing else 'off'}, token budget {self.micro_batch_tokens or 'off'}")
        if self.sampler_weights == "shards":
            text += ", sampler through the shards"
        return text + (f" ({'; '.join(self.notes)})" if self.notes else "")


def sampler_shards_refusal(config, precision, processes: int, *, agents: bool = False) -> str | None:
    """Why the built-in sampler cannot sample through the FSDP2 shards (``rollout.sampler_weights=shards``), or
    None when it can: the shards are gathered in FSDP2's compute dtype, every process must run the same
    forwards, and only the in-process engine's transformers forward runs through them."""
    r = config.rollout
    if config.distributed.strategy != "fsdp" or processes < 2:
        return "the model is sharded only under distributed.strategy=fsdp with 2 or more processes (torchrun)"
    if r.engine != "hf":
        return f"rollout.engine={r.engine} holds its own weights"
    if r.max_staleness:
        return "rollout.max_staleness > 0 samples in a process of its own"
    if agents:
        return "agent episodes take a different number of turns on each process (set rollout.sampler_weights=copy)"
    if precision.sampler != precision.compute:
        return (f"the shards compute in {precision.compute} (optim.dtype), the sampler is set to {precision.sampler}: "
                f"set rollout.engine_dtype=auto or {precision.compute}")
    if r.decoder == "native":
        return "gspo's native decode step reads whole weights outside the layers' forwards: set rollout.decoder=auto"
    return None


def plan(model: ModelShape, run: RunShape, *, checkpointing: str = "false", micro_batch_tokens: int = 0,
         available: int | None = None, sampler_weights: str = "copy", heap_reuse: bool = False) -> MemoryPlan:
    """Resolve ``optim.gradient_checkpointing`` (auto | true | false) and ``optim.micro_batch_tokens`` (-1 =
    auto, 0 = off, N) against the estimate, then check that the result fits (:func:`check_memory`).

    A token budget costs little compute and is tried first: auto keeps one forward per minibatch while that
    fits in :data:`AUTO_MARGIN` of ``available``, else picks the most whole responses (at prompt +
    ``max_new_tokens``) per forward that fit. With ``heap_reuse`` (a CPU process where
    :func:`gspo.host_memory.configure_heap` applies), it first tries to keep room for the reused heap's holes
    (:func:`heap_reuse_fits`): the most whole responses per forward, at least :data:`HEAP_REUSE_MIN_TOKENS`
    tokens, with which the heap can be kept: forwards of that size run at speed, the lean heap does not (the
    0.6B shape, 16 x 1,024 tokens: one response per forward trained in 320.5 s with the heap kept, two in
    324.8 s, two on the lean heap in 476.9 s). Checkpointing costs ~1/3 more training compute: auto turns it on
    when even one response per forward (or the configured budget) does not fit without it, and always on CUDA
    from :data:`CUDA_CHECKPOINT_PARAMS`. Raises :class:`~gspo.errors.ConfigError` when nothing fits.

    ``sampler_weights`` (rollout.sampler_weights, FSDP2's built-in sampler, where ``run.sampler_can_shard``):
    auto keeps the whole copy when the run fits with it (with whatever the other auto settings choose), else
    samples through the shards (more communication: every decode step gathers every layer).
    """
    available = available_bytes(run.device) if available is None else available
    if sampler_weights == "auto":
        settings = dict(checkpointing=checkpointing, micro_batch_tokens=micro_batch_tokens, available=available)
        if not run.sampler_can_shard:
            return plan(model, run, sampler_weights="copy", **settings)
        from gspo.errors import ConfigError

        try:
            return plan(model, run, sampler_weights="copy", **settings)
        except ConfigError:
            try:
                chosen = plan(model, run, sampler_weights="shards", **settings)
            except ConfigError as exc:  # the message describes the run without the copy: say why
                raise ConfigError(f"{exc} (the sampler through the shards, rollout.sampler_weights=auto: no whole "
                                  "copy)") from None
        whole = _machine_total(model, replace(run, sampler_weights="copy", checkpointing=chosen.checkpointing,
                                              micro_tokens=chosen.micro_batch_tokens))
        note = f"sampler weights auto: through the shards, with a whole copy {whole / GB:.1f} GB"
        return replace(chosen, notes=(*chosen.notes, note))
    run = replace(run, sampler_weights=sampler_weights)
    room = int(AUTO_MARGIN * available)
    auto_ckpt, auto_tokens = checkpointing == "auto", micro_batch_tokens < 0 and not run.micro_rows
    notes = []
    ckpt = checkpointing == "true"
    if auto_ckpt and run.device == "cuda" and model.params >= CUDA_CHECKPOINT_PARAMS:
        ckpt = True
        notes.append(f"checkpointing auto: on for {model.params / 1e9:.1f}B params on CUDA")
    run = replace(run, checkpointing=ckpt, micro_tokens=max(micro_batch_tokens, 0))

    def fits(r: RunShape) -> bool:
        return _machine_total(model, r) <= room

    def heap_need(r: RunShape) -> float:  # with the host heap kept for reuse (as heap_reuse_fits asks)
        return _heap_total(estimate(model, r), sampler_estimate(model, r), r.processes if _shares_ram(r) else 1)

    def keeps_heap(r: RunShape) -> bool:  # fits with the heap kept, in forwards of a size that runs at speed
        return r.micro_batch_tokens >= HEAP_REUSE_MIN_TOKENS and heap_need(r) <= room

    whole = _machine_total(model, run)
    if auto_tokens and heap_reuse and run.device != "cuda" and not keeps_heap(run):
        # from the fewest whole responses that reach HEAP_REUSE_MIN_TOKENS (one 300-token response does not,
        # two do): below them keeps_heap is false whatever the memory, so the search starts there
        kept = _largest_budget(model, run, keeps_heap, min_rows=-(-HEAP_REUSE_MIN_TOKENS // run.sequence_tokens))
        if kept is not None:
            notes.append(f"token budget auto: one forward per minibatch needs {whole / GB:.1f} GB, "
                         f"{heap_need(run) / GB:.1f} GB with the host heap kept for reuse")
            run = kept
    if auto_tokens and not fits(run):
        budgeted = _largest_budget(model, run, fits)
        if budgeted is None and auto_ckpt and not ckpt:
            one = _machine_total(model, replace(run, micro_tokens=run.sequence_tokens, micro_rows=0))
            run = replace(run, checkpointing=True)
            notes.append(f"checkpointing auto: on, one response per forward needs {one / GB:.1f} GB without it")
            budgeted = _largest_budget(model, run, fits) if not fits(run) else run
        if budgeted is not None:
            if budgeted.micro_tokens:
                notes.append(f"token budget auto: one forward per minibatch needs {whole / GB:.1f} GB")
            run = budgeted
        else:
            run = replace(run, micro_tokens=run.sequence_tokens)  # the most the budget can do; refused below
    elif auto_ckpt and not ckpt and not fits(run):
        run = replace(run, checkpointing=True)
        notes.append(f"checkpointing auto: on, {whole / GB:.1f} GB without it")
    message = refusal(model, run, available)
    if message:
        from gspo.errors import ConfigError

        chosen = [k for k, on in (("activation checkpointing", run.checkpointing and auto_ckpt),
                                  (f"optim.micro_batch_tokens={run.micro_tokens}", run.micro_tokens and auto_tokens))
                  if on]
        raise ConfigError(message + (f" (already with {' and '.join(chosen)}, chosen by auto)" if chosen else ""))
    return MemoryPlan(run.checkpointing, run.micro_tokens, estimate(model, run), available, run.device, tuple(notes),
                      run.sampler_weights, sampler_estimate(model, run))


def _largest_budget(model: ModelShape, run: RunShape, fits, min_rows: int = 1) -> RunShape | None:
    """``run`` with the largest token budget of whole responses per forward that ``fits``, from ``min_rows``
    responses per forward up (``fits`` must be monotonic from there: more rows, more memory); None if
    ``min_rows`` do not fit or are more than a minibatch."""
    one = replace(run, micro_tokens=run.sequence_tokens, micro_rows=0)
    if min_rows > max(run.minibatch_rows, 1) or not fits(replace(one, micro_tokens=min_rows * run.sequence_tokens)):
        return None
    low, high = min_rows, max(run.minibatch_rows, 1)  # rows per forward: low fits, find the most
    while low < high:
        mid = (low + high + 1) // 2
        if fits(replace(one, micro_tokens=mid * run.sequence_tokens)):
            low = mid
        else:
            high = mid - 1
    return replace(one, micro_tokens=0 if low >= run.minibatch_rows else low * run.sequence_tokens)


def heap_reuse_fits(memory: MemoryPlan | None, processes: int = 1) -> bool:
    """Whether a CPU run fits with the host heap kept for reuse (:func:`gspo.host_memory.configure_heap`): its
    estimate plus :data:`HEAP_REUSE_ALLOWANCE` of its largest transient, times the processes
    sharing the RAM, within :data:`AUTO_MARGIN` of the memory available. Without a plan (a model config without
    the shape keys) the leaner heap is kept; on CUDA the host heap holds little and reuse is always taken."""
    if memory is None:
        return False
    if memory.device == "cuda":
        return True
    return _heap_total(memory.estimate, memory.sampler, processes) <= AUTO_MARGIN * memory.available


def _heap_total(estimate: Estimate, sampler: Estimate | None, processes: int) -> float:
    """The RAM a CPU run needs with the host heap kept for reuse: the estimate plus :data:`HEAP_REUSE_ALLOWANCE`
    of its largest transient per process, and the pipelined mode's sampler process."""
    return (estimate.total + HEAP_REUSE_ALLOWANCE * estimate.transient) * processes + (
        sampler.total if sampler is not None else 0)
