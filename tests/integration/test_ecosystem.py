"""The ecosystem integrations on tiny local models: reasoning-gym and math-verify rewards, datasets with
chat templates, reward models, LoRA adapters, checkpoint exports that transformers loads, and trackers.

Every test runs offline: a fixture makes any network connection fail. Optional extras are skipped with
the install command when missing (CI installs them with .[all]).
"""

from __future__ import annotations

import json
import socket
import string
import sys
import types
from pathlib import Path

import pytest
import torch

from gspo.cli import main
from gspo.config import load_config
from gspo.errors import ConfigError
from gspo.logprobs import token_logprobs
from gspo.trainer.reference import reference_policy
from gspo.trainer.trainer import Trainer

WIDE_ALPHABET = string.ascii_letters + string.digits + string.punctuation + " "
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}[assistant]{% endif %}")
RG_TASK = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&max_digits=1"


def needs(module: str, extra: str):
    return pytest.importorskip(module, reason=f"{module} is the gspo[{extra}] extra: pip install 'gspo[{extra}]'")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing may be fetched: any outgoing connection fails the test."""
    def refuse(self, address, *args, **kwargs):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3 whose character tokenizer covers printable ASCII, 128 positions, a chat template."""
    from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3

    path = tmp_path_factory.mktemp("wide-model")
    tokenizer = build_char_tokenizer(WIDE_ALPHABET)
    tokenizer.model_max_length = 128
    tokenizer.chat_template = CHAT_TEMPLATE
    model = build_tiny_qwen3(tokenizer, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position_embeddings=128, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def reward_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3ForSequenceClassification with one label (a reward model) and its tokenizer."""
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    from gspo.models.tiny import build_char_tokenizer

    path = tmp_path_factory.mktemp("reward-model")
    tokenizer = build_char_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen3ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trainer(overrides, *extra) -> Trainer:
    return Trainer.from_config(load_config(None, [*overrides, *extra]), run_dir=None)


def without(overrides, *prefixes):
    return [o for o in overrides if not o.startswith(prefixes)]


def sample_batch(t: Trainer):
    """A rollout batch's (input_ids, attention_mask, completion length) for log-probability checks."""
    batch = t.collector.collect(t.data.take(2), seed=123)
    r = batch.rollout
    return r.input_ids, r.attention_mask, r.completion_ids.shape[1]


def logits_equal(a, b, input_ids) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids).logits, b(input_ids).logits, rtol=0, atol=1e-5)


# -- reasoning-gym ------------------------------------------------------------------------------------

def test_reasoning_gym_task_is_local_seeded_held_out_and_verified():
    needs("reasoning_gym", "tasks")
    from gspo.tasks.reasoning_gym import reasoning_gym_task

    task = reasoning_gym_task(RG_TASK.split(":", 1)[1], seed=3, eval_size=16)
    again = reasoning_gym_task(RG_TASK.split(":", 1)[1], seed=3, eval_size=16)
    stream, repeat = task.train_stream(), again.train_stream()
    train = [next(stream) for _ in range(300)]
    assert [r["prompt"] for r in train[:50]] == [next(repeat)["prompt"] for _ in range(50)]  # seeded
    assert len({r["prompt"] for r in train[:50]}) > 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in task.eval_rows}  # disjoint splits
    assert len(task.eval_rows) == 16 and task.eval_rows[0]["prompt"].startswith("State the final answer")
    verifier, weight = task.rewards["verifier"]
    row = task.eval_rows[0]
    columns = {k: v for k, v in row.items() if k != "prompt"}
    wrong = str(int(row["answer"]) + 1)
    assert weight == 1.0
    assert verifier(row["prompt"], f"<answer>{row['answer']}</answer>", **columns) == 1.0
    assert verifier(row["prompt"], f" {row['answer']}", **columns) == 1.0  # no tags: the whole completion
    assert verifier(row["prompt"], f"<answer>{wrong}</answer>", **columns) == 0.0
    assert verifier(row["prompt"], "", **columns) == 0.0


