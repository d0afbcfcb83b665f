"""Episodes with a scripted engine: token fidelity of the assembled sequence, masks, seeds, per-turn
advantages, and the objectives on multi-turn batches invariant to how the batch is split."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.agents.calculator import build_calc_tokenizer, calculator_environment
from gspo.agents.collect import score_episodes, turn_advantages
from gspo.agents.env import Environment, EpisodeState, Reply
from gspo.agents.episode import Episode, EpisodeRunner, assemble, turn_seed
from gspo.agents.format import MessageFormat
from gspo.algorithms import get_objective, group_advantages
from gspo.rollout.base import EngineInfo, Rollout, SamplingParams
from gspo.tasks.arithmetic import exact_answer_reward
from gspo.tasks.rewards import WeightedReward

TOK = build_calc_tokenizer()
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id
RESPONSE = TOK.convert_tokens_to_ids("<tool_response>")


def enc(text: str) -> list[int]:
    return list(TOK(text, add_special_tokens=False)["input_ids"])


class ScriptedEngine:
    """Answers each prompt with its scripted turns, in order; records every call."""

    info = EngineInfo("scripted")

    def __init__(self, scripts: dict[tuple, list[list[int]]]) -> None:
        self.scripts, self.calls = scripts, []

    def generate(self, prompts, params, generator=None, *, row_seeds=None, record_routing=False) -> Rollout:
        self.calls.append((prompts, params, row_seeds))
        rows = []
        for context in prompts:
            key = next(k for k in self.scripts if tuple(context[: len(k)]) == k)
            turn = context[len(key):].count(RESPONSE)  # one environment message per finished turn
            ids = self.scripts[key][turn][: params.max_new_tokens]
            rows.append(ids)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        logprobs = torch.zeros((len(rows), width))
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
            logprobs[i, : len(r)] = -0.01 * torch.arange(1, len(r) + 1) - 0.001 * len(prompts[i])
        truncated = torch.tensor([r[-1] != EOS for r in rows])
        p = max(len(c) for c in prompts)
        return Rollout(torch.zeros((len(rows), p), dtype=torch.long), torch.ones((len(rows), p), dtype=torch.bool),
                       ids, mask, logprobs, truncated, timings={"sample/decode_s": 0.0})

    def sync_weights(self, model) -> None: ...

    def close(self) -> None: ...


CALL = '<tool_call>{"name":"calc","arguments":{"expr":"12*3"}}</tool_call>'
SCRIPTS = {
    tuple(enc("12*3=")): [enc(CALL) + [EOS], enc("36") + [EOS]],  # a call that ends with EOS, then the answer
    tuple(enc("11*2=")): [enc('<tool_call>{"name":"calc","arguments":{"expr":"11*2"}}</tool_call>junk') + [EOS],
                          enc("22") + [EOS]],  # goes on after the marker: cut there
    tuple(enc("13*4=")): [enc("<tool_call>{bad json</tool_call>") + [EOS], enc("52") + [EOS]],
    tuple(enc("14*5=")): [enc("70") + [EOS]],  # answers at once
}
ROWS = [{"prompt": "12*3=", "answer": "36"}, {"prompt": "11*2=", "answer": "22"},
        {"prompt": "13*4=", "answer": "52"}, {"prompt": "14*5=", "answer": "70"}]


def runner(engine, **kw) -> EpisodeRunner:
    return EpisodeRunner(engine, calculator_environment(), MessageFormat(TOK),
                         lambda ids: TOK.decode(ids, skip_special_tokens=True), PAD, kw.pop("context", 96), **kw)


def run_scripted(**kw):
    engine = ScriptedEngine(SCRIPTS)
    prompts = [enc(r["prompt"]) for r in ROWS]
    episodes, _ = runner(engine, **kw).run(prompts, ROWS, SamplingParams(max_new_tokens=48), [11, 12, 13, 14])
    return engine, episodes


def test_assembled_ids_are_sampled_ids_plus_tokenized_env_messages():
    _, episodes = run_scripted()
    fmt = MessageFormat(TOK)
    e0, e1, e2, e3 = episodes
    turn1 = SCRIPTS[tuple(enc("12*3="))][0]
    assert e0.ids == turn1 + fmt.message_ids("36", ended_with_eos=True) + enc("36") + [EOS]
    assert e0.ids == turn1 + enc("<tool_response>36</tool_response>") + enc("36") + [EOS]
    assert e0.model == [True] * len(turn1) + [False] * 4 + [True] * 3
    # cut right after </tool_call>: the tokens after it are not part of the episode
    call = enc('<tool_call>{"name":"calc","arguments":{"expr":"11*2"}}</tool_call>')
    assert e1.ids == call + enc("<tool_response>22</tool_response>") + enc("22") + [EOS]
    assert e2.state.errors == {"malformed": 1}
    assert TOK.decode(e2.ids).count("error: malformed tool") == 1 and e2.done and not e2.truncated
    assert e3.ids == enc("70") + [EOS] and e3.num_turns == 1
    assert [e.num_turns for e in episodes] == [2, 2, 2, 1] and not any(e.truncated for e in episodes)


def test_rollout_layout_masks_and_logprobs():
    _, episodes = run_scripted()
    rollout = assemble(episodes, PAD)
    for i, e in enumerate(episodes):
        t = len(e.ids)
        assert rollout.completion_ids[i, :t].tolist() == e.ids
        assert rollout.completion_mask[i, :t].tolist() == e.model and not rollout.completion_mask[i, t:].any()
        assert rollout.completion_attention[i, :t].all() and not rollout.completion_attention[i, t:].any()
        env = ~rollout.completion_mask[i] & rollout.completion_attention[i]
        assert (rollout.logprobs[i][env] == 0).all() and (rollout.logprobs[i][rollout.completion_mask[i]] < 0).all()
        p = len(e.prompt)
        assert rollout.prompt_ids[i, -p:].tolist() == e.prompt and rollout.prompt_mask[i].sum() == p
    assert rollout.attention_mask.sum(1).tolist() == [len(e.prompt) + len(e.ids) for e in episodes]
    assert rollout.lengths.tolist() == [sum(e.model) for e in episodes]  # |y| = the model's tokens only


def test_sampler_logprobs_kept_exactly_on_model_tokens():
    engine, episodes = run_scripted()
    e1 = episodes[1]  # turn 1 was cut: the kept log-probabilities are the sampler's first ones
    kept = [lp for lp, m in zip(e1.logprobs, e1.model) if m]
    call = len(enc('<tool_call>{"name":"calc","arguments":{"expr":"11*2"}}</tool_call>'))
    expected = (-0.01 * torch.arange(1, call + 1) - 0.001 * 5).tolist()
    assert kept[:call] == pytest.approx(expected, abs=1e-6)


def test_each_turn_is_one_generate_call_on_prompt_plus_history_with_per_turn_seeds():
    engine, episodes = run_scripted()
    assert len(engine.calls) == 2
    (first, _, seeds1), (second, _, seeds2) = engine.calls
    assert seeds1 == [turn_seed(s, 0) for s in (11, 12, 13, 14)]
    assert seeds2 == [turn_seed(s, 1) for s in (11, 12, 13)]  # the episode that ended is not continued
    e0 = episodes[0]
    history = e0.ids[: len(SCRIPTS[tuple(enc("12*3="))][0]) + 4]
    assert second[0] == e0.prompt + history


def test_max_turns_and_context_budget_end_episodes():
    _, episodes = run_scripted(max_turns=1)
    assert all(e.num_turns == 1 and e.done for e in episodes)
    assert episodes[0].ids == SCRIPTS[tuple(enc("12*3="))][0]  # the unanswered call is not followed by env tokens
    _, episodes = run_scripted(context=30)  # 5 prompt tokens + a 46-token call do not fit
    assert all(len(e.prompt) + len(e.ids) <= 30 for e in episodes)
    assert episodes[0].truncated and episodes[0].num_turns == 1


class Feedback(Environment):
    """A guessing game: per-turn reward -0.1 for a wrong guess, done on the right one."""

    max_turns = 3

    def step(self, state, text):
        right = text == state.row["answer"]
        return Reply(message=None if right else "no", done=right, reward=0.0 if right else -0.1)


def test_per_turn_rewards_and_turn_advantages():
    script = {tuple(enc("1*1=")): [enc("2") + [EOS], enc("1") + [EOS]], tuple(enc("2*1=")): [enc("2") + [EOS]]}
    rows = [{"prompt": "1*1=", "answer": "1"}, {"prompt": "2*1=", "answer": "2"}]  # one group of two episodes
    run = EpisodeRunner(ScriptedEngine(script), Feedback(), MessageFormat(TOK),
                        lambda ids: TOK.decode(ids, skip_special_tokens=True), PAD, 64)
    episodes, _ = run.run([enc(r["prompt"]) for r in rows], rows, SamplingParams(max_new_tokens=8), [1, 2])
    rewards, correct, metrics = score_episodes(run, episodes, rows, [WeightedReward("exact", exact_answer_reward, 1.0)],
                                               "zero")
    assert rewards.tolist() == pytest.approx([0.9, 1.0]) and correct.tolist() == [True, True]
    assert metrics["agent/turns_mean"] == 1.5
    episode_adv = group_advantages(rewards, 2)
    width = max(len(e.ids) for e in episodes)
    adv = turn_advantages(rewards, episodes, 2, "group", width=width)  # (B, T)
    first = 2  # "2" + EOS, then the 4-token "no" message, then "1" + EOS
    assert adv[0, :first].tolist() == pytest.approx([episode_adv[0].item()] * first, abs=1e-5)
    # the retry is the only second turn of its group: no baseline, no signal
    assert adv[0, first + 4 : first + 6].tolist() == [0.0, 0.0]
    assert adv[1, :2].tolist() == pytest.approx([episode_adv[1].item()] * 2, abs=1e-5) and (adv[1, 2:] == 0).all()


def test_batch_scaled_turn_advantages_use_the_given_batch_std():
    # under torchrun each process holds some groups: the advantages divide by the whole batch's std
    script = {tuple(enc("1*1=")): [enc("2") + [EOS], enc("1") + [EOS]], tuple(enc("2*1=")): [enc("2") + [EOS]]}
    rows = [{"prompt": "1*1=", "answer": "1"}, {"prompt": "2*1=", "answer": "2"}]
    run = EpisodeRunner(ScriptedEngine(script), Feedback(), MessageFormat(TOK),
                        lambda ids: TOK.decode(ids, skip_special_tokens=True), PAD, 64)
    episodes, _ = run.run([enc(r["prompt"]) for r in rows], rows, SamplingParams(max_new_tokens=8), [1, 2])
    rewards, _, _ = score_episodes(run, episodes, rows, [WeightedReward("exact", exact_answer_reward, 1.0)], "zero")
    width = max(len(e.ids) for e in episodes)
    whole_std = torch.tensor(0.5)  # the std of a larger batch than these two episodes
    adv = turn_advantages(rewards, episodes, 2, "batch", width=width, batch_std=whole_std)
    assert adv[0, :2].tolist() == pytest.approx([-0.05 / (0.5 + 1e-6)] * 2, abs=1e-6)
    local = turn_advantages(rewards, episodes, 2, "batch", width=width)  # this shard's own std
    assert not torch.allclose(local, adv)


def test_turn_advantages_without_turn_rewards_compare_episodes_that_reached_the_turn():
    _, episodes = run_scripted()  # turns [2, 2, 2, 1], groups of two: (e0, e1), (e2, e3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(rewards, 2)
    width = max(len(e.ids) for e in episodes)
    out = turn_advantages(rewards, episodes, 2, "group", width=width)
    for i in (0, 1, 3):  # every turn of these is compared with a partner that reached it: A_i throughout
        e = episodes[i]
        assert out[i, : len(e.ids)].tolist() == pytest.approx([adv[i].item()] * len(e.ids), abs=1e-6)
        assert (out[i, len(e.ids):] == 0).all()
    second = torch.tensor(episodes[2].turn) == 1  # e2's second turn: its partner e3 stopped after one
    assert (out[2, : len(episodes[2].ids)][~second] - adv[2]).abs().max() < 1e-6
    assert (out[2, : len(episodes[2].ids)][second] == 0).all()


def synthetic(turn_rewards: list[float], tokens_per_turn: int = 2) -> Episode:
    """An episode of len(turn_rewards) model turns, each followed by a 1-token environment message."""
    turns = [k for k in range(len(turn_rewards)) for _ in range(tokens_per_turn + 1)][:-1]
    return Episode(EpisodeState({}), [1], ids=[5] * len(turns), model=[True] * len(turns), turn=turns,
                   turn_rewards=list(turn_rewards))


def per_token(adv: torch.Tensor, episodes: list[Episode], turn: int) -> list[float]:
    """The advantage of each episode's turn-``turn`` tokens (all equal; None where it has no such turn)."""
    out = []
    for i, e in enumerate(episodes):
        cols = [t for t, k in enumerate(e.turn) if k == turn]
        values = adv[i, cols].tolist()
        assert len(set(values)) <= 1
        out.append(values[0] if values else None)
    return out


