"""A first hour without friction: one grammar for every subcommand, answers without torch, typo
suggestions, string values kept as written, rewards from the working directory, readable progress,
umask-respecting files, a plot that says what it shows."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from gspo.cli import main
from gspo.cli_args import Command, Flag, Option, UsageError, parse
from gspo.config import load_config
from gspo.config.load import EMBEDDED_MODELS, from_dict
from gspo.config.schema import ALGORITHMS, SWITCH_KEYS, Config
from gspo.errors import ConfigError, RewardError
from gspo.suggest import closest, edit_distance

SRC = Path(__file__).resolve().parents[2] / "src"
COMMANDS = ("train", "eval", "plot", "sft", "export", "experiment", "version")


def fails(capsys, *argv: str) -> str:
    """Run ``gspo ARGV``; assert exit code 2 and an error line ``gspo <cmd>: error: ...``; return stderr."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gspo {argv[0]}: error: "), err
    assert "Traceback" not in err
    return err


# -- 1, 10: one grammar, --help everywhere, errors exit 2 ------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: gspo {command}")


def test_version(capsys):
    from gspo import __version__

    for argv in (["--version"], ["version"]):
        assert main(argv) == 0
        assert capsys.readouterr().out.strip() == f"gspo {__version__}"


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--steps", "3"], "key=value (steps=3)"),
    (["train", "steps", "3"], "write it key=value, e.g. steps=3"),
    (["train", "--resme", "runs/x"], "Did you mean '--resume'?"),
    (["train", "--nproc", "two"], "--nproc 'two' must be a whole number"),
    (["eval"], "missing MODEL_OR_RUN"),
    (["eval", "some-model", "sampels=2"], "Did you mean 'samples'?"),
    (["eval", "some-model", "samples=0"], "samples=0 must be >= 1"),
    (["eval", "some-model", "k=a"], "k='a' must be a whole number"),
    (["eval", "some-model", "optim.lrr=1"], "Did you mean 'optim.lr'?"),
    (["plot"], "missing RUN"),
    (["plot", "run-a", "run-b"], "'run-b' is not key=value"),
    (["plot", "run-a", "ouy=x.png"], "Did you mean 'out'?"),
    (["sft", "model=tiny-arth"], "Did you mean 'tiny-arith'?"),
    (["sft", "seed=x"], "seed='x' must be a whole number"),
    (["sft", "stpes=3"], "Did you mean 'steps'?"),
    (["export", "run-a"], "missing OUT_DIR"),
    (["export", "run-a", "out", "merge=maybe"], "merge='maybe' must be true or false"),
    (["export", "run-a", "out", "merg=true"], "Did you mean 'merge'?"),
    (["experiment", "moe-stabilty"], "Did you mean 'moe-stability'?"),
    (["experiment", "moe-stability", "--seeds", "3"], "key=value"),
    (["experiment"], "missing NAME"),
])
def test_mistakes_exit_2_naming_the_problem_and_the_fix(capsys, argv, fragment):
    assert fragment in fails(capsys, *argv)


def test_unknown_command_and_flag_get_the_closest(capsys):
    assert main(["trian"]) == 2
    assert "Did you mean 'train'?" in capsys.readouterr().err
    assert main(["--verison"]) == 2
    assert "Did you mean '--version'?" in capsys.readouterr().err


def test_the_shared_grammar():
    command = Command("demo", "a demo", positionals=(("A", ""), ("B", "")), required=1,
                      options=(Option("n", "2", "", kind="int"), Option("flag", "false", "", kind="bool"),
                               Option("out", "", "")),
                      flags=(Flag("--resume", "RUN", ""), Flag("--out", "PATH", "", alias_of="out")))
    parsed = parse(command, ["a", "n=5", "--resume=runs/x", "b", "flag=yes", "--out", "o.png"])
    assert parsed.positionals == ["a", "b"]
    assert parsed.options == {"n": 5, "flag": True, "out": "o.png"}
    assert parsed.flags == {"--resume": "runs/x"}
    assert parse(command, ["a"]).options == {"n": 2, "flag": False}  # defaults typed too
    assert parse(command, ["x", "--help", "junk junk"]).help
    assert parse(command, ["runs/a=b"]).positionals == ["runs/a=b"]  # a path with '=' is not a key
    with pytest.raises(UsageError, match="--resume needs a value"):
        parse(command, ["a", "--resume"])


def test_plot_takes_out_and_keeps_dash_dash_out_as_a_deprecated_alias(capsys):
    from gspo.plot import PLOT

    assert parse(PLOT, ["run", "out=a.png"]).options["out"] == "a.png"
    assert parse(PLOT, ["run", "--out", "b.png"]).options["out"] == "b.png"
    assert "--out is deprecated; write out=b.png" in capsys.readouterr().err