def test_reasoning_gym_trains_two_steps_scored_by_its_verifier(wide_model_dir, tiny_overrides, reward_module):
    needs("reasoning_gym", "tasks")
    overrides = without(tiny_overrides, "model=", "reward.")
    t = trainer(overrides, f"model={wide_model_dir}", f"data.task={RG_TASK}", "data.chat_template=never",
                f"reward.functions=verifier,{reward_module}:ones@0.1")  # ones: a signal for a random model
    assert t.task.name == RG_TASK and [r.name for r in t.rewards] == ["verifier", f"{reward_module}:ones"]
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    batch = t.collector.collect(t.data.take(2), seed=0)
    verifier = t.rewards[0].fn
    expected = [verifier(str(r["prompt"]), c, **{k: v for k, v in r.items() if k != "prompt"})
                for r, c in zip(batch.rows, batch.completions)]
    assert batch.correct.tolist() == [v >= 0.5 for v in expected]  # accuracy is the verifier's
    for _ in range(2):
        metrics = t.train_step()
    assert t.state.step == 2 and "reward/verifier" in metrics and 0.0 <= metrics["reward/verifier"] <= 1.0
    assert any(not torch.equal(p, before[n]) for n, p in t.model.named_parameters())


def test_gspo_eval_on_a_reasoning_gym_task(tmp_path, wide_model_dir):
    needs("reasoning_gym", "tasks")
    out = tmp_path / "report.json"
    code = main(["eval", str(wide_model_dir), f"data.task={RG_TASK}", "data.chat_template=never", "eval.size=4",
                 "samples=2", "k=1,2", "max_new_tokens=4", f"out={out}"])
    report = json.loads(out.read_text())
    assert code == 0 and report["task"] == RG_TASK and report["prompts"] == 4
    assert 0 <= report["sampled/pass@1"] <= report["sampled/pass@2"] <= 1 and "sampled/reward" in report


def test_unknown_reasoning_gym_task_suggests_the_name(tiny_overrides):
    needs("reasoning_gym", "tasks")
    with pytest.raises(ConfigError, match="no task 'chain_summ'. Did you mean chain_sum"):
        trainer(tiny_overrides, "data.task=reasoning_gym:chain_summ")


# -- datasets: local files, chat templates, math-verify ---------------------------------------------------

