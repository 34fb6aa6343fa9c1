"""The ascent loop alone, on climbs along a line: one number ``x`` whose objective, loss and
gradient norm each test chooses, so every step the loop takes, undoes or retries is visible.

Rates and lengths are powers of two, so ``x`` moves and comes back exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import guard_on
from hypothesis import given
from hypothesis import strategies as st

from torch_teleport.ascent import Ascent, _predicted, check_start
from torch_teleport.climb import Applied, AscentStopped, Climb, Step
from torch_teleport.limits import LANDED, Limits
from torch_teleport.line_search import BREACHES, LANDINGS, LineSearch, StepRule
from torch_teleport.objective import Evaluation


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


class Line(Climb):
    """A climb along ``x`` (from 0): each step moves ``x`` by the scale the loop gives.

    ``value``, ``loss`` and ``grad_norm`` map ``x`` to the figures of an
    evaluation. With ``measures_loss=False`` an evaluation keeps the loss at
    the start (as a closed form does) and only :meth:`final` measures it.
    ``stop_at`` raises :class:`AscentStopped` when asked for that step (1: the first).
    ``flags`` set the :class:`Climb` attributes (``blocked``, ``measures_loss``, ``retries``,
    ``may_grow``); ``way_back`` gives it a :meth:`Climb.snapshot`.
    """

    def __init__(
        self,
        value=lambda x: x,
        loss=lambda x: 1.0,
        grad_norm=lambda x: 1.0,
        *,
        norm=1.0,
        reference=1.0,
        size=None,
        stop_at=None,
        way_back=False,
        **flags,
    ) -> None:
        self.value_at, self.loss_at, self.grad_norm_at = value, loss, grad_norm
        self.norm, self.reference, self.size, self.stop_at = norm, reference, size, stop_at
        self.way_back = way_back
        for name, flag in flags.items():
            setattr(self, name, flag)
        self.x = 0.0
        self.scales: list[float] = []  # every scale a step was applied at, undone or not
        self.module_limits: list[float | None] = []
        self.steps_asked = self.finals = 0
        self.first = self.evaluate()

    def _at(self, loss: float) -> Evaluation:
        return Evaluation(
            scalar(self.value_at(self.x)), scalar(loss), scalar(self.grad_norm_at(self.x))
        )

    def evaluate(self) -> Evaluation:
        return self._at(self.loss_at(self.x if self.measures_loss else 0.0))

    def final(self) -> Evaluation:
        self.finals += 1
        return self._at(self.loss_at(self.x))

    def snapshot(self):
        if not self.way_back:
            return None
        saved = self.x

        def restore() -> None:
            self.x = saved

        return restore

    def step(self, evaluation: Evaluation) -> Step:
        self.steps_asked += 1
        if self.steps_asked == self.stop_at:
            raise AscentStopped("kkt")
        return LineStep(self)


class LineStep(Step):
    def __init__(self, line: Line) -> None:
        self.line, self.norm, self.reference = line, line.norm, line.reference

    def apply(self, scale: float, module_limit: float | None) -> Applied:
        line = self.line
        line.scales.append(scale)
        line.module_limits.append(module_limit)
        line.x += scale

        def undo() -> None:
            line.x -= scale

        def redo() -> None:
            line.x += scale

        return Applied(undo, line.size, redo)


def fixed(lr: float, ascend: bool = True) -> StepRule:
    return StepRule(lr, normalize=False, ascend=ascend)


def searched(**options) -> StepRule:
    return StepRule.of(LineSearch(**options), normalize=False, ascend=True)


def limits(**given) -> Limits:
    """No limit but those ``given`` (the gain limit off unless given)."""
    return Limits(**{"drift": None, "guard": None, "max_gain": None, "module_step": None, **given})


def run(
    climb: Climb, rule: StepRule, steps: int = 4, cap: float | None = None, guarded=None, **given
):
    """The outcome of an ascent along ``climb`` (``guarded``: a guard batch's :class:`Guard`)."""
    return Ascent(rule, limits(**given), steps, cap).run(climb, guarded)


# -- the step length -----------------------------------------------------------------------------


@given(exponent=st.integers(1, 10), steps=st.integers(1, 8))
def test_a_fixed_rate_takes_every_step_at_that_rate(exponent, steps):
    lr = 2.0**-exponent
    line = Line()
    outcome = run(line, fixed(lr), steps)
    assert (outcome.steps, outcome.stopped) == (steps, "steps")
    assert outcome.step_sizes == [lr] * steps and line.scales == [lr] * steps
    assert line.x == steps * lr and float(outcome.last.value) == line.x
    assert outcome.losses == [1.0] * steps and len(outcome.grad_norms) == steps


@given(
    growth=st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    max_length=st.sampled_from([1.0, 4.0, 16.0]),
    steps=st.integers(1, 8),
)
def test_the_search_grows_each_step_up_to_its_longest_only_when_the_climb_may_grow(
    growth, max_length, steps
):
    initial = 2.0**-6
    rule = searched(initial=initial, growth=growth, max_length=max_length)
    grown = run(Line(), rule, steps)
    expected = [initial * min(growth**k, max_length) for k in range(steps)]
    assert grown.step_sizes == pytest.approx(expected, rel=1e-12)
    kept = run(Line(may_grow=False), rule, steps)
    assert kept.step_sizes == [initial] * steps


def test_a_normalised_step_is_relative_to_the_reference_and_carries_the_module_limit():
    line = Line(norm=4.0, reference=2.0)
    Ascent(StepRule(0.125, normalize=True, ascend=True), limits(module_step=0.3), 1, None).run(line)
    assert line.scales == [0.125 * 2.0 / 4.0] and line.module_limits == [0.3]
    plain = Line(norm=4.0, reference=2.0)
    Ascent(StepRule(0.125, normalize=False, ascend=True), limits(module_step=0.3), 1, None).run(
        plain
    )
    assert plain.scales == [0.125] and plain.module_limits == [None]


def test_a_step_that_measures_its_own_size_reports_it():
    outcome = run(Line(size=0.7), fixed(0.125), 2)
    assert outcome.step_sizes == [0.7, 0.7]


# -- steps undone: drift and the line search -------------------------------------------------------


@given(retries=st.integers(0, 4), shrink=st.sampled_from([0.5, 0.25]))
def test_a_drift_no_shorter_step_keeps_ends_the_ascent_after_breaches_tries(retries, shrink):
    """Whatever the search's own retries (they are for steps that do not improve the objective)."""
    line = Line(loss=lambda x: 1.0 + x)  # any move breaks the drift limit
    outcome = run(line, searched(initial=0.5, shrink=shrink, retries=retries), drift=1e-9)
    assert len(line.scales) == BREACHES + 1 and line.scales[0] == 0.5
    assert all(0 < later <= earlier / 2 for earlier, later in zip(line.scales, line.scales[1:], strict=False))
    assert (outcome.steps, outcome.stopped, outcome.step_sizes) == (0, "drift", [])
    assert line.x == 0.0 and outcome.last is line.first
    assert outcome.losses == [1.0]  # the retries are tried from the same point


def test_a_drift_at_its_floor_ends_the_ascent_at_the_second_try():
    """A loss that moves by the same amount at any length (rounding): shortening does not help."""
    line = Line(loss=lambda x: 1.0 + (1e-3 if x else 0.0))
    outcome = run(line, searched(initial=0.5), drift=1e-4)
    assert len(line.scales) == 2 and (outcome.steps, outcome.stopped, line.x) == (0, "drift", 0.0)


def test_a_retry_that_keeps_the_drift_is_taken_and_the_steps_grow_no_more():
    """A step that breaks the drift by a little is retried at half its length; from then on the
    limit binds: the steps grow no more, each breach is retried shorter while shortening helps, and
    every point kept is within the limit."""
    line = Line(loss=lambda x: 1.0 + x)
    outcome = run(line, searched(initial=0.5, growth=2.0), 4, drift=0.4)  # 0.5 breaks it by 1.25x
    assert line.scales[:3] == [0.5, 0.25, 0.25] and outcome.step_sizes == [0.25, 0.125]
    assert (outcome.steps, outcome.stopped, line.x) == (2, "drift", 0.375)


def test_without_a_search_a_step_that_breaks_the_drift_ends_the_ascent_at_once():
    line = Line(loss=lambda x: 1.0 + x)
    outcome = run(line, fixed(0.5), drift=1e-9)
    assert line.scales == [0.5] and line.x == 0.0
    assert (outcome.steps, outcome.stopped) == (0, "drift")


def test_a_climb_that_cannot_retry_ends_at_the_first_rejection_and_never_grows():
    rule = searched(initial=0.5, max_length=4.0)
    rejected = Line(loss=lambda x: 1.0 + x, retries=False)
    assert run(rejected, rule, drift=1e-9).stopped == "drift" and rejected.scales == [0.5]
    assert run(Line(retries=False), rule, 3).step_sizes == [0.5] * 3


@pytest.mark.parametrize("ascend", [True, False])
def test_the_search_undoes_a_step_that_does_not_improve_the_objective(ascend):
    worse = Line(
        value=lambda x: -x
    )  # the step follows the rule's sign, the objective the other way
    outcome = run(worse, StepRule.of(LineSearch(initial=0.5, retries=2), False, ascend))
    assert (outcome.steps, outcome.stopped) == (0, "line_search")
    assert len(worse.scales) == 3 and worse.x == 0.0
    better = Line(value=lambda x: x)
    assert run(better, StepRule.of(LineSearch(initial=0.5), False, ascend), 2).stopped == "steps"
    # A fixed rate is the paper's plain ascent: it does not judge the objective.
    assert run(Line(value=lambda x: -x), fixed(0.5, ascend), 2).steps == 2


# -- where the ascent stops, keeping the point -----------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "cap", "given"), [("cap", 1.25, {}), ("gain", None, {"max_gain": 1.25})]
)
def test_the_cap_and_the_gain_stop_the_ascent_keeping_the_step_that_reached_them(
    reason, cap, given
):
    line = Line(grad_norm=lambda x: 1.0 + x)
    outcome = run(line, fixed(0.125), 8, cap=cap, **given)
    assert (outcome.steps, outcome.stopped) == (2, reason)
    assert line.x == 0.25 and float(outcome.last.grad_norm) == 1.25
    assert len(outcome.losses) == 3  # the point that reached the limit was looked at


