"""The ascent loop every method shares: step, check the limits, take a bad step back.

It knows no method. A :class:`~torch_teleport.climb.Climb` gives it
evaluations and the step at each point; the :class:`~torch_teleport.line_search.StepRule`
and :class:`~torch_teleport.line_search.LineSearch` say how long the step
is; the :class:`~torch_teleport.limits.LimitCheck` says whether a step may
stay. What happened comes back as an :class:`Outcome`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .climb import Applied, AscentStopped, Climb
from .limits import LANDED, Breach, Guard, LimitCheck, Limits
from .line_search import SearchState, StepRule
from .objective import Evaluation


@dataclass
class Outcome:
    """What one ascent did: where it started and ended, how many steps it kept and why it stopped.

    ``losses`` and ``grad_norms`` are the figures at the start of every step
    tried from a new point; ``step_sizes`` the rates of the steps kept;
    ``continued_from`` the step after which a second climb went on (``None``: one climb).
    """

    first: Evaluation
    last: Evaluation
    steps: int = 0
    stopped: str = "steps"
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    guard_before: float | None = None
    guard_after: float | None = None
    continued_from: int | None = None


@dataclass(frozen=True)
class _Within:
    """A point the end's check measured within the limits: its index, the way back to its weights
    (``None``: the climb has none), its evaluation and guard loss."""

    point: int
    restore: Callable[[], None] | None
    evaluation: Evaluation
    guard: float | None


def _walk(taken: list[Applied], at: int, target: int) -> int:
    """Move from the point after ``at`` of the ``taken`` steps to the point after ``target``."""
    for applied in reversed(taken[target:at]):
        applied.undo()
    for applied in taken[at:target]:
        applied.redo()
    return target


def check_start(first: Evaluation) -> None:
    """A non-finite loss or objective before any step is bad input, not a failed step: it raises."""
    if first.value.dim() != 0:
        raise ValueError(f"the objective must return a scalar tensor, got shape {tuple(first.value.shape)}")
    if not (torch.isfinite(first.loss) and torch.isfinite(first.value)):
        raise ValueError(f"the loss or objective on the teleport batch is not finite (loss {float(first.loss)})")


USED_UP = 0.9
"""A closed form's climb walked back to a point that has used this share of the limit its next step
broke ends there: what is left is too little for another step to be worth its measurements (nor,
where the fit predicts the next point breaks the limit, for measuring that point)."""


class Ascent:
    """At most ``steps`` steps along a climb, under one step rule (and its line search) and set of limits."""

    def __init__(self, rule: StepRule, limits: Limits, steps: int, cap: float | None) -> None:
        self.rule, self.limits, self.steps, self.cap = rule, limits, steps, cap
        self.module_limit = limits.module_step if rule.normalize else None

    def run(
        self, climb: Climb, guard: Guard | None = None, then: Callable[[], Climb | None] | None = None
    ) -> Outcome:
        """Climb until a limit, the cap, the step count or the climb itself ends the ascent. Where the
        drift limit ends it, ``then`` may give the climb to go on with from there
        (judged by the same limits, measured from the same start)."""
        check_start(climb.first)
        outcome = Outcome(climb.first, climb.first)
        if climb.blocked is not None:
            outcome.stopped = climb.blocked
            return outcome
        check = LimitCheck(self.limits, climb.first, guard, self.cap)
        outcome.guard_before = outcome.guard_after = check.guard_before
        try:
            self._stage(climb, check, outcome)
            if then is not None and outcome.stopped == "drift":  # (a step was undone: steps are left)
                more = then()
                if more is not None:
                    outcome.stopped, outcome.last = "steps", more.first
                    outcome.continued_from = outcome.steps
                    self._stage(more, check, outcome, recorded=True)
        except AscentStopped as stop:
            outcome.stopped = stop.reason
            return outcome
        if guard is not None and outcome.steps:
            outcome.guard_after = guard.last if guard.last is not None else guard.loss()
        if not torch.isfinite(outcome.last.value):
            outcome.stopped = "non_finite"
        return outcome

    def _stage(self, climb: Climb, check: LimitCheck, outcome: Outcome, recorded: bool = False) -> None:
        """The steps of one climb from ``outcome.last``, with its own step-length search (``recorded``:
        that point's figures are in the outcome already)."""
        search = SearchState(self.rule.search, may_grow=climb.may_grow, retries=climb.retries)
        start = check.shares(outcome.last)
        taken = self._climb(climb, check, search, outcome, recorded=recorded)
        if not climb.measures_loss and taken:
            broken = self._check_at_the_end(climb, check, taken, outcome, start)
            if broken is not None and self._retry_shorter(*broken, search, outcome, check):
                self._climb(climb, check, search, outcome, measure=True)

    def _climb(
        self,
        climb: Climb,
        check: LimitCheck,
        search: SearchState,
        outcome: Outcome,
        measure: bool = False,
        recorded: bool = False,
    ) -> list[Applied]:
        """The steps, each checked (or, for a climb that does not measure its loss, kept for the end;
        with ``measure`` such a climb measures every step's end point and checks it at once)."""
        taken: list[Applied] = []
        evaluation = outcome.last
        measured = climb.measures_loss or measure
        while outcome.steps < self.steps:
            if not (search.retrying or recorded):
                outcome.losses.append(float(evaluation.loss))
                outcome.grad_norms.append(float(evaluation.grad_norm))
            if not torch.isfinite(evaluation.value):
                raise AscentStopped("non_finite")
            reached = check.reached(evaluation)
            if reached is not None:
                outcome.stopped = reached
                break
            applied = self._take(climb.step(evaluation), search.length)
            after = climb.final() if measure else climb.evaluate()
            reason, retry = self._judge(after, evaluation, check, search, measured)
            if reason is not None:
                applied.undo()
                if check.guard is not None:
                    check.guard.last = None  # (an undo restores the weights to rounding: measure again)
                if retry:
                    continue
                outcome.stopped = reason
                break
            if not measured:  # (kept for the end's check; a measured step is final)
                taken.append(applied)
            outcome.steps += 1
            outcome.step_sizes.append(applied.size if applied.size is not None else self.rule.lr * search.length)
            outcome.last = evaluation = after
            search.accept()
            recorded = False
            del applied  # (a final step's update need not sit beside the next one's making)
        return taken

    def _judge(
        self, after: Evaluation, before: Evaluation, check: LimitCheck, search: SearchState, measured: bool
    ) -> tuple[str | None, bool]:
        """Why the step that led to ``after`` must be undone (``None``: it stays), and whether the
        search tries it again at another length: a broken limit, an objective that did not improve,
        or a gradient norm past the gain limit (or the cap), which the step is shortened to land on."""
        breach = check.broken(after) if measured else None
        if breach is not None:
            return breach.reason, search.breached(breach.excess, breach.reason)
        if search.active and not self._improved(after, before):
            return "line_search", search.reject()
        passed = check.passed(after)
        if passed is not None:
            reason, ceiling = passed
            return reason, search.land(float(before.grad_norm), float(after.grad_norm), ceiling, ceiling * (1 - LANDED))
        return None, False

    def _take(self, step, length: float) -> Applied:
        """Apply ``step`` at ``length`` times the rule's step (nothing moves for a zero direction)."""
        if not math.isfinite(step.norm):
            raise AscentStopped("non_finite")
        scale = self.rule.scale(step.norm, step.reference, length) if step.norm > 0 else 0.0
        return step.apply(scale, self.module_limit)

    def _check_at_the_end(
        self, climb: Climb, check: LimitCheck, taken: list[Applied], outcome: Outcome, start: dict[str, float]
    ) -> tuple[Breach, float] | None:
        """The limits on the measured end point. Where broken, the last point within them is found by a
        search over the steps taken (undone and taken again) that measures a few points rather than
        every one, each where the broken limit's share is predicted to reach 1 (:func:`_predicted`);
        ``start`` is the shares at the first. Returns the breach of the step after the point found and
        that step's size (``None``: the end point holds)."""
        outcome.last = climb.final()
        breach = check.broken(outcome.last)
        if breach is None:
            return None
        outcome.stopped = breach.reason
        reach = list(itertools.accumulate(outcome.step_sizes[len(outcome.step_sizes) - len(taken) :], initial=0.0))
        shares = {0: start, len(taken): check.shares(outcome.last)}
        within: _Within | None = None  # the last point measured within the limits
        good, broken, at = 0, len(taken), len(taken)  # point ``broken`` breaks a limit; we stand at ``at``
        while True:
            while broken - good > 1:
                low, high = shares[good][breach.reason], shares[broken][breach.reason]
                # A point measured within that the steps have brought to USED_UP of the limit ends the
                # climb (no retry goes on from it): the next point is not measured where the fit
                # predicts it breaks the limit, since the measurement would only confirm it.
                ends_here = good > 0 and low >= USED_UP and low > shares[0][breach.reason]
                middle = _predicted(reach, good, broken, low, high, keeps_good=ends_here)
                if middle == good:
                    break
                at = self._measure(climb, check, taken, at, middle, outcome)
                found = check.broken(outcome.last)
                shares[middle] = check.shares(outcome.last)
                if found is None:
                    guard = check.guard.last if check.guard is not None else None
                    within = _Within(middle, climb.snapshot(), outcome.last, guard)
                good, broken, breach = (middle, broken, breach) if found is None else (good, middle, found)
            if within is not None and within.point == good and (at == good or within.restore is not None):
                if at != good:  # exactly the weights measured there: no need to measure them again
                    within.restore()
                    outcome.last = within.evaluation
                    if check.guard is not None:
                        check.guard.last = within.guard
                break
            if at != good:
                at = self._measure(climb, check, taken, at, good, outcome)
            if good == 0 or (found := check.broken(outcome.last)) is None:
                break
            good, broken, breach = 0, good, found  # walked back to it, rounding put it over: search below it
        kept = outcome.steps - len(taken) + good  # (the steps of an earlier climb stay)
        size = outcome.step_sizes[kept]
        outcome.steps, outcome.step_sizes = kept, outcome.step_sizes[:kept]
        # The figures of the kept steps' starts, and of the point the broken step was tried from.
        outcome.losses[kept:] = [float(outcome.last.loss)]
        outcome.grad_norms[kept:] = [float(outcome.last.grad_norm)]
        return breach, size

    def _retry_shorter(
        self, breach: Breach, size: float, search: SearchState, outcome: Outcome, check: LimitCheck
    ) -> bool:
        """After the end's check walked back to the last good point: whether to go on from there with
        the broken step shortened (each step measured from then on). Not where the point has used
        :data:`USED_UP` of the broken limit already; the step is judged by its share of what was left."""
        used = check.used(outcome.last, breach.reason)
        if outcome.steps >= self.steps or not search.active or used >= USED_UP:
            return False
        if not search.breached((breach.excess - used) / (1 - used), breach.reason, length=size / self.rule.lr):
            return False
        outcome.stopped = "steps"
        return True

    @staticmethod
    def _measure(climb: Climb, check: LimitCheck, taken: list[Applied], at: int, target: int, outcome: Outcome) -> int:
        """Walk from the point after ``at`` steps to the one after ``target`` and measure it there."""
        _walk(taken, at, target)
        if check.guard is not None:
            check.guard.last = None  # (undone and redone steps restore the weights to rounding)
        outcome.last = climb.final()
        return target

    def _improved(self, after: Evaluation, before: Evaluation) -> bool:
        """Whether a step moved the objective the way the ascent goes."""
        new, old = float(after.value.detach()), float(before.value.detach())
        return new > old if self.rule.ascend else new < old


SMALLEST = 1e-30
"""Distances below this are taken as this one (a logarithm of zero is of no use)."""


def _predicted(
    reach: list[float], good: int, broken: int, low: float, high: float, keeps_good: bool = False
) -> int:
    """The point strictly between ``good`` and ``broken`` nearest (in log distance) to where a limit's
    share, ``low`` at the one and ``high`` at the other, is predicted to reach 1, as a power of the
    distance travelled (``reach``, in step sizes from the first point): fitted through both shares
    where the lower is not zero, else second order in the distance from ``good``. The middle point
    where the shares do not bracket 1. With ``keeps_good`` (``good`` is a point measured within the
    limits, not the start) ``good`` itself is a candidate: the answer where the prediction is nearer
    it than the point after it, whose measurement would then only confirm the breach."""
    near, far = reach[good], reach[broken]
    if not low < 1 < high:  # nothing to predict from (a start past a series' baseline): bisection
        return (good + broken) // 2
    if low > 0 and far > near > 0:
        crossing = near * (1 / low) ** (math.log(far / near) / math.log(high / low))
    else:
        crossing = near + (far - near) * math.sqrt((1 - low) / (high - low))
    crossing = max(crossing, SMALLEST)
    candidates = range(good if keeps_good else good + 1, broken)
    return min(candidates, key=lambda k: abs(math.log(max(reach[k], SMALLEST) / crossing)))