def test_chat_dataset_with_a_system_prompt_and_math_verify(tmp_path, wide_model_dir, tiny_overrides):
    needs("math_verify", "tasks")
    rows = [{"messages": [{"role": "user", "content": f"What is {i}/2?"}], "solution": f"\\frac{{{i}}}{{2}}"}
            for i in range(1, 11)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = without(tiny_overrides, "model=", "reward.")
    t = trainer(overrides, f"model={wide_model_dir}", f"data.path={data}", "data.prompt_column=messages",
                "data.answer_column=solution", "data.system_prompt=Be brief", "reward.functions=math_verify")
    row = t.task.eval_rows[0]
    expected = [{"role": "system", "content": "Be brief"}, *row["prompt"]]
    ids = t.parts.tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert t.render(row) == list(ids)
    assert t.parts.tokenizer.decode(t.render(row)) == f"[system]Be brief[user]{row['prompt'][0]['content']}[assistant]"
    math_verify = t.rewards[0].fn
    assert math_verify("q", "0.5", answer=r"\frac{1}{2}") == 1.0 and math_verify("q", "0.4", answer="1/2") == 0.0
    metrics = t.train_step()
    assert "reward/math_verify" in metrics and metrics["optim/skipped"] == 0.0


def test_gspo_eval_on_a_saved_hf_dataset(tmp_path, tiny_model_dir, monkeypatch):
    datasets = needs("datasets", "datasets")
    rows = [{"question": f"{i}+{i}=", "target": str(2 * i)} for i in range(10)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "recording_reward.py").write_text(
        "import json\n"
        "def rec(prompt, completion, answer, **row):\n"
        "    with open('scored.jsonl', 'a') as f:\n"
        "        f.write(json.dumps([prompt, completion, answer]) + '\\n')\n"
        "    return float(completion.strip() == answer)\n")
    monkeypatch.chdir(tmp_path)  # the reward module is found in the working directory
    out = tmp_path / "report.json"
    code = main(["eval", str(tiny_model_dir), f"data.path={tmp_path / 'saved'}", "data.prompt_column=question",
                 "data.answer_column=target", "reward.functions=recording_reward:rec", "samples=2", "k=1,2",
                 f"out={out}"])
    report = json.loads(out.read_text())
    assert code == 0 and report["task"] == f"dataset:{tmp_path / 'saved'}" and report["prompts"] == 2
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    sampled, greedy = scored[:4], scored[4:]  # 2 held-out prompts x 2 samples, then 2 greedy
    from gspo.config.schema import Config
    from gspo.tasks.registry import held_out_split

    held, _ = held_out_split(rows, 2, Config().seed)  # a seeded sample of the rows, as plain text
    assert [p for p, _, _ in sampled] == [r["question"] for r in held for _ in range(2)]
    assert [a for _, _, a in sampled] == [r["target"] for r in held for _ in range(2)]
    assert report["sampled/accuracy"] == sum(c.strip() == a for _, c, a in sampled) / 4
    assert report["greedy/accuracy"] == sum(c.strip() == a for _, c, a in greedy) / 2
    per_prompt = [sum(c.strip() == a for _, c, a in sampled[i:i + 2]) for i in (0, 2)]
    assert report["sampled/pass@2"] == sum(1.0 if n else 0.0 for n in per_prompt) / 2


# -- reward models --------------------------------------------------------------------------------------

def test_reward_model_scores_a_step_in_one_forward_and_combines_by_weight(tiny_overrides, reward_module,
                                                                          reward_model_dir):
    overrides = without(tiny_overrides, "reward.")
    t = trainer(overrides, f"reward.functions={reward_module}:ones@1.0,rm:{reward_model_dir}@0.5")
    rm = t.rewards[1].fn
    forwards = []
    rm.model.register_forward_hook(lambda module, args, kwargs, out: forwards.append(kwargs["input_ids"].shape[0]),
                                   with_kwargs=True)
    batch = t.collector.collect(t.data.take(4), seed=0)
    assert forwards == [16]  # one forward over all P x G = 4 x 4 completions
    prompts = [str(r["prompt"]) for r in batch.rows]
    alone = [rm([p], [c], [r])[0] for p, c, r in zip(prompts, batch.completions, batch.rows)]  # one at a time
    batched = rm(prompts, batch.completions, batch.rows)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(alone), rtol=0, atol=1e-5)  # padding-invariant
    assert len(set(round(v, 6) for v in batched)) > 1  # it does depend on the text
    ones = t.rewards[0].fn
    expected = [ones(p, c) + 0.5 * s for p, c, s in zip(prompts, batch.completions, batched)]
    torch.testing.assert_close(batch.rewards, torch.tensor(expected), rtol=0, atol=1e-5)
    forwards.clear()
    metrics = t.train_step()
    assert forwards == [16] and f"reward/rm:{reward_model_dir}" in metrics


def test_a_reward_model_must_have_one_label(tmp_path, tiny_overrides, reward_model_dir):
    from transformers import AutoModelForSequenceClassification

    from gspo.errors import ModelLoadError

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir, num_labels=3,
                                                               ignore_mismatched_sizes=True)
    model.save_pretrained(tmp_path / "three")
    with pytest.raises(ModelLoadError, match="has 3 labels; a reward model has one"):
        trainer(without(tiny_overrides, "reward."), f"reward.functions=rm:{tmp_path / 'three'}")


# -- LoRA -----------------------------------------------------------------------------------------------

def lora_overrides(tiny_overrides, *extra):
    needs("peft", "lora")
    return [*tiny_overrides, "lora.rank=4", "lora.alpha=8", *extra]


def test_lora_changes_only_adapter_weights(tiny_overrides):
    t = trainer(lora_overrides(tiny_overrides))
    named = dict(t.model.named_parameters())
    adapters = {n for n in named if "lora_" in n}
    assert adapters and {n for n, p in named.items() if p.requires_grad} == adapters
    optimised = {id(p) for group in t.parts.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(named[n]) for n in adapters}
    assert t.parts.engine.shares_model and t.parts.engine._keeps_last_logits  # samples through the PEFT wrapper
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(2):
        metrics = t.train_step()
        assert metrics["mismatch/token_abs_mean"] < 1e-5  # sampler and chunked log-probs agree under PEFT
    changed = {n for n, p in t.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in adapters if "lora_B" in n} | {n for n in adapters if "lora_A" in n}


