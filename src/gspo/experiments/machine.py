"""One line naming the machine a measurement came from (seeded CPU runs differ across CPU models)."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """e.g. "AMD EPYC (2 cores, avx2, no avx512), torch 2.13.0+cpu"."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown CPU", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    vector = "avx512" if "avx512f" in flags else "avx2, no avx512" if "avx2" in flags else "no avx2"
    extras = [name for name, flag in (("amx", "amx_tile"), ("avx512-bf16", "avx512_bf16")) if flag in flags]
    try:
        import torch

        version = f", torch {torch.__version__}"
    except ImportError:
        version = ""
    return f"{model} ({os.cpu_count()} cores, {', '.join([vector, *extras])}){version}"
