"""The command line as a user meets it: help, mistakes, a short run, plot, eval, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gspo.cli import main


def test_top_level_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_train_help_lists_every_option_with_default_and_meaning(capsys):
    from gspo.config import field_docs

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key, _, default, doc in field_docs():
        assert f"  {key}=" in out, key
        assert doc.split()[0] in out


@pytest.mark.parametrize("args, fragment", [
    (["optim.lrr=1"], "Did you mean 'optim.lr'"),
    (["--steps", "3"], "key=value"),
    (["model=/nonexistent/model"], "neither an embedded model"),
    (["rollout.group_size=1"], "at least 2"),
    (["--resume"], "needs a value"),
])
def test_mistakes_get_one_clear_line_and_exit_2(capsys, args, fragment):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert "Traceback" not in err


def test_a_directory_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path)
    from gspo.models.tiny import build_char_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    assert main(["train", f"model={tmp_path}"]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "gspo", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "gspo <command>" in out.stdout


def test_train_plot_eval_and_resume(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    args = [o for o in tiny_overrides if not o.startswith("checkpoint.")] + ["checkpoint.every=1", f"run_dir={run}"]
    assert main(["train", *args]) == 0
    # the run says how it samples and where pi_old comes from (a tiny float32 Qwen3: native, from the sampler)
    assert "native decode step; old log-probs from the sampler (auto)" in capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and "lift/accuracy" in summary
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss/clip_frac"' in line for line in lines) == 2
    assert json.loads((run / "config.json").read_text())["steps"] == 2

    assert main(["plot", str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()
    assert main(["eval", str(run), "samples=2", "k=1,2", "eval.size=4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts"] == 4 and 0 <= report["sampled/pass@1"] <= report["sampled/pass@2"] <= 1

    # resume to 3 steps == a fresh 3-step run
    assert main(["train", "--resume", str(run), "steps=3"]) == 0
    straight = tmp_path / "straight"
    straight_args = [a for a in args if not a.startswith(("steps=", "run_dir="))] + ["steps=3", f"run_dir={straight}"]
    assert main(["train", *straight_args]) == 0
    from gspo.checkpoint import find_latest_checkpoint
    from safetensors.torch import load_file

    resumed = load_file(find_latest_checkpoint(run) / "model.safetensors")
    fresh = load_file(find_latest_checkpoint(straight) / "model.safetensors")
    assert resumed.keys() == fresh.keys()
    for key in resumed:
        assert torch.equal(resumed[key], fresh[key]), key


def test_resume_with_an_incompatible_config_is_refused(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", *tiny_overrides, "steps=1", f"run_dir={run}"]) == 0
    assert main(["train", "--resume", str(run), "algorithm=grpo"]) == 2
    assert "different config" in capsys.readouterr().err


def test_native_decoder_on_a_model_it_does_not_cover_is_a_clear_error(tiny_overrides, tiny_moe_dir, capsys):
    overrides = [o for o in tiny_overrides if not o.startswith("model=")]
    assert main(["train", *overrides, f"model={tiny_moe_dir}", "rollout.decoder=native", "steps=1"]) == 2
    err = capsys.readouterr().err
    assert "rollout.decoder=native cannot sample" in err and "qwen3_moe" in err and "rollout.decoder=auto" in err
    assert "Traceback" not in err
