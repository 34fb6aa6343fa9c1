"""What a method hands the ascent loop: a climb (one teleport batch) and its steps (one point each).

A method knows how to move; the loop (:mod:`~torch_teleport.ascent`) knows
how far, when to stop and when to take a step back. They meet here: the
loop asks a :class:`Climb` for evaluations and for the :class:`Step` at the
current point, applies the step at the scale its step rule gives, and
undoes it through the :class:`Applied` record when a limit is broken.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from .objective import Evaluation
from .report import LayerReport


class AscentStopped(Exception):
    """Raised by a climb or a step to end the ascent for ``reason`` (a ``TeleportReport.stopped`` value).

    Nothing may have moved when it is raised, or the step must have undone itself: the ascent
    ends at the current point. ``"non_finite"`` ends it with a roll-back of the whole teleport.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _nothing() -> None:
    """The undo of a step that moved nothing."""


@dataclass(frozen=True)
class Applied:
    """A step taken: how to take it back (and, once taken back, to take it again), and its size when
    the step measures its own (else the rule's)."""

    undo: Callable[[], None] = _nothing
    size: float | None = None
    redo: Callable[[], None] = _nothing


class Step(ABC):
    """The direction of one method at one point, ready to be taken at any scale.

    ``norm`` is the direction's norm (a non-finite norm ends the teleport
    with a roll-back, before anything moves) and ``reference`` what a
    normalised step is relative to (the moved weights' norm, or 1 in a
    method's own coordinates). The loop multiplies the direction by
    ``scale = StepRule.scale(norm, reference, length)``.
    """

    norm: float
    reference: float = 1.0

    @abstractmethod
    def apply(self, scale: float, module_limit: float | None) -> Applied:
        """Move the parameters in place by ``scale`` times the direction; ``module_limit`` is the largest
        fraction of its own norm a module may move (``None``: unlimited; methods without modules ignore it)."""


class Climb(ABC):
    """One teleport batch as a method sees it: its first evaluation and a step at any point.

    ``blocked`` names why nothing can move at all (``"no_room"``): the loop
    then stops before it starts. ``measures_loss`` is false for a climb
    whose :meth:`evaluate` reports a loss it did not measure (a closed form
    that keeps the captured one): the loop then checks the limits once, on
    :meth:`final`, undoing steps from the last while they are broken.
    ``retries`` says whether a step undone by the loop may be taken again at
    another length (its direction keeps no state the undo would leave stale),
    ``may_grow`` whether steps longer than the first keep the data's loss.
    ``layers``, ``frozen``, ``basis_seconds``, ``batch_norm`` (which mode's loss
    of the batch is kept) and ``keeps_batch`` (whether every core space holds the
    batch's span; see :class:`~torch_teleport.TeleportReport`) go into the report.
    Subclasses set ``first`` (and what differs from these defaults) when built.
    """

    first: Evaluation
    blocked: str | None = None
    measures_loss = True
    retries = True
    may_grow = True
    layers: Sequence[LayerReport] = ()
    batch_norm: str | None = None
    keeps_batch: bool | None = None
    frozen: Mapping[str, str] = MappingProxyType({})
    basis_seconds = 0.0

    @abstractmethod
    def evaluate(self) -> Evaluation:
        """The objective at the current weights."""

    @abstractmethod
    def step(self, evaluation: Evaluation) -> Step:
        """The step at the point ``evaluation`` was taken at (raise :class:`AscentStopped` to end the ascent)."""

    def final(self) -> Evaluation:
        """The end point's evaluation with a measured loss (for climbs that do not measure it per step)."""
        return self.evaluate()

    def snapshot(self) -> Callable[[], None] | None:
        """A way back to the current weights exactly, or ``None`` (the default). Undone steps restore
        the weights to rounding only, so where the loop walks back to a point it measured it measures
        it again unless it holds such a way back."""
        return None