@pytest.mark.parametrize(("cap", "given"), [(2.0, {}), (None, {"max_gain": 2.0})], ids=["cap", "gain"])
@pytest.mark.parametrize("rule", [fixed(1.0), searched(initial=1.0)], ids=["fixed", "searched"])
def test_a_step_past_the_cap_or_the_gain_is_shortened_to_land_just_below_it(cap, given, rule):
    """The gradient norm grows as exp(x): the first step (to e) passes the limit of 2, and the
    shortened retry lands within ``LANDED`` below it, where the ascent stops keeping it."""
    line = Line(grad_norm=math.exp)
    outcome = run(line, rule, 8, cap=cap, **given)
    assert (outcome.steps, outcome.stopped) == (1, "cap" if cap else "gain")
    assert line.scales[0] == 1.0 and len(line.scales) == 2 and 0 < line.scales[1] < 1.0
    assert 2.0 * (1 - LANDED) <= float(outcome.last.grad_norm) <= 2.0
    assert max(outcome.grad_norms) <= 2.0


def test_a_step_that_cannot_land_on_the_gain_is_undone_and_the_ascent_stops_below_it():
    """A gradient norm that jumps past the limit at any move: after ``LANDINGS`` shorter tries the
    crossing step is undone; a climb that cannot retry undoes it at once."""
    jumps = Line(grad_norm=lambda x: 1.0 if x == 0 else 10.0)
    outcome = run(jumps, fixed(1.0), 8, max_gain=2.0)
    assert len(jumps.scales) == 1 + LANDINGS and jumps.x == 0.0
    assert (outcome.steps, outcome.stopped, float(outcome.last.grad_norm)) == (0, "gain", 1.0)
    no_retry = Line(grad_norm=math.exp, retries=False)
    outcome = run(no_retry, fixed(1.0), 8, cap=2.0)
    assert no_retry.scales == [1.0] and no_retry.x == 0.0
    assert (outcome.steps, outcome.stopped) == (0, "cap")


