"""``gspo sft``: rebuild an embedded warm-start checkpoint, reproducibly (same seed, same weights)."""

from __future__ import annotations

from pathlib import Path

from gspo.errors import ConfigError

SFT_HELP = """usage: gspo sft [model=tiny-arith] [out=DIR] [seed=0] [steps=N]

Trains the embedded model from scratch with a short supervised stage on the arithmetic task and
saves a Hugging Face checkpoint. Without out=, it rewrites the embedded checkpoint in the package
(src/gspo/assets/<model>), which is how the committed one was made."""


def run_sft(args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        print(SFT_HELP)
        return 0
    options = {"model": "tiny-arith", "out": "", "seed": "0", "steps": ""}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise ConfigError(f"gspo sft takes {', '.join(k + '=...' for k in options)}; got '{arg}'")
        options[key] = value
    from gspo.models.load import EMBEDDED
    from gspo.sft import warm_start_embedded

    if options["model"] not in EMBEDDED:
        raise ConfigError(f"model={options['model']!r}: gspo sft builds the embedded models ({', '.join(EMBEDDED)})")
    out = Path(options["out"]) if options["out"] else EMBEDDED[options["model"]]
    kwargs = {"seed": _int("seed", options["seed"])}
    if options["steps"]:
        kwargs["steps"] = _int("steps", options["steps"])
    if options["model"] == "tiny-moe":  # the MoE has its own calibrated recipe (docs/moe-stability.md)
        from gspo.experiments.moe_warm_start import warm_start_moe

        path = warm_start_moe(out, **kwargs)
    else:
        path = warm_start_embedded(options["model"], out, **kwargs)
    print(path)
    return 0


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} must be a whole number") from None
