"""The sharpness, curvature and log-gradient-norm objectives, and swapping objectives by name."""

from __future__ import annotations

import copy
import importlib.metadata
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torch_teleport as tt
from torch_teleport.objectives.curvature import (
    Curvature,
    CurvatureUndefinedError,
    curvature,
    measure_curvature,
)
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.objectives.log_grad_norm import LogGradNorm
from torch_teleport.objectives.sharpness import Sharpness, measure_sharpness, perturbed_loss
from torch_teleport.registry import build_plugin_manager, build_registry
from torch_teleport.testing import assert_teleport_invariant, mlp_problems

cross_entropy = nn.functional.cross_entropy
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


def _directional_check(objective: tt.Objective, problem, seed: int) -> None:
    """Central differences of the objective along random directions match autograd (float64)."""
    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]

    def value() -> torch.Tensor:
        batch = tt.Batch(model, problem.loss_fn, problem.inputs, problem.targets, params)
        return objective.evaluate(batch).value

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]
    generator = torch.Generator().manual_seed(seed)
    eps = 1e-6
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum(d.square().sum() for d in direction))
        direction = [d / norm for d in direction]
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
        values = []
        for step in (eps, -2 * eps, eps):
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.add_(step * d)
            values.append(float(value().detach()))
        plus, minus = values[:2]
        numeric = (plus - minus) / (2 * eps)
        scale = max(abs(analytic), abs(numeric), float(torch.sqrt(sum(g.square().sum() for g in grads))), 1e-12)
        assert abs(analytic - numeric) <= 1e-6 * scale, (analytic, numeric)


# -- gradients ------------------------------------------------------------------------------


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_sharpness_gradient_matches_finite_differences(problem):
    objective = Sharpness(radii=(0.05, 0.1), directions=2, seed=problem.seed % 1000)
    _directional_check(objective, problem, problem.seed)


@settings(max_examples=8)
@given(problem=invertible_mlps())
def test_curvature_gradient_matches_finite_differences(problem):
    _directional_check(Curvature(generators=3, seed=problem.seed % 1000), problem, problem.seed)


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_log_grad_norm_gradient_matches_finite_differences(problem):
    _directional_check(LogGradNorm(), problem, problem.seed)


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_log_grad_norm_is_the_log_of_the_gradient_norm(problem):
    batch = tt.Batch(problem.model, problem.loss_fn, problem.inputs, problem.targets, list(problem.model.parameters()))
    half_squared = GradNorm().evaluate(batch).value
    log_value = LogGradNorm().evaluate(batch).value
    torch.testing.assert_close(log_value, 0.5 * torch.log(2 * half_squared), rtol=1e-12, atol=1e-12)


# -- definitions ------------------------------------------------------------------------------


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


def test_sharpness_is_the_mean_over_radii_and_unit_gaussian_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    radii = (0.1, 0.3)
    generator = torch.Generator().manual_seed(11)
    params = dict(model.named_parameters())
    expected = []
    for _ in range(3):
        draws = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()}
        norm = torch.sqrt(sum(d.square().sum() for d in draws.values()))
        for r in radii:
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in moved.named_parameters():
                    p.add_(r * draws[n] / norm)
                expected.append(float(cross_entropy(moved(x), y)))
    with torch.no_grad():
        value = perturbed_loss(model, cross_entropy, x, y, radii=radii, directions=3, seed=11)
    assert float(value) == pytest.approx(sum(expected) / len(expected), rel=1e-12)


def test_measurements_are_deterministic_and_leave_the_model_as_found():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Dropout(0.5), nn.LeakyReLU(0.1), nn.Linear(8, 3))
    model.train()
    x = torch.randn(9, 6)
    y = torch.randint(0, 3, (9,))
    state = copy.deepcopy(model.state_dict())
    first = measure_sharpness(model, cross_entropy, [(x, y)], seed=3)
    assert first == measure_sharpness(model, cross_entropy, [(x, y)], seed=3)
    assert first != measure_sharpness(model, cross_entropy, [(x, y)], seed=4)
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CurvatureUndefinedError, match="Dropout"):
        measure_curvature(model, [x])


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


def test_bad_options_get_clear_errors():
    with pytest.raises(ValueError, match="radii"):
        Sharpness(radii=())
    with pytest.raises(ValueError, match="radii"):
        Sharpness(radii=(0.1, -1.0))
    with pytest.raises(ValueError, match="directions"):
        Sharpness(directions=0)
    with pytest.raises(ValueError, match="pairs"):
        Curvature(pairs="first")
    with pytest.raises(ValueError, match="generators"):
        Curvature(generators=0)
    with pytest.raises(ValueError, match="direction"):
        Sharpness(direction="sideways")


# -- teleporting with each objective ------------------------------------------------------------


@settings(max_examples=6)
@given(problem=mlp_problems(max_depth=3, max_width=24, max_batch=16))
@pytest.mark.parametrize(
    ("objective", "options"),
    [("sharpness", {"radii": [0.1, 0.2], "directions": 2}), ("log_grad_norm", {})],
)
def test_teleport_batch_loss_is_invariant_with_each_objective(problem, objective, options):
    assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets,
        objective=objective, objective_options=options, uncovered="freeze", steps=3,
    )