@pytest.mark.parametrize("norm", [math.nan, math.inf])
def test_a_non_finite_step_ends_the_ascent_before_anything_moves(norm):
    line = Line(norm=norm)
    outcome = run(line, fixed(0.5))
    assert (outcome.steps, outcome.stopped) == (0, "non_finite")
    assert line.scales == [] and line.x == 0.0


def test_a_non_finite_objective_after_a_step_ends_the_ascent():
    line = Line(value=lambda x: x if x < 0.75 else math.nan)
    outcome = run(line, fixed(0.5))
    assert outcome.stopped == "non_finite" and line.scales == [0.5, 0.5]


@pytest.mark.parametrize("stop_at", [1, 3])
def test_a_climb_may_end_the_ascent_for_its_own_reason(stop_at):
    line = Line(stop_at=stop_at)
    outcome = run(line, fixed(0.5))
    assert outcome.stopped == "kkt" and outcome.steps == stop_at - 1
    assert line.scales == [0.5] * (stop_at - 1)


def test_a_blocked_climb_stops_before_any_step_and_never_measures_the_guard():
    line = Line(blocked="no_room")
    guard, probe = guard_on(lambda: -line.x)
    outcome = run(line, fixed(0.5), guarded=guard, guard=0.01)
    assert (outcome.steps, outcome.stopped) == (0, "no_room")
    assert line.steps_asked == 0 and probe.forwards == 0
    assert outcome.guard_before is None and outcome.guard_after is None


