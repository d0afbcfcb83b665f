"""The tied embedding's sparse backward (gspo.trainer.tied_embedding): the same gradient, no (V, H) temporary."""

from __future__ import annotations

import copy

import pytest
import torch

from gspo.logprobs import token_logprobs
from gspo.models.tiny import build_char_tokenizer, build_tiny_qwen3
from gspo.trainer.tied_embedding import SparseTiedEmbedding, use_sparse_tied_gradient

T = 6


def _model(dtype=torch.float64, tied=True):
    model = build_tiny_qwen3(build_char_tokenizer(), seed=0).to(dtype)
    if not tied:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.use_cache = False
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (5, 14), generator=g)
    ids[:, :3] = ids[0, 5]  # repeated tokens: several rows of the sparse gradient hit one embedding row
    attention = torch.ones_like(ids)
    attention[1, :2] = 0  # left padding
    return ids, attention


def _embedding_grads(model, ids, attention):
    """(the weight's .grad, what the embedding's backward produced) for the log-probabilities' weighted sum."""
    produced = []
    loss_weights = torch.linspace(-1, 1, T, dtype=torch.float64)
    embedding = model.get_input_embeddings()

    def watch(_module, _inputs, out):  # the embedding node's gradient for its weight
        out.grad_fn.register_hook(lambda grads, _outputs: produced.append(grads[0]))

    hook = embedding.register_forward_hook(watch)
    (token_logprobs(model, ids, attention, T) * loss_weights).sum().backward()
    hook.remove()
    return embedding.weight.grad, produced[0]


def test_tied_weights_get_the_dense_gradient_from_a_sparse_embedding_backward():
    dense_model, sparse_model = _model(), _model()
    assert use_sparse_tied_gradient(sparse_model) and type(sparse_model.model.embed_tokens) is SparseTiedEmbedding
    ids, attention = _batch(dense_model.config.vocab_size)
    want, dense_part = _embedding_grads(dense_model, ids, attention)
    got, sparse_part = _embedding_grads(sparse_model, ids, attention)
    assert not dense_part.is_sparse and sparse_part.is_sparse  # no (V, H) matrix for the embedding's rows
    assert got.layout == torch.strided and not got.is_sparse  # the optimizer sees a dense gradient, as before
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    for (name, a), b in zip(sparse_model.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15, msg=name)


def test_accumulates_over_micro_batches_and_steps_with_fused_adamw():
    model = _model(torch.float32)
    use_sparse_tied_gradient(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids, attention = _batch(model.config.vocab_size)
    for rows in (slice(0, 2), slice(2, 5)):  # two backwards into one .grad
        token_logprobs(model, ids[rows], attention[rows], T).sum().backward()
    assert not model.lm_head.weight.grad.is_sparse
    optimizer.step()  # fused AdamW refuses sparse gradients


@pytest.mark.parametrize("case", ["untied", "frozen", "off the CPU"])
def test_left_alone_where_the_head_does_not_share_a_trainable_cpu_weight(case):
    model = _model(tied=case != "untied")
    if case == "frozen":
        model.get_input_embeddings().weight.requires_grad_(False)
    if case == "off the CPU":  # only the CPU has run it (meta stands in for a GPU here)
        model = model.to("meta")
    assert not use_sparse_tied_gradient(model)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_a_copy_keeps_the_sparse_backward_and_a_no_grad_forward_is_unchanged():
    model = _model()
    ids, attention = _batch(model.config.vocab_size)
    with torch.no_grad():
        want = token_logprobs(model, ids, attention, T)
    use_sparse_tied_gradient(model)
    twin = copy.deepcopy(model)  # the frozen KL reference is a deep copy
    assert type(twin.get_input_embeddings()) is SparseTiedEmbedding
    with torch.no_grad():
        assert torch.equal(token_logprobs(twin, ids, attention, T), want)
