"""``gspo sft``: rebuild an embedded warm-start checkpoint, reproducibly (same seed, same weights).

The checkpoint goes to ``sft/<model>`` in the working directory (or ``out=``), never into the installed
package unless ``into_package=true`` says so: the embedded checkpoints are what the README's figures were
measured on, and a rebuilt one differs (another torch build, another CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

from gspo.cli_args import Command, Option, UsageError, parse, render_help
from gspo.config.load import EMBEDDED_MODELS

DEFAULT_OUT_ROOT = Path("sft")  # gspo sft model=NAME writes ./sft/NAME unless out= is given
PLAIN_EVERY = 50  # steps between progress lines when stderr is not a terminal

SFT = Command(
    "sft", "rebuild an embedded warm-start checkpoint (into ./sft/<model>)",
    options=(Option("model", "tiny-arith", f"the embedded model to build ({', '.join(EMBEDDED_MODELS)})"),
             Option("out", "", f"output directory (default: {DEFAULT_OUT_ROOT}/<model> in the working directory)"),
             Option("into_package", "false", "rewrite the embedded checkpoint inside the installed package "
                    "(src/gspo/assets/<model>), as its maintainers do; without it gspo sft never writes there",
                    kind="bool"),
             Option("seed", "0", "seed of the initialisation and the data", kind="int"),
             Option("steps", "", "supervised steps (default: the model's recipe)", kind="int", minimum=1),
             Option("bos", "false", "tiny-arith only: a base-model-style tokenizer that adds <bos> to every text "
                    "(no chat template), trained with it; for trying gspo on an own model directory", kind="bool")),
    description="Trains an embedded model from scratch with a short supervised stage (the recipe that made the\n"
                f"committed checkpoint) and saves a Hugging Face checkpoint to {DEFAULT_OUT_ROOT}/<model> (or out=);\n"
                f"train from it with model={DEFAULT_OUT_ROOT}/<model>. The embedded checkpoint stays as installed.",
)


def output_dir(model: str, out: str = "", *, into_package: bool = False) -> Path:
    """Where a warm start of ``model`` goes: ``out``, else ``sft/<model>``; the package only when asked."""
    from gspo.models.load import ASSETS, EMBEDDED

    if into_package:
        if out:
            raise UsageError("into_package=true writes the embedded checkpoint; drop out= (or into_package)")
        return EMBEDDED[model]
    path = Path(out) if out else DEFAULT_OUT_ROOT / model
    if path.resolve().is_relative_to(ASSETS.parent):
        raise UsageError(f"out={path} is inside the installed gspo package; write elsewhere, or pass "
                         "into_package=true (without out=) to rebuild the embedded checkpoint on purpose")
    return path


def run_sft(args: list[str]) -> int:
    parsed = parse(SFT, args)
    if parsed.help:
        print(render_help(SFT))
        return 0
    options = parsed.options
    from gspo.suggest import did_you_mean

    model = options["model"]
    if model not in EMBEDDED_MODELS:
        raise UsageError(f"model={model!r}: gspo sft builds the embedded models "
                         f"({', '.join(EMBEDDED_MODELS)}).{did_you_mean(model, EMBEDDED_MODELS)}")
    out = output_dir(model, options.get("out", ""), into_package=options["into_package"])
    kwargs = {"seed": options["seed"]}
    if options.get("bos"):
        if model != "tiny-arith":
            raise UsageError(f"bos=true builds tiny-arith with a <bos> tokenizer; model={model} has its own")
        if options["into_package"]:
            raise UsageError("bos=true with into_package=true would replace the embedded tiny-arith; use out=DIR")
        kwargs["bos"] = True
    if "steps" in options:
        kwargs["steps"] = options["steps"]
    from gspo.models.load import quiet_transformers

    quiet_transformers()
    progress = _Progress()
    try:
        path = _warm_start(model, out, on_step=progress, **kwargs)
    finally:
        progress.close()
    print(summary_text(model, path, into_package=options["into_package"]))
    return 0


def _warm_start(model: str, out: Path, **kwargs) -> Path:
    if model == "tiny-calc":  # agents: calculator demonstrations (gspo.agents.warm_start)
        from gspo.agents.warm_start import warm_start_calculator

        return warm_start_calculator(out, **kwargs)
    if model == "tiny-moe":  # the MoE has its own calibrated recipe (docs/moe-stability.md)
        from gspo.experiments.moe_warm_start import warm_start_moe

        return warm_start_moe(out, **kwargs)
    from gspo.sft import warm_start_embedded

    return warm_start_embedded(model, out, **kwargs)


class _Progress:
    """``gspo train``'s progress display for the supervised steps: a bar on a terminal, else a plain line
    every :data:`PLAIN_EVERY` steps (stderr); then a note while the held-out accuracy is measured."""

    def __init__(self) -> None:
        self._progress = None

    def __call__(self, step: int, steps: int, metrics: dict) -> None:
        if self._progress is None:
            from gspo.trainer.progress import Progress

            self._progress = Progress(steps, every=PLAIN_EVERY, label="sft").__enter__()
        self._progress.update(step, metrics)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)
            self._progress = None


def summary_text(model: str, path: Path, *, into_package: bool = False) -> str:
    """The closing lines: steps and time, held-out accuracy, where the checkpoint is and how to train from it."""
    report = json.loads((path / "warm_start.json").read_text())
    greedy, sampled = report.get("heldout_greedy", {}), report.get("heldout_sampled_t1", {})
    accuracy = ""
    if "accuracy" in greedy and "accuracy" in sampled:
        accuracy = (f"; held-out accuracy {100 * sampled['accuracy']:.1f}% sampled (T=1), "
                    f"{100 * greedy['accuracy']:.1f}% greedy")
    use = model if into_package else str(path)
    task = " data.task=calculator" if model == "tiny-calc" else ""
    where = ("the embedded checkpoint in the package was rewritten" if into_package
             else f"the embedded {model} is unchanged")
    return (f"sft {model}: {report.get('steps_run', '?')} steps in {report.get('train_seconds', '?')} s{accuracy}\n"
            f"saved to {path} ({where})\n"
            f"train from it: gspo train model={use}{task}")
