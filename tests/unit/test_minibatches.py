"""The data-parallel minibatch plan (gspo.trainer.minibatches) and its zero-weight padding rows.

Every process's share of every minibatch has one length (FSDP2 runs as many collective forwards on every
process, and no process ever runs a 0-row forward), minibatch i holds the same responses whatever the
number of processes (N processes end with the weights of one), and a padding row changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gspo.algorithms import OBJECTIVES
from gspo.algorithms.catalogue import CORRECTION_MODES
from gspo.trainer.update import UpdateInputs, Updater


@st.composite
def layouts(draw):
    """(prompts, group_size, processes, minibatches, epochs, seed) that config validation accepts."""
    processes = draw(st.integers(1, 8))
    prompts = processes * draw(st.integers(1, 4))
    group = draw(st.integers(2, 8))
    total = prompts * group
    minibatches = draw(st.sampled_from([m for m in range(1, 17) if total % m == 0]))
    return prompts, group, processes, minibatches, draw(st.integers(1, 2)), draw(st.integers(0, 2**31 - 1))


def plans(prompts, group, processes, minibatches, epochs, seed):
    """Every process's plan, as the trainer draws them (one generator seeded alike on every process)."""
    updater = Updater("gspo", minibatches=minibatches, epochs=epochs)
    total = prompts * group
    local = total // processes
    return [updater.plan(torch.Generator().manual_seed(seed), local, offset=rank * local, total=total)
            for rank in range(processes)]