# -- climbs that do not measure their loss per step ------------------------------------------------


def test_a_climb_not_measuring_its_loss_is_checked_at_the_end_and_undone_from_the_last_step():
    line = Line(loss=lambda x: 1.0 + x, measures_loss=False)
    outcome = run(line, fixed(0.125), 4, drift=0.3)
    assert line.scales == [0.125] * 4  # every step taken before any check
    assert (outcome.steps, outcome.stopped, outcome.step_sizes) == (2, "drift", [0.125] * 2)
    assert line.x == 0.25 and float(outcome.last.loss) == 1.25
    assert line.finals == 3  # the end; 3 (broken), then 2 (kept), where it stands
    assert outcome.losses == [1.0, 1.0, 1.25]  # the kept steps' starts (unmeasured), then where it stands


@pytest.mark.parametrize("way_back", [False, True])
def test_the_end_check_measures_where_the_limit_is_predicted_to_break(way_back):
    """Eight steps of 1 along a drift of (distance / 3.8)^3: the second-order prediction from the end
    points at 3 (kept), the fit through 3 and the end at 3.8, nearer 4 (broken) than 3: two points
    measured where bisection measures three. A climb with a way back to the weights measured at 3
    goes back exactly; one without walks back and measures again."""
    line = Line(loss=lambda x: 1.0 + (x / 3.8) ** 3, measures_loss=False, way_back=way_back)
    outcome = run(line, fixed(1.0), 8, drift=1.0)
    assert line.scales == [1.0] * 8
    assert (outcome.steps, outcome.stopped, line.x) == (3, "drift", 3.0)
    assert line.finals == (3 if way_back else 4)  # the end, 3 and 4 (and 3 again)


