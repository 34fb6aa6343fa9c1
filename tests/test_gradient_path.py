"""The full gradient path against a dense reference, the custom autograd Functions it cannot
differentiate twice, and the climb that turns a path into steps (once per point, with a warning
when the first one is zero)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.autograd.function import once_differentiable as mark_once_differentiable
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.bases import NO_ROOM, build_bases
from torch_teleport.distributed import Replicas
from torch_teleport.gradient_path import (
    FullPath,
    ProjectedClimb,
    custom_functions,
    once_differentiable,
)
from torch_teleport.objective import Batch
from torch_teleport.update import MovedWeights, ProjectedStep, ProjectedUpdate

NO_DIRECTION = "teleport cannot move: the projected objective gradient is exactly zero"


def tanh_mlp(seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A float64 6-10-3 Tanh MLP and a batch of 4 (every layer has room), drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randint(0, 3, (4,), generator=generator)


def full_path(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """The full path of the batch, its exact bases and the moved weights, as the null-space method
    builds them."""
    mover = tt.Teleporter(model, F.cross_entropy, null_space="exact", gradient="full").mover
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = Batch(model, F.cross_entropy, inputs, targets, trainable)
    path = FullPath(mover.context, batch, mover.coverage)
    bases = build_bases(mover.coverage, path.captured_inputs(), {}, mover.null_space, Replicas())
    return mover, batch, path, bases, MovedWeights(mover.coverage.movable(), mover.module_of)


def null_projection(gradient: torch.Tensor, layer_inputs: torch.Tensor) -> torch.Tensor:
    """``[gW | gb]`` with the span of the layer's inputs (a 1 appended) removed, by a dense
    pseudo-inverse."""
    folded = torch.cat([layer_inputs, torch.ones_like(layer_inputs[:, :1])], 1)
    return gradient - gradient @ torch.linalg.pinv(folded) @ folded


@given(seed=st.integers(0, 2**31 - 1))
def test_the_full_paths_update_is_autograds_gradient_projected_onto_each_null_space(seed):
    model, inputs, targets = tanh_mlp(seed)
    mover, batch, path, bases, weights = full_path(model, inputs, targets)
    update = path.update(path.first, weights, bases)
    value = mover.context.objective.evaluate(batch).value
    grads = dict(
        zip(
            ["0.weight", "0.bias", "2.weight", "2.bias"],
            torch.autograd.grad(value, batch.parameters),
            strict=True,
        )
    )
    with torch.no_grad():
        layer_inputs = {"0": inputs, "2": torch.tanh(model[0](inputs))}
    moved = {}
    for layer, x in layer_inputs.items():
        gradient = torch.cat([grads[f"{layer}.weight"], grads[f"{layer}.bias"][:, None]], 1)
        expected = null_projection(gradient, x)
        got = torch.cat(
            [update.dense[f"{layer}.weight"], update.dense[f"{layer}.bias"][:, None]], 1
        )
        assert float((got - expected).norm()) <= 1e-10 * float(gradient.norm())
        moved[layer] = float(expected.norm()) / float(gradient.norm())
    # The first layer's gradient lies in the span of the data; the head's does not.
    assert moved["0"] < 1e-10 < 1e-3 < moved["2"]
    assert update.factored == []


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class OnceCube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @mark_once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class CubeByVjp(torch.autograd.Function):
    """Its backward is written as ``vjp`` (its ``backward`` is torch's own, which calls it)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def vjp(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x * x * grad


class Through(nn.Module):
    """Two Linear layers with a custom autograd Function between them."""

    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.first, self.second, self.function = nn.Linear(6, 12), nn.Linear(12, 3), function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.function.apply(self.first(x)))


def test_custom_functions_are_found_in_a_graph_and_a_once_differentiable_backward_is_told_apart():
    x = torch.randn(3, requires_grad=True)
    both = (OnceCube.apply(Cube.apply(x)) + torch.tanh(x)).sum()
    assert set(custom_functions(both)) == {Cube, OnceCube}
    assert custom_functions(torch.tanh(x).sum()) == []
    assert once_differentiable(OnceCube) and not once_differentiable(Cube)
    assert not once_differentiable(CubeByVjp)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(CubeByVjp.apply, (x,))  # it is differentiable twice