def test_lora_kl_reference_is_the_base_model_without_a_copy(tiny_overrides, tiny_model_dir):
    from gspo.models.load import load_model

    t = trainer(lora_overrides(tiny_overrides, "loss.beta=0.1"))
    assert t.parts.reference is t.model  # no second copy: the adapter is switched off instead
    for _ in range(2):
        t.train_step()
    ids, attn, num = sample_batch(t)
    base = load_model(tiny_model_dir)
    with torch.no_grad():
        expected = token_logprobs(base, ids, attn, num)
        with reference_policy(t.parts) as reference:
            ref = token_logprobs(reference, ids, attn, num)
        policy = token_logprobs(t.model, ids, attn, num)  # the adapter is back on after the block
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-6)
    assert (policy - expected).abs().max() > 1e-4
    assert t.last_updates[-1]["kl/ref"] > 0


def test_lora_checkpoints_resume_exactly_and_export_merged(tmp_path, tiny_overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo.export import export_model
    from gspo.models.load import load_adapter_model
    from gspo.trainer.run import train

    overrides = lora_overrides(without(tiny_overrides, "checkpoint."), "checkpoint.every=1", "eval.greedy=false")
    train(load_config(None, [*overrides, "steps=3"]), tmp_path / "straight")
    train(load_config(None, overrides), tmp_path / "resumed")  # 2 steps, then 1 more after a resume
    train(load_config(None, [*overrides, "steps=3"]), tmp_path / "resumed", resume=True)
    straight, resumed = (tmp_path / name / "checkpoints" / "step-00000003" for name in ("straight", "resumed"))
    from safetensors.torch import load_file

    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (resumed / "model.safetensors").exists()  # the adapter only: the base is not copied per step

    adapter = load_adapter_model(resumed, merge=False)
    direct = AutoModelForCausalLM.from_pretrained(resumed)  # transformers + PEFT read the adapter directory
    out = export_model(tmp_path / "resumed", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    assert not any("lora" in k for k in merged.state_dict())
    logits_equal(merged, adapter, ids)
    logits_equal(direct, adapter, ids)
    assert main(["export", str(resumed), str(tmp_path / "adapter"), "merge=false"]) == 0
    assert main(["eval", str(tmp_path / "resumed"), "eval.size=4", "samples=2", "k=1,2",
                 f"out={tmp_path / 'report.json'}"]) == 0  # evaluates the merged adapter
    assert json.loads((tmp_path / "report.json").read_text())["model"] == str(resumed)
    assert sorted(p.name for p in (tmp_path / "adapter").glob("adapter_*")) == ["adapter_config.json",
                                                                             "adapter_model.safetensors"]


def test_lora_on_moe_leaves_routers_alone(tiny_overrides, tiny_moe_dir):
    t = trainer(lora_overrides(without(tiny_overrides, "model="), f"model={tiny_moe_dir}", "moe.routing_replay=r3"))
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n in trainable) and not any(".gate." in n for n in trainable)
    assert t.train_step()["optim/skipped"] == 0.0


# -- exports: every checkpoint loads with transformers -------------------------------------------------------

@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "tiny_moe_dir"])
def test_trainer_checkpoints_load_with_transformers_and_export(request, tmp_path, tiny_overrides, model_fixture):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gspo.checkpoint import save_checkpoint

    t = trainer(without(tiny_overrides, "model="), f"model={request.getfixturevalue(model_fixture)}")
    t.train_step()
    ckpt = save_checkpoint(tmp_path / "run", 1, model=t.model, tokenizer=t.parts.tokenizer, trainer_state={})
    ids = torch.tensor([AutoTokenizer.from_pretrained(ckpt)("12+34=")["input_ids"]])
    t.model.eval()
    logits_equal(AutoModelForCausalLM.from_pretrained(ckpt), t.model, ids)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits_equal(exported, t.model, ids)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("12+34=")["input_ids"] == ids[0].tolist()
    if model_fixture == "tiny_moe_dir":  # checkpoints keep fused experts; the export writes the standard names
        assert any(k.endswith("experts.gate_up_proj") for k in load_file(ckpt / "model.safetensors"))
        assert any(".experts.0." in k for k in load_file(tmp_path / "out" / "model.safetensors"))


