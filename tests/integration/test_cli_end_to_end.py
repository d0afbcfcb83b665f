"""The first hour through the real ``gspo`` console script: your own rewards beside you, a failing
reward's traceback, plain progress lines when the output is not a terminal, files other users can
read, and the README's command lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from gspo.cli import TRAIN, main
from gspo.cli_args import parse

USER_REWARDS = textwrap.dedent('''
    def score(prompt, completion, **row):
        return completion.count("1") / 4.0

    def _check(completion):
        raise ValueError("cannot parse " + repr(completion))

    def strict(prompt, completion, **row):
        return _check(completion)
''')


def gspo_script(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the installed ``gspo`` script in ``tmp_path`` (no PYTHONPATH: what a user's shell does)."""
    script = shutil.which("gspo")
    if script is None:
        pytest.skip("the gspo console script is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([script, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


def script_overrides(tiny_model_dir: Path) -> list[str]:
    return [f"model={tiny_model_dir}", "steps=2", "rollout.prompts_per_step=4", "rollout.group_size=4",
            "rollout.max_new_tokens=6", "optim.minibatches=2", "eval.size=8", "log.tensorboard=false",
            "checkpoint.every=0"]


def test_a_reward_beside_the_user_trains_and_prints_plain_progress(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    out = gspo_script(tmp_path, "train", *script_overrides(tiny_model_dir), "reward.functions=my_rewards:score",
                      "run_dir=run")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == ["2/2"]  # every=10: only the last step of 2
    assert "elapsed " in step_lines[0] and "eta " in step_lines[0] and "reward " in step_lines[0]
    assert any(line.startswith("held-out after training:") for line in lines)
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_failing_reward_shows_the_users_frames_and_the_sample(tmp_path, tiny_model_dir):
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    out = gspo_script(tmp_path, "train", *script_overrides(tiny_model_dir), "reward.functions=my_rewards:strict",
                      "run_dir=run")
    assert out.returncode == 2
    err = out.stderr[out.stderr.index("gspo train: error:"):]
    first, *rest = err.splitlines()
    assert first.startswith("gspo train: error: reward 'my_rewards:strict' on sample 0 (completion ")
    assert "raised ValueError: cannot parse" in first
    detail = "\n".join(rest)
    assert f'File "{tmp_path / "my_rewards.py"}", line 9, in strict' in detail
    assert "line 6, in _check" in detail
    assert "gspo/tasks/rewards.py" not in detail and "gspo/trainer" not in detail
    assert "\nprompt: '" in detail and "\ncompletion: '" in detail


def test_a_missing_reward_module_is_one_line_naming_the_directory(tmp_path, tiny_model_dir):
    out = gspo_script(tmp_path, "train", *script_overrides(tiny_model_dir), "reward.functions=not_here:score")
    assert out.returncode == 2
    assert f"neither in the current directory ({tmp_path}) nor on PYTHONPATH" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_export_files_respect_the_umask(tmp_path, tiny_model_dir, umask, mode):
    old = os.umask(umask)
    try:
        assert main(["export", str(tiny_model_dir), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir() if f.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {mode}, modes


def test_plot_a_real_run(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides, f"run_dir={run}", "eval.every=1", "steps=3"]) == 0
    assert main(["plot", str(run), f"out={tmp_path / 'curves.png'}"]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    from gspo.plot import run_title

    assert run_title(run).startswith("gspo on ")


README_TRAIN_LINES = [
    "",
    "algorithm=grpo steps=100",
    "my_run.yaml optim.lr=5e-5",
    "--resume runs/gspo-tiny-arith-x",
    "--nproc 2 steps=100",
    "model=path/to/hf-model data.path=train.jsonl data.prompt_column=question data.answer_column=solution "
    "reward.functions=my_rewards:correct@1.0,my_rewards:short@0.1",
    "model=path/to/hf-model data.task=reasoning_gym:chain_sum data.system_prompt=Put",
    "data.task=reasoning_gym:basic_arithmetic?max_terms=3&max_digits=2",
    "model=path/to/hf-model data.path=math.jsonl data.prompt_column=messages data.answer_column=solution "
    "reward.functions=math_verify",
    "reward.functions=math_verify@1.0,rm:path/to/reward-model@0.5",
    "model=path/to/hf-model lora.rank=16 lora.alpha=32 loss.beta=0.01",
    "log.trackers=wandb,mlflow log.project=my-ablation",
    "distributed.strategy=fsdp",
]


@pytest.mark.parametrize("line", README_TRAIN_LINES)
def test_the_readme_train_lines_parse(line):
    parsed = parse(TRAIN, line.split())
    assert not parsed.help and len(parsed.positionals) <= 1


@pytest.mark.parametrize("argv", [
    ["eval", "runs/gspo-tiny-arith-x", "samples=8", "k=1,8"],
    ["eval", "path/to/model", "data.task=reasoning_gym:chain_sum", "samples=8", "k=1,8", "out=report.json"],
    ["eval", "runs/gspo-my-run", "data.path=heldout.jsonl", "samples=4", "k=1,4"],
    ["plot", "runs/gspo-tiny-arith-x"],
    ["export", "runs/gspo-my-run", "exported/"],
    ["export", "runs/gspo-my-run/checkpoints/step-00000100", "adapter/", "merge=false"],
    ["sft"],
])
def test_the_readme_lines_of_the_other_commands_parse(argv):
    from gspo.cli import commands

    parse(commands()[argv[0]], argv[1:])
