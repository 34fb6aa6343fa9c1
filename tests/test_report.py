"""What a teleport reports: the derived figures, the forms it takes, and that a teleport's report
agrees with itself and with the model it leaves."""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_unchanged, batch_loss, filled_tanh_mlp, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.bases import NO_ROOM
from torch_teleport.report import LayerReport, TeleportReport
from torch_teleport.testing import mlp_problems


def report(**given) -> TeleportReport:
    figures = {
        "loss_before": 2.0,
        "loss_after": 2.5,
        "grad_norm_before": 1.0,
        "grad_norm_after": 3.0,
        "objective_before": 0.5,
        "objective_after": 4.5,
        "steps": 3,
        "stopped": "drift",
    }
    return TeleportReport(**{**figures, **given})


@given(before=st.floats(-1e6, 1e6).filter(lambda x: abs(x) > 1e-6), after=st.floats(-1e6, 1e6))
def test_the_loss_change_is_relative_to_the_loss_before(before, after):
    assert report(loss_before=before, loss_after=after).loss_change == abs(after - before) / abs(
        before
    )


def test_the_loss_change_from_a_zero_loss_is_taken_against_a_tiny_floor():
    assert report(loss_before=0.0, loss_after=0.0).loss_change == 0.0
    assert report(loss_before=0.0, loss_after=1e-31).loss_change == pytest.approx(0.1)


def test_the_summary_gives_steps_reason_loss_and_gradient_norm():
    kept = report(loss_before=1.2345678, loss_after=1.2345679)
    assert kept.summary() == "teleport: 3 steps (drift), loss 1.23457 -> 1.23457, grad norm 1 -> 3"
    undone = report(
        stopped="non_finite", rolled_back=True, grad_norm_before=0.123456, grad_norm_after=0.123456
    )
    assert (
        undone.summary()
        == "teleport: 3 steps (non_finite, rolled back), loss 2 -> 2.5, grad norm 0.1235 -> 0.1235"
    )


def test_the_report_as_a_dict_holds_every_field_in_plain_values():
    layer = LayerReport(
        "0.weight", input_dim=9, null_dim=3, samples=6, groups=1, gradient="structured"
    )
    full = report(
        layers=[layer],
        frozen={"2.bias": NO_ROOM},
        losses=[2.0, 2.1],
        grad_norms=[1.0, 2.0],
        step_sizes=[0.01],
        guard_loss_before=0.7,
        guard_loss_after=0.75,
    )
    as_dict = full.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["layers"] == [
        {
            "name": "0.weight",
            "input_dim": 9,
            "null_dim": 3,
            "samples": 6,
            "groups": 1,
            "gradient": "structured",
        }
    ]
    rebuilt = TeleportReport(
        **{**as_dict, "layers": [LayerReport(**layer) for layer in as_dict["layers"]]}
    )
    assert rebuilt == full


@given(mlp_problems())
def test_a_teleports_report_agrees_with_itself_and_the_model(problem):
    loss_before = batch_loss(problem)
    result = tt.Teleporter(problem.model, problem.loss_fn).teleport(problem.inputs, problem.targets)
    assert not result.rolled_back
    assert len(result.step_sizes) == result.steps and all(size > 0 for size in result.step_sizes)
    # One figure per point a step was tried from: each kept step's start, and the point where
    # it ended.
    tried_from = 0 if result.stopped == "no_room" else result.steps + (result.stopped != "steps")
    assert len(result.losses) == len(result.grad_norms) == tried_from
    if tried_from:
        assert (result.losses[0], result.grad_norms[0]) == (
            result.loss_before,
            result.grad_norm_before,
        )
    assert result.gain == result.grad_norm_after / result.grad_norm_before
    assert result.loss_before == pytest.approx(loss_before, rel=1e-12)
    assert result.loss_after == pytest.approx(batch_loss(problem), rel=1e-12)
    assert result.guard_loss_before is None and result.guard_loss_after is None
    # The parameters of every layer without room, and only those, are fixed; the report says why.
    full = {layer.name.rsplit(".", 1)[0] for layer in result.layers if layer.null_dim == 0}
    fixed = {name for name, _ in problem.model.named_parameters() if name.rsplit(".", 1)[0] in full}
    assert result.frozen == dict.fromkeys(fixed, NO_ROOM)
    assert 0 < result.basis_seconds < result.seconds


def test_a_rolled_back_report_gives_the_figures_before_as_those_after_and_keeps_its_steps():
    model, inputs, targets = filled_tanh_mlp()
    before = snapshot(model)
    # tau = 0.9 moves the loss by design; any change of it rolls the whole teleport back.
    limits = tt.Limits(drift=None, max_loss_change=1e-12)
    teleporter = tt.Teleporter(
        model, F.cross_entropy, null_space="svd", tau=0.9, lr=0.005, limits=limits
    )
    rolled = teleporter.teleport(inputs, targets)
    assert rolled.rolled_back and rolled.stopped == "loss_changed"
    assert rolled.steps == 8 and len(rolled.step_sizes) == 8 and len(rolled.losses) == 8
    assert (rolled.loss_after, rolled.grad_norm_after, rolled.objective_after) == (
        rolled.loss_before,
        rolled.grad_norm_before,
        rolled.objective_before,
    )
    assert_unchanged(model, before)


def test_the_gain_of_a_teleport_that_started_at_a_zero_gradient_is_nan():
    report = TeleportReport(1.0, 1.0, 0.0, 0.5, 0.0, 0.125, steps=1, stopped="steps")
    assert math.isnan(report.gain)