def test_the_end_check_keeps_a_point_within_when_the_next_is_predicted_to_break():
    """Along a drift of (distance / 15.5)^2 the prediction from the end points at 15 (point 4, kept,
    the limit used up) and the fit through 4 and the end at 15.5, nearer 15 than 31 (point 5): the
    ascent ends at 4 without measuring 5, the end and 4 measured once each."""
    line = Line(loss=lambda x: 1.0 + (x / 15.5) ** 2, measures_loss=False)
    outcome = run(line, searched(initial=1.0, growth=2.0, max_length=64.0), 7, drift=1.0)
    assert line.scales == [2.0**k for k in range(7)]
    assert (outcome.steps, outcome.stopped, line.x) == (4, "drift", 15.0)
    assert line.finals == 2


def test_a_point_with_room_left_has_its_next_point_measured_even_where_the_fit_says_it_breaks():
    """A drift that grows by 0.2 a step to 0.8 at 4, then hits a wall: at 3 (0.6 used) the fit through
    3 and the end puts the crossing at 3.4, nearer 3 than 4, but a point with that much of the limit
    left is not where the climb ends: 4 is measured, found within (0.8), and kept."""
    line = Line(loss=lambda x: 1.0 + (0.2 * x if x <= 4 else 0.8 + 10.0 * (x - 4)), measures_loss=False)
    outcome = run(line, fixed(1.0), 8, drift=1.0)
    assert (outcome.steps, outcome.stopped, line.x) == (4, "drift", 4.0)


@pytest.mark.parametrize(
    ("reach", "low", "high", "expected"),
    [
        ([0.0, 1.0, 3.0, 7.0, 15.0], 0.0, 4.0, 3),  # second order: 1 at half the way, 7.5: nearest 7
        ([0.0, 1.0, 2.0, 3.0, 4.0], 0.5, 0.5, 2),  # no rise between them: the middle
        ([0.0, 1.0, 2.0, 3.0, 4.0], 1.5, 2.0, 2),  # past the limit at both: the middle
        ([0.0, 1.0, 2.0, 3.0, 4.0], 0.0, math.inf, 1),  # a non-finite share: the first point after
    ],
)
def test_the_predicted_point_is_strictly_between_the_two_measured(reach, low, high, expected):
    assert _predicted(reach, 0, len(reach) - 1, low, high) == expected


@pytest.mark.parametrize(
    ("low", "keeps_good", "expected"),
    [
        (0.9, True, 1),  # 1 at 1.05: nearer the point measured within than the next
        (0.9, False, 2),  # the same prediction, the point within not a candidate
        (0.3, True, 2),  # 1 at 1.49: nearer the next point, which is measured
    ],
)
def test_a_point_measured_within_is_the_answer_where_the_limit_is_predicted_to_break_right_after_it(
    low, keeps_good, expected
):
    assert _predicted([0.0, 1.0, 2.0, 3.0, 4.0], 1, 4, low, 20.0, keeps_good=keeps_good) == expected


def test_a_climb_that_does_not_measure_its_loss_keeps_every_step_within_the_limits():
    line = Line(loss=lambda x: 1.0 + x, measures_loss=False)
    outcome = run(line, fixed(0.125), 2, drift=0.3)
    assert (outcome.steps, outcome.stopped, line.finals) == (2, "steps", 1)
    assert float(outcome.last.loss) == 1.25


def test_a_closed_form_climb_past_a_limit_walks_back_and_goes_on_with_shorter_measured_steps():
    """Unmeasured steps of 0.25, 0.5, 1 take x to 1.75 past the drift's wall at x = 1 (loss 1 + 10 *
    (x - 1)): the end's check walks back to 0.75, then the broken step is retried at the length the
    linear model allows, each try measured at once, and the climb ends closer to the wall."""
    line = Line(loss=lambda x: 1.0 + 10.0 * max(x - 1.0, 0.0), measures_loss=False)
    rule = searched(initial=0.25, growth=2.0, max_length=4.0)
    outcome = run(line, rule, 8, drift=0.5)
    assert line.scales[:3] == [0.25, 0.5, 1.0] and outcome.step_sizes[:2] == [0.25, 0.5]
    assert outcome.steps > 2 and 0.75 < line.x <= 1.05 and float(outcome.last.loss) <= 1.5
    assert all(size < 1.0 for size in outcome.step_sizes[2:])  # shorter than the step that broke