def test_train_config_file_and_overrides_go_through_the_parser():
    from gspo.cli import TRAIN

    parsed = parse(TRAIN, ["run.yaml", "steps=3", "optim.lr=1e-4", "--nproc", "2"])
    assert parsed.positionals == ["run.yaml"]
    assert parsed.overrides == ["steps=3", "optim.lr=1e-4"]
    assert parsed.flags == {"--nproc": "2"}


# -- 2: help and typos without torch ---------------------------------------------------------------------

NO_TORCH_PROBE = """
import sys, gspo.cli
code = gspo.cli.main({argv!r})
heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
print("RESULT", code, ",".join(heavy))
"""


@pytest.mark.parametrize("argv, code", [
    (["--help"], 0), (["--version"], 0), (["train", "--help"], 0), (["eval", "--help"], 0),
    (["plot", "--help"], 0), (["sft", "--help"], 0), (["export", "--help"], 0), (["experiment", "--help"], 0),
    (["trian"], 2), (["train", "algorithm=gpro"], 2), (["train", "optim.lrr=1"], 2),
    (["train", "model=tiny-arth"], 2), (["train", "steps=abc"], 2), (["train", "--steps", "3"], 2),
    (["eval", "tiny-arith", "sampels=3"], 2),
])
def test_help_and_mistakes_import_no_torch(argv, code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE.format(argv=argv)], capture_output=True, text=True,
                         env=env, timeout=120)
    result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    assert result == f"RESULT {code} ", (result, out.stderr)


