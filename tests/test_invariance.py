"""Property tests of the teleport engine on random MLPs.

Every check is made twice over: through ``assert_teleport_invariant`` (as a
plugin author would) and against quantities measured here independently
(losses from plain forward passes, layer inputs from our own hooks).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_null_space import reference_rank
from torch import nn

from torch_teleport import Teleporter
from torch_teleport.testing import assert_teleport_invariant, mlp_problems

STEPS = 8  # the paper's t
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ANNIHILATION_TOL = {torch.float64: 1e-11, torch.float32: 1e-5}


def batch_loss(problem, model=None) -> float:
    """The teleport-batch loss as the engine sees it (dropout-free MLPs: eval mode)."""
    model = problem.model if model is None else model
    with torch.no_grad():
        return float(problem.loss_fn(model(problem.inputs), problem.targets))


def linear_inputs(model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each ``nn.Linear``'s input on the batch, with the constant 1 of the bias appended."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(
            lambda m, args, name=name: captured.__setitem__(name, args[0])
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return {
        name: torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        if modules[name].bias is not None
        else x
        for name, x in captured.items()
    }


def weight_and_bias(module: nn.Linear) -> torch.Tensor:
    """``[W | b]``, the matrix that multiplies the input with a folded constant 1."""
    if module.bias is None:
        return module.weight.detach().clone()
    return torch.cat([module.weight.detach(), module.bias.detach()[:, None]], 1)


@given(mlp_problems())
def test_helper_accepts_the_builtin_linear_projector(problem):
    report = assert_teleport_invariant(
        problem.model,
        problem.loss_fn,
        problem.inputs,
        problem.targets,
        steps=STEPS,
        null_space="exact",
        lr=0.005,  # a fixed step takes every step; the step-length search stops where nothing improves
    )
    assert report.steps == STEPS or report.stopped == "no_room"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@given(data=st.data())
def test_loss_is_invariant_and_every_update_annihilates_its_inputs(dtype, data):
    problem = data.draw(mlp_problems(dtypes=(dtype,)), label="problem")
    model = problem.model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs_before = linear_inputs(model, problem.inputs)
    weights_before = {name: weight_and_bias(m) for name, m in linears.items()}
    loss_before = batch_loss(problem)

    report = Teleporter(model, problem.loss_fn, null_space="exact", steps=STEPS).teleport(
        problem.inputs, problem.targets
    )

    loss_after = batch_loss(problem)
    change = abs(loss_after - loss_before) / abs(loss_before)
    assert change <= LOSS_RTOL[dtype], f"relative loss change {change:.3e}"
    assert report.loss_before == loss_before
    assert abs(report.loss_after - loss_after) <= 1e-12 * abs(loss_after) + 1e-300
    assert report.loss_change <= LOSS_RTOL[dtype]
    assert not report.rolled_back

    # Per layer: [dW | db] X = 0, so every layer's pre-activations, hence every later input, stay put.
    inputs_after = linear_inputs(model, problem.inputs)
    for name, module in linears.items():
        before, after, x = weights_before[name], weight_and_bias(module), inputs_before[name]
        step = after - before
        scale = max(float(step.norm()), float(before.norm())) * float(x.norm())
        residual = float((step @ x.T).norm())
        assert residual <= ANNIHILATION_TOL[dtype] * scale, f"{name}: ||dW X|| = {residual:.3e}"
        torch.testing.assert_close(
            inputs_after[name], x, rtol=0, atol=ANNIHILATION_TOL[dtype] * 10 * float(x.abs().max())
        )

    # The layer report holds the exact null-space dimension of each layer's inputs.
    for layer in report.layers:
        x = inputs_before[layer.name.rsplit(".", 1)[0]]
        rank = reference_rank(x.T, dtype)
        assert (layer.input_dim, layer.null_dim, layer.samples) == (
            x.shape[1],
            x.shape[1] - rank,
            len(x),
        )


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
