"""The null-space method: its options, its steps on random MLPs (first-order gain, defaults, tau
below one) and the rounding guard where the whole gradient lies in the core space."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import LOSS_RTOL, STEPS, batch_loss, filled_tanh_mlp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport import Teleporter
from torch_teleport.line_search import INITIAL_LR, LineSearch
from torch_teleport.plugins.methods.null_space import DEFAULT_DRIFT, GRADIENT_PATHS, NullSpaceMethod
from torch_teleport.testing import mlp_problems


def test_an_unknown_gradient_path_is_refused_naming_the_paths():
    with pytest.raises(
        ValueError, match=re.escape(f"gradient must be one of {GRADIENT_PATHS}, got 'dual'")
    ):
        NullSpaceMethod(gradient="dual")


ROUNDING = {torch.float64: 1e-12, torch.float32: 1e-6}
"""How far a reported loss may be from one measured again: a few units of the dtype's rounding."""


def mlp(seed: int, widths: tuple[int, ...]) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        return nn.Sequential(*layers[:-1])


def batch(seed: int, samples: int, width: int, classes: int):
    generator = torch.Generator().manual_seed(seed + 1000)
    inputs = torch.randn(samples, width, generator=generator)
    return inputs, torch.randint(0, classes, (samples,), generator=generator)


@given(seed=st.integers(0, 2**16), samples=st.integers(4, 48), hidden=st.integers(16, 64))
def test_a_default_teleport_keeps_its_float32_batch_loss_and_never_lowers_the_gradient_norm(
    seed, samples, hidden
):
    model = mlp(seed, (12, hidden, hidden, 4))
    report = tt.Teleporter(model, F.cross_entropy).teleport(*batch(seed, samples, 12, 4))
    assert report.loss_change <= DEFAULT_DRIFT
    assert report.grad_norm_after >= report.grad_norm_before
    assert len(report.step_sizes) == report.steps
    assert all(0 < size <= INITIAL_LR * LineSearch().max_length for size in report.step_sizes)


@given(mlp_problems(dtypes=(torch.float64,)))
def test_a_small_step_does_not_decrease_the_gradient_norm(problem):
    """First-order ascent: f(W + eta d) - f(W) = eta ||d||^2 + O(eta^2), d the projected gradient.

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
    loss_before = batch_loss(problem)
    report = Teleporter(
        problem.model, problem.loss_fn, null_space="svd", tau=tau, steps=STEPS
    ).teleport(problem.inputs, problem.targets)
    loss_after = batch_loss(problem)
    assert [layer.name for layer in report.layers] == [layer.name for layer in exact_report.layers]
    for approximate, exact_layer in zip(report.layers, exact_report.layers, strict=True):
        assert approximate.null_dim >= exact_layer.null_dim
    # The report states the real losses before and after the teleport, and their relative change (to
    # rounding: a step undone by subtraction restores the weights to rounding, not bit for bit).
    assert not report.rolled_back
    rounding = ROUNDING[problem.inputs.dtype]
    assert report.loss_before == pytest.approx(loss_before, rel=rounding)
    assert report.loss_after == pytest.approx(loss_after, rel=rounding)
    change = abs(loss_after - loss_before) / abs(loss_before)
    assert report.loss_change == pytest.approx(change, rel=0, abs=3 * rounding)


def test_tau_below_one_moves_the_loss_and_says_how_much():
    model, inputs, targets = filled_tanh_mlp()
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
        limits=tt.Limits(drift=1e-3),
    ).teleport(inputs, targets)
    assert exact.stopped == "no_room"  # 64 samples fill every layer's input space
    assert sum(layer.null_dim for layer in report.layers) > 0
    assert report.steps == 8 and not report.rolled_back
    with torch.no_grad():
        loss_after = float(nn.functional.cross_entropy(model(inputs), targets))
    assert report.loss_before == loss_before and report.loss_after == loss_after
    assert report.loss_change == abs(loss_after - loss_before) / loss_before > 1e-6


@pytest.mark.parametrize("gradient", ["auto", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_a_gradient_wholly_in_the_core_space_does_not_move_the_weights(dtype, gradient):
    """One layer: the objective's gradient lies in the span of the inputs. The structured path
    finds it zero outright (the inputs have no tangent); the full path projects autograd's
    gradient, leaving rounding noise that must become an exact zero (a normalised step would
    scale the noise up). Either way the teleport says it cannot move."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Linear(30, 5).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    inputs = torch.randn(8, 30, generator=generator, dtype=dtype)
    targets = torch.randint(0, 5, (8,), generator=generator)
    loss_fn = nn.functional.cross_entropy
    teleporter = Teleporter(model, loss_fn, null_space="exact", gradient=gradient)
    with pytest.warns(RuntimeWarning, match="projected objective gradient is exactly zero"):
        report = teleporter.teleport(inputs, targets)
    assert report.layers[0].null_dim == 31 - 8 and report.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


class _ScaledRelu(torch.autograd.Function):
    """A custom activation whose backward autograd cannot differentiate, with no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0) * 1.5

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * 1.5


class _ScaledReluModule(nn.Module):
    def forward(self, x):
        return _ScaledRelu.apply(x)


def test_a_function_without_jvp_or_second_derivative_is_named_when_the_teleport_cannot_move():
    """Such an activation sends the teleport to the full path, whose double backward skips it: every
    direction through it is lost, and the warnings say which Function does it and why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), _ScaledReluModule(), nn.Linear(16, 16), _ScaledReluModule(), nn.Linear(16, 3))
    inputs, targets = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.warns(RuntimeWarning) as warned:
        report = Teleporter(model, F.cross_entropy).teleport(inputs, targets)
    messages = [str(w.message) for w in warned]
    assert any("the custom autograd Function _ScaledRelu defines no jvp" in m for m in messages)
    assert any(m.startswith("_ScaledRelu: backward marked @once_differentiable") for m in messages)
    assert any(m.startswith("teleport cannot move") for m in messages)
    assert report.steps == 0
