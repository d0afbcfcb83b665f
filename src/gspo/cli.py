"""The ``gspo`` command line: train, eval, plot, sft, export, experiment, version.

One grammar everywhere (:mod:`gspo.cli_args`): positionals, then ``key=value`` options with dotted
keys (``optim.lr=1e-4``); the only ``--`` flags are ``--help``, ``--resume RUN`` and ``--nproc N``.
Help, typos and config errors are answered before torch is imported: this module and the parsers
import only the standard library, yaml and the config schema; each command imports its machinery
once its arguments are known to be good.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

from gspo.cli_args import Command, Flag, UsageError, help_width, parse, render_help, wrap
from gspo.errors import GspoError
from gspo.suggest import did_you_mean

TRAIN = Command(
    "train", "RL-train a model (default: GSPO on the embedded tiny model + arithmetic)",
    positionals=(("CONFIG.yaml", "a YAML config file; key=value options apply after it"),),
    flags=(Flag("--resume", "RUN", "continue RUN from its last valid checkpoint (reuses RUN/config.json)"),
           Flag("--nproc", "N", "run N data-parallel processes via torchrun")),
    config_keys=True,
    description="Trains with GSPO or another objective (algorithm=, below). With no arguments: the embedded tiny\n"
                "model on the embedded arithmetic task, a few minutes on a laptop CPU. Options are key=value\n"
                "with dotted keys, applied after CONFIG.yaml (whose keys nest the same way).",
)

VERSION = Command("version", "print the gspo version")


def commands() -> dict[str, Command]:
    """Every subcommand's grammar, by name (each defined beside the code that runs it)."""
    from gspo.eval_cli import EVAL
    from gspo.experiments import EXPERIMENT
    from gspo.export import EXPORT
    from gspo.plot import PLOT
    from gspo.sft_cli import SFT

    return {c.name: c for c in (TRAIN, EVAL, PLOT, SFT, EXPORT, EXPERIMENT, VERSION)}


def usage() -> str:
    lines = ["usage: gspo <command> [args]", "", "commands:"]
    width = help_width()
    for command in commands().values():
        lines += [*wrap(command.usage.removeprefix("gspo "), width, indent="  "),
                  *wrap(command.summary, width, indent="      ")]
    lines += ["", *wrap("Options are key=value everywhere; 'gspo <command> --help' explains each command.", width),
              "gspo --version prints the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        return _version([])
    command, rest = argv[0], argv[1:]
    handlers = {"train": _train, "eval": _eval, "plot": _plot, "sft": _sft, "export": _export,
                "experiment": _experiment, "version": _version}
    if command not in handlers:
        what = "flag" if command.startswith("-") else "command"
        options = [*handlers, "--help", "--version"]
        print(f"gspo: error: unknown {what} '{command}'.{did_you_mean(command, options)} "
              f"Commands: {', '.join(handlers)}; 'gspo --help' explains them.", file=sys.stderr)
        return 2
    try:
        return handlers[command](rest) or 0
    except GspoError as exc:
        print(f"gspo {command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gspo train --help | head`: the reader has gone, which is not an error
        sys.stdout = open(os.devnull, "w")
        return 0


def _version(args: list[str]) -> int:
    parsed = parse(VERSION, args)
    if parsed.help:
        print(render_help(VERSION))
        return 0
    from gspo import __version__

    print(f"gspo {__version__}")
    return 0


def _train(args: list[str]) -> int:
    parsed = parse(TRAIN, args)
    if parsed.help:
        print(train_help())
        return 0
    resume, nproc = parsed.flags.get("--resume"), parsed.flags.get("--nproc")
    config_file, overrides = parsed.positional(0), parsed.overrides
    if nproc is not None and not (nproc.isdigit() and int(nproc) >= 1):
        raise UsageError(f"--nproc {nproc!r} must be a whole number of processes >= 1, e.g. --nproc 2")
    if resume:
        config_file = _resume_config(Path(resume), config_file)
    from gspo.config import load_config

    config = load_config(config_file, overrides)  # every config mistake is reported here, before torch
    if nproc and int(nproc) > 1:
        from gspo.config.validate import validate_processes
        from gspo.launch import relaunch_with_torchrun

        validate_processes(config, int(nproc))  # before N processes start
        return relaunch_with_torchrun(int(nproc), ["train", *([parsed.positional(0)] if parsed.positional(0) else []),
                                                   *overrides, *(["--resume", resume] if resume else [])])
    from gspo.cuda_settings import configure_allocator
    from gspo.launch import maybe_init_distributed
    from gspo.trainer.run import train

    from gspo.errors import RunInterrupted

    configure_allocator()  # CUDA: before torchrun's set_device and the first tensor
    maybe_init_distributed()
    try:
        summary = train(config, Path(resume) if resume else None, resume=bool(resume))
    except RunInterrupted as stop:  # the checkpoint is saved and the resume command printed
        return stop.exit_code
    return 0 if summary else 1


def _resume_config(run_dir: Path, config_file: str | None) -> str | None:
    """Resuming without a config file reuses the run's saved config (overrides still apply)."""
    saved = run_dir / "config.json"
    if config_file is None and saved.exists():
        return str(saved)
    return config_file


def train_help(width: int | None = None) -> str:
    """``gspo train --help``: every config key from the schema's field docs, wrapped to ``width`` (the
    terminal's); a list a docstring names with the :data: role is read from that registry."""
    from gspo.config import field_docs
    from gspo.config.schema import AUTO_KEYS, SWITCH_KEYS

    width = width or help_width()
    lines = wrap("options (key=default, meaning; every key also works in CONFIG.yaml):", width)
    for key, type_name, default, doc in field_docs():
        lines.append(f"  {key}={_show(default, key)}")
        type_name += " or auto" if key in AUTO_KEYS else ""
        type_name = "auto, true or false" if key in SWITCH_KEYS else type_name
        lines += wrap(f"{_plain(doc)} [{type_name}]", width, indent="      ")
    return render_help(TRAIN, lines, width)


def _plain(doc: str) -> str:
    """A field's docstring as help text: registry references replaced by their values, RST markup dropped."""
    return re.sub(r":data:`([\w.]+)`", lambda m: ", ".join(_registry(m.group(1))), doc).replace("``", "")


def _registry(name: str) -> tuple[str, ...]:
    """The values of the registry a docstring names (``gspo.tasks.registry.BUILTIN_TASKS``, or a name of
    gspo.config.schema); one copy of each list, in the code that owns it."""
    module, _, attr = name.rpartition(".")
    return tuple(getattr(importlib.import_module(module or "gspo.config.schema"), attr))


def _show(value, key: str = "") -> str:
    from gspo.config.schema import AUTO, AUTO_KEYS

    if key in AUTO_KEYS and value == AUTO:
        return "auto"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _eval(args: list[str]) -> int:
    from gspo.eval_cli import run_eval

    return run_eval(args)


def _plot(args: list[str]) -> int:
    from gspo.plot import run_plot

    return run_plot(args)


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
