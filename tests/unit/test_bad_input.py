"""Bad input gets one clear line naming the problem and the fix: exit code 2 from the CLI, or the
documented error type from the API. Cases already covered elsewhere are not repeated here: unknown
keys and most out-of-range values (tests/unit/test_config.py), a missing model directory, a model that
is not a causal LM and a resume with another config (tests/integration/test_cli.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers

from gspo.cli import main
from gspo.config import load_config
from gspo.errors import ConfigError, ModelLoadError, RewardError
from gspo.models.load import load_model, load_tokenizer
from gspo.tasks.rewards import WeightedReward, resolve_rewards, score


def train_fails(capsys, *args: str) -> str:
    """Run ``gspo train``; assert exit code 2 and one error line without a traceback; return that line."""
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("gspo train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- configuration values not in test_config.py -----------------------------------------------------

@pytest.mark.parametrize("override, fragment", [
    ("rollout.prompts_per_step=0", "rollout.prompts_per_step=0 must be positive"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last=0 must be positive"),
    ("loss.clip_low=1", "must be below 1"),
    ("loss.beta=-0.1", "loss.beta=-0.1 must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 must be >= 0"),
    ("reward.none_policy=skip", "reward.none_policy='skip' is not one of zero, error"),
    ("moe.routing_replay=r4", "is not one of off, r2, r3"),
    ("rollout.engine_dtype=float8", "is not one of auto, float32, bfloat16, float16"),
    ("seed=-1", "seed=-1 must be >= 0"),
])
def test_more_out_of_range_values_are_named(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert fragment in str(info.value)


# -- datasets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, content, fragment", [
    ("empty.jsonl", "", "has no rows; add rows or point data.path at another file"),
    ("header-only.csv", "prompt,answer\n", "has no rows"),
    ("no-prompt.jsonl", '{"question": "1+1=", "answer": "2"}\n', "no column 'prompt'"),
    ("no-answer.csv", "prompt,solution\n1+1=,2\n2+2=,4\n", "no column 'answer'"),
])
def test_a_bad_dataset_is_named_with_the_fix(capsys, tmp_path, tiny_overrides, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    line = train_fails(capsys, *tiny_overrides, f"data.path={path}")
    assert fragment in line and str(path) in line
    if "column" in fragment:
        assert "set data." in line  # the key that fixes it


def test_prompts_longer_than_the_context_are_refused_not_truncated(capsys, tmp_path, tiny_overrides):
    rows = [{"prompt": "1+" * 40 + "1=", "answer": "41"}] * 10  # 82 characters = 82 tokens > 64 - 6
    line = train_fails(capsys, *tiny_overrides, f"data.path={write_jsonl(tmp_path / 'long.jsonl', rows)}")
    assert "has 82 tokens but at most 58 fit" in line and "rollout.max_new_tokens" in line


# -- tokenizers --------------------------------------------------------------------------------------

def model_copy(src: Path, dst: Path, **tokenizer_changes) -> Path:
    shutil.copytree(src, dst)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dst)
    for name, value in tokenizer_changes.items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(dst)
    return dst


def test_a_tokenizer_without_eos_is_refused(capsys, tmp_path, tiny_model_dir, tiny_overrides):
    path = model_copy(tiny_model_dir, tmp_path / "no-eos", eos_token=None)
    line = train_fails(capsys, *tiny_overrides, f"model={path}")
    assert "has no EOS token" in line and "tokenizer.eos_token" in line


def test_a_tokenizer_without_pad_pads_with_eos_and_trains(tmp_path, tiny_model_dir, tiny_overrides):
    path = model_copy(tiny_model_dir, tmp_path / "no-pad", pad_token=None)
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    from gspo.trainer.trainer import Trainer

    trainer = Trainer.from_config(load_config(None, [*tiny_overrides, f"model={path}"]))
    metrics = trainer.train_step()
    assert trainer.parts.engine.pad_token_id == tokenizer.eos_token_id
    assert metrics["optim/skipped"] == 0.0 and metrics["response/length_mean"] > 0


# -- rewards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("function, fragment", [
    ("boom", "raised RuntimeError: reward exploded"),
    ("nan", "returned nan; rewards must be finite numbers"),
    ("text", "returned str 'high'; rewards must be numbers"),
])
def test_a_failing_reward_names_the_function_and_the_sample(capsys, tiny_overrides, reward_module, function, fragment):
    spec = f"{reward_module}:{function}"
    overrides = [o for o in tiny_overrides if not o.startswith("reward.")]
    line = train_fails(capsys, *overrides, f"reward.functions={spec}")
    assert f"reward '{spec}' on sample 0 (completion " in line and fragment in line


def test_a_reward_returning_none_is_zero_and_counted_or_an_error(capsys, tmp_path, tiny_overrides, reward_module):
    spec = f"{reward_module}:nothing"
    overrides = [o for o in tiny_overrides if not o.startswith(("reward.", "steps="))] + ["steps=1"]
    run = tmp_path / "run"
    assert main(["train", *overrides, f"reward.functions={spec}", f"run_dir={run}"]) == 0
    step = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "reward/mean" in r)
    assert step[f"reward/{spec}/none_frac"] == 1.0 and step[f"reward/{spec}"] == 0.0
    line = train_fails(capsys, *overrides, f"reward.functions={spec}", "reward.none_policy=error")
    assert "returned None; return a number, or set reward.none_policy=zero" in line


def test_score_reports_the_failing_sample_index():
    calls = []

    def picky(prompt, completion, **row):
        calls.append(completion)
        return None if completion == "b" else 1.0

    rewards = [WeightedReward("picky", picky, 1.0)]
    totals, _, metrics = score(rewards, ["p"] * 3, ["a", "b", "c"], [{}] * 3)
    assert totals == [1.0, 0.0, 1.0] and metrics["reward/picky/none_frac"] == pytest.approx(1 / 3)
    with pytest.raises(RewardError, match=r"reward 'picky' on sample 1 \(completion 'b'\) returned None"):
        score(rewards, ["p"] * 3, ["a", "b", "c"], [{}] * 3, none_policy="error")


@pytest.mark.parametrize("spec, fragment", [
    ("exact_answer@heavy", "the weight after '@' must be a number"),
    ("exact_anwser", "unknown reward 'exact_anwser'. This task's rewards: exact_answer, format"),
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("json:no_such_function", "module 'json' has no callable 'no_such_function'"),
])
def test_bad_reward_specs(spec, fragment):
    from gspo.tasks.arithmetic import REWARDS

    with pytest.raises(ConfigError) as info:
        resolve_rewards([spec], {name: (fn, 1.0) for name, fn in REWARDS.items()})
    assert fragment in str(info.value)


# -- model directories that ask for their own code -----------------------------------------------------

EVIL_MODULE = "from pathlib import Path\nPath({marker!r}).write_text('executed')\n"


def with_custom_code(src: Path, dst: Path, marker: Path, config_name: str) -> Path:
    """A copy of ``src`` whose ``config_name`` points auto_map at a module that leaves ``marker`` when imported."""
    shutil.copytree(src, dst)
    (dst / "modeling_evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    config = json.loads((dst / config_name).read_text())
    config["auto_map"] = ({"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]} if config_name.startswith("tok")
                          else {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (dst / config_name).write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
def test_custom_code_in_a_model_directory_is_refused(capsys, tmp_path, tiny_model_dir, tiny_overrides, config_name):
    marker = tmp_path / "executed"
    path = with_custom_code(tiny_model_dir, tmp_path / "custom", marker, config_name)
    line = train_fails(capsys, *tiny_overrides, f"model={path}")
    assert "custom code is never executed" in line and config_name in line
    loader = load_model if config_name == "config.json" else load_tokenizer
    with pytest.raises(ModelLoadError, match="auto_map"):
        loader(path)
    assert not marker.exists()


def test_loading_never_turns_on_trust_remote_code(tiny_model_dir, monkeypatch):
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_tokenizer(tiny_model_dir)
    load_model(tiny_model_dir)
    assert seen and all(value is False for value in seen), seen
