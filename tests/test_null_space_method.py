"""The null-space method's steps on random MLPs: first-order gain, defaults, tau below one, and the
rounding guard where the whole gradient lies in the core space."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_projector_linear import LOSS_RTOL, STEPS, batch_loss
from torch import nn

from torch_teleport import Teleporter
from torch_teleport.testing import mlp_problems


@given(mlp_problems(dtypes=(torch.float64,)))
def test_a_small_step_does_not_decrease_the_gradient_norm(problem):
    """First-order ascent: f(W + eta d) - f(W) = eta ||d||^2 + O(eta^2), with d the projected gradient.

    One plain step (eq. 5, ``normalize=False``) with a small rate: the objective
    0.5 ||grad L||^2 must grow by ``||dW||^2 / eta`` (the first-order prediction)
    within 1 %, and never fall by more than rounding.
    """
    lr = 1e-6
    params = [p for p in problem.model.parameters()]
    before = [p.detach().clone() for p in params]
    teleporter = Teleporter(problem.model, problem.loss_fn, steps=1, lr=lr, normalize=False)
    report = teleporter.teleport(problem.inputs, problem.targets)
    moved_squared = sum(
        float((p.detach() - b).square().sum()) for p, b in zip(params, before, strict=True)
    )
    predicted = moved_squared / lr
    gained = report.objective_after - report.objective_before
    rounding = 1e-13 * max(1.0, abs(report.objective_before))
    assert gained >= -rounding
    assert report.grad_norm_after >= report.grad_norm_before * (1 - 1e-12)
    assert abs(gained - predicted) <= 0.01 * predicted + rounding


def test_default_teleport_raises_the_gradient_norm_visibly():
    """Defaults on a trained-from-scratch MLP of the paper's shape (scaled down): a clear gain."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    inputs = torch.randn(32, 64, generator=generator)
    targets = torch.randint(0, 10, (32,), generator=generator)
    report = Teleporter(model, nn.functional.cross_entropy).teleport(inputs, targets)
    assert report.stopped == "steps" and report.steps == 8
    assert report.grad_norm_after > 1.2 * report.grad_norm_before
    assert report.loss_change <= LOSS_RTOL[torch.float32]


@given(mlp_problems(), st.floats(0.5, 0.99))
def test_tau_below_one_reports_the_loss_change_and_widens_the_null_space(problem, tau):
    exact = Teleporter(
        copy.deepcopy(problem.model), problem.loss_fn, null_space="exact", steps=STEPS
    )
    exact_report = exact.teleport(problem.inputs, problem.targets)
    report = Teleporter(
        problem.model, problem.loss_fn, null_space="svd", tau=tau, steps=STEPS
    ).teleport(problem.inputs, problem.targets)
    assert [layer.name for layer in report.layers] == [layer.name for layer in exact_report.layers]
    for approximate, exact_layer in zip(report.layers, exact_report.layers, strict=True):
        assert approximate.null_dim >= exact_layer.null_dim
    if report.rolled_back:
        return
    # The report states the real loss after the teleport, and its relative change.
    loss_after = batch_loss(problem)
    assert abs(report.loss_after - loss_after) <= 1e-12 * abs(loss_after)
    expected_change = abs(report.loss_after - report.loss_before) / abs(report.loss_before)
    assert report.loss_change == expected_change


def test_tau_below_one_moves_the_loss_and_says_how_much():
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).double()
    inputs = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 4, (64,), generator=generator)
    with torch.no_grad():
        loss_before = float(nn.functional.cross_entropy(model(inputs), targets))
    exact = Teleporter(
        copy.deepcopy(model), nn.functional.cross_entropy, null_space="exact"
    ).teleport(inputs, targets)
    # A fixed step and a drift tolerance that lets a thresholded null space move the loss by design.
    report = Teleporter(
        model,
        nn.functional.cross_entropy,
        null_space="svd",
        tau=0.9,
        lr=0.005,
        drift_tolerance=1e-3,
    ).teleport(inputs, targets)
    assert exact.stopped == "no_room"  # 64 samples fill every layer's input space
    assert sum(layer.null_dim for layer in report.layers) > 0
    assert report.steps == 8 and not report.rolled_back
    with torch.no_grad():
        loss_after = float(nn.functional.cross_entropy(model(inputs), targets))
    assert report.loss_before == loss_before and report.loss_after == loss_after
    assert report.loss_change == abs(loss_after - loss_before) / loss_before > 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_gradient_wholly_in_the_core_space_does_not_move_the_weights(dtype):
    """One layer: the objective's gradient lies in the span of the inputs, its projection is noise."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(30, 5).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    inputs = torch.randn(8, 30, generator=generator, dtype=dtype)
    targets = torch.randint(0, 5, (8,), generator=generator)
    report = Teleporter(model, nn.functional.cross_entropy, null_space="exact").teleport(
        inputs, targets
    )
    assert report.layers[0].null_dim == 31 - 8
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
