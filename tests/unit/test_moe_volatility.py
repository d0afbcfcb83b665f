"""Expert volatility (GSPO section 5.3): closed-form values on hand-made routings."""

from __future__ import annotations

import math

import pytest
import torch

from gspo.moe import RoutingRecord, expert_volatility, token_volatility


def _routing(*layers):
    """A RoutingRecord from nested lists, one ``(B, S, k)`` per layer."""
    return RoutingRecord([torch.tensor(layer) for layer in layers])


def test_same_set_in_another_order_is_not_a_change():
    mean, per_layer = expert_volatility(_routing([[[1, 3]]]), _routing([[[3, 1]]]))
    assert mean.item() == 0.0 and per_layer.tolist() == [0.0]


def test_closed_form_values():
    a = _routing([[[0, 1], [0, 1], [0, 1], [4, 5]]])  # one layer, B=1, S=4, k=2
    b = _routing([[[0, 1], [0, 2], [2, 3], [5, 4]]])
    assert token_volatility(a, b).tolist() == [[[0.0, 0.5, 1.0, 0.0]]]
    mean, per_layer = expert_volatility(a, b)
    assert per_layer.tolist() == [0.375]  # (0 + 0.5 + 1 + 0) / 4
    assert mean.item() == pytest.approx(0.375)


def test_mean_averages_the_layers():
    a = _routing([[[0, 1]]], [[[0, 1]]])  # two layers, one token
    b = _routing([[[0, 1]]], [[[2, 3]]])
    mean, per_layer = expert_volatility(a, b)
    assert per_layer.tolist() == [0.0, 1.0] and mean.item() == 0.5


def test_top_k_of_four():
    mean, _ = expert_volatility([torch.tensor([[[0, 1, 2, 3]]])], [torch.tensor([[[3, 2, 7, 6]]])])
    assert mean.item() == 0.5  # plain tensor lists are accepted too


def test_mask_ignores_padding_positions():
    a = _routing([[[0, 1], [0, 1]], [[2, 3], [2, 3]]])  # B=2, S=2
    b = _routing([[[0, 1], [6, 7]], [[3, 2], [6, 7]]])  # changes only at position 1 (padding)
    mask = torch.tensor([[True, False], [True, False]])
    assert expert_volatility(a, b, mask)[0].item() == 0.0
    assert expert_volatility(a, b)[0].item() == 0.5


def test_empty_mask_gives_nan():
    a = _routing([[[0, 1]]])
    mean, per_layer = expert_volatility(a, a, torch.zeros(1, 1, dtype=torch.bool))
    assert math.isnan(mean.item()) and math.isnan(per_layer[0].item())


def test_symmetric_for_equal_k():
    generator = torch.Generator().manual_seed(0)
    a = [torch.rand(3, 5, 8, generator=generator).topk(2).indices for _ in range(2)]
    b = [torch.rand(3, 5, 8, generator=generator).topk(2).indices for _ in range(2)]
    torch.testing.assert_close(expert_volatility(a, b)[1], expert_volatility(b, a)[1])


def test_shape_mismatches_raise():
    a = _routing([[[0, 1]]])
    with pytest.raises(ValueError, match="differ in shape"):
        expert_volatility(a, _routing([[[0, 1], [0, 1]]]))
    with pytest.raises(ValueError, match="mask has shape"):
        expert_volatility(a, a, torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="no MoE layers"):
        expert_volatility(RoutingRecord(), RoutingRecord())


def test_record_slicing_helpers():
    record = _routing([[[0, 1], [2, 3], [4, 5]], [[6, 7], [0, 2], [1, 3]]])  # B=2, S=3, k=2
    assert record.select(torch.tensor([1])).indices[0].tolist() == [[[6, 7], [0, 2], [1, 3]]]
    assert record.narrow(1, 2).indices[0].tolist() == [[[2, 3], [4, 5]], [[0, 2], [1, 3]]]
    padded = record.pad_to(4)
    assert padded.shape == (2, 4) and padded.indices[0][:, 3].tolist() == [[0, 1], [0, 1]]
    joined = RoutingRecord.cat([record.narrow(0, 1), record.narrow(1, 2)], dim=1)
    assert torch.equal(joined.indices[0], record.indices[0])
    assert RoutingRecord.cat([record.select(slice(0, 1)), record.select(slice(1, 2))]).shape == (2, 3)


def test_sorted_search_equals_the_pairwise_definition_on_compact_ids():
    # token_volatility searches sorted sets instead of building a (L, B, S, k, k) tensor; records hold uint8
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.rand(2, 3, 5, 64, generator=generator).argsort(-1)[..., :8] for _ in range(2))  # (L, B, S, k)
    pairwise = 1.0 - (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().mean(-1)  # |A \\ B| / k
    compact = RoutingRecord([layer.to(torch.uint8) for layer in a])
    assert torch.equal(token_volatility(compact, list(b)), pairwise)
    assert 0 < pairwise.mean() < 1