@pytest.mark.parametrize(("function", "warned"), [(OnceCube, True), (Cube, False)])
def test_the_full_path_warns_naming_a_function_it_cannot_differentiate_twice(function, warned):
    torch.manual_seed(0)
    model = Through(function).double()
    inputs, targets = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tt.Teleporter(model, F.cross_entropy, null_space="exact", gradient="full").teleport(
            inputs, targets
        )
    named = [str(w.message) for w in caught if "@once_differentiable" in str(w.message)]
    assert named == ([named[0]] if warned else []) and (
        not warned or named[0].startswith("OnceCube:")
    )


def test_the_climb_computes_the_step_once_per_point(monkeypatch):
    model, inputs, targets = tanh_mlp(0)
    _, _, path, bases, weights = full_path(model, inputs, targets)
    calls = []
    update = path.update
    monkeypatch.setattr(path, "update", lambda *args: calls.append(args[0]) or update(*args))
    climb = ProjectedClimb(path, bases, weights, {})
    step = climb.step(climb.first)
    assert climb.step(climb.first) is step and calls == [climb.first]
    step.apply(0.01, None)
    moved = climb.evaluate()
    assert climb.step(moved) is not step and calls == [climb.first, moved]


def test_a_teleport_computes_one_step_per_point_however_often_it_retries(monkeypatch):
    counts = {"updates": 0, "tries": 0}

    def counted(method, key):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return method(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(FullPath, "update", counted(FullPath.update, "updates"))
    monkeypatch.setattr(ProjectedStep, "apply", counted(ProjectedStep.apply, "tries"))
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    ).double()
    generator = torch.Generator().manual_seed(2)
    inputs, targets = (
        torch.randn(64, 8, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (64,)),
    )
    # tau = 0.99 leaves directions the batch uses: the drift limit rejects long steps, the
    # search retries.
    report = tt.Teleporter(
        model,
        F.cross_entropy,
        gradient="full",
        null_space="svd",
        tau=0.99,
        limits=tt.Limits(drift=1e-6),
    ).teleport(inputs, targets)
    assert counts["tries"] > counts["updates"] == len(report.losses) > 0


