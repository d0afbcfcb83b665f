"""``gspo sft``: rebuild an embedded warm-start checkpoint, reproducibly (same seed, same weights)."""

from __future__ import annotations

from pathlib import Path

from gspo.cli_args import Command, Option, UsageError, parse, render_help

SFT = Command(
    "sft", "rebuild the embedded warm-start checkpoint",
    options=(Option("model", "tiny-arith", "the embedded model to build (tiny-arith, tiny-moe, tiny-calc)"),
             Option("out", "", "output directory (default: the embedded checkpoint in the package)"),
             Option("seed", "0", "seed of the initialisation and the data", kind="int"),
             Option("steps", "", "supervised steps (default: the model's recipe)", kind="int", minimum=1),
             Option("bos", "false", "tiny-arith only: a base-model-style tokenizer that adds <bos> to every text "
                    "(no chat template), trained with it; for trying gspo on an own model directory", kind="bool")),
    description="Trains the embedded model from scratch with a short supervised stage on the arithmetic task and\n"
                "saves a Hugging Face checkpoint. Without out=, it rewrites the embedded checkpoint in the package\n"
                "(src/gspo/assets/<model>), which is how the committed one was made.",
)


def run_sft(args: list[str]) -> int:
    parsed = parse(SFT, args)
    if parsed.help:
        print(render_help(SFT))
        return 0
    options = parsed.options
    from gspo.config.load import EMBEDDED_MODELS
    from gspo.suggest import did_you_mean

    if options["model"] not in EMBEDDED_MODELS:
        raise UsageError(f"model={options['model']!r}: gspo sft builds the embedded models "
                         f"({', '.join(EMBEDDED_MODELS)}).{did_you_mean(options['model'], EMBEDDED_MODELS)}")
    from gspo.models.load import EMBEDDED
    from gspo.sft import warm_start_embedded
    out = Path(options["out"]) if options.get("out") else EMBEDDED[options["model"]]
    kwargs = {"seed": options["seed"]}
    if options.get("bos"):
        if options["model"] != "tiny-arith":
            raise UsageError(f"bos=true builds tiny-arith with a <bos> tokenizer; model={options['model']} has its own")
        if not options.get("out"):
            raise UsageError("bos=true needs out=DIR: the embedded tiny-arith stays as it is")
        kwargs["bos"] = True
    if "steps" in options:
        kwargs["steps"] = options["steps"]
    if options["model"] == "tiny-calc":  # agents (issue 16): calculator demonstrations (gspo.agents.warm_start)
        from gspo.agents.warm_start import warm_start_calculator

        path = warm_start_calculator(out, **kwargs)
    elif options["model"] == "tiny-moe":  # the MoE has its own calibrated recipe (docs/moe-stability.md)
        from gspo.experiments.moe_warm_start import warm_start_moe

        path = warm_start_moe(out, **kwargs)
    else:
        path = warm_start_embedded(options["model"], out, **kwargs)
    print(path)
    return 0
