"""The sharded load's reading, in one process (no process group; the tensors whole): gspo's own checkpoints
(fused MoE names), and a clear error for a tensor the checkpoint lacks or holds in another shape. The
2-process shards are tested in tests/distributed/test_fsdp_meta_load.py."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from gspo.errors import ModelLoadError
from gspo.models.load import build_on_meta
from gspo.trainer.fsdp_load import load_local_slices

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # one process: DCP says so


def _load(path) -> torch.nn.Module:
    model = build_on_meta(path)
    load_local_slices(path, torch.device("cpu"), [(model, model)])
    return model


def test_fused_expert_names_as_gspo_saves_them(tiny_moe_dir, tmp_path):
    whole = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    whole.save_pretrained(tmp_path, save_original_format=False)  # what gspo's checkpoints write
    assert any(name.endswith("experts.gate_up_proj") for name in load_file(tmp_path / "model.safetensors"))
    loaded = _load(tmp_path)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    for name, buffer in whole.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buffer), name


@pytest.mark.parametrize("model_dir, name, change", [
    ("tiny_model_dir", "model.layers.1.mlp.up_proj.weight", "missing"),
    ("tiny_model_dir", "model.layers.1.mlp.up_proj.weight", "shape"),
    ("tiny_moe_dir", "model.layers.1.mlp.experts.3.down_proj.weight", "missing"),  # one expert of a fused tensor
    ("tiny_moe_dir", "model.layers.0.mlp.experts.7.gate_proj.weight", "shape"),
])
def test_a_missing_or_mismatched_tensor_is_named(tmp_path, model_dir, name, change, request):
    shutil.copytree(request.getfixturevalue(model_dir), tmp_path, dirs_exist_ok=True)
    state = load_file(tmp_path / "model.safetensors")
    if change == "missing":
        del state[name]
    else:
        state[name] = state[name][:-1].contiguous()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.") + ".*do not match config.json"):
        _load(tmp_path)


def test_a_directory_without_safetensors_is_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        _load(tmp_path)
