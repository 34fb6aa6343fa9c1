"""What a teleport may not do: the options' checks, the method's defaults, the check the ascent
loop makes at every point (with exact binary figures, so each limit is tested at its edge), and
the gain limit held by whole teleports."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import guard_on
from hypothesis import given
from hypothesis import strategies as st

import torch_teleport as tt
from torch_teleport.limits import AUTO, LANDED, Breach, LimitCheck, Limits
from torch_teleport.objective import Evaluation
from torch_teleport.testing import conv_problems, mlp_problems

NONE = {"drift": None, "guard": None, "max_gain": None, "module_step": None}


def at(loss: float, grad_norm: float = 1.0) -> Evaluation:
    return Evaluation(
        torch.tensor(0.0), torch.tensor(loss, dtype=torch.float64), torch.tensor(grad_norm)
    )


# -- the options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("drift", 0.0, "drift must be a positive finite number, got 0.0"),
        ("drift", math.nan, "drift must be a positive finite number"),
        ("drift", "tight", "drift must be a positive finite number, got 'tight'"),
        ("guard", -0.01, "guard must be a positive finite number, got -0.01"),
        ("guard", math.inf, "guard must be a positive finite number"),
        ("module_step", 0, "module_step must be a positive finite number, got 0"),
        ("module_step", True, "module_step must be a positive finite number, got True"),
        (
            "max_gain",
            0.5,
            "max_gain is a multiple of the starting gradient norm and must be at least 1, got 0.5",
        ),
        ("max_gain", math.nan, "max_gain must be a positive finite number"),
        (
            "max_loss_change",
            -1e-3,
            "max_loss_change must be None or a non-negative number, got -0.001",
        ),
        (
            "max_loss_change",
            "1%",
            "max_loss_change must be None or a non-negative number, got '1%'",
        ),
    ],
)
def test_each_limit_is_checked_with_a_message_naming_it(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Limits(**{field: value})


def test_the_edges_of_each_limit_are_allowed():
    Limits(max_gain=1.0, max_loss_change=0.0, drift=1e-12, guard=1e-12, module_step=1e-12)
    Limits(**NONE, max_loss_change=None)


def test_the_default_limits():
    """The guard allows a rise of half a percent of the guard batch's loss; the gain, ten-fold."""
    assert Limits() == Limits(
        drift=AUTO, guard=0.005, max_gain=10.0, module_step=0.3, max_loss_change=None
    )


def test_auto_drift_takes_the_methods_default_and_a_given_drift_stays():
    assert Limits().drift == AUTO
    assert Limits().with_default_drift(1e-5).drift == 1e-5
    assert Limits().with_default_drift(None).drift is None
    assert Limits(drift=1e-3).with_default_drift(1e-5).drift == 1e-3
    assert Limits(drift=None).with_default_drift(1e-5).drift is None
    assert Limits(guard=0.5).with_default_drift(1e-5).guard == 0.5


def test_a_method_that_keeps_the_loss_its_own_way_keeps_only_the_roll_back():
    kept = Limits(
        drift=1e-3, guard=0.1, max_gain=2.0, module_step=0.1, max_loss_change=0.05
    ).kept_by_the_method()
    assert kept == Limits(**NONE, max_loss_change=0.05)


# -- where the ascent stops, keeping the point ---------------------------------------------------


@pytest.mark.parametrize(
    ("given", "cap", "reason"),
    [({"max_gain": 1.5}, None, "gain"), ({}, 3.0, "cap"), ({"max_gain": 4.0}, 3.0, "cap")],
)
def test_the_cap_and_the_gain_are_reached_within_landed_below_their_value(given, cap, reason):
    check = LimitCheck(Limits(**{**NONE, **given}), at(1.0, grad_norm=2.0), None, cap)
    assert check.reached(at(1.0, grad_norm=3.0 * (1 - LANDED) * (1 - 1e-4))) is None
    assert check.reached(at(1.0, grad_norm=3.0 * (1 - LANDED))) == reason
    assert check.reached(at(1.0, grad_norm=3.0)) == reason


@pytest.mark.parametrize(
    ("given", "cap", "passed"),
    [
        ({"max_gain": 1.5}, None, ("gain", 3.0)),
        ({}, 3.0, ("cap", 3.0)),
        ({"max_gain": 4.0}, 3.0, ("cap", 3.0)),
        ({"max_gain": 1.5}, 5.0, ("gain", 3.0)),
    ],
)
def test_a_point_past_the_lowest_gradient_norm_limit_has_passed_it(given, cap, passed):
    check = LimitCheck(Limits(**{**NONE, **given}), at(1.0, grad_norm=2.0), None, cap)
    assert check.passed(at(1.0, grad_norm=3.0)) is None  # on the limit is not past it
    assert check.passed(at(1.0, grad_norm=3.001)) == passed
    assert check.passed(at(1.0, grad_norm=1e9)) == passed  # the lowest of the two


