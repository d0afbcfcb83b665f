"""Reproduction studies of the GSPO paper's claims, run with the library's own trainer.

``gspo experiment <name> [key=value ...]``:

- ``moe-stability``: GSPO vs GRPO vs GRPO + Routing Replay on a tiny Qwen3-MoE, expert volatility by
  depth, token vs sequence log-ratio spread, and the bf16-rollout precision check (sections 5.3-5.4).
"""

from __future__ import annotations

from gspo.errors import ConfigError

EXPERIMENTS = {"moe-stability": "gspo.experiments.moe_stability"}
USAGE = "usage: gspo experiment <name> [key=value ...] (--help for a name's options)\n\nexperiments:\n" + "\n".join(
    f"  {name}" for name in EXPERIMENTS)


def run_experiment(args: list[str]) -> int:
    """Dispatch ``gspo experiment NAME ...`` to the experiment module's ``main(args)``."""
    import importlib

    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = args[0], args[1:]
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{name}'; available: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).main(rest)