@settings(max_examples=300, deadline=None)
@given(layout=layouts())
def test_every_process_holds_an_equal_nonempty_share_of_the_same_minibatches(layout):
    prompts, group, processes, minibatches, epochs, seed = layout
    local = prompts * group // processes
    one = plans(prompts, group, 1, minibatches, epochs, seed)[0]
    many = plans(prompts, group, processes, minibatches, epochs, seed)
    for epoch in range(epochs):
        for mb in range(minibatches):
            shares = [plan[epoch][mb] for plan in many]
            assert len({len(s.index) for s in shares}) == 1  # one length everywhere: equal collective counts
            assert len(shares[0].index) >= 1  # never a 0-row forward
            if local % minibatches == 0:  # stratified: exactly equal shares, no padding
                assert all(bool(s.real.all()) and len(s.index) == local // minibatches for s in shares)
            rows = sorted(rank * local + int(i) for rank, s in enumerate(shares) for i in s.index[s.real])
            assert rows == sorted(one[epoch][mb].index.tolist())  # the same responses as one process
        for plan in many:  # every row trains exactly once per epoch
            counts = sum(minibatch.rows(local).long() for minibatch in plan[epoch])
            assert bool((counts == 1).all())


def test_a_draw_that_emptied_a_share_under_the_global_permutation_now_splits_evenly():
    # the plan before: minibatch of global response j = randperm(total)[j] % minibatches; with 8 responses over
    # 2 processes and 4 minibatches, this generator gave each process two 0-row minibatches (a crash in the model)
    before = torch.randperm(8, generator=torch.Generator().manual_seed(0)) % 4  # (8,)
    assert torch.nn.functional.one_hot(before.view(2, 4), 4).sum(1).tolist() == [[2, 0, 0, 2], [0, 2, 2, 0]]
    for plan in plans(2, 4, 2, 4, 1, 0):
        assert [len(m.index) for m in plan[0]] == [1, 1, 1, 1] and all(bool(m.real.all()) for m in plan[0])
    # 8 responses over 4 processes, 4 minibatches: 2 rows per process for 4 steps, padded to equal shares
    many = plans(4, 2, 4, 4, 1, 0)
    assert all(len(m.index) >= 1 for plan in many for m in plan[0])
    assert sum(int(m.real.sum()) for plan in many for m in plan[0]) == 8


def _inputs(b: int, t: int, seed: int) -> UpdateInputs:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3  # (B, T)
    ids = torch.arange(b)[:, None].expand(b, t + 2)  # (B, P + T): a row's id, read by the stand-in policy
    return UpdateInputs(ids, torch.ones(b, t + 2, dtype=torch.bool), mask, torch.randn(b, generator=g),
                        old, old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64),
                        rollout_logprobs=old + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("algorithm", sorted(OBJECTIVES))
@pytest.mark.parametrize("correction", CORRECTION_MODES)
def test_padding_rows_change_no_loss_gradient_or_metric(algorithm, correction):
    inputs = _inputs(3, 5, seed=len(algorithm) + 7 * len(correction))
    table = (inputs.old_logprobs + 0.1 * torch.randn(inputs.old_logprobs.shape, generator=torch.Generator().manual_seed(1),
                                                     dtype=torch.float64)).requires_grad_()  # (B, T)

    def policy(ids, attn, num_t, temperature, routed=False):
        return table[ids[:, 0]]  # (b, T) the stand-in model's log-probabilities of these rows

    updater = Updater(algorithm, max_length=5, correction=correction, beta=0.1)
    if correction == "bypass":
        updater.correction = "none"

    def run(rows: UpdateInputs):
        lengths = rows.completion_mask.sum(1)
        normaliser = (lengths.sum() if OBJECTIVES[algorithm].normaliser == "num_tokens" else (lengths > 0).sum())
        out = updater._loss(policy, rows, normaliser.double())
        (grad,) = torch.autograd.grad(out.loss, table)
        return out.loss.detach(), grad, {k: float(v) for k, v in out.metrics.items()}

    plain = run(inputs)
    padded = run(inputs.rows(torch.tensor([0, 1, 2, 0, 2])).with_padding(torch.tensor([True, True, True, False, False])))
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded[1], plain[1], rtol=1e-12, atol=1e-12)
    assert padded[2].keys() == plain[2].keys()
    for key, value in plain[2].items():
        assert padded[2][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# -- validation: what N processes need of the batch sizes, before any process starts -------------------------

@pytest.mark.parametrize("processes, overrides, fragment", [
    (3, ["rollout.prompts_per_step=4"], "rollout.prompts_per_step=4 does not split over 3 processes"),
    # 8 prompts x 4 = 32 responses, 4 minibatches, 2 processes: 4 rows each per minibatch; 3 does not divide 4
    (2, ["rollout.prompts_per_step=8", "rollout.group_size=4", "optim.micro_batch_size=8"],
     "optim.micro_batch_size=8 does not divide the 4 responses each of the 2 processes trains per minibatch"),
    (1, ["rollout.prompts_per_step=8", "rollout.group_size=4", "optim.micro_batch_size=3"],
     "optim.micro_batch_size=3 does not divide the 8 responses per minibatch"),
])
def test_shares_that_do_not_fit_name_the_key_and_the_fix(processes, overrides, fragment):
    from gspo.config import load_config
    from gspo.config.validate import validate_processes
    from gspo.errors import ConfigError

    with pytest.raises(ConfigError, match="choose") as error:
        validate_processes(load_config(None, overrides), processes)  # load_config checks 1 process
    assert fragment in str(error.value)


def test_padded_shares_take_any_micro_batch_size():
    from gspo.config import load_config
    from gspo.config.validate import validate_processes

    # 8 responses, 4 processes, 4 minibatches: 2 rows per process do not split in 4; shares are padded
    validate_processes(load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=2",
                                          "optim.micro_batch_size=1"]), 4)


def test_gspo_train_nproc_checks_the_shares_before_starting_processes(capsys, monkeypatch):
    import gspo.launch
    from gspo.cli import main

    monkeypatch.setattr(gspo.launch, "relaunch_with_torchrun", lambda *a: pytest.fail("processes were started"))
    assert main(["train", "--nproc", "3", "rollout.prompts_per_step=4"]) == 2
    assert "does not split over 3 processes" in capsys.readouterr().err
