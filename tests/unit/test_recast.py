"""gspo.trainer.recast: autocast's weight casts recast in the backward instead of kept through it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from gspo.trainer import recast


def _qwen3(layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).float()


def _grads(model, ids, context, cache: bool) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache), context:
        logits = model(ids).logits  # (b, T, V)
    logits.float().log_softmax(-1).mean().backward()
    return [p.grad.clone() for p in model.parameters()]


def test_gradients_are_bit_identical_to_autocast_keeping_its_casts():
    model, ids = _qwen3(), torch.randint(0, 300, (3, 11))
    kept = _grads(model, ids, contextlib.nullcontext(), cache=True)
    recast_grads = _grads(model, ids, recast.recast_weights(), cache=False)
    assert all(torch.equal(a, b) for a, b in zip(kept, recast_grads))


def test_every_linear_weight_cast_is_recast_and_nothing_else(monkeypatch):
    model, ids = _qwen3(layers=3), torch.randint(0, 300, (2, 7))
    original, packed = recast._pack, []
    monkeypatch.setattr(recast, "_pack", lambda saved: packed.append(original(saved)) or packed[-1])
    with recast.autocast("cpu", torch.bfloat16), recast.recast_weights():
        model(ids).logits.float().sum().backward()
    recipes = [p for p in packed if isinstance(p, recast._Recast)]
    linears = {id(m.weight) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 7 * 3  # q, k, v, o, gate, up, down
    # every projection saved its weight's cast for the input's gradient: all recast, and nothing else
    assert {id(r.weight) for r in recipes} == linears | {id(model.lm_head.weight)}
    assert all(r.dtype == torch.bfloat16 and r.weight.dtype == torch.float32 for r in recipes)


def test_frozen_weights_and_float32_are_left_alone():
    frozen = torch.nn.Linear(8, 4)
    frozen.weight.requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = frozen.weight.to(torch.bfloat16)
    assert recast._pack(cast) is cast  # no autograd history to recast from (LoRA's base weights)
    live = torch.nn.Linear(8, 4)
    same_dtype = live.weight * 1.0  # float32: not a cast
    assert recast._pack(same_dtype) is same_dtype
    assert recast._pack(x) is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_autocast_has_no_weight_cache(dtype):
    with recast.autocast("cpu", dtype):
        assert torch.is_autocast_enabled("cpu") == (dtype is not None)
        assert not torch.is_autocast_cache_enabled()