def test_a_closed_form_climb_walked_back_to_a_point_with_its_limit_used_up_ends_there():
    """At x = 0.75 the loss has used 0.93 of the drift allowed (USED_UP 0.9): no step is tried from there."""
    line = Line(loss=lambda x: 1.0 + 0.62 * min(x, 0.75) + 10.0 * max(x - 0.75, 0.0), measures_loss=False)
    outcome = run(line, searched(initial=0.25, growth=2.0, max_length=4.0), 8, drift=0.5)
    assert (outcome.steps, outcome.stopped, line.x) == (2, "drift", 0.75)
    assert len(line.scales) == 8  # the eight unmeasured steps, no retry after the walk back


def test_without_a_search_a_closed_form_climb_past_a_limit_stops_at_the_last_good_point():
    line = Line(loss=lambda x: 1.0 + 10.0 * max(x - 1.0, 0.0), measures_loss=False)
    outcome = run(line, fixed(0.5), 4, drift=0.5)
    assert (outcome.steps, outcome.stopped, line.x) == (2, "drift", 1.0)


# -- going on after the drift --------------------------------------------------------------------


def continuing(climb: Climb):
    """A ``then`` for :meth:`Ascent.run` that hands over ``climb`` and counts the calls."""

    def then() -> Climb:
        then.calls += 1
        return climb

    then.calls = 0
    return then


def test_where_the_drift_ends_a_climb_the_next_one_takes_the_steps_left():
    """Steps of 0.125 along ``1 + x`` break the drift of 0.3 at the third: the second climb starts
    where the first stopped (value 0.25, loss 1.25) and takes the two steps left."""
    first, second = Line(loss=lambda x: 1.0 + x), Line(value=lambda x: 0.25 + x, loss=lambda x: 1.25)
    then = continuing(second)
    outcome = Ascent(fixed(0.125), limits(drift=0.3), 4, None).run(first, None, then)
    assert (then.calls, outcome.steps, outcome.stopped, outcome.continued_from) == (1, 4, "steps", 2)
    assert (first.x, second.x, float(outcome.last.value)) == (0.25, 0.25, 0.5)
    assert outcome.losses == [1.0, 1.125, 1.25, 1.25]  # the point the second starts from once


def test_the_next_climb_is_judged_from_the_first_ones_start():
    """The second climb moves the loss on from 1.25: its first step passes 1.3, the drift from the
    start of the teleport, and is undone."""
    first, second = Line(loss=lambda x: 1.0 + x), Line(value=lambda x: 0.25 + x, loss=lambda x: 1.25 + x)
    outcome = Ascent(fixed(0.125), limits(drift=0.3), 4, None).run(first, None, continuing(second))
    assert (outcome.steps, outcome.stopped, second.x, float(outcome.last.loss)) == (2, "drift", 0.0, 1.25)


@pytest.mark.parametrize(
    ("line", "rule", "given"),
    [
        (Line(loss=lambda x: 1.0 + 0.1 * x), fixed(0.125), {"drift": 0.3}),  # every step within the drift
        (Line(grad_norm=lambda x: 1.0 + x), fixed(0.125), {"max_gain": 1.2}),  # another limit ended it
        (Line(value=lambda x: -x), searched(), {"drift": 0.3}),  # no step improves the objective
    ],
)
def test_no_next_climb_is_asked_for_unless_the_drift_ended_the_first(line, rule, given):
    then = continuing(Line())
    Ascent(rule, limits(**given), 4, None).run(line, None, then)
    assert then.calls == 0


def test_without_a_next_climb_the_ascent_ends_on_the_drift():
    outcome = Ascent(fixed(0.125), limits(drift=0.3), 4, None).run(Line(loss=lambda x: 1.0 + x), None, lambda: None)
    assert (outcome.steps, outcome.stopped, outcome.continued_from) == (2, "drift", None)