def test_export_refuses_a_non_empty_target(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["export", str(tiny_model_dir), str(tmp_path / "out")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_export_prints_no_transformers_progress_bars(tmp_path, tiny_model_dir, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a fresh process (a run earlier in this one may have turned them off)
    try:
        assert main(["export", str(tiny_model_dir), str(tmp_path / "out")]) == 0
    finally:
        hf_logging.disable_progress_bar()
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "out") and "%|" not in err and "Loading" not in err, err


# -- trackers -------------------------------------------------------------------------------------------

def test_tensorboard_sink_writes_event_files(tmp_path):
    needs("tensorboard", "trackers")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gspo.trainer.logging import MetricsLogger

    logger = MetricsLogger(tmp_path, tensorboard=False, trackers=["tensorboard"])
    logger.log(1, {"reward/mean": 0.25, "note": "text", "bad": float("nan")})
    logger.log(2, {"reward/mean": 0.5})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["reward/mean"]
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.events = []

    def init(self, **kwargs):
        self.events.append(("init", kwargs))
        fake = self

        class Run:
            def log(self, metrics, step):
                fake.events.append(("log", step, dict(metrics)))

            def finish(self):
                fake.events.append(("finish",))

        return Run()


class FakeMlflow(types.ModuleType):
    def __init__(self):
        super().__init__("mlflow")
        self.events = []

    def set_experiment(self, name):
        self.events.append(("experiment", name))

    def start_run(self, run_name):
        self.events.append(("start", run_name))

    def log_params(self, params):
        self.events.append(("params", dict(params)))

    def log_metrics(self, metrics, step):
        self.events.append(("log", step, dict(metrics)))

    def end_run(self):
        self.events.append(("end",))


def test_wandb_and_mlflow_sinks_log_a_run(tmp_path, monkeypatch, tiny_overrides):
    from gspo.trainer.run import train

    wandb, mlflow = FakeWandb(), FakeMlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    run = tmp_path / "my-run"
    overrides = [*without(tiny_overrides, "steps="), "steps=1", "log.trackers=wandb,mlflow", "log.project=ablation"]
    train(load_config(None, overrides), run)
    init = wandb.events[0]
    assert init[0] == "init" and init[1]["project"] == "ablation" and init[1]["name"] == "my-run"
    assert init[1]["config"]["log"]["trackers"] == ["wandb", "mlflow"]
    logged = [e for e in wandb.events if e[0] == "log"]
    # step 0: the held-out evaluation before training; step 1: the first training step; last: the final eval
    assert logged[0][1] == 0 and "eval/accuracy" in logged[0][2]
    assert logged[1][1] == 1 and "loss/clip_frac" in logged[1][2] and "eval/accuracy" in logged[-1][2]
    assert all(isinstance(v, float) for _, _, metrics in logged for v in metrics.values())
    assert wandb.events[-1] == ("finish",)
    assert mlflow.events[:2] == [("experiment", "ablation"), ("start", "my-run")]
    assert mlflow.events[2][0] == "params" and mlflow.events[2][1]["rollout.group_size"] == "4"
    assert [e[1:] for e in mlflow.events if e[0] == "log"] == [e[1:] for e in logged]
    assert mlflow.events[-1] == ("end",)


def test_a_tracker_that_is_not_installed_is_a_config_error(monkeypatch, tiny_overrides):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"log.trackers=wandb needs the wandb package: pip install 'gspo\[trackers-cloud\]'"):
        load_config(None, [*tiny_overrides, "log.trackers=wandb"])
    with pytest.raises(ConfigError, match="log.trackers='neptune' is not one of tensorboard, wandb, mlflow"):
        load_config(None, [*tiny_overrides, "log.trackers=neptune"])