def test_a_first_step_of_zero_warns_naming_the_sites_with_room():
    """Only the first layer has room, and its whole gradient lies in the span of its inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    before = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    inputs, targets = (
        torch.randn(8, 30, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (8,)),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tt.Teleporter(model, F.cross_entropy, null_space="exact").teleport(inputs, targets)
    messages = [str(w.message) for w in caught if NO_DIRECTION in str(w.message)]
    assert len(messages) == 1 and "(0.weight)" in messages[0]
    assert report.steps == 0 and report.frozen == {
        "2.weight": NO_ROOM,
        "2.bias": NO_ROOM,
    }
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_zero_step_after_the_first_is_no_warning(monkeypatch):
    """A later step of zero is a point where the objective is stationary, not a model that
    cannot move."""
    model, inputs, targets = tanh_mlp(0)
    _, _, path, bases, weights = full_path(model, inputs, targets)
    climb = ProjectedClimb(path, bases, weights, {})
    climb.step(climb.first).apply(0.01, None)
    moved = climb.evaluate()
    zero = ProjectedUpdate({name: torch.zeros_like(p) for name, p in weights.params.items()}, [])
    monkeypatch.setattr(path, "update", lambda *args: zero)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert climb.step(moved).norm == 0


def test_a_moving_teleport_does_not_warn_of_a_zero_step():
    model, inputs, targets = tanh_mlp(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tt.Teleporter(model, F.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert report.steps > 0 and not [w for w in caught if NO_DIRECTION in str(w.message)]


def test_a_climb_without_room_is_blocked_and_one_with_room_reports_its_bases():
    model, inputs, targets = tanh_mlp(0)
    _, _, path, bases, weights = full_path(model, inputs, targets)
    climb = ProjectedClimb(path, bases, weights, {"frozen.weight": "no projector for its module"})
    assert climb.blocked is None and climb.may_grow == bases.saturated and climb.measures_loss
    assert (
        climb.frozen == {"frozen.weight": "no projector for its module"}
        and climb.layers == bases.layers
    )
    bases.of.clear()
    assert ProjectedClimb(path, bases, weights, {}).blocked == "no_room"


def zero_head_mlp(seed: int) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A float64 6-16-16-3 Tanh MLP whose classifier head starts at zero (as ViT's and MLP-Mixer's
    do), and a batch of 4: the objective is stationary on the level set there."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        nn.init.zeros_(model[4].weight)
        nn.init.zeros_(model[4].bias)
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    return model.double(), inputs, torch.randint(0, 3, (4,), generator=generator)


@given(seed=st.integers(0, 2**16))
def test_a_zero_head_climbs_off_its_stationary_start_keeping_the_batch_loss(seed):
    model, inputs, targets = zero_head_mlp(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot move" warning
        report = tt.Teleporter(model, F.cross_entropy).teleport(inputs, targets)
    assert report.steps > 0 and report.grad_norm_after > 1.001 * report.grad_norm_before
    assert abs(report.loss_after - report.loss_before) <= 1e-12 * report.loss_before
    assert model[4].weight.abs().sum() > 0


def test_the_stationary_start_probes_the_projected_hessian_and_leaves_the_weights_as_found():
    """The first step at a stationary start is P H d (full Hessian-vector product through autograd,
    projected) for the seeded null-space direction d, to the probe's first order."""
    model, inputs, targets = zero_head_mlp(0)
    _, batch, path, bases, weights = full_path(model, inputs, targets)
    before = {name: p.detach().clone() for name, p in weights.params.items()}
    climb = ProjectedClimb(path, bases, weights, {})
    step = climb.step(climb.first)
    assert step.norm > 0 and all(torch.equal(p, before[name]) for name, p in weights.params.items())

    generator = torch.Generator().manual_seed(0)  # the probe's direction, drawn as the climb draws it
    random = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in weights.params.items()}
    direction = path.finished(random, [], bases).dense
    params = list(weights.params.values())
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    objective = 0.5 * sum(g.square().sum() for g in grads)
    (first,) = [torch.autograd.grad(objective, params, create_graph=True)]
    along = sum((g * direction[n]).sum() for g, n in zip(first, weights.params, strict=True))
    hessian = torch.autograd.grad(along, params)
    expected = path.finished({n: h.detach() for n, h in zip(weights.params, hessian, strict=True)}, [], bases).dense
    got = step.update.dense
    dot = sum((got[n] * expected[n]).sum() for n in expected)
    norms = step.norm * math.sqrt(sum(float(expected[n].square().sum()) for n in expected))
    assert float(dot) / norms > 0.999


@pytest.mark.parametrize("gradient", ["full", "structured"])
def test_the_first_evaluation_runs_after_the_bases(monkeypatch, gradient):
    """A path captures the batch's inputs when built (one no-grad forward) and evaluates nothing until
    its first evaluation is asked for, which the climb does once the bases exist: what an evaluation
    holds (the gradient, output gradients, tangents) never sits beside a basis's decomposition."""
    model, inputs, targets = tanh_mlp(0)
    events: list[str] = []
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    real = tt.bases.build_bases

    def recorded(*args, **kwargs):
        events.append("bases")
        return real(*args, **kwargs)

    monkeypatch.setattr("torch_teleport.plugins.methods.null_space.build_bases", recorded)
    teleporter = tt.Teleporter(model, F.cross_entropy, null_space="exact", gradient=gradient, steps=1)
    report = teleporter.teleport(inputs, targets)
    assert report.steps == 1 and {layer.gradient for layer in report.layers} == {gradient}
    assert events[:2] == ["forward", "bases"] and "forward" in events[2:]
