"""Reproduction studies of the GSPO paper's claims, run with the library's own trainer.

``gspo experiment <name> [key=value ...]``:

- ``moe-stability``: GSPO vs GRPO vs GRPO + Routing Replay on a tiny Qwen3-MoE, expert volatility by
  depth, token vs sequence log-ratio spread, and the bf16-rollout precision check (sections 5.3-5.4).
- ``algorithms``: every objective (GSPO, GSPO-token, GRPO, DAPO, CISPO, SAPO, GMPO, ...) on the same
  model, prompts, seeds and compute, then a bf16 sampler with and without each rollout correction.
"""

from __future__ import annotations

from gspo.cli_args import Command, UsageError, parse, render_help
from gspo.suggest import did_you_mean

EXPERIMENTS = {"moe-stability": "gspo.experiments.moe_stability", "algorithms": "gspo.experiments.algorithms"}
EXPERIMENT = Command(
    "experiment", "a reproduction study (moe-stability: GSPO vs GRPO on a tiny MoE; algorithms: the objectives side by side)",
    positionals=(("NAME", "the study: " + ", ".join(EXPERIMENTS)),),
    required=1,
    free_keys=True,
    description="Runs a reproduction study of the GSPO paper with the library's own trainer.\n"
                "'gspo experiment NAME --help' lists the study's own key=value options.",
)


def run_experiment(args: list[str]) -> int:
    """Dispatch ``gspo experiment NAME ...`` to the experiment module's ``main(args)``.

    The study's own ``key=value`` options (and its ``--help``) are checked by its module.
    """
    import importlib

    name = args[0] if args and not args[0].startswith("-") else None
    if name is None:
        parse(EXPERIMENT, args)  # --help, or a usage error naming what is missing
        print(render_help(EXPERIMENT, ["experiments:", *(f"  {n}" for n in EXPERIMENTS)]))
        return 0
    if name not in EXPERIMENTS:
        raise UsageError(f"unknown experiment '{name}'.{did_you_mean(name, EXPERIMENTS)} "
                         f"Available: {', '.join(EXPERIMENTS)}")
    rest = args[1:]
    if not any(a in ("-h", "--help") for a in rest):
        parse(EXPERIMENT, args)  # the shared grammar: key=value options, no stray words or flags
    return importlib.import_module(EXPERIMENTS[name]).main(rest)
