"""What a teleport may not do: the options' checks, the method's defaults, and the check the ascent
loop makes at every point (with exact binary figures, so each limit is tested at its edge)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import guard_on

from torch_teleport.limits import AUTO, LimitCheck, Limits
from torch_teleport.objective import Evaluation

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
def test_the_cap_and_the_gain_are_reached_at_their_value(given, cap, reason):
    check = LimitCheck(Limits(**{**NONE, **given}), at(1.0, grad_norm=2.0), None, cap)
    assert check.reached(at(1.0, grad_norm=2.9375)) is None
    assert check.reached(at(1.0, grad_norm=3.0)) == reason


def test_nothing_is_reached_without_a_cap_or_a_gain_limit():
    check = LimitCheck(Limits(**NONE), at(1.0, grad_norm=2.0), None)
    assert check.reached(at(1.0, grad_norm=1e30)) is None


# -- limits a step may break ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss", "broken"), [(2.25, False), (1.75, False), (2.25000001, True), (1.7499999, True)]
)
def test_the_drift_is_relative_to_the_starting_loss_either_way(loss, broken):
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125}), at(2.0), None)
    assert check.broken(at(loss)) == ("drift" if broken else None)


def test_a_zero_starting_loss_allows_no_drift():
    check = LimitCheck(Limits(**{**NONE, "drift": 0.125}), at(0.0), None)
    assert check.broken(at(0.0)) is None and check.broken(at(1e-20)) == "drift"


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
    assert check.broken(at(3.0)) == "drift" and probe.forwards == 1 and guard.last is None
    value[0] = 4.5  # a rise of exactly the tolerance
    assert check.broken(at(2.0)) is None and probe.forwards == 2 and guard.last == 4.5
    value[0] = 4.5000001
    assert check.broken(at(2.0)) == "guard"


def test_a_nan_guard_loss_breaks_the_guard():
    value = [4.0]
    guard, _ = guard_on(lambda: value[0])
    check = LimitCheck(Limits(**{**NONE, "guard": 0.125}), at(2.0), guard)
    value[0] = math.nan
    assert check.broken(at(2.0)) == "guard"


def test_a_guard_baseline_replaces_the_starting_guard_loss():
    value = [4.0]
    guard, _ = guard_on(lambda: value[0], baseline=2.0)
    check = LimitCheck(Limits(**{**NONE, "guard": 0.125}), at(2.0), guard)
    assert check.guard_before == 4.0 and check.broken(at(2.0)) == "guard"  # 4 is far above 2
    value[0] = 2.25
    assert check.broken(at(2.0)) is None


def test_without_a_guard_tolerance_the_guard_is_measured_only_at_the_start():
    guard, probe = guard_on(lambda: 1e9)
    check = LimitCheck(Limits(**NONE), at(2.0), guard)
    assert check.broken(at(2.0)) is None and probe.forwards == 1
