"""A tiny Hugging Face Qwen3-MoE (about 1.4M parameters) for CPU tests of Routing Replay.

A plain ``Qwen3MoeForCausalLM`` built from a config in code (nothing downloaded), so capture/replay
(:mod:`gspo.moe.routing`), ``generate`` and ``save_pretrained`` behave as on a real Qwen3-30B-A3B:
every decoder layer is a sparse MoE layer with ``num_experts`` experts, ``top_k`` of them active per
token, and ``norm_topk_prob=True`` (the top-k probabilities are renormalised, as in Qwen3-MoE).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM


def build_tiny_qwen3_moe(
    tokenizer_or_vocab_size: Any,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    moe_intermediate_size: int = 96,
    max_position_embeddings: int = 64,
    seed: int | None = 0,
) -> Qwen3MoeForCausalLM:
    """A randomly initialised Qwen3-MoE sized to a tokenizer or a vocabulary size.

    ``tokenizer_or_vocab_size`` is either an int, or a tokenizer (anything with ``len()``,
    ``pad_token_id`` and ``eos_token_id``, e.g. ``gspo.models.tiny.build_char_tokenizer()``), whose
    pad/eos ids then go into ``config`` and ``generation_config``. ``seed`` (if not None) makes the
    initialisation reproducible without disturbing the caller's global RNG state.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    vocab_size, pad_id, eos_id = _vocab(tokenizer_or_vocab_size)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,  # unused: every layer is sparse (mlp_only_layers=[])
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        use_sliding_window=False,
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
    model.generation_config = GenerationConfig(pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    return model


def _vocab(tokenizer_or_vocab_size: Any) -> tuple[int, int | None, int | None]:
    """(vocab_size, pad_id, eos_id) from an int or a tokenizer-like object."""
    if isinstance(tokenizer_or_vocab_size, int):
        return tokenizer_or_vocab_size, None, None
    tokenizer = tokenizer_or_vocab_size
    return len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id
