"""The supervised warm-start: deterministic for a seed, learns, and the embedded checkpoint is sound."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gspo.models.tiny import build_char_tokenizer
from gspo.sft import encode_sft_batch, evaluate_accuracy, warm_start
from gspo.tasks.arithmetic import ArithmeticTask

TINY = dict(model_kwargs=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
            steps=40, batch_size=32, lr=1e-2, label_smoothing=0.0, target_accuracy=None, n_eval=8, eval_samples=2)
ASSET = Path(__file__).resolve().parents[2] / "src" / "gspo" / "assets" / "tiny-arith"


def test_labels_cover_answer_and_eos_only():
    tokenizer = build_char_tokenizer()
    batch = encode_sft_batch(tokenizer, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+25=", "answer": "35"}])
    ids, labels = batch["input_ids"], batch["labels"]
    assert tokenizer.decode(ids[0]) == "1+2=3<eos><pad><pad><pad>"
    assert labels[0].tolist() == [-100] * 4 + tokenizer("3")["input_ids"] + [1] + [-100] * 3
    assert labels[1].tolist() == [-100] * 6 + tokenizer("35")["input_ids"] + [1]
    assert batch["attention_mask"].sum(1).tolist() == [6, 9]


def test_warm_start_is_deterministic_and_reduces_loss(tmp_path):
    a = warm_start(tmp_path / "a", seed=0, **TINY)
    b = warm_start(tmp_path / "b", seed=0, **TINY)
    c = warm_start(tmp_path / "c", seed=1, **{**TINY, "steps": 2})  # another seed: other weights
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    report = json.loads((a / "warm_start.json").read_text())
    assert report["final_loss"] < 0.75 * report["first_loss"]  # 2.9 (uniform) -> about 2.05
    assert report["args"]["seed"] == 0 and "heldout_greedy" in report and "heldout_sampled_t1" in report
    assert all(v.dtype == torch.float32 for v in wa.values())


@pytest.mark.skipif(not (ASSET / "config.json").exists(), reason="embedded checkpoint not built")
def test_embedded_checkpoint_batched_decode_matches_single():
    """Left padding must not change greedy answers (position ids follow the attention mask)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(ASSET), AutoModelForCausalLM.from_pretrained(ASSET)
    rows = ArithmeticTask(seed=0).eval_rows(24)
    batched = evaluate_accuracy(model, tokenizer, rows, temperature=0.0, batch_size=24)
    singles = [evaluate_accuracy(model, tokenizer, [r], temperature=0.0)["accuracy"] for r in rows]
    assert batched["accuracy"] == pytest.approx(sum(singles) / len(singles))
    assert batched["eos"] > 0.95 and 0.2 < batched["accuracy"] < 0.95  # partially learned, stops properly
    assert (ASSET / "model.safetensors").stat().st_size < 5e6


def test_gspo_sft_writes_to_the_working_directory_with_progress_and_a_summary(tmp_path, monkeypatch, capsys):
    """``gspo sft model=NAME`` (the README's agent section) once rewrote the embedded checkpoint inside the
    installed package, silently. Now: ./sft/NAME, a progress line, a closing summary, and the package only on
    request."""
    import gspo.sft
    from gspo.cli import main
    from gspo.models.load import EMBEDDED

    monkeypatch.setitem(gspo.sft.EMBEDDED_RECIPES, "tiny-arith", {**TINY, "steps": 3})
    monkeypatch.chdir(tmp_path)
    asset = EMBEDDED["tiny-arith"] / "model.safetensors"
    before = asset.stat().st_mtime_ns if asset.exists() else None
    assert main(["sft", "model=tiny-arith", "log=x"]) == 2  # (an unknown key is still a usage error)
    capsys.readouterr()
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process: gspo sft silences transformers' own bars
    try:
        assert main(["sft", "model=tiny-arith"]) == 0
    finally:
        hf_logging.disable_progress_bar()
    out, err = capsys.readouterr()
    assert "%|" not in err
    assert (tmp_path / "sft" / "tiny-arith" / "config.json").exists()
    assert (asset.stat().st_mtime_ns if asset.exists() else None) == before  # the package is untouched
    assert "step 3/3" in err and "loss" in err  # gspo train's plain progress line (stderr is not a terminal)
    assert "sft tiny-arith: 3 steps" in out and "held-out accuracy" in out
    assert "train from it: gspo train model=sft/tiny-arith" in out and "unchanged" in out
    assert main(["sft", "model=tiny-arith", f"out={EMBEDDED['tiny-arith']}"]) == 2  # into the package: refused
    assert "into_package=true" in capsys.readouterr().err
