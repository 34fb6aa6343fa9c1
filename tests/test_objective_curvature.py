"""The curvature objective: its gradient against finite differences, its definition against the
explicit layer-pair curve, where it is undefined, and teleports that ascend or descend it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_gradient_matches_finite_differences, leaky_mlp_problem
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.functional import cross_entropy

import torch_teleport as tt
from torch_teleport.objectives.curvature import (
    Curvature,
    CurvatureUndefinedError,
    curvature,
    measure_curvature,
)
from torch_teleport.testing import assert_teleport_invariant

INVERSES = {
    nn.LeakyReLU: lambda module, y: nn.functional.leaky_relu(y, 1 / module.negative_slope),
    nn.Tanh: lambda module, y: torch.atanh(y),
    nn.Sigmoid: lambda module, y: torch.logit(y),
}


ACTIVATIONS = {
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


@st.composite
def invertible_mlps(draw, dtype=torch.float64, max_batch=12):
    """MLPs on which curvature is defined: 2-3 Linear layers joined by invertible activations."""
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(2, 3))
    widths = draw(st.lists(st.integers(3, 12), min_size=depth, max_size=depth))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    bias = draw(st.booleans())
    batch = draw(st.integers(2, max_batch))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dims = [*widths, 3]
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        model = nn.Sequential(*layers).to(dtype)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    return tt.testing.Problem(model, inputs, targets, cross_entropy, seed)


@settings(max_examples=8)
@given(problem=invertible_mlps())
def test_curvature_gradient_matches_finite_differences(problem):
    objective = Curvature(generators=3, seed=problem.seed % 1000)
    assert_gradient_matches_finite_differences(objective, problem, problem.seed)


@settings(max_examples=6)
@given(problem=invertible_mlps(max_batch=6), generator_seed=st.integers(0, 1000))
def test_curvature_matches_the_curve_differentiated_by_autograd(problem, generator_seed):
    """kappa from the analytic derivatives equals kappa of the explicit curve gamma(t) (forward AD)."""
    model = problem.model
    linears = [m for m in model if isinstance(m, nn.Linear)]
    activations = [m for m in model if type(m) in INVERSES]
    inner, outer, activation = linears[-2], linears[-1], activations[-1]
    with torch.no_grad():
        h = problem.inputs.flatten(1)
        for linear, act in zip(linears[:-2], activations[:-1], strict=True):
            h = act(linear(h))
    h = h.T
    v = inner.weight.detach()
    if inner.bias is not None:
        h = torch.cat([h, torch.ones_like(h[:1])])
        v = torch.cat([v, inner.bias.detach()[:, None]], dim=1)
    # the documented draw: Gaussian from the seed, pair by pair, unit Frobenius norm
    draws = torch.Generator().manual_seed(generator_seed)
    ms = [torch.randn(1, n, n, generator=draws, dtype=torch.float64)[0] for n in (lin.out_features for lin in linears[:-1])]
    m = ms[-1] / torch.linalg.matrix_norm(ms[-1])
    s = activation(v @ h)
    h_pinv = torch.linalg.pinv(h)

    def curve(t):
        u_t = outer.weight.detach() @ torch.linalg.matrix_exp(-t * m)
        v_t = INVERSES[type(activation)](activation, torch.linalg.matrix_exp(t * m) @ s) @ h_pinv
        return torch.cat([u_t.flatten(), v_t.flatten()])

    t0 = torch.zeros((), dtype=torch.float64)
    g1 = torch.func.jacfwd(curve)(t0)
    g2 = torch.func.jacfwd(torch.func.jacfwd(curve))(t0)
    expected = torch.sqrt(g1.dot(g1) * g2.dot(g2) - g1.dot(g2) ** 2) / g1.norm() ** 3
    with torch.no_grad():
        measured = curvature(model, problem.inputs, generators=1, seed=generator_seed, pairs="last")
    torch.testing.assert_close(measured, expected, rtol=1e-7, atol=0)


@settings(max_examples=10)
@given(problem=invertible_mlps(max_batch=3))
def test_the_layer_pair_curve_keeps_the_output_when_the_batch_is_small(problem):
    """With h^+ h = I (batch no larger than the inner layer's inputs) gamma(t) is on the level set."""
    model = problem.model
    linears = [m for m in model if isinstance(m, nn.Linear)]
    inner, outer = linears[0], linears[1]
    activation = next(m for m in model if type(m) in INVERSES)
    x = problem.inputs.T
    if inner.bias is not None:
        x = torch.cat([x, torch.ones_like(x[:1])])
    v = torch.cat([inner.weight, inner.bias[:, None]], 1) if inner.bias is not None else inner.weight
    m = torch.randn(inner.out_features, inner.out_features, generator=torch.Generator().manual_seed(problem.seed), dtype=torch.float64)
    m = 0.1 * m / torch.linalg.matrix_norm(m)
    with torch.no_grad():
        before = model(problem.inputs)
        moved = copy.deepcopy(model)
        moved_linears = [mod for mod in moved if isinstance(mod, nn.Linear)]
        v_t = INVERSES[type(activation)](activation, torch.linalg.matrix_exp(m) @ activation(v @ x)) @ torch.linalg.pinv(x)
        moved_linears[0].weight.copy_(v_t[:, : inner.in_features])
        if inner.bias is not None:
            moved_linears[0].bias.copy_(v_t[:, -1])
        moved_linears[1].weight.copy_(outer.weight @ torch.linalg.matrix_exp(-m))
        torch.testing.assert_close(moved(problem.inputs), before, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), "ReLU is not invertible"),
        (nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.0), nn.Linear(5, 2)), "positive slope"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.1), nn.Flatten(), nn.Linear(2, 2)), "found Conv2d"),
        (nn.Sequential(nn.Linear(4, 2)), "at least two Linear layers"),
        (nn.Linear(4, 2), "nn.Sequential"),
    ],
)
def test_curvature_is_refused_where_it_is_undefined_and_the_model_is_untouched(model, message):
    x = torch.randn(5, 4) if not isinstance(model[0] if isinstance(model, nn.Sequential) else model, nn.Conv2d) else torch.randn(5, 1, 3, 3)
    y = torch.randint(0, 2, (5,))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(CurvatureUndefinedError, match=message):
        tt.Teleporter(model, cross_entropy, objective="curvature", uncovered="freeze").teleport(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@settings(max_examples=6)
@given(problem=invertible_mlps(max_batch=8), direction=st.sampled_from(["ascend", "descend"]))
def test_teleport_batch_loss_is_invariant_with_curvature(problem, direction):
    assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets,
        objective=Curvature(generators=3, direction=direction), steps=3,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascending_curvature_raises_measured_curvature(seed):
    model, x, y = leaky_mlp_problem(seed)
    before = measure_curvature(model, [x], seed=100)
    report = tt.Teleporter(
        model, cross_entropy, objective="curvature", steps=10, lr=0.05, null_space="exact"
    ).teleport(x, y)
    after = measure_curvature(model, [x], seed=100)
    assert report.objective_after > report.objective_before
    assert after > before * (1 + 1e-3), (before, after)
    assert report.loss_change < 1e-10
