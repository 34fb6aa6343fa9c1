"""What a teleport may not do, and the one check of it that the ascent loop makes after every step.

Invariance on the teleport batch holds in exact arithmetic; in floating
point, weights that grow in the null space amplify rounding, and the batch
is not the training set. So every step is checked with a real loss:
*drift* of the teleport batch's loss and a rise of a *guard* batch's loss
undo the step; a *gain* of the gradient norm (or the caller's ``cap``)
ends the ascent keeping it; no normalised step moves a module by more
than ``module_step`` of its own norm. See docs/architecture.md, "Limits".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .distributed import Replicas
from .inputs import Inputs, batch_size, call_model
from .line_search import finite_positive
from .objective import Evaluation, LossFn

AUTO = "auto"
"""``Limits(drift=AUTO)``: the method's own default drift tolerance."""


@dataclass(frozen=True)
class Limits:
    """The limits of one teleport; ``None`` switches one off.

    ``drift``: largest relative change of the teleport-batch loss a step may
    make (``"auto"``: the method's default, the null-space method's is
    ``1e-5``, float32's invariance). ``guard``: largest relative rise of the
    guard batch's loss (with a guard batch). ``max_gain``: the ascent stops
    once the gradient norm reaches this multiple of its starting value.
    ``module_step``: no normalised step moves a module's parameters by more
    than this fraction of their norm at the teleport's start (a plain rate
    is not limited). ``max_loss_change``: roll the whole teleport back when
    the batch loss moved more than this (relative) in the end.
    """

    drift: float | str | None = AUTO
    guard: float | None = 0.005
    max_gain: float | None = 10.0
    module_step: float | None = 0.3
    max_loss_change: float | None = None

    def __post_init__(self) -> None:
        if self.drift != AUTO and self.drift is not None:
            finite_positive(self.drift, "drift")
        for name in ("guard", "module_step"):
            if getattr(self, name) is not None:
                finite_positive(getattr(self, name), name)
        if self.max_gain is not None and finite_positive(self.max_gain, "max_gain") < 1:
            raise ValueError(
                f"max_gain is a multiple of the starting gradient norm and must be at least 1, got {self.max_gain}"
            )
        if self.max_loss_change is not None and not (
            isinstance(self.max_loss_change, int | float) and self.max_loss_change >= 0
        ):
            raise ValueError(f"max_loss_change must be None or a non-negative number, got {self.max_loss_change!r}")

    def with_default_drift(self, drift: float | None) -> Limits:
        """These limits with ``drift="auto"`` replaced by ``drift`` (a method's default)."""
        return replace(self, drift=drift) if self.drift == AUTO else self

    def kept_by_the_method(self) -> Limits:
        """What applies to a method that keeps the loss its own way: only the roll-back of a whole teleport."""
        return Limits(drift=None, guard=None, max_gain=None, module_step=None, max_loss_change=self.max_loss_change)


class Guard:
    """The loss on a guard batch: a no-grad forward (the global batch's under data parallelism).

    ``baseline`` is the guard loss a series of teleports started from, when
    the caller gives one; ``last`` the latest value :meth:`loss` measured.
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, batch: tuple[Inputs, Tensor], replicas: Replicas,
        baseline: float | None = None,
    ) -> None:
        self.model, self.loss_fn, self.replicas = model, loss_fn, replicas
        self.inputs, self.targets = batch
        self.baseline = baseline
        self.last: float | None = None

    def loss(self) -> float:
        with torch.no_grad():
            loss = float(self.loss_fn(call_model(self.model, self.inputs), self.targets))
        self.last = self.replicas.mean(loss, batch_size(self.inputs))
        return self.last


@dataclass(frozen=True)
class Breach:
    """A limit a step broke: its ``reason`` and ``excess``, the change seen over the change allowed."""

    reason: str
    excess: float


LANDED = 1e-2
"""A gradient norm within this fraction below the gain limit (or the cap) has landed on it."""


class LimitCheck:
    """The limits of one teleport, held against its start: what the ascent loop asks after every step.

    Building it measures the guard loss at the start (``guard_before``).
    """

    def __init__(
        self, limits: Limits, first: Evaluation, guard: Guard | None, cap: float | None = None
    ) -> None:
        self.limits, self.guard, self.cap = limits, guard, cap
        self.loss_before, self.grad_norm_before = float(first.loss), float(first.grad_norm)
        self.guard_before = guard.loss() if guard is not None else None

    def ceilings(self) -> list[tuple[str, float]]:
        """The gradient-norm limits: the caller's cap and ``max_gain`` times the starting norm."""
        found = [("cap", self.cap)] if self.cap is not None else []
        if self.limits.max_gain is not None:
            found.append(("gain", self.limits.max_gain * self.grad_norm_before))
        return found

    def reached(self, evaluation: Evaluation) -> str | None:
        """``"cap"`` or ``"gain"`` when the gradient norm has landed on that limit (within
        :data:`LANDED` below it, or past it): the ascent stops at this point, keeping it."""
        grad_norm = float(evaluation.grad_norm)
        for reason, ceiling in self.ceilings():
            if grad_norm >= ceiling * (1 - LANDED):
                return reason
        return None

    def passed(self, evaluation: Evaluation) -> tuple[str, float] | None:
        """The lowest gradient-norm limit ``evaluation`` passed (its reason and value), else ``None``."""
        grad_norm = float(evaluation.grad_norm)
        passed = [(ceiling, reason) for reason, ceiling in self.ceilings() if grad_norm > ceiling]
        return None if not passed else min(passed)[::-1]

    def broken(self, evaluation: Evaluation) -> Breach | None:
        """The drift or guard limit the step that led to ``evaluation`` broke, else ``None``.

        The guard loss is measured only when the drift is within its limit (``guard.last`` says
        whether it was).
        """
        if self.guard is not None:
            self.guard.last = None
        for reason in ("drift", "guard"):
            used = self._used(evaluation, reason)
            if used is not None and not used <= 1:
                return Breach(reason, used if math.isfinite(used) else math.inf)
        return None

    def used(self, evaluation: Evaluation, reason: str) -> float:
        """The share of limit ``reason`` the change up to ``evaluation`` takes (0 where it is off or
        unmeasured); the guard's last measured loss is read, not measured again."""
        return self._used(evaluation, reason, measure=False) or 0.0

    def shares(self, evaluation: Evaluation) -> dict[str, float]:
        """:meth:`used` of the drift and the guard limits."""
        return {reason: self.used(evaluation, reason) for reason in ("drift", "guard")}

    def _used(self, evaluation: Evaluation, reason: str, measure: bool = True) -> float | None:
        if reason == "drift":
            loss, drift = float(evaluation.loss), self.limits.drift
            if drift is None or not math.isfinite(loss):
                return None
            return abs(loss - self.loss_before) / (drift * max(abs(self.loss_before), 1e-30))
        if self.guard is None or self.limits.guard is None:
            return None
        reference = self.guard.baseline if self.guard.baseline is not None else self.guard_before
        loss = self.guard.loss() if measure else self.guard.last
        if loss is None:
            return None
        rise = loss - reference
        return rise / (self.limits.guard * max(abs(reference), 1e-30)) if math.isfinite(rise) else math.inf
