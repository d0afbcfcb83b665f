"""Checkpoints: exact resume, corruption detection and fallback, rotation, safe loading, kill-safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import gspo.checkpoint.load as checkpoint_load
from gspo.checkpoint import (
    CorruptCheckpointWarning,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from gspo.errors import CheckpointError, ConfigError

SRC_DIR = Path(checkpoint_load.__file__).resolve().parents[2]  # .../src, for subprocesses


def tiny_config(tie: bool = False, layers: int = 1) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    tie_word_embeddings=tie)


def tiny_model(seed: int = 0, **config_kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(**config_kwargs)).train()


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


def training_parts(model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)


def train_step(model, optimizer, scheduler) -> None:
    """One update whose data and loss scale draw from torch, Python and numpy generators."""
    ids = torch.randint(0, 32, (2, 8))  # (B, T)
    scale = 1.0 + random.random() + float(np.random.rand())
    loss = model(input_ids=ids, labels=ids).loss * scale
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def assert_same(a, b) -> None:
    """Bit-for-bit equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def save(run_dir: Path, step: int, model, **kwargs) -> Path:
    return save_checkpoint(run_dir, step, model=model, trainer_state={"step": step}, **kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def three_checkpoints(tmp_path, model):
    """Checkpoints at steps 10, 20, 30 of the same model."""
    return [save(tmp_path, step, model, keep_last=5) for step in (10, 20, 30)]


def test_resume_continues_bit_for_bit(tmp_path):
    model = tiny_model(seed=0)
    optimizer, scheduler = training_parts(model)
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"step": 2, "data_position": 7, "history": {"loss": [1.5, float("nan")]}})
    train_step(model, optimizer, scheduler)
    expected = (model.state_dict(), optimizer.state_dict(), scheduler.state_dict(), torch.rand(3), random.random())

    resumed = tiny_model(seed=123)
    resumed_optimizer, resumed_scheduler = training_parts(resumed)
    loaded = load_checkpoint(path, model=resumed, optimizer=resumed_optimizer, scheduler=resumed_scheduler)
    restore_rng_state(loaded["rng"])
    train_step(resumed, resumed_optimizer, resumed_scheduler)

    assert loaded["step"] == 2 and loaded["trainer_state"]["data_position"] == 7
    assert np.isnan(loaded["trainer_state"]["history"]["loss"][1])
    assert_same(expected, (resumed.state_dict(), resumed_optimizer.state_dict(), resumed_scheduler.state_dict(),
                           torch.rand(3), random.random()))


def test_rng_state_round_trip_restores_every_generator():
    state = capture_rng_state()
    before = (torch.rand(4), random.random(), np.random.rand(4))
    restore_rng_state(state)
    after = (torch.rand(4), random.random(), np.random.rand(4))
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def test_layout_and_from_pretrained(tmp_path, model):
    path = save(tmp_path, 10, model, tokenizer=tiny_tokenizer())
    assert path == tmp_path / "checkpoints" / "step-00000010"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "rng.pt", "trainer_state.json", "manifest.json"} <= names
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and set(manifest["files"]) == names - {"manifest.json"}
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-00000010\n"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert_same(model.state_dict(), reloaded.state_dict())
    assert transformers.AutoTokenizer.from_pretrained(path)("hello world")["input_ids"] == [1, 2]


def test_tied_weights_load_and_architecture_mismatch_is_refused(tmp_path):
    tied = tiny_model(seed=1, tie=True)
    path = save(tmp_path, 1, tied)
    fresh = tiny_model(seed=2, tie=True)
    load_checkpoint(path, model=fresh)
    assert_same(tied.state_dict(), fresh.state_dict())
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    with pytest.raises(CheckpointError, match=r"lacks weights the model has \(.*lm_head.weight"):
        load_checkpoint(path, model=tiny_model(tie=False))
    with pytest.raises(CheckpointError, match=r"lacks weights the model has \(model.layers.1"):
        load_checkpoint(path, model=tiny_model(tie=True, layers=2))


