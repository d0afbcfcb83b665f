"""Reward plumbing: batched rewards beside per-sample ones, math-verify, answer extraction, optional extras."""

from __future__ import annotations

import math

import pytest

from gspo.errors import ConfigError, RewardError
from gspo.tasks import answers
from gspo.tasks.rewards import WeightedReward, resolve_rewards, score


class CountingBatched:
    """A batched reward: one call per batch, the completion's length as its value."""

    batched = True

    def __init__(self, values=None):
        self.calls = []
        self.values = values

    def __call__(self, prompts, completions, rows):
        self.calls.append((list(prompts), list(completions), list(rows)))
        return self.values if self.values is not None else [float(len(c)) for c in completions]


def per_sample(prompt, completion, **row):
    return 1.0 if completion == row["answer"] else 0.0


ROWS = [{"prompt": "p0", "answer": "a"}, {"prompt": "p1", "answer": "bb"}, {"prompt": "p2", "answer": "x"}]
COMPLETIONS = ["a", "bb", "ccc"]


def test_a_batched_reward_is_called_once_and_combines_by_weight():
    batched = CountingBatched()
    rewards = [WeightedReward("exact", per_sample, 1.0), WeightedReward("len", batched, 0.5)]
    totals, columns, metrics = score(rewards, ["p0", "p1", "p2"], COMPLETIONS, ROWS)
    assert len(batched.calls) == 1
    prompts, completions, rows = batched.calls[0]
    assert (prompts, completions, rows) == (["p0", "p1", "p2"], COMPLETIONS, ROWS)  # rows carry every column
    assert columns == {"exact": [1.0, 1.0, 0.0], "len": [1.0, 2.0, 3.0]}
    assert totals == [1.0 + 0.5 * 1, 1.0 + 0.5 * 2, 0.0 + 0.5 * 3]
    assert metrics["reward/len"] == pytest.approx(2.0)


def test_batched_values_get_the_per_sample_policy():
    none = [WeightedReward("rm", CountingBatched([1.0, None, 2.0]), 1.0)]
    totals, _, metrics = score(none, ["p"] * 3, COMPLETIONS, ROWS)
    assert totals == [1.0, 0.0, 2.0] and metrics["reward/rm/none_frac"] == pytest.approx(1 / 3)
    with pytest.raises(RewardError, match=r"reward 'rm' on sample 1 .* returned None"):
        score(none, ["p"] * 3, COMPLETIONS, ROWS, none_policy="error")
    with pytest.raises(RewardError, match=r"reward 'rm' on sample 2 \(completion 'ccc'\) returned nan"):
        score([WeightedReward("rm", CountingBatched([0.0, 1.0, math.nan]), 1.0)], ["p"] * 3, COMPLETIONS, ROWS)
    with pytest.raises(RewardError, match="returned 2 values for 3 completions"):
        score([WeightedReward("rm", CountingBatched([0.0, 1.0]), 1.0)], ["p"] * 3, COMPLETIONS, ROWS)


def test_a_failing_batched_reward_names_itself():
    def broken(prompts, completions, rows):
        raise RuntimeError("out of memory")

    broken.batched = True
    with pytest.raises(RewardError, match=r"reward 'rm' on a batch of 3 completions raised RuntimeError: out of memory"):
        score([WeightedReward("rm", broken, 1.0)], ["p"] * 3, COMPLETIONS, ROWS)


def test_extract_answer_prefers_boxed_then_hashes():
    assert answers.extract_answer(r"so \boxed{1} then \boxed{42}") == "42"
    assert answers.extract_answer("work #### 7") == "7"
    assert answers.extract_answer("  9 ") == "9"


# -- math-verify -------------------------------------------------------------------------------------

def _math_verify():
    pytest.importorskip("math_verify", reason="math-verify is the gspo[tasks] extra: pip install 'gspo[tasks]'")
    return answers.ANSWER_REWARDS["math_verify"][0]


@pytest.mark.parametrize("reference, completion", [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    ("0.5", r"The answer is \boxed{\frac{1}{2}}."),
    (r"$\frac{1}{2}$", "1/2"),
    ("42", "so it is 42"),
    (r"x^2+1", r"$1+x^2$"),
])
def test_math_verify_accepts_equivalent_forms(reference, completion):
    assert _math_verify()("q", completion, answer=reference) == 1.0


@pytest.mark.parametrize("reference, completion", [
    (r"\boxed{\frac{1}{2}}", "0.6"),
    ("0.5", r"\boxed{\frac{1}{3}}"),
    ("42", "43"),
])
def test_math_verify_rejects_wrong_answers(reference, completion):
    assert _math_verify()("q", completion, answer=reference) == 0.0


def test_math_verify_without_an_answer_cannot_score():
    assert _math_verify()("q", "no idea", answer="3") is None


def test_math_verify_is_a_dataset_reward_by_name():
    fn = _math_verify()
    resolved = resolve_rewards(["math_verify@2"], dict(answers.ANSWER_REWARDS))
    assert resolved == [WeightedReward("math_verify", fn, 2.0)]


def test_math_verify_without_the_extra_names_the_install(monkeypatch):
    without = {k: v for k, v in answers.ANSWER_REWARDS.items() if k != "math_verify"}
    monkeypatch.setattr(answers, "ANSWER_REWARDS", without)
    with pytest.raises(ConfigError, match=r"reward 'math_verify' needs math-verify: pip install 'gspo\[tasks\]'"):
        resolve_rewards(["math_verify"], without)


def test_a_reward_model_spec_must_be_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"reward model 'rm:.*': not a Hugging Face model directory"):
        resolve_rewards([f"rm:{tmp_path}@0.5"], {})


def test_a_reward_model_scores_in_forwards_within_its_token_budget(tmp_path):
    # a no-grad pass too: a step's completions go through the reward model in budgeted forwards, not one
    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from gspo.models.tiny import build_char_tokenizer
    from gspo.tasks.reward_model import RewardModel, token_groups

    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    prompts = [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (250, 31), (7, 7), (9, 11), (123, 456)]]
    completions = ["3", "17 is the sum", "281", "14, since 7 and 7 make fourteen", "20", "579"]
    rows = [{}] * len(prompts)
    one = RewardModel(tmp_path, batch_tokens=10_000)
    split = RewardModel(tmp_path, batch_tokens=60)
    shapes = []
    split.model.register_forward_hook(lambda m, a, kw, out: shapes.append(tuple(kw["input_ids"].shape)),
                                      with_kwargs=True)
    expected, got = one(prompts, completions, rows), split(prompts, completions, rows)
    assert len(shapes) > 2 and all(b * length <= 60 or b == 1 for b, length in shapes)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)
    assert token_groups([5, 9, 2, 9, 4], 18) == [[1, 3], [0, 4, 2]]
    assert token_groups([30, 1], 10) == [[0], [1]]  # a row over the budget runs alone


def test_reasoning_gym_answer_extraction():
    from gspo.tasks.reasoning_gym import extract_tagged_answer, parse_spec

    assert extract_tagged_answer("think <answer> 12 </answer> <answer>-4</answer>") == "-4"
    assert extract_tagged_answer(r"\boxed{7}") == "7"
    assert extract_tagged_answer(" 5 ") == "5"
    assert parse_spec("chain_sum?max_terms=3&max_digits=1") == ("chain_sum", {"max_terms": 3, "max_digits": 1})
    with pytest.raises(ConfigError, match="option 'max_terms' is not key=value"):
        parse_spec("chain_sum?max_terms")