def test_turn_advantages_identical_episodes_carry_no_signal():
    # review D2: four identical episodes (tool call +0.1, then a correct answer +1.0): every token gets 0
    episodes = [synthetic([0.1, 0.0]) for _ in range(4)]
    rewards = torch.tensor([1.1, 1.1, 1.1, 1.1])
    adv = turn_advantages(rewards, episodes, 4, "group", width=6)
    assert (adv == 0).all()


def test_turn_advantages_one_episode_skips_the_tool():
    # review D2: the 4th answers at once (R = 1.0); the others' final answers (return-to-go 1.0) get 0, not -1.5
    episodes = [synthetic([0.1, 0.0]) for _ in range(3)] + [synthetic([0.0])]
    rewards = torch.tensor([1.1, 1.1, 1.1, 1.0])
    adv = turn_advantages(rewards, episodes, 4, "group", width=6)
    std = 0.05  # sample std of [1.1, 1.1, 1.1, 1.0]
    assert per_token(adv, episodes, 0) == pytest.approx([0.025 / (std + 1e-6)] * 3 + [-0.075 / (std + 1e-6)],
                                                        abs=1e-4)  # [0.5, 0.5, 0.5, -1.5]
    assert per_token(adv, episodes, 1) == [0.0, 0.0, 0.0, None]