def test_plain_module_round_trip(tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    path = save(tmp_path, 3, module)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    load_checkpoint(path, model=other)
    assert_same(module.state_dict(), other.state_dict())


def test_wrapped_model_is_saved_and_loaded_without_prefix(tmp_path):
    torch.manual_seed(0)
    wrapped = torch.nn.DataParallel(torch.nn.Linear(4, 2))  # runs on CPU too; keys would start with "module."
    path = save(tmp_path, 1, wrapped)
    other = torch.nn.Linear(4, 2)
    load_checkpoint(path, model=other)
    assert_same(wrapped.module.state_dict(), other.state_dict())
    load_checkpoint(path, model=torch.nn.DataParallel(other))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


CORRUPTIONS = {
    "flipped_byte": (lambda ckpt: flip_byte(ckpt / "model.safetensors"), r"model\.safetensors has sha256"),
    "truncated": (lambda ckpt: truncate(ckpt / "optimizer.pt"), r"optimizer\.pt has \d+ bytes but the manifest"),
    "missing_file": (lambda ckpt: (ckpt / "rng.pt").unlink(), r"rng\.pt is listed in the manifest but missing"),
    "missing_manifest": (lambda ckpt: (ckpt / "manifest.json").unlink(), r"manifest\.json is missing"),
    "garbled_manifest": (lambda ckpt: (ckpt / "manifest.json").write_text("{"), r"manifest\.json is not valid JSON"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_detected_and_previous_checkpoint_used(tmp_path, model, kind):
    optimizer, _ = training_parts(model)
    good = save(tmp_path, 10, model, optimizer=optimizer)
    bad = save(tmp_path, 20, model, optimizer=optimizer)
    corrupt, message = CORRUPTIONS[kind]
    corrupt(bad)
    with pytest.warns(CorruptCheckpointWarning, match=message):
        assert find_latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(bad, model=model)


def test_leftover_temp_dir_is_ignored_then_cleaned(tmp_path, three_checkpoints, model):
    root = tmp_path / "checkpoints"
    partial = root / ".tmp-step-00000040-999-abcd"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert find_latest_checkpoint(tmp_path) == three_checkpoints[-1]
    save(tmp_path, 40, model)
    assert not partial.exists()
    assert find_latest_checkpoint(tmp_path) == root / "step-00000040"


def test_all_corrupt_or_empty_gives_none(tmp_path, model):
    assert find_latest_checkpoint(tmp_path) is None
    (save(tmp_path, 1, model) / "manifest.json").unlink()
    with pytest.warns(CorruptCheckpointWarning):
        assert find_latest_checkpoint(tmp_path) is None


def test_keep_last_rotation(tmp_path, model):
    for step in range(1, 6):
        save(tmp_path, step, model, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    assert (root / "latest").read_text() == "step-00000005\n"


def test_rotation_does_not_count_broken_checkpoints(tmp_path, model):
    save(tmp_path, 1, model, keep_last=2)
    (save(tmp_path, 2, model, keep_last=2) / "rng.pt").unlink()
    save(tmp_path, 3, model, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000003"]


def test_saving_a_step_again_replaces_it(tmp_path, model):
    flip_byte(save(tmp_path, 20, model) / "model.safetensors")
    path = save(tmp_path, 20, model)
    assert find_latest_checkpoint(tmp_path) == path


def test_bad_arguments_publish_nothing(tmp_path, model):
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={"loss": torch.tensor(1.0)})
    with pytest.raises(ConfigError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={}, keep_last=0)
    assert not (tmp_path / "checkpoints").exists()


class UnsafeLambda:
    """A callable lr_lambda whose state holds an arbitrary object: not weights_only-loadable."""

    def __init__(self):
        self.owner = ConfigError("any object")

    def __call__(self, step: int) -> float:
        return 1.0


def test_unloadable_scheduler_state_fails_at_save_not_at_resume(tmp_path, model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, UnsafeLambda())
    with pytest.raises(CheckpointError, match="scheduler state holds objects that cannot be loaded safely"):
        save(tmp_path, 1, model, scheduler=scheduler)
    assert list((tmp_path / "checkpoints").iterdir()) == []


class Exploit:
    """Unpickling this creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def rewrite_manifest(ckpt: Path) -> None:
    """Make the manifest match the files again, as an attacker with write access could."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_malicious_pickle_is_refused_not_executed(tmp_path, model):
    optimizer, _ = training_parts(model)
    path = save(tmp_path, 1, model, optimizer=optimizer)
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"state": {}, "param_groups": [Exploit(marker)]}, buffer)
    (path / "optimizer.pt").write_bytes(buffer.getvalue())
    rewrite_manifest(path)
    assert find_latest_checkpoint(tmp_path) == path  # the manifest verifies; only safe loading protects
    with pytest.raises(CheckpointError, match=r"optimizer\.pt cannot be loaded safely"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    assert not marker.exists()


def test_every_torch_load_is_weights_only(tmp_path, model, monkeypatch):
    optimizer, scheduler = training_parts(model)
    path = save(tmp_path, 1, model, optimizer=optimizer, scheduler=scheduler)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_load.torch, "load", spy)
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert calls == [True, True, True]  # optimizer.pt, scheduler.pt, rng.pt


KILL_LOOP = textwrap.dedent(r"""
    import os, random, select, signal, sys, time, warnings
    import torch
    torch.set_num_threads(1)  # single-threaded before fork: the forked savers must not inherit a thread pool
    from gspo.checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint

    run_dir, seed, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    chooser = random.Random(seed)
    # A plain module (no transformers import: seconds saved per run); ~4 MB of weights + momentum.
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 512)).sum().backward()
    optimizer.step()  # momentum buffers exist, so optimizer.pt is as large as the weights
    warnings.simplefilter("ignore")
    real_fsync = os.fsync
    pinned_kills = timed_kills = fresh = 0
    for it in range(iterations):
        # Even iterations: kill at a random time. Odd ones: freeze the saver at a random fsync of its
        # second save (payload, manifest, publish, "latest" pointer or rotation) and kill it there, so
        # kills provably land inside saves however fast or slow this machine is.
        pin_at = chooser.randint(1, 9) if it % 2 else 0  # every save here makes 9 or 10 fsyncs
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # saver: checkpoint forever; the weights of checkpoint s all equal s
            os.close(ready_r)
            saves_done, calls = 0, [0]

            def pinned_fsync(fd):
                real_fsync(fd)
                calls[0] += 1
                if saves_done >= 1 and calls[0] == pin_at:
                    os.write(ready_w, b"x")
                    time.sleep(3600)

            if pin_at:
                os.fsync = pinned_fsync
            step = (it + 1) * 1000
            while True:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(step)
                calls[0] = 0
                save_checkpoint(run_dir, step, model=model, optimizer=optimizer, trainer_state={"step": step},
                                keep_last=2)
                saves_done += 1
                step += 1
        os.close(ready_w)
        try:
            if pin_at:
                ready, _, _ = select.select([ready_r], [], [], 120)
                assert ready and os.read(ready_r, 1) == b"x", f"iteration {it}: the saver never reached fsync {pin_at}"
                pinned_kills += 1
            else:
                time.sleep(chooser.uniform(0.2, 0.6))
                timed_kills += 1
        finally:  # never leave a saver behind (it would hold the test's output pipe open)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(ready_r)
        latest = find_latest_checkpoint(run_dir)
        assert latest is not None or it == 0, f"iteration {it}: the previous checkpoints were lost"
        if latest is None:
            continue
        loaded = load_checkpoint(latest, model=model, optimizer=optimizer)
        step = loaded["trainer_state"]["step"]
        assert latest.name == f"step-{step:08d}" and step >= it * 1000, (latest, step)
        assert all(bool((p == step).all()) for p in model.parameters()), f"weights of {latest} do not match"
        fresh += step >= (it + 1) * 1000
    print("pinned_kills", pinned_kills, "fresh", fresh)
""")


def test_sigkill_during_saves_never_yields_a_corrupt_checkpoint(tmp_path):
    iterations = 8
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    done = subprocess.run([sys.executable, "-c", KILL_LOOP, str(tmp_path), "1234", str(iterations)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = done.stdout.split()
    pinned_kills, fresh = int(counts[1]), int(counts[3])
    # Half the kills are pinned inside a save (at a random fsync); every pinned iteration published a
    # checkpoint first, so the newest loadable one must come from it.
    assert pinned_kills == iterations // 2 and fresh >= iterations // 2, done.stdout
