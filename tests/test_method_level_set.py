"""Level-set teleport: first-order constraint satisfaction and convergence where the level set is
known (a convex quadratic), gradient-norm growth on an MLP, and the loss drift it accumulates there."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_teleport import Teleporter
from torch_teleport.plugins.methods.level_set import LevelSetMethod

EIGENVALUES = torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64)


def half_squared_error(outputs, targets):
    return 0.5 * (outputs.squeeze(-1) - targets).square().mean()


def quadratic(weights: list[float]):
    """``f(w) = 0.5 w^T A w``, ``A = diag(EIGENVALUES)``: a linear model, inputs ``sqrt(d A)``, targets 0."""
    dims = len(EIGENVALUES)
    model = nn.Linear(dims, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights], dtype=torch.float64))
    inputs = torch.diag((dims * EIGENVALUES).sqrt())
    return model, inputs, torch.zeros(dims, dtype=torch.float64)


def test_a_step_satisfies_the_linearised_constraint_and_errs_at_second_order():
    errors = []
    for lr in (0.2, 0.1):
        model, inputs, targets = quadratic([1.0, 0.7, -0.5, 0.2])
        start = model.weight.detach().clone()
        options = {"line_search": False}
        report = Teleporter(
            model,
            half_squared_error,
            method="level_set",
            steps=1,
            lr=lr,
            normalize=False,
            **options,
        ).teleport(inputs, targets)
        step = (model.weight.detach() - start).squeeze(0)
        gradient = (EIGENVALUES * start).squeeze(0)
        assert abs(float(gradient @ step)) <= 1e-13 * float(gradient.norm() * step.norm())
        second_order = 0.5 * float(step @ (EIGENVALUES * step))
        assert report.loss_after - report.loss_before == pytest.approx(second_order, rel=1e-9)
        errors.append(report.loss_after - report.loss_before)
    assert errors[1] / errors[0] == pytest.approx(
        0.25, rel=1e-6
    )  # halving the step quarters the error


def test_it_reaches_the_known_maximiser_on_the_level_set():
    model, inputs, targets = quadratic([1.0, 0.7, -0.5, 0.2])
    level = float(0.5 * (model.weight.detach().squeeze(0).square() * EIGENVALUES).sum())
    report = Teleporter(
        model, half_squared_error, method="level_set", steps=500, lr=0.5, normalize=False
    ).teleport(inputs, targets)
    # max ||A w||^2 subject to 0.5 w^T A w = c is 2 c lambda_max, on the top eigenvector.
    assert report.stopped == "kkt"
    assert report.grad_norm_after**2 == pytest.approx(
        2 * level * float(EIGENVALUES.max()), rel=1e-5
    )
    assert abs(report.loss_after - level) <= 1e-6
    assert abs(float(model.weight.detach()[0, -1])) == pytest.approx(
        (2 * level / float(EIGENVALUES.max())) ** 0.5, rel=1e-5
    )


def tanh_mlp(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    ).double()
    generator = torch.Generator().manual_seed(seed + 100)
    inputs = torch.randn(16, 20, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randint(0, 5, (16,), generator=generator)


def test_gradient_norm_grows_on_an_mlp():
    model, inputs, targets = tanh_mlp(7)
    report = Teleporter(model, F.cross_entropy, method="level_set", steps=4, lr=0.01).teleport(
        inputs, targets
    )
    assert report.steps == 4
    assert report.grad_norm_after > 1.1 * report.grad_norm_before
    assert all(b > a for a, b in zip(report.grad_norms, report.grad_norms[1:], strict=False))


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_its_loss_drift_accumulates_on_an_mlp_where_null_space_teleport_has_none(seed):
    model, inputs, targets = tanh_mlp(seed)
    level_set = Teleporter(
        copy.deepcopy(model), F.cross_entropy, method="level_set", steps=32, lr=0.01
    )
    report = level_set.teleport(inputs, targets)
    drift = [
        abs(loss - report.loss_before) / report.loss_before
        for loss in [*report.losses[1:], report.loss_after]
    ]
    null_space = Teleporter(
        copy.deepcopy(model), F.cross_entropy, null_space="exact", steps=32, lr=0.01
    ).teleport(inputs, targets)
    assert report.steps == 32 and null_space.steps == 32
    assert statistics.fmean(drift[-8:]) > 2 * statistics.fmean(drift[:8]) > 1e-6
    assert null_space.loss_change <= 1e-12


def test_a_zero_objective_is_refused_and_the_model_left_as_found():
    model, inputs, targets = quadratic([0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="objective must be positive"):
        Teleporter(model, half_squared_error, method="level_set").teleport(inputs, targets)
    assert torch.equal(model.weight.detach(), torch.zeros(1, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"armijo": 1.0}, "armijo"),
        ({"backtrack": 0.0}, "backtrack"),
        ({"max_backtracks": 0}, "max_backtracks"),
    ],
)
def test_bad_options_are_refused(options, message):
    model, _, _ = quadratic([1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=message):
        Teleporter(model, half_squared_error, method="level_set", **options)


def test_it_is_the_registered_level_set_method():
    model, _, _ = quadratic([1.0, 0.0, 0.0, 0.0])
    assert isinstance(
        Teleporter(model, half_squared_error, method="level_set").method, LevelSetMethod
    )