def test_a_next_closed_form_climb_past_a_limit_walks_back_over_its_own_steps_only():
    """The second climb's unmeasured steps pass the wall at 0.5 of its own: the end's check walks back
    within them, keeping the first climb's two steps and their sizes."""
    first = Line(loss=lambda x: 1.0 + x)
    second = Line(value=lambda x: 0.25 + x, loss=lambda x: 1.25 + 10.0 * max(x - 0.25, 0.0), measures_loss=False)
    outcome = Ascent(fixed(0.125), limits(drift=0.3), 6, None).run(first, None, continuing(second))
    assert (outcome.steps, outcome.stopped, outcome.continued_from) == (4, "drift", 2)
    assert outcome.step_sizes == [0.125] * 4 and second.x == 0.25 and float(outcome.last.loss) == 1.25


# -- the guard ------------------------------------------------------------------------------------


def test_the_guard_is_measured_at_the_start_and_after_each_step_and_its_last_value_is_the_end():
    line = Line()
    guard, probe = guard_on(lambda: 2.0 - line.x)
    outcome = run(line, fixed(0.25), 3, guarded=guard, guard=0.01)
    assert outcome.steps == 3 and probe.forwards == 1 + 3
    assert (outcome.guard_before, outcome.guard_after) == (2.0, 2.0 - 0.75)


def test_after_an_undone_step_the_guard_is_measured_again_at_the_end():
    line = Line(loss=lambda x: 1.0 + max(x - 0.5, 0.0))  # the third step breaks the drift
    guard, probe = guard_on(lambda: 2.0 - line.x)
    outcome = run(line, fixed(0.25), 4, guarded=guard, drift=1e-9, guard=0.01)
    assert (outcome.steps, outcome.stopped) == (2, "drift")
    assert (
        probe.forwards == 1 + 2 + 1
    )  # start, two kept steps, the end (the drift judged the third)
    assert outcome.guard_after == 2.0 - 0.5


def test_a_step_that_raises_the_guard_loss_is_undone():
    line = Line()
    guard, _ = guard_on(lambda: 2.0 + line.x)
    outcome = run(line, fixed(0.25), 4, guarded=guard, guard=0.01)
    assert (outcome.steps, outcome.stopped, line.x) == (0, "guard", 0.0)


def test_after_a_guard_breach_the_steps_grow_no_more():
    """The guard loss rises steeply past x = 1: the grown step of length 1 (to 1.75) breaks it and
    is retried shorter; the steps after it keep that length until the next breach or the end."""
    line = Line()
    guard, _ = guard_on(lambda: 2.0 + 100.0 * max(line.x - 1.0, 0.0))
    rule = searched(initial=0.25, growth=2.0, max_length=16.0)
    outcome = run(line, rule, 8, guarded=guard, guard=0.125)
    sizes = outcome.step_sizes
    assert sizes[:2] == [0.25, 0.5] and line.scales[2] == 1.0  # grown until the guard broke
    assert len(sizes) >= 4 and sizes[2] < 1.0 and set(sizes[2:]) == {sizes[2]}


# -- the start ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "loss"), [(math.nan, 1.0), (1.0, math.inf), (math.inf, 1.0)])
def test_a_non_finite_start_is_refused(value, loss):
    with pytest.raises(ValueError, match="on the teleport batch is not finite"):
        check_start(Evaluation(scalar(value), scalar(loss), scalar(1.0)))
    with pytest.raises(ValueError, match="not finite"):
        run(Line(value=lambda x: value, loss=lambda x: loss), fixed(0.5))


def test_an_objective_that_is_not_a_scalar_is_refused():
    evaluation = Evaluation(torch.ones(2, dtype=torch.float64), scalar(1.0), scalar(1.0))
    with pytest.raises(
        ValueError, match=r"the objective must return a scalar tensor, got shape \(2,\)"
    ):
        check_start(evaluation)
