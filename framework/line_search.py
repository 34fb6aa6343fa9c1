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
    """A backtracking line search with growth along each step's direction.

    A step that breaks a limit or fails to improve the objective is undone
    and tried again at ``shrink`` times its length, at most ``retries``
    times in a row (then the ascent stops); an accepted step makes the next
    one ``growth`` times longer, up to ``max_length`` times the first (up to
    the first length where the climb has no evidence that longer steps keep
    the data's loss).
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


class SearchState:
    """Where one teleport's search stands: the next step's ``length`` and the rejections in a row.

    Without a policy (a fixed rate, or a climb whose steps cannot be retried) the length stays 1
    and a rejected step is not tried again.
    """

    def __init__(self, policy: LineSearch | None, may_grow: bool) -> None:
        self.policy, self.active = policy, policy is not None
        self.longest = policy.max_length if policy is not None and may_grow else 1.0
        self.length, self.rejected = 1.0, 0

    @property
    def retrying(self) -> bool:
        """Whether the next step retries a rejected one at the same point."""
        return self.rejected > 0

    def accept(self) -> None:
        self.rejected = 0
        if self.active:
            self.length = min(self.length * self.policy.growth, self.longest)

    def reject(self) -> bool:
        """Shorten the step after a rejection; whether it is tried again."""
        if not self.active or self.rejected >= self.policy.retries:
            return False
        self.rejected, self.length = self.rejected + 1, self.length * self.policy.shrink
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
