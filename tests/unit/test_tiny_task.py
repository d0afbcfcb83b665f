"""The embedded tiny model, its character tokenizer, and the arithmetic task with its rewards."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo.models.tiny import ALPHABET, EOS_TOKEN, PAD_TOKEN, build_char_tokenizer, build_tiny_qwen3
from gspo.tasks.arithmetic import EOS_TEXT, PAD_TEXT, ArithmeticTask, exact_answer_reward, format_reward, make_row


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# -- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_one_token_per_char_and_no_specials_added(tokenizer):
    text = "123+-45*6= 7890"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # no BOS/EOS added, spaces kept
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert len(tokenizer) == 3 + len(ALPHABET)
    assert ids[0] == 3 + ALPHABET.index("1")


def test_tokenizer_special_tokens_and_unknown_chars(tokenizer):
    ids = tokenizer("12")["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids) == "12" + EOS_TOKEN + PAD_TOKEN
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12"
    assert tokenizer("x")["input_ids"] == [tokenizer.unk_token_id]
    assert (EOS_TEXT, PAD_TEXT) == (EOS_TOKEN, PAD_TOKEN)  # the task's rewards strip these strings


def test_save_and_auto_reload_offline(tokenizer, tmp_path):
    model = build_tiny_qwen3(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                             intermediate_size=64)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    model2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert tok2("37+48=")["input_ids"] == tokenizer("37+48=")["input_ids"]
    assert (tok2.pad_token_id, tok2.eos_token_id) == (0, 1)
    assert model2.config.vocab_size == len(tokenizer) and model2.config.tie_word_embeddings
    assert model2.generation_config.eos_token_id == 1 and model2.generation_config.pad_token_id == 0
    ids = torch.tensor([tokenizer("37+48=")["input_ids"]])
    torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_default_model_is_about_one_million_parameters(tokenizer):
    n = sum(p.numel() for p in build_tiny_qwen3(tokenizer).parameters())
    assert 0.5e6 < n < 1.5e6


def test_model_init_is_seeded(tokenizer):
    kw = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    a, b, c = (build_tiny_qwen3(tokenizer, seed=s, **kw) for s in (0, 0, 1))
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


# -- task -----------------------------------------------------------------------------------------
def test_rows_are_deterministic_and_well_formed(tokenizer):
    rows = ArithmeticTask(seed=3).train_rows(200)
    assert rows == ArithmeticTask(seed=3).train_rows(200)
    assert rows != ArithmeticTask(seed=4).train_rows(200)
    assert ArithmeticTask(seed=3).eval_rows(50) == ArithmeticTask(seed=3).eval_rows(50)
    for row in rows:
        a, b = row["prompt"][:-1].split("+")
        assert row["prompt"].endswith("=") and int(row["answer"]) == int(a) + int(b)
        assert max(len(a), len(b)) <= 3
        assert tokenizer.unk_token_id not in tokenizer(row["prompt"] + row["answer"])["input_ids"]


@pytest.mark.timeout(10)
def test_no_heldout_rows_is_an_empty_list_not_an_endless_loop():
    assert ArithmeticTask(seed=0).eval_rows(0) == []  # eval.size=0 (it looped forever)


def test_heldout_is_disjoint_from_train_for_every_seed():
    heldout = {r["prompt"] for r in ArithmeticTask(seed=0).eval_rows(300)}
    assert len(heldout) == 300  # distinct
    for seed in (0, 1):
        train = {r["prompt"] for r in ArithmeticTask(seed=seed).train_rows(5_000)}
        assert not heldout & train


def test_subtraction_rows_can_be_negative():
    rows = ArithmeticTask(seed=0, subtraction_fraction=1.0).train_rows(200)
    assert all("-" in r["prompt"] for r in rows)
    assert any(r["answer"].startswith("-") for r in rows)
    assert make_row("-", 3, 10) == {"prompt": "3-10=", "answer": "-7"}


def test_invalid_task_settings_are_rejected():
    with pytest.raises(ValueError, match="max_digits"):
        ArithmeticTask(max_digits=0)
    with pytest.raises(ValueError, match="heldout_fraction"):
        ArithmeticTask(heldout_fraction=0.0)


# -- rewards --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "exact", "fmt"),
    [
        ("85", 1.0, 1.0),
        ("85<eos>", 1.0, 1.0),
        (" 85 <eos><pad><pad>", 1.0, 1.0),
        ("85<eos>7", 1.0, 1.0),  # only what precedes the first EOS counts
        ("850", 0.0, 1.0),
        ("8", 0.0, 1.0),
        ("-85", 0.0, 1.0),
        ("85+", 0.0, 0.0),
        ("8 5", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("<eos>", 0.0, 0.0),
        ("--85", 0.0, 0.0),
    ],
)
def test_rewards_closed_form(completion, exact, fmt):
    row = {"answer": "85"}
    assert exact_answer_reward("37+48=", completion, **row) == exact
    assert format_reward("37+48=", completion, **row) == fmt