@pytest.mark.parametrize("scale, spread", [("group", None), ("batch", 2.0), ("none", 1.0)])
def test_turn_advantages_ragged_turns_closed_form(scale, spread):
    # turns [3, 2, 2, 1]; returns-to-go G_k = R - rewards earned before turn k
    episodes = [synthetic([0.1, 0.2, 0.0]), synthetic([0.1, 0.0]), synthetic([0.0, 0.5]), synthetic([0.3])]
    rewards = torch.tensor([1.3, 0.1, 1.5, 0.3])  # task reward 1, 0, 1, 0 plus the per-turn rewards
    # turn 0: G = [1.3, 0.1, 1.5, 0.3], mean 0.8; turn 1: G = [1.2, 0.0, 1.5] (3 episodes), mean 0.9;
    # turn 2: only the first episode reached it: 0
    s0, s1 = (math.sqrt(1.48 / 3), math.sqrt(0.63)) if scale == "group" else (spread, spread)
    eps = 0.0 if scale == "none" else 1e-6
    adv = turn_advantages(rewards, episodes, 4, scale, width=8,
                          batch_std=torch.tensor(spread) if scale == "batch" else None)
    assert per_token(adv, episodes, 0) == pytest.approx([c / (s0 + eps) for c in (0.5, -0.7, 0.7, -0.5)], abs=1e-5)
    assert per_token(adv, episodes, 1) == pytest.approx([c / (s1 + eps) for c in (0.3, -0.9, 0.6)] + [None], abs=1e-5)
    assert per_token(adv, episodes, 2) == [0.0, None, None, None]
    assert (adv[3, 2:] == 0).all()  # padding