@settings(max_examples=6)
@given(problem=invertible_mlps(max_batch=8), direction=st.sampled_from(["ascend", "descend"]))
def test_teleport_batch_loss_is_invariant_with_curvature(problem, direction):
    assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets,
        objective="curvature", objective_options={"generators": 3, "direction": direction}, steps=3,
    )


def _direction_problem(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.LeakyReLU(0.1), nn.Linear(32, 24), nn.LeakyReLU(0.1), nn.Linear(24, 4))
    generator = torch.Generator().manual_seed(seed)
    return model.double(), torch.randn(10, 12, generator=generator, dtype=torch.float64), torch.randint(0, 4, (10,), generator=generator)


@pytest.mark.parametrize("seed", [0, 1])
def test_descending_sharpness_lowers_measured_sharpness(seed):
    model, x, y = _direction_problem(seed)
    radii = (0.5, 1.0, 1.5)
    # measured with directions the teleport never saw
    before = measure_sharpness(model, cross_entropy, [(x, y)], radii=radii, seed=100)
    tele = tt.Teleporter(model, cross_entropy, objective="sharpness", objective_options={"radii": radii, "directions": 4}, steps=10, lr=0.05, null_space="exact")
    report = tele.teleport(x, y)
    after = measure_sharpness(model, cross_entropy, [(x, y)], radii=radii, seed=100)
    assert report.objective_after < report.objective_before
    assert after < before - 1e-3, (before, after)
    assert report.loss_change < 1e-10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ascending_curvature_raises_measured_curvature(seed):
    model, x, y = _direction_problem(seed)
    before = measure_curvature(model, [x], seed=100)
    report = tt.Teleporter(
        model, cross_entropy, objective="curvature", steps=10, lr=0.05, null_space="exact"
    ).teleport(x, y)
    after = measure_curvature(model, [x], seed=100)
    assert report.objective_after > report.objective_before
    assert after > before * (1 + 1e-3), (before, after)
    assert report.loss_change < 1e-10


# -- choosing objectives by name -------------------------------------------------------------------


def test_objectives_are_chosen_by_name_with_options_through_the_python_api():
    model, x, y = _direction_problem(0)
    tele = tt.Teleporter(
        model, cross_entropy, objective="sharpness",
        objective_options={"radii": [0.2, 0.4], "directions": 3, "seed": 7, "direction": "ascend"},
    )
    assert isinstance(tele.objective, Sharpness)
    assert (tele.objective.radii, tele.objective.directions, tele.objective.seed) == ((0.2, 0.4), 3, 7)
    assert tele.objective.ascend
    report = tele.teleport(x, y)
    assert report.objective_after > report.objective_before
    assert isinstance(tt.Teleporter(model, cross_entropy, objective="curvature").objective, Curvature)
    assert isinstance(tt.Teleporter(model, cross_entropy, objective="log_grad_norm").objective, LogGradNorm)
    assert isinstance(tt.Teleporter(model, cross_entropy).objective, GradNorm)  # still the default
    with pytest.raises(tt.UnknownPluginError, match="curvature, grad_norm, log_grad_norm, sharpness"):
        tt.Teleporter(model, cross_entropy, objective="flatness")


class _WeightNorm(tt.Objective):
    """A third party's objective: half the squared weight norm, descended by default."""

    default_direction = "descend"

    def evaluate(self, batch):
        return tt.Evaluation(value=0.5 * sum(p.square().sum() for p in batch.parameters), loss=batch.loss())


def test_a_third_party_objective_registers_through_an_entry_point(monkeypatch):
    plugin = types.ModuleType("third_party_teleport_objectives")

    @tt.hookimpl
    def teleport_register_objectives(registry):
        registry.add_objective("weight_norm", _WeightNorm)

    plugin.teleport_register_objectives = teleport_register_objectives

    class EntryPoint:
        name = "third-party-objectives"
        group = "torch_teleport"
        value = "third_party_teleport_objectives"

        def load(self):
            return plugin

    class Distribution:
        entry_points = (EntryPoint(),)
        metadata = {"name": "third-party-objectives"}
        version = "1.2.3"

    monkeypatch.setattr(importlib.metadata, "distributions", lambda: (Distribution(),))
    registry = build_registry(build_plugin_manager())
    assert registry.get("objective", "weight_norm") is _WeightNorm
    entry = next(e for e in registry.entries() if e.kind == "objective" and e.name == "weight_norm")
    assert entry.origin == "third-party-objectives 1.2.3"
    assert {"sharpness", "curvature", "log_grad_norm", "grad_norm"} <= set(registry.names("objective"))
    model, x, y = _direction_problem(1)
    report = tt.Teleporter(
        model, cross_entropy, objective="weight_norm", registry=registry, steps=2, null_space="exact"
    ).teleport(x, y)
    assert report.objective_after < report.objective_before
    assert report.loss_change < 1e-10
