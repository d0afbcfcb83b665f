"""The run's precision policy: what computes in bfloat16, what stays float32, and why.

One small frozen object, :class:`PrecisionPolicy`, is built once per run (:func:`resolve_precision`, at
the assembly point) and read by the sampler (its weights' dtype), the update and the old/reference
log-probability passes (one autocast context, so pi_old is computed with the training forward's own
kernels and the on-policy ratio is exactly 1), and the checkpoint code (the master weights it saves).

Master weights and the optimizer state are always float32; only the compute of the training forwards
(autocast) and the sampler's copy of the weights change. ``auto`` picks bfloat16 where it pays:

- CUDA with native bfloat16 (compute capability 8.0+): bfloat16.
- CPU: bfloat16 only with bf16 matrix instructions (``amx_bf16`` or ``avx512_bf16``) *and* a measured
  bf16 GEMM at least :data:`MIN_GEMM_SPEEDUP` x faster than float32 (flags alone mislead: AVX512-BF16
  without AMX is a different speed). An AVX2-only CPU emulates bfloat16 ~3x slower than float32.
- A model under :data:`MIN_BF16_PARAMS` parameters stays float32 everywhere (its GEMMs are too small
  for the matrix units to matter, and gspo's embedded models and the tests' exact values are float32).

Float32 compute chosen by ``auto`` (a model under :data:`MIN_BF16_PARAMS`) on a CUDA GPU with TF32
(compute capability 8.0+, the same GPUs as native bfloat16) runs its matmuls in TF32; an explicit
``optim.dtype=float32`` stays true float32 (PyTorch's own default) (``tf32``, :func:`use_tf32`; applied by :mod:`gspo.cuda_settings`): true float32
GEMMs run at a tenth of the tensor cores' rate. pi_old is then recomputed (the sampler's float32
log-probabilities are no longer the trainer's to float32 rounding). Nothing changes on a CPU.

The GEMM probe takes a few tens of milliseconds and is cached per machine in the user cache directory
(``$XDG_CACHE_HOME/gspo``, else ``~/.cache/gspo``; ``GSPO_CACHE_DIR`` overrides it), keyed by CPU model and
torch version; never inside the package.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Below this many parameters a model is float32 under ``auto``: the embedded models (1M-17M) have hidden
# sizes of 64-512, whose GEMMs are too small and whose steps are dominated by per-op overhead, so bf16
# gains little there while it moves their exact float32 results (which the tests and benchmarks pin).
MIN_BF16_PARAMS = 50_000_000
# A measured bf16 GEMM must be at least this much faster than fp32 to pay: autocast also adds casts and
# leaves softmax, norms and the loss in float32, so a GEMM gain under ~1.5x disappears in a whole step.
MIN_GEMM_SPEEDUP = 1.5
# The probe's square GEMM: 512^3 (0.27 GFLOP) takes ~1-4 ms per call on one core in either dtype (~30 ms in all).
PROBE_SIZE = 512
PROBE_REPEATS = 5  # best of 5: one preempted call on a loaded machine does not decide
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DeviceFacts:
    """What the machine declares: ``kind`` (cpu / cuda), its model name, CPU flags, CUDA bf16 support."""

    kind: str
    name: str = ""
    flags: frozenset = field(default_factory=frozenset)
    cuda_bf16: bool = False


@dataclass(frozen=True)
class ProbeTimings:
    """Best-of-n seconds of one float32 and one bfloat16 GEMM of the same shape."""

    float32_s: float
    bfloat16_s: float

    @property
    def speedup(self) -> float:
        return self.float32_s / self.bfloat16_s if self.bfloat16_s > 0 else 0.0


@dataclass(frozen=True)
class PrecisionPolicy:
    """The run's precision: ``compute`` (training/old/reference forwards, autocast), ``sampler`` (the
    in-process engine's weights), ``master`` (parameters, optimizer state and checkpoints, always float32),
    and ``reason`` (one phrase for the start line)."""

    compute: str = "float32"
    sampler: str = "float32"
    reason: str = "configured"
    master: str = "float32"
    tf32: bool = False  # float32 compute on CUDA: matmuls in TF32 (use_tf32)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The training forward's autocast dtype (None = plain float32)."""
        return None if self.compute == "float32" else DTYPES[self.compute]

    @property
    def sampler_dtype(self) -> torch.dtype:
        return DTYPES[self.sampler]

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Every training-module forward runs under this (training, pi_old and reference passes alike)."""
        dtype = self.autocast_dtype
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    @property
    def matmul(self) -> str:
        """What the training matmuls compute in: the compute dtype, or ``tf32``."""
        return "tf32" if self.tf32 else self.compute

    def describe(self) -> str:
        """``precision: bfloat16 compute, fp32 master (AMX: bf16 GEMM 3.8x fp32)`` (the start line's part)."""
        text = f"precision: {self.compute} compute" + (" (TF32 matmuls)" if self.tf32 else "")
        if self.sampler != self.compute:
            text += f", {self.sampler} sampler"
        return f"{text}, fp32 master ({self.reason})"


def decide(facts: DeviceFacts, timings: ProbeTimings | None, num_params: int) -> tuple[str, str]:
    """(compute dtype, reason) that ``auto`` resolves to: a pure function of the machine's declared
    facts, the GEMM probe's timings (None = not measured) and the model's size."""
    if num_params < MIN_BF16_PARAMS:
        return "float32", f"{num_params / 1e6:.2g}M params < {MIN_BF16_PARAMS // 1_000_000}M: GEMMs too small for bf16"
    if facts.kind == "cuda":
        return ("bfloat16", "CUDA bf16") if facts.cuda_bf16 else ("float32", "no native CUDA bf16")
    if facts.kind != "cpu":
        return "float32", f"{facts.kind}: bf16 not chosen automatically"
    units = [name for name, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")) if flag in facts.flags]
    if not units:
        return "float32", "no AMX / AVX512-BF16: bf16 would be emulated"
    if timings is None:
        return "bfloat16", f"{units[0]}, not measured"
    if timings.speedup < MIN_GEMM_SPEEDUP:
        return "float32", f"{units[0]}: bf16 GEMM only {timings.speedup:.1f}x fp32"
    return "bfloat16", f"{units[0]}: bf16 GEMM {timings.speedup:.1f}x fp32"


def use_tf32(facts: DeviceFacts, compute: str) -> bool:
    """Float32 compute on a CUDA GPU with TF32 tensor cores (compute capability 8.0+, which is also where
    native bfloat16 is, ``cuda_bf16``) runs its matmuls in TF32; never on a CPU or under bf16 compute."""
    return facts.kind == "cuda" and facts.cuda_bf16 and compute == "float32"


def resolve_precision(optim_dtype: str, engine_dtype: str, device: torch.device, num_params: int, *,
                      cache_dir: Path | None = None) -> PrecisionPolicy:
    """The run's :class:`PrecisionPolicy` from ``optim.dtype`` and ``rollout.engine_dtype``.

    ``optim.dtype=auto`` runs :func:`decide` (probing the CPU's GEMMs only when the model is large enough
    and the CPU declares bf16 units); ``rollout.engine_dtype=auto`` samples in the compute dtype; float32
    compute chosen by ``auto`` on a CUDA GPU with TF32 uses it (:func:`use_tf32`); an explicit float32 does not.
    """
    facts = device_facts(device) if device.type == "cuda" else None  # the CPU's flags only where auto asks
    if optim_dtype == "auto":
        facts = facts or device_facts(device)
        needs_probe = num_params >= MIN_BF16_PARAMS and facts.kind == "cpu" and any(
            f in facts.flags for f in CPU_BF16_FLAGS)
        timings = cached_probe(facts, cache_dir) if needs_probe else None
        compute, reason = decide(facts, timings, num_params)
    else:
        compute, reason = optim_dtype, "configured"
    sampler = compute if engine_dtype == "auto" else engine_dtype
    tf32 = optim_dtype == "auto" and facts is not None and use_tf32(facts, compute)  # asked float32: true float32
    return PrecisionPolicy(compute=compute, sampler=sampler, reason=reason, tf32=tf32)


def device_facts(device: torch.device) -> DeviceFacts:
    """This machine's :class:`DeviceFacts` for ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation flag
            bf16 = torch.cuda.is_bf16_supported()
        return DeviceFacts("cuda", name, cuda_bf16=bool(bf16))
    if device.type != "cpu":
        return DeviceFacts(device.type)
    name, flags = _cpuinfo()
    return DeviceFacts("cpu", name, frozenset(f for f in flags if f in CPU_BF16_FLAGS))


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo (Linux); elsewhere the platform's name and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not name:
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return name or platform.machine(), flags


def probe_gemm(size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> ProbeTimings:
    """Best-of-``repeats`` seconds of a ``size``-square GEMM in float32 and in bfloat16 (after a warm-up)."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)  # (n, n) each
        a @ b  # warm-up: kernel selection, packing buffers
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[dtype] = min(times)
    return ProbeTimings(best[torch.float32], best[torch.bfloat16])


def cache_path(cache_dir: Path | None = None) -> Path:
    """The probe cache file: ``GSPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/gspo``, else ``~/.cache/gspo``."""
    if cache_dir is None:
        root = os.environ.get("GSPO_CACHE_DIR") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gspo"
        cache_dir = Path(root)
    return Path(cache_dir) / "precision-probe.json"


def cached_probe(facts: DeviceFacts, cache_dir: Path | None = None, probe=None) -> ProbeTimings:
    """:func:`probe_gemm`'s timings for this CPU and torch version, measured once and then read back."""
    path = cache_path(cache_dir)
    key = f"{facts.name}|{','.join(sorted(facts.flags))}|torch {torch.__version__}"
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = {}
    if isinstance(entries, dict) and isinstance(entries.get(key), dict):
        item = entries[key]
        with contextlib.suppress(KeyError, TypeError, ValueError):
            return ProbeTimings(float(item["float32_s"]), float(item["bfloat16_s"]))
    timings = (probe or probe_gemm)()
    entries = entries if isinstance(entries, dict) else {}
    entries[key] = {"float32_s": timings.float32_s, "bfloat16_s": timings.bfloat16_s}
    with contextlib.suppress(OSError):  # a read-only home only costs the probe next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(path)
    return timings