def test_nothing_is_reached_without_a_cap_or_a_gain_limit():
    check = LimitCheck(Limits(**NONE), at(1.0, grad_norm=2.0), None)
    assert check.reached(at(1.0, grad_norm=1e30)) is None


# -- limits a step may break ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "broken"), [(2.25, False), (1.75, False), (2.25000001, True), (1.7499999, True)]
)
def test_the_drift_is_relative_to_the_starting_loss_either_way(loss, broken):
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125}), at(2.0), None)
    breach = check.broken(at(loss))
    assert (breach is not None) == broken
    if broken:  # the change seen over the 0.25 allowed
        assert breach == Breach("drift", pytest.approx(abs(loss - 2.0) / 0.25, rel=1e-12))


def test_a_zero_starting_loss_allows_no_drift():
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125}), at(0.0), None)
    assert check.broken(at(0.0)) is None and check.broken(at(1e-20)).reason == "drift"


@pytest.mark.parametrize("loss", [math.nan, math.inf])
def test_the_drift_does_not_judge_a_non_finite_loss(loss):
    """The loop's own non-finite check ends such a teleport with a roll-back, not a step back."""
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125}), at(2.0), None)
    assert check.broken(at(loss)) is None


def test_the_guard_is_measured_once_at_the_start_and_then_only_within_the_drift():
    value = [4.0]
    guard, probe = guard_on(lambda: value[0])
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125, "guard": 0.125}), at(2.0), guard)
    assert (check.guard_before, probe.forwards) == (4.0, 1)
    assert check.broken(at(3.0)).reason == "drift" and probe.forwards == 1 and guard.last is None
    value[0] = 4.5  # a rise of exactly the tolerance
    assert check.broken(at(2.0)) is None and probe.forwards == 2 and guard.last == 4.5
    value[0] = 5.5  # three times the rise allowed
    assert check.broken(at(2.0)) == Breach("guard", 3.0)


def test_a_nan_guard_loss_breaks_the_guard():
    value = [4.0]
    guard, _ = guard_on(lambda: value[0])
    check = LimitCheck(Limits(**{**NONE, "guard": 0.125}), at(2.0), guard)
    value[0] = math.nan
    assert check.broken(at(2.0)) == Breach("guard", math.inf)


def test_a_guard_baseline_replaces_the_starting_guard_loss():
    value = [4.0]
    guard, _ = guard_on(lambda: value[0], baseline=2.0)
    check = LimitCheck(Limits(**{**NONE, "guard": 0.125}), at(2.0), guard)
    assert check.guard_before == 4.0 and check.broken(at(2.0)).reason == "guard"  # 4 is far above 2
    value[0] = 2.25
    assert check.broken(at(2.0)) is None


def test_without_a_guard_tolerance_the_guard_is_measured_only_at_the_start():
    guard, probe = guard_on(lambda: 1e9)
    check = LimitCheck(Limits(**NONE), at(2.0), guard)
    assert check.broken(at(2.0)) is None and probe.forwards == 1


# -- the gain limit in whole teleports -----------------------------------------------------------

RATES = [
    {},  # the step-length search
    {"lr": 0.05},
    {"lr": 0.3},
    {"lr": 1.0, "normalize": False},
    {"lr": 30.0, "normalize": False},
]
"""Searched, normalised and plain rates, from steps that need many to reach the limit to steps
that pass it at once."""


@pytest.mark.filterwarnings("ignore:teleport cannot move")
@given(
    problem=st.one_of(mlp_problems(), conv_problems(max_batch=3)),
    max_gain=st.floats(1.5, 3.0),
    rate=st.sampled_from(RATES),
    steps=st.integers(4, 24),
)
def test_no_teleport_passes_the_gain_limit(problem, max_gain, rate, steps):
    """A step past the limit is shortened to land on it or undone: no point a teleport keeps or
    starts a step from has a gradient norm above ``max_gain`` times the starting one."""
    teleporter = tt.Teleporter(
        problem.model, problem.loss_fn, steps=steps, limits=Limits(max_gain=max_gain), **rate
    )
    report = teleporter.teleport(problem.inputs, problem.targets)
    ceiling = max_gain * report.grad_norm_before * (1 + 1e-6)
    assert report.grad_norm_after <= ceiling
    assert all(norm <= ceiling for norm in report.grad_norms)