def test_the_probe_sees_torch_when_it_is_imported():
    """Control: the probe above can fail."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    probe = NO_TORCH_PROBE.replace("import sys, gspo.cli", "import sys, gspo.cli, gspo.algorithms.gspo")
    out = subprocess.run([sys.executable, "-c", probe.format(argv=["--help"])], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "RESULT 0 torch" in out.stdout


# -- 3: value suggestions ----------------------------------------------------------------------------------

def test_transpositions_cost_one_edit():
    assert edit_distance("gpro", "grpo") == 1
    assert edit_distance("gpro", "gspo") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("kitten", "sitting") == 3


@pytest.mark.parametrize("typo, options, expected", [
    ("gpro", ALGORITHMS, "grpo"),
    ("grp", ALGORITHMS, "grpo"),
    ("gspo-token", ALGORITHMS, "gspo_token"),
    ("dapoo", ALGORITHMS, "dapo"),
    ("tiny-arth", EMBEDDED_MODELS, "tiny-arith"),
    ("tiny_moe", EMBEDDED_MODELS, "tiny-moe"),
    ("trian", COMMANDS, "train"),
    ("ppo", ALGORITHMS, None),
    ("something-else", EMBEDDED_MODELS, None),
])
def test_closest(typo, options, expected):
    assert closest(typo, options) == expected


def test_algorithm_typo_suggests_grpo_not_gspo():
    with pytest.raises(ConfigError, match="Did you mean 'grpo'") as info:
        load_config(None, ["algorithm=gpro"])
    assert "gspo, gspo_token, grpo, dapo" in str(info.value)


def test_eval_of_a_missing_run_says_it_does_not_exist_without_a_model_option(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "gspo-tiny-arith-1").mkdir(parents=True)
    message = fails(capsys, "eval", "runs/nope")
    assert "'runs/nope' does not exist" in message and "model=" not in message
    assert "Did you mean 'runs/gspo-tiny-arith-1'?" in fails(capsys, "eval", "runs/gspo-tiny-arth-1")


def test_model_typo_suggests_the_embedded_name_and_says_it_is_not_a_directory():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model=tiny-arth"])
    message = str(info.value)
    assert "neither an embedded model" in message and "existing directory" in message
    assert "Did you mean 'tiny-arith'?" in message


def test_an_existing_directory_is_a_valid_model(tmp_path):
    assert load_config(None, [f"model={tmp_path}"]).model == str(tmp_path)


def test_embedded_model_names_match_the_model_loader():
    from gspo.models.load import EMBEDDED

    assert set(EMBEDDED_MODELS) == set(EMBEDDED)


# -- 4: string values stay as written (YAML 1.1 booleans) -------------------------------------------------

def _string_fields(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _string_fields(hints[f.name], f"{prefix}{f.name}.")
        elif hints[f.name] is str and prefix + f.name not in SWITCH_KEYS:  # auto | true | false: tested below
            yield prefix + f.name


STRING_FIELDS = list(_string_fields())
WORDS = ("off", "on", "none", "yes", "no", "null", "Off", "NO", "~", "true", "1")


def _nested(key: str, value):
    raw: dict = {}
    node = raw
    *sections, leaf = key.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    return raw


def _get(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("word, value", [("auto", "auto"), ("AUTO", "auto"), ("yes", "true"), ("on", "true"),
                                         ("1", "true"), ("true", "true"), ("no", "false"), ("off", "false"),
                                         ("false", "false"), (True, "true"), (False, "false")])
def test_switch_fields_read_auto_or_any_spelling_of_a_boolean(tmp_path, word, value):
    from gspo.config.load import _read_yaml

    for key in SWITCH_KEYS:
        section, leaf = key.split(".")
        assert _get(from_dict({section: {leaf: word}}), key) == value
        (tmp_path / "c.yaml").write_text(f"{section}:\n  {leaf}: {word}\n")
        assert _get(from_dict(_read_yaml(tmp_path / "c.yaml")), key) == value.lower()
    with pytest.raises(ConfigError, match="optim.gradient_checkpointing='sometimes' is not one of auto, true, false"):
        load_config(None, ["optim.gradient_checkpointing=sometimes"])


@pytest.mark.parametrize("word", WORDS)
def test_every_string_field_keeps_the_word_from_the_command_line_and_yaml(tmp_path, word):
    from gspo.config.load import _read_yaml, _set_dotted, _split_override

    assert "moe.routing_replay" in STRING_FIELDS and len(STRING_FIELDS) > 10
    path = tmp_path / "c.yaml"
    for key in STRING_FIELDS:
        raw: dict = {}
        _set_dotted(raw, *_split_override(f"{key}={word}"))
        assert _get(from_dict(raw), key) == word, key
        *sections, leaf = key.split(".")
        path.write_text("".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
                        + f"{'  ' * len(sections)}{leaf}: {word}\n")
        assert _get(from_dict(_read_yaml(path)), key) == word, key


def test_routing_replay_off_and_advantage_scale_none_load(tmp_path):
    assert load_config(None, ["moe.routing_replay=off"]).moe.routing_replay == "off"
    assert load_config(None, ["loss.advantage_scale=none"]).loss.advantage_scale == "none"
    path = tmp_path / "run.yaml"
    path.write_text("moe:\n  routing_replay: off\nloss:\n  advantage_scale: none\n  clip_low: null\n"
                    "  dynamic_sampling: no\n  beta: 0.01\noptim:\n  lr: 1e-5\n  gradient_checkpointing: yes\n"
                    "steps: 7\nreward:\n  functions: [exact_answer, format@0.1]\n")
    config = load_config(path)
    assert config.moe.routing_replay == "off" and config.loss.advantage_scale == "none"
    assert config.loss.clip_low is None and config.loss.dynamic_sampling is False and config.loss.beta == 0.01
    assert config.optim.lr == 1e-5 and config.optim.gradient_checkpointing == "true" and config.steps == 7
    assert config.reward.functions == ["exact_answer", "format@0.1"]


def test_typed_fields_still_read_their_words():
    config = load_config(None, ["log.progress=off", "loss.dynamic_sampling=none", "loss.clip_low=null",
                                "rollout.ignore_eos=yes", "steps=1e2", "reward.functions=[a:b, c]"])
    assert config.log.progress is False and config.loss.dynamic_sampling is None and config.loss.clip_low is None
    assert config.rollout.ignore_eos is True and config.steps == 100 and config.reward.functions == ["a:b", "c"]
    with pytest.raises(ConfigError, match="'steps' must be an integer"):
        load_config(None, ["steps=1.5e0"])


def test_a_saved_config_json_loads_back_to_the_same_config(tmp_path):
    config = load_config(None, ["moe.routing_replay=off", "data.system_prompt=yes", "loss.clip_low=0.1"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config


# -- 5, 6: user rewards ---------------------------------------------------------------------------------------

USER_REWARDS = textwrap.dedent('''
    def _ratio(completion):
        return 1 / len(completion.strip("x"))

    def score(prompt, completion, **row):
        return _ratio(completion)
''')


def test_a_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    from gspo.tasks.rewards import resolve_rewards

    (tmp_path / "cwd_rewards_ux.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_rewards_ux", raising=False)
    path_before = list(sys.path)
    (reward,) = resolve_rewards(["cwd_rewards_ux:score@2"], {})
    assert reward.fn("p", "ab") == 0.5 and reward.weight == 2.0
    assert sys.path == path_before  # the working directory was on the path for that import only


def test_a_missing_reward_module_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from gspo.tasks.rewards import resolve_rewards

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        resolve_rewards(["no_such_rewards_ux:score"], {})
    message = str(info.value)
    assert f"current directory ({tmp_path})" in message and "no_such_rewards_ux.py" in message
    (tmp_path / "broken_dep_ux.py").write_text("import no_such_dependency_ux\ndef score(p, c): return 1\n")
    with pytest.raises(ConfigError, match="no_such_dependency_ux"):
        resolve_rewards(["broken_dep_ux:score"], {})


def test_a_failing_reward_shows_its_frames_and_the_sample(tmp_path, monkeypatch):
    from gspo.tasks.rewards import resolve_rewards, score

    (tmp_path / "failing_rewards_ux.py").write_text(USER_REWARDS)
    monkeypatch.chdir(tmp_path)
    rewards = resolve_rewards(["failing_rewards_ux:score"], {})
    with pytest.raises(RewardError) as info:
        score(rewards, ["1+1=", "2+2="], ["2", "xx"], [{}, {}])
    first, *rest = str(info.value).splitlines()
    assert first.startswith("reward 'failing_rewards_ux:score' on sample 1") and "ZeroDivisionError" in first
    text = "\n".join(rest)
    assert f'File "{tmp_path / "failing_rewards_ux.py"}", line 6, in score' in text
    assert "line 3, in _ratio" in text and 'return 1 / len(completion.strip("x"))' in text
    assert "rewards.py" not in text  # gspo's own frames are left out
    assert "prompt: '2+2='" in text and "completion: 'xx'" in text


# -- 7: progress ---------------------------------------------------------------------------------------------

METRICS = {"reward/mean": 0.412, "reward/accuracy": 0.41, "loss/clip_frac": 0.0012, "kl/old_new": 1.2e-5,
           "throughput/tokens_per_s": 1234.0}


@pytest.mark.parametrize("width", [80, 100, 60])
def test_the_bar_at_narrow_widths_keeps_step_times_and_key_metrics(width):
    from rich.console import Console

    from gspo.trainer.progress import Progress

    console = Console(width=width, force_terminal=True, record=True, file=io.StringIO())
    with Progress(200, console=console) as progress:
        progress.update(12, METRICS)
    last = console.export_text().rstrip("\n").splitlines()[-1]
    assert "…" not in last
    assert " 12/200 " in last and "0:00:0" in last and "eta " in last
    assert "reward 0.412" in last
    if width >= 80:
        assert "acc 0.41" in last and "clip 0.0012" in last
    assert len(last.split("train ")[-1]) <= width


def test_without_a_terminal_one_plain_line_every_n_steps():
    from rich.console import Console

    from gspo.trainer.progress import Progress

    out = io.StringIO()
    long_note = "lift: accuracy 39.4% -> 61.4% (+22.0 points) -> runs/" + "a-long-run-name-" * 8
    with Progress(25, console=Console(file=out, width=80), every=10) as progress:
        for step in range(1, 26):
            progress.update(step, METRICS)
        progress.note(long_note)
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["10/25", "20/25", "25/25"]
    for line in lines[:3]:
        assert "elapsed 0:00:0" in line and "eta " in line
        assert "reward 0.412" in line and "acc 0.41" in line and "clip 0.0012" in line
    assert lines[3:] == [long_note]  # whole, on one line, never cut to 80 columns


def test_a_resumed_run_estimates_the_eta_from_the_steps_done_since(monkeypatch):
    import gspo.trainer.progress as progress_module
    from rich.console import Console

    clock = iter([0.0, 0.0, 10.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with progress_module.Progress(200, console=Console(file=out), every=1) as progress:
        progress.update(101, METRICS)  # resumed at step 100: one step in 10 s, 99 to go
    assert out.getvalue().startswith("step 101/200  elapsed 0:00:10  eta 0:16:30  ")


def test_a_disabled_progress_prints_nothing_but_notes(capsys):
    from gspo.trainer.progress import Progress

    with Progress(5, enabled=False) as progress:
        progress.update(5, METRICS)
        progress.note("hello")
    assert capsys.readouterr().err == "hello\n"


# -- 8: file modes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoint_files_respect_the_umask(tmp_path, umask, mode):
    from gspo.checkpoint import save_checkpoint
    from gspo.models.load import load_model, resolve_model_path

    model = load_model(resolve_model_path("tiny-arith"))
    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "run", 1, model=model, trainer_state={"step": 1})
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir() if f.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {mode}, modes


# -- 9: plot -------------------------------------------------------------------------------------------------

def _fake_run(run: Path, steps: int = 40) -> Path:
    run.mkdir()
    config = Config(algorithm="grpo").to_dict()
    (run / "config.json").write_text(json.dumps(config))
    records = [{"step": 0, "eval/accuracy": 0.3, "eval/greedy_accuracy": 0.5}]
    for step in range(1, steps + 1):
        records.append({"step": step, "reward/mean": step / steps + 0.1 * (-1) ** step,
                        "reward/accuracy": step / steps, "loss/clip_frac": 0.1, "kl/old_new": 1e-3,
                        "response/length_mean": 6.0, "logratio/token_std": 0.01, "logratio/seq_std": 0.005})
        if step % 10 == 0:
            records.append({"step": step, "eval/accuracy": 0.3 + step / 100, "eval/greedy_accuracy": 0.5})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_ema_starts_at_the_data_and_smooths():
    from gspo.plot import ema

    assert ema([2.0, 2.0, 2.0], span=5) == [2.0, 2.0, 2.0]
    smoothed = ema([0.0] * 10 + [1.0] * 10, span=5)
    assert smoothed[9] == 0.0 and 0 < smoothed[10] < 1 and smoothed[-1] > 0.9


def test_plot_title_smoothing_and_every_eval_record(tmp_path, monkeypatch, capsys):
    import gspo.plot as plot

    run = _fake_run(tmp_path / "run")
    title = plot.run_title(run)
    assert title.startswith("grpo on tiny-arith: 16 prompts x 8, lr 1e-4, clip 0.2 / 0.2, 4 minibatches")
    drawn = {}
    original = plot._plot_series
    monkeypatch.setattr(plot, "_plot_series",
                        lambda ax, points, label, **kw: (drawn.setdefault(label, points), original(ax, points, label, **kw)))
    assert main(["plot", str(run), f"out={tmp_path / 'c.png'}"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert [step for step, _ in drawn["held-out (sampled)"]] == [0, 10, 20, 30, 40]
    assert len(drawn["mean reward"]) == 40


def test_plot_without_a_config_json_titles_with_the_path(tmp_path):
    from gspo.plot import run_title

    run = _fake_run(tmp_path / "run")
    (run / "config.json").unlink()
    assert run_title(run) == str(run)


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS), ["experiment", "algorithms"],
                                  ["experiment", "moe-stability"]])
def test_help_fits_80_columns_when_columns_is_80(capsys, monkeypatch, argv):
    """gspo train --help had 65 of 172 lines wider than 80 columns (up to 381), whatever COLUMNS said."""
    monkeypatch.setenv("COLUMNS", "80")
    assert main([*argv, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80][:3]
    monkeypatch.setenv("COLUMNS", "60")
    main([*argv, "--help"])
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 60


def test_train_help_reads_its_lists_from_the_registries_and_has_no_stale_text(capsys, monkeypatch):
    import gspo.tasks.registry
    from gspo.config.load import EMBEDDED_MODELS
    from gspo.config.schema import ALGORITHMS

    monkeypatch.setattr(gspo.tasks.registry, "BUILTIN_TASKS", (*gspo.tasks.registry.BUILTIN_TASKS, "new_task"))
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"Embedded model name ({', '.join(EMBEDDED_MODELS)})" in text and "tiny-calc" in text
    assert f"The objective ({', '.join(ALGORITHMS)})" in text
    assert "Built-in task (arithmetic, calculator, reasoning_gym:<name>, new_task)" in text  # read at --help time
    assert "eval.every=auto" in text and "[an integer or auto]" in text
    for stale in ("``", "issue 1", "about 3 minutes", "(or gspo_token / grpo / dapo)", ":data:"):
        assert stale not in text, stale
    assert load_config(None, ["eval.every=auto"]).eval.every == load_config(None, []).eval.every


def test_the_plot_explains_the_clip_fraction_and_the_docs_hold_the_explanation():
    """A GSPO reader saw ~0.4 where the paper shows ~0.15 and a flat 0 on-policy line, explained nowhere."""
    from gspo.plot import CAPTIONS, PANELS

    labels = dict(dict(PANELS)["clip fraction"])
    assert "0 by construction" in labels["onpolicy/clip_frac"] and "minibatches" in labels["loss/clip_frac"]
    assert "0.15" in CAPTIONS["clip fraction"] and "docs/objectives.md" in CAPTIONS["clip fraction"]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "objectives.md").read_text()
    section = docs.split("### Reading the clip fraction", 1)[1].split("\n## ", 1)[0]
    for point in ("0 by construction", "1/sqrt(|y_i|)", "0.15", "onpolicy/clip_frac", "max_staleness"):
        assert point in section, point
