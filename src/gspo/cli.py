"""The ``gspo`` command line: train, eval, plot, sft, export.

One convention everywhere: options are ``key=value`` with dotted keys (``optim.lr=1e-4``), after an
optional YAML file. The only ``--`` flags are ``--help``, ``--resume RUN`` and ``--nproc N``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gspo.errors import GspoError

USAGE = """gspo <command> [args]

commands:
  train [CONFIG.yaml] [key=value ...] [--resume RUN] [--nproc N]
                         RL-train a model (default: GSPO on the embedded tiny model + arithmetic)
  eval MODEL_OR_RUN [key=value ...]
                         held-out accuracy, pass@k and mean reward (JSON report)
  plot RUN               PNG of a run's curves (reward, accuracy, clip fraction, KL, length, ratio spread)
  sft [key=value ...]    rebuild the embedded warm-start checkpoint
  export RUN_OR_CHECKPOINT OUT_DIR [merge=true]
                         a Hugging Face model directory (LoRA adapters merged) that from_pretrained loads
  experiment NAME [key=value ...]
                         a paper-reproduction study (moe-stability: GSPO vs GRPO on a tiny MoE)

'gspo <command> --help' explains each command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {"train": _train, "eval": _eval, "plot": _plot, "sft": _sft, "export": _export,
                "experiment": _experiment}
    if command not in commands:
        import difflib

        close = difflib.get_close_matches(command, list(commands), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"gspo: unknown command '{command}'.{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[command](rest) or 0
    except GspoError as exc:
        print(f"gspo {command}: error: {exc}", file=sys.stderr)
        return 2


def _train(args: list[str]) -> int:
    if "-h" in args or "--help" in args:
        print(train_help())
        return 0
    resume, args = _take_flag(args, "--resume")
    nproc, args = _take_flag(args, "--nproc")
    config_file = args[0] if args and "=" not in args[0] else None
    overrides = args[1:] if config_file else args
    if nproc and int(nproc) > 1:
        from gspo.launch import relaunch_with_torchrun

        return relaunch_with_torchrun(int(nproc), ["train", *([config_file] if config_file else []), *overrides,
                                                   *(["--resume", resume] if resume else [])])
    from gspo.config import load_config

    if resume:
        config_file, overrides = _resume_config(Path(resume), config_file, overrides)
    config = load_config(config_file, overrides)
    from gspo.launch import maybe_init_distributed
    from gspo.trainer.run import train

    maybe_init_distributed()
    summary = train(config, Path(resume) if resume else None, resume=bool(resume))
    return 0 if summary else 1


def _resume_config(run_dir: Path, config_file: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """Resuming without a config file reuses the run's saved config (overrides still apply)."""
    saved = run_dir / "config.json"
    if config_file is None and saved.exists():
        return str(saved), overrides
    return config_file, overrides


def train_help() -> str:
    from gspo.config import field_docs

    lines = ["usage: gspo train [CONFIG.yaml] [key=value ...] [--resume RUN] [--nproc N]", "",
             "Trains with GSPO (or gspo_token / grpo / dapo). With no arguments: the embedded tiny model on",
             "the embedded arithmetic task, about 3 minutes on a laptop CPU. Options are key=value with",
             "dotted keys, applied after CONFIG.yaml (whose keys nest the same way).", "",
             "  --resume RUN   continue RUN from its last valid checkpoint", 
             "  --nproc N      run N data-parallel processes via torchrun", "", "options (key, default, meaning):"]
    for key, type_name, default, doc in field_docs():
        lines.append(f"  {key}={_show(default)}")
        lines.append(f"      {doc} [{type_name}]")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _take_flag(args: list[str], flag: str) -> tuple[str | None, list[str]]:
    for i, arg in enumerate(args):
        if arg == flag:
            if i + 1 >= len(args):
                raise GspoError(f"{flag} needs a value, e.g. {flag} runs/my-run")
            return args[i + 1], args[:i] + args[i + 2:]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def _eval(args: list[str]) -> int:
    from gspo.eval_cli import run_eval

    return run_eval(args)


def _plot(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gspo plot", description="Write a PNG of a run's training curves.")
    parser.add_argument("run", help="run directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="output PNG (default: RUN/curves.png)")
    ns = parser.parse_args(args)
    from gspo.plot import plot_run

    path = plot_run(Path(ns.run), Path(ns.out) if ns.out else None)
    print(path)
    return 0


def _sft(args: list[str]) -> int:
    from gspo.sft_cli import run_sft

    return run_sft(args)


def _export(args: list[str]) -> int:
    from gspo.export import run_export

    return run_export(args)


def _experiment(args: list[str]) -> int:
    from gspo.experiments import run_experiment

    return run_experiment(args)


if __name__ == "__main__":
    raise SystemExit(main())
