"""How long a step is: the step rule every method shares, and the step-length search.

:class:`StepRule` turns a direction into a step (normalised or a plain
rate, the objective's sign); :class:`LineSearch` adapts the length of the
next step to what the last one did. The ascent loop (:mod:`~torch_teleport.ascent`)
uses both and knows no method.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

INITIAL_LR = 0.005
"""The step-length search's first step: half a percent of the moved weights' norm (normalised)."""


def finite_positive(value: object, name: str) -> float:
    """``value`` as a float if it is a finite positive number; a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LineSearch:
    """A line search with growth along each step's direction.

    An accepted step makes the next one ``growth`` times longer, up to
    ``max_length`` times the first (up to the first length where the climb
    has no evidence that longer steps keep the data's loss). A step that
    fails to improve the objective is undone and tried again at ``shrink``
    times its length, at most ``retries`` times in a row. A step that breaks
    a limit (drift, guard) is undone and tried again at the length a linear
    model of the limit's change says it allows, with a margin (a step along
    a null space moves the guard's loss, and the batch's by rounding, in
    proportion to its length); once a limit binds, steps grow no more. A
    breach ends the ascent where shortening stopped helping (the excess of the
    same limit fell by less than :data:`SHORTENING_HELPS` since its last try:
    the batch's loss at its rounding floor, a guard already at its limit) or after
    :data:`BREACHES` tries in a row, rather than spending attempts on ever
    shorter steps.
    """

    initial: float = INITIAL_LR
    growth: float = 2.0
    shrink: float = 0.25
    retries: int = 3
    max_length: float = 16.0
    """With the default initial step, 8% of the moved weights' norm per step."""

    def __post_init__(self) -> None:
        for name in ("initial", "growth", "shrink", "max_length"):
            finite_positive(getattr(self, name), name)
        if self.shrink >= 1 or self.growth < 1 or self.max_length < 1:
            raise ValueError(f"a line search needs shrink < 1, growth >= 1 and max_length >= 1, got {self}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a non-negative whole number, got {self.retries!r}")


BREACHES = 3
"""Tries in a row at one point that may break a limit before the ascent ends."""
SHORTENING_HELPS = 0.9
"""A breach is tried again only below this fraction of the last try's excess at the same point."""

LANDINGS = 4
"""Attempts at shortening a step that passed the gain limit (or the cap) so that it lands on it."""


class SearchState:
    """Where one teleport's search stands: the next step's ``length`` and the attempts at this point.

    Without a policy (a fixed rate) the length stays 1 and a step a limit rejects is not tried
    again; a climb that cannot retry (its steps keep state an undo would leave stale) never retries.
    Landing on the gain limit shortens a step whatever the policy, where the climb can retry.
    """

    def __init__(self, policy: LineSearch | None, *, may_grow: bool, retries: bool) -> None:
        self.policy = policy if retries else None
        self.active, self.can_retry = self.policy is not None, retries
        self.longest = policy.max_length if self.active and may_grow else 1.0
        self.length, self.rejected, self.landings, self.limit_bound = 1.0, 0, 0, False
        self.breaches = 0  # limits broken in a row at this point
        self.last_excess: dict[str, float] = {}  # the last excess of each limit broken at this point
        self.tried: list[tuple[float, float]] = []  # (length, log gradient norm) of steps past the limit

    @property
    def retrying(self) -> bool:
        """Whether the next step retries a rejected one at the same point."""
        return self.rejected > 0 or self.landings > 0

    def accept(self) -> None:
        landed = self.landings > 0
        self.rejected = self.landings = self.breaches = 0
        self.last_excess.clear()
        self.tried.clear()
        if self.active and not (self.limit_bound or landed):
            self.length = min(self.length * self.policy.growth, self.longest)

    def reject(self) -> bool:
        """Shorten the step after it failed to improve the objective; whether it is tried again."""
        if not self.active or self.rejected >= self.policy.retries:
            return False
        self.rejected, self.length = self.rejected + 1, self.length * self.policy.shrink
        return True

    def breached(self, excess: float, limit: str = "limit", length: float | None = None) -> bool:
        """Shorten the step after it broke ``limit`` by ``excess`` times what it allows; whether it is
        tried again (while shortening helps that limit: a first breach of another limit is news, not a
        floor; from then on the limits bind and the steps grow no more). ``length`` is the broken
        step's, where it was not the search's last (a step the end's check found broken)."""
        if length is not None:
            self.length = length
        helps = limit not in self.last_excess or excess < SHORTENING_HELPS * self.last_excess[limit]
        if not self.active or self.breaches >= BREACHES or not helps:
            return False
        factor = min(0.5, max(1 / 256, 0.8 / excess)) if math.isfinite(excess) else 1 / 256
        self.breaches, self.last_excess[limit] = self.breaches + 1, excess
        self.limit_bound, self.rejected, self.length = True, self.rejected + 1, self.length * factor
        return True

    def land(self, start: float, passed: float, ceiling: float, below: float) -> bool:
        """Shorten a step that took the gradient norm from ``start`` past ``ceiling`` (to ``passed``) so
        that it lands between ``below`` and ``ceiling``; whether to try.

        The log of the gradient norm is interpolated in the step's length: from the point and the
        shortest step past the limit first, then through the two last steps (a secant, kept inside
        what is known to fall short and to pass)."""
        if not self.can_retry or self.landings >= LANDINGS or not 0 < start < ceiling < passed:
            return False
        self.tried.append((self.length, math.log(passed)))
        target = math.log((ceiling * below) ** 0.5)
        shortest = min(length for length, _ in self.tried)
        points = [(0.0, math.log(start)), min(self.tried)] if len(self.tried) == 1 else self.tried[-2:]
        (a, fa), (b, fb) = points
        guess = a + (target - fa) * (b - a) / (fb - fa) if fb != fa else shortest / 2
        self.landings, self.length = self.landings + 1, guess if 0 < guess < shortest else shortest / 2
        return True


@dataclass(frozen=True)
class StepRule:
    """How far a step goes along a direction.

    With ``normalize`` a direction of norm ``n`` is scaled to ``lr`` times a
    reference norm (the moved weights' norm, or 1 in a method's own
    coordinates); without it the step is ``lr`` times the direction (eq. 5).
    The sign follows the objective's direction. With a ``search``, ``lr`` is
    only the first step's length: the search multiplies it by a ``length``
    it adapts to what the limits accept.
    """

    lr: float
    normalize: bool
    ascend: bool
    search: LineSearch | None = None

    @classmethod
    def of(cls, lr: float | LineSearch | None, normalize: bool, ascend: bool) -> StepRule:
        """The rule for a fixed rate ``lr``, or for a search (``None``: the default :class:`LineSearch`)."""
        search = (lr or LineSearch()) if lr is None or isinstance(lr, LineSearch) else None
        rate = search.initial if search is not None else finite_positive(lr, "lr")
        if normalize and rate > 1:
            raise ValueError(
                f"lr is relative to the weights' norm when normalize=True: {rate} would move them by more "
                "than their own size per step; use lr <= 1, or leave it out to search for it"
            )
        return cls(rate, bool(normalize), ascend, search)

    def scale(self, direction_norm: float, reference_norm: float = 1.0, length: float = 1.0) -> float:
        """The signed multiplier of a direction of norm ``direction_norm``, at ``length`` times ``lr``."""
        size = self.lr * length * (reference_norm / direction_norm if self.normalize else 1.0)
        return size if self.ascend else -size
