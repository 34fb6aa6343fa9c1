"""The guard batch and the limits of one teleport: drift, guard-loss rise and gradient-norm gain."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt


def problem(seed: int = 0):
    """An MLP and two batches of one task: a small teleport batch and a larger guard batch."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(10, 3, generator=generator)
    inputs = torch.randn(40, 10, generator=generator)
    targets = (inputs @ teacher).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    return model, (inputs[:6], targets[:6]), (inputs[6:], targets[6:])


def loss_on(model, batch) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(batch[0]), batch[1]))


@pytest.mark.parametrize("seed", range(3))
def test_a_step_that_raises_the_guard_loss_is_undone(seed):
    model, teleport_batch, guard = problem(seed)
    options = {"lr": 0.2, "max_gain": None}
    unguarded = copy.deepcopy(model)
    report = tt.Teleporter(unguarded, F.cross_entropy, **options).teleport(*teleport_batch)
    rise = loss_on(unguarded, guard) / loss_on(model, guard) - 1
    assert rise > 0.01, "the setting must hurt the guard batch without a guard, or the test says nothing"
    assert report.guard_loss_before is None and report.guard_loss_after is None

    guarded = copy.deepcopy(model)
    report = tt.Teleporter(guarded, F.cross_entropy, **options).teleport(*teleport_batch, guard=guard)
    assert report.stopped == "guard" and not report.rolled_back
    assert report.guard_loss_before == pytest.approx(loss_on(model, guard), rel=1e-6)
    assert report.guard_loss_after == pytest.approx(loss_on(guarded, guard), rel=1e-6)
    assert report.guard_loss_after <= 1.01 * report.guard_loss_before
    assert report.loss_change <= 1e-5  # the teleport batch itself stays invariant either way


def test_the_guard_tolerance_is_the_teleporters():
    model, teleport_batch, guard = problem(0)
    loose = tt.Teleporter(copy.deepcopy(model), F.cross_entropy, lr=0.2, max_gain=None, guard_tolerance=10.0)
    report = loose.teleport(*teleport_batch, guard=guard)
    assert report.stopped == "steps" and report.steps == 8


def test_a_harmless_teleport_passes_its_guard_untouched():
    model, teleport_batch, guard = problem(1)
    plain, guarded = copy.deepcopy(model), copy.deepcopy(model)
    tt.Teleporter(plain, F.cross_entropy, lr=1e-4).teleport(*teleport_batch)
    report = tt.Teleporter(guarded, F.cross_entropy, lr=1e-4).teleport(*teleport_batch, guard=guard)
    assert report.stopped == "steps"
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), guarded.parameters(), strict=True))


def test_level_set_teleport_refuses_a_guard():
    model, teleport_batch, guard = problem(0)
    with pytest.raises(ValueError, match="takes no guard batch"):
        tt.Teleporter(model, F.cross_entropy, method="level_set").teleport(*teleport_batch, guard=guard)

