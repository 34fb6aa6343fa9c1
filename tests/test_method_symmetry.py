"""Symmetry teleport: exact where its rank condition holds, measurably not where it fails, and its
ascent step equals a plain autograd implementation of the references' algorithm."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from torch_teleport import Teleporter
from torch_teleport.plugins.methods.symmetry import SymmetryMethod


def leaky_mlp(
    seed: int, widths: list[int], bias: bool, slope: float, dtype=torch.float64
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if i < len(widths) - 2:
                layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers).to(dtype)


def batch(seed: int, size: int, features: int, classes: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, features, generator=generator, dtype=dtype)
    return inputs, torch.randint(0, classes, (size,), generator=generator)


@st.composite
def problems(draw, rank_condition: bool):
    """A LeakyReLU MLP and a batch; with ``rank_condition`` every layer is at least as wide as the batch."""
    seed = draw(st.integers(0, 2**31 - 1))
    bias = draw(st.booleans())
    depth = draw(st.integers(2, 4))
    if rank_condition:
        size = draw(st.integers(1, 12))
        widths = draw(st.lists(st.integers(size, 24), min_size=depth, max_size=depth))
    else:
        widths = draw(st.lists(st.integers(3, 10), min_size=depth, max_size=depth))
        size = draw(st.integers(max(widths[:-1]) + 3, 40))
    slope = draw(st.sampled_from([0.1, 0.5]))
    classes = draw(st.integers(2, 5))
    model = leaky_mlp(seed, [*widths, classes], bias, slope)
    return model, *batch(seed + 1, size, widths[0], classes)


@given(problems(rank_condition=True))
def test_action_keeps_the_batch_loss_where_the_batch_is_no_wider_than_the_layers(problem):
    model, inputs, targets = problem
    outputs = model(inputs).detach()
    report = Teleporter(model, F.cross_entropy, method="symmetry", steps=4, lr=0.05).teleport(
        inputs, targets
    )
    assert report.steps == 4 and not report.rolled_back
    assert report.loss_change <= 1e-10, report.summary()
    torch.testing.assert_close(model(inputs).detach(), outputs, rtol=1e-9, atol=1e-9)
    assert report.grad_norm_after != report.grad_norm_before


@given(problems(rank_condition=False))
def test_action_moves_the_batch_loss_where_the_batch_is_wider_than_a_layer(problem):
    model, inputs, targets = problem
    report = Teleporter(model, F.cross_entropy, method="symmetry", steps=4, lr=0.05).teleport(
        inputs, targets
    )
    assert report.steps == 4
    # h^+ h is a projection, not the identity: the drift is many orders above float64 rounding.
    assert report.loss_change > 1e-7, report.summary()


def test_float32_invariance_within_a_stated_tolerance():
    model = leaky_mlp(3, [20, 32, 32, 5], True, 0.1, torch.float32)
    inputs, targets = batch(4, 16, 20, 5, torch.float32)
    report = Teleporter(model, F.cross_entropy, method="symmetry", steps=8, lr=0.05).teleport(
        inputs, targets
    )
    assert report.loss_change <= 1e-4, report.summary()
    assert report.grad_norm_after > report.grad_norm_before


def reference_step(model: nn.Sequential, inputs, targets, lr: float) -> list[torch.Tensor]:
    """One step of the references' algorithm, differentiated by autograd end to end.

    Weights ``[W | b]`` become functions of every pair's ``T``; the objective
    0.5 ||grad L||^2 is taken at the transformed weights (its inner gradient
    with respect to the weights as independent inputs, by ``torch.func.grad``),
    its gradient with respect to each ``T`` at ``T = 0`` by autograd (through
    the pseudo-inverses too), and the action applied with ``T = lr * gradient``.
    """
    linears = [m for m in model if isinstance(m, nn.Linear)]
    slopes = [m.negative_slope for m in model if isinstance(m, nn.LeakyReLU)]
    original = [torch.cat([m.weight, m.bias[:, None]], 1).detach() for m in linears]

    def act(group):
        weights = list(original)
        h = inputs.T
        for p, (t, slope) in enumerate(zip(group, slopes, strict=True)):
            columns = torch.cat([h, torch.ones_like(h[:1])])
            z = weights[p] @ columns
            eye = torch.eye(t.shape[0], dtype=t.dtype)
            target = F.leaky_relu((eye + t) @ F.leaky_relu(z, slope), 1 / slope)
            weights[p] = weights[p] + (target - z) @ torch.linalg.pinv(columns)
            upper = weights[p + 1]
            weights[p + 1] = torch.cat(
                [upper[:, :-1] @ torch.linalg.inv(eye + t), upper[:, -1:]], 1
            )
            h = F.leaky_relu(weights[p] @ columns, slope)
        return weights

    def forward(weights):
        h = inputs.T
        for p, weight in enumerate(weights):
            h = weight @ torch.cat([h, torch.ones_like(h[:1])])
            if p < len(slopes):
                h = F.leaky_relu(h, slopes[p])
        return h.T

    def objective(weights):
        grads = torch.func.grad(lambda ws: F.cross_entropy(forward(ws), targets))(weights)
        return 0.5 * sum(g.square().sum() for g in grads)

    group = [
        torch.zeros(m.out_features, m.out_features, dtype=inputs.dtype, requires_grad=True)
        for m in linears[:-1]
    ]
    ascent = torch.autograd.grad(objective(act(group)), group)
    return [w.detach() for w in act([lr * g for g in ascent])]


@pytest.mark.parametrize("seed", [0, 1])
def test_one_step_matches_an_autograd_implementation_of_the_references(seed):
    model = leaky_mlp(seed, [12, 16, 14, 3], True, 0.1)
    inputs, targets = batch(seed + 10, 10, 12, 3)
    expected = reference_step(model, inputs, targets, lr=0.3)
    Teleporter(
        model, F.cross_entropy, method="symmetry", steps=1, lr=0.3, normalize=False
    ).teleport(inputs, targets)
    moved = [
        torch.cat([m.weight, m.bias[:, None]], 1).detach()
        for m in model
        if isinstance(m, nn.Linear)
    ]
    for got, want in zip(moved, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_parameters_are_updated_in_place_and_the_model_left_as_found():
    model = leaky_mlp(5, [10, 12, 4], True, 0.1)
    model.train()
    inputs, targets = batch(6, 8, 10, 4)
    before = [(p, p.data_ptr()) for p in model.parameters()]
    report = Teleporter(model, F.cross_entropy, method="symmetry", steps=3).teleport(
        inputs, targets
    )
    assert [(p, p.data_ptr()) for p in model.parameters()] == before
    assert model.training and all(
        not m._forward_hooks and not m._forward_pre_hooks for m in model.modules()
    )
    assert report.frozen == {"3.bias": "the group action leaves the last layer's bias fixed"}
    assert len(report.losses) == len(report.grad_norms) == 3


def test_the_step_that_would_cross_the_cap_is_undone_and_the_ascent_stops_below_it():
    """Symmetry steps cannot be retried shorter (an undo leaves the inputs read after them
    stale), so the step that would pass the cap is undone rather than landed: the ascent keeps
    the last point below the cap, from which one more step passes it."""
    model = leaky_mlp(7, [10, 12, 12, 4], True, 0.1)
    inputs, targets = batch(8, 8, 10, 4)
    start = Teleporter(copy.deepcopy(model), F.cross_entropy, method="symmetry", steps=1).teleport(
        inputs, targets
    )
    cap = start.grad_norm_before * 1.5
    report = Teleporter(
        model, F.cross_entropy, method="symmetry", steps=200, lr=0.05, cap=cap
    ).teleport(inputs, targets)
    assert report.stopped == "cap" and 0 < report.steps < 200
    assert report.grad_norm_after < cap and all(norm < cap for norm in report.grad_norms)
    assert report.grad_norms[-1] == report.grad_norm_after  # the point it stopped at
    beyond = Teleporter(model, F.cross_entropy, method="symmetry", steps=1, lr=0.05).teleport(
        inputs, targets
    )
    assert beyond.grad_norm_before == pytest.approx(report.grad_norm_after, rel=1e-5)
    assert beyond.grad_norm_after > cap


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), "layer 1 is ReLU"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.1), nn.Linear(2, 2)),
            "layer 0 is Conv2d",
        ),
        (nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(0.0), nn.Linear(6, 2)), "not invertible"),
        (nn.Sequential(nn.Linear(4, 2)), "the action needs two"),
        (
            nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)),
            "layer 1 is Linear where LeakyReLU was expected",
        ),
        (nn.Linear(4, 2), "got Linear"),
    ],
)
def test_unsupported_architectures_are_refused_clearly(model, message):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((TypeError, ValueError), match=message):
        Teleporter(model, F.cross_entropy, method="symmetry")
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_frozen_layers_are_refused():
    model = leaky_mlp(0, [4, 6, 2], True, 0.1)
    model[1].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="1.bias has requires_grad=False"):
        Teleporter(model, F.cross_entropy, method="symmetry")


def test_it_is_the_registered_symmetry_method():
    model = leaky_mlp(0, [4, 6, 2], True, 0.1)
    assert isinstance(Teleporter(model, F.cross_entropy, method="symmetry").method, SymmetryMethod)
