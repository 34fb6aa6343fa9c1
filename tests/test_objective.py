"""What the objectives share: measurements, options, invariance with each, choosing them by name and
registering a third party's; ``test_objective_<name>.py`` test each built-in objective."""

from __future__ import annotations

import copy
import importlib.metadata
import types

import pytest
import torch
from conftest import leaky_mlp_problem
from hypothesis import given, settings
from torch import nn

import torch_teleport as tt
from torch_teleport.objectives.curvature import (
    Curvature,
    CurvatureUndefinedError,
    measure_curvature,
)
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.objectives.log_grad_norm import LogGradNorm
from torch_teleport.objectives.sharpness import Sharpness, measure_sharpness
from torch_teleport.plugin_manager import build_plugin_manager
from torch_teleport.registry import build_registry
from torch_teleport.testing import assert_teleport_invariant, mlp_problems

cross_entropy = nn.functional.cross_entropy


# -- measurements and options ------------------------------------------------------------------


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
        objective=tt.default_registry().get("objective", objective)(**options), uncovered="freeze", steps=3,
    )


# -- choosing objectives by name -------------------------------------------------------------------


def test_objectives_are_chosen_by_name_or_given_with_options_through_the_python_api():
    model, x, y = leaky_mlp_problem(0)
    tele = tt.Teleporter(
        model, cross_entropy, objective=Sharpness(radii=[0.2, 0.4], directions=3, seed=7, direction="ascend")
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
    model, x, y = leaky_mlp_problem(1)
    report = tt.Teleporter(
        model, cross_entropy, objective="weight_norm", registry=registry, steps=2, null_space="exact"
    ).teleport(x, y)
    assert report.objective_after < report.objective_before
    assert report.loss_change < 1e-10