@pytest.mark.parametrize("algorithm", ["gspo", "gspo_token", "grpo", "dapo", "cispo"])
def test_objectives_on_multiturn_batches_are_split_invariant(algorithm):
    _, episodes = run_scripted()
    rollout = assemble(episodes, PAD)
    mask = rollout.completion_mask  # (B, T) model tokens only
    gen = torch.Generator().manual_seed(0)
    old = rollout.logprobs
    new = (old + 0.05 * torch.randn(old.shape, generator=gen)).requires_grad_()
    # environment tokens: garbage there must not matter
    new_env = torch.where(rollout.completion_attention & ~mask, torch.full_like(old, 50.0), torch.zeros_like(old))
    logprobs = new + new_env
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    objective = get_objective(algorithm)
    norm_key = objective.normaliser
    total = mask.sum().double() if norm_key == "num_tokens" else (mask.sum(1) > 0).sum().double()
    whole = objective.loss(logprobs, old, advantages, mask, **{norm_key: total}).loss
    parts = sum(objective.loss(logprobs[idx], old[idx], advantages[idx], mask[idx], **{norm_key: total}).loss
                for idx in (torch.tensor([0, 2]), torch.tensor([1, 3])))
    assert torch.allclose(whole, parts, atol=1e-6)
    (grad,) = torch.autograd.grad(whole, new)
    assert (grad[~mask] == 0).all() and grad[mask].abs().sum() > 0  # loss flows through model tokens only


class Chars:
    """A stand-in tokenizer: one id per character (ord), no special tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def get_vocab(self):
        return {"<|im_start|>": 1}


def test_qwen3_message_format_follows_the_chat_template_shape():
    fmt = MessageFormat.for_tokenizer(Chars())
    text = "".join(map(chr, fmt.message_ids("9716", ended_with_eos=False)))
    assert text == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n9716\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert "".join(map(chr, fmt.message_ids("x", ended_with_eos=True))).startswith("\n<|im_start|>user")
    ids = [ord(c) for c in 'a</tool_call>junk']
    assert fmt.turn_end(ids) == len("a</tool_call>") and fmt.turn_end([1, 2]) is None
