"""The method interface: how a teleport moves along the level set."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import Replicas
from .inputs import batch_size, call_model
from .objective import Batch, Evaluation, LossFn, Objective
from .registry import Registry
from .report import TeleportReport

Evaluate = Callable[[Batch], Evaluation]


SEARCH_GROWTH = 2.0
"""The step-length search doubles the step after every accepted step..."""

SEARCH_SHRINK = 0.25
"""...and quarters it after a rejected one, which is undone and tried again..."""

SEARCH_RETRIES = 3
"""...at most this many times in a row before the ascent stops."""

SEARCH_MAX_LENGTH = 16.0
"""The search never goes beyond this multiple of the initial step (with the default initial
step, 8% of the moved weights' norm per step)."""


@dataclass(frozen=True)
class StepRule:
    """How far a step goes along a direction: the one rule every method shares.

    With ``normalize`` a direction of norm ``n`` is scaled to ``lr`` times a
    reference norm (the moved weights' norm, or 1 in a method's own
    coordinates); without it the step is ``lr`` times the direction (eq. 5).
    The sign follows the objective's direction. With ``search`` (no ``lr``
    given), ``lr`` is only the first step's length: :meth:`TeleportMethod.ascend`
    multiplies it by a ``length`` it adapts to what the limits accept.
    """

    lr: float
    normalize: bool
    ascend: bool
    search: bool = False

    def scale(self, direction_norm: float, reference_norm: float = 1.0, length: float = 1.0) -> float:
        """The signed multiplier of a direction of norm ``direction_norm``, at ``length`` times ``lr``."""
        size = self.lr * length * (reference_norm / direction_norm if self.normalize else 1.0)
        return size if self.ascend else -size


@dataclass(frozen=True)
class Limits:
    """What a teleport may not do; a step that does it is undone and the ascent stops there.

    ``drift``: relative change of the teleport-batch loss (``None``: unchecked).
    ``guard``: relative rise of the guard batch's loss, when a guard batch is given.
    ``max_gain``: the gradient norm may not pass this multiple of its starting value
    (the ascent stops when it does, keeping the step).
    """

    drift: float | None = None
    guard: float | None = None
    max_gain: float | None = None


@dataclass(frozen=True)
class MethodContext:
    """What a method works with: the model, its loss and objective, how to evaluate, the replicas,
    the step rule and the registry. Methods never call back into the facade that built them."""

    model: nn.Module
    loss_fn: LossFn
    objective: Objective
    evaluate: Evaluate
    replicas: Replicas
    step: StepRule
    registry: Registry
    limits: Limits = Limits()


class TeleportMethod(ABC):
    """Base class of teleport methods.

    A method is built once per :class:`~torch_teleport.Teleporter` from a
    :class:`MethodContext` and its own options, and runs on one batch at a
    time. The teleporter wraps every run: it checks the batch, keeps the
    model's modes and buffers, disables autocast and restores the
    parameters when the run raises or reports ``stopped="non_finite"``.
    """

    keeps_replicas_in_sync = False
    """Whether :meth:`run` reduces through ``context.replicas`` (required under data parallelism)."""

    honours_limits = True
    """Whether :meth:`run` goes through :meth:`ascend`, which enforces ``context.limits`` and the guard."""

    undoes_steps = False
    """Whether the ``step`` given to :meth:`ascend` returns its own undo (saving a copy of the weights)."""

    takes_basis_sample = False
    """Whether :meth:`run` builds its null space from ``batch.basis`` and the guard's inputs too."""

    retries_steps = False
    """Whether a step undone by :meth:`ascend` may be tried again at another length (the step
    keeps no state that the undo would leave stale): what the step-length search needs."""

    def moved_parameters(self, batch: Batch) -> list[nn.Parameter]:
        """The parameters a run may change (all trainable ones unless the method knows better):
        what the teleporter saves for a roll-back and :meth:`ascend` for undoing a step."""
        return list(batch.parameters)

    def default_drift(self) -> float | None:
        """The drift tolerance ``drift_tolerance="auto"`` stands for with this method (off by default)."""
        return None

    def __init__(self, context: MethodContext) -> None:
        self.context = context

    @abstractmethod
    def run(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        """Teleport on ``batch`` for at most ``steps`` steps, stopping at gradient norm ``cap``."""

    def start(
        self, batch: Batch, *, evaluate: Evaluate | None = None, **fields: Any
    ) -> tuple[Evaluation, TeleportReport]:
        """Evaluate the objective before any step and open the report with it (and ``fields``).

        ``evaluate`` is the method's own evaluation (the context's by default).
        A non-finite loss or objective here is bad input, not a failed step: it raises.
        """
        first = (evaluate or self.context.evaluate)(batch)
        if not (torch.isfinite(first.loss) and torch.isfinite(first.value)):
            raise ValueError(f"the loss or objective on the teleport batch is not finite (loss {float(first.loss)})")
        value = float(first.value.detach())
        report = TeleportReport(
            loss_before=float(first.loss),
            loss_after=float(first.loss),
            grad_norm_before=float(first.grad_norm),
            grad_norm_after=float(first.grad_norm),
            objective_before=value,
            objective_after=value,
            steps=0,
            stopped="steps",
            **fields,
        )
        return first, report

    def ascend(
        self,
        batch: Batch,
        first: Evaluation,
        report: TeleportReport,
        steps: int,
        cap: float | None,
        step: Callable[[Evaluation], bool],
        evaluate: Evaluate | None = None,
        final: Evaluate | None = None,
        deferred: bool = False,
        grow: bool = True,
    ) -> TeleportReport:
        """The loop every method shares: record, stop at a limit, step, and backtrack a bad step.

        ``step(evaluation, length)`` moves the parameters once, in place, by
        ``length`` times the step rule's step, and returns
        ``False`` when its update was not finite (nothing moved), else ``True``
        or, for methods with ``undoes_steps``, a callable that undoes the step
        (otherwise a copy of the moved parameters is kept to undo it). ``evaluate``
        (the context's by default) evaluates after each step, with a real
        forward pass for the loss. A step after which the batch loss drifted
        beyond ``limits.drift`` or the guard batch's loss rose beyond
        ``limits.guard`` is undone (``stopped="drift"`` or ``"guard"``); the
        ascent stops at the cap, at ``limits.max_gain`` times the starting
        gradient norm (``"gain"``) or after ``steps`` steps. ``final`` (default:
        the last evaluation) gives the figures of the end point.

        With ``deferred`` (a method whose ``evaluate`` measures no loss, and
        whose steps undo themselves), the limits are checked once, on the
        ``final`` evaluation; while they are broken the last step is undone
        and the end point measured again, back to the last good step.

        The step-length search (``step.search``, methods with ``retries_steps``)
        is a backtracking line search with growth: a step that breaks a limit
        or fails to improve the objective is undone and tried again at
        :data:`SEARCH_SHRINK` times the length (up to :data:`SEARCH_RETRIES`
        times in a row; then the ascent stops, ``"line_search"`` when the
        objective did not improve); an accepted step makes the next one
        :data:`SEARCH_GROWTH` times longer, up to :data:`SEARCH_MAX_LENGTH` (up to the
        first length without ``grow``: the method has no evidence that longer steps keep the
        data's loss).
        In deferred mode the search judges the objective only. The report's
        ``step_sizes`` are the accepted steps' rates.
        """
        evaluate = evaluate or self.context.evaluate
        limits = self.context.limits
        guard = _GuardLoss(self.context, batch) if batch.guard is not None else None
        if guard is not None:
            report.guard_loss_before = report.guard_loss_after = guard.loss()
        checked = limits.drift is not None or (guard is not None and limits.guard is not None)
        moved_params = self.moved_parameters(batch)

        def undo(taken: Callable[[], None] | bool, saved: list[Tensor] | None) -> None:
            """Undo a step: by its own undo, else from the copy (a step that moved nothing needs neither)."""
            if callable(taken):
                taken()
            elif saved is not None:
                with torch.no_grad():
                    for param, value in zip(moved_params, saved, strict=True):
                        param.copy_(value)

        undos: list = []
        evaluation = first
        moved = False
        guard_here = report.guard_loss_before  # the guard loss at the current point, when measured there
        search = self.context.step.search and self.retries_steps
        length, rejected = 1.0, 0
        while True:
            if report.steps >= steps:
                break
            if not rejected:  # at the start of each step (not again for a retry)
                report.losses.append(float(evaluation.loss))
                report.grad_norms.append(float(evaluation.grad_norm))
            if not torch.isfinite(evaluation.value):
                report.stopped = "non_finite"
                return report
            if cap is not None and float(evaluation.grad_norm) >= cap:
                report.stopped = "cap"
                break
            if limits.max_gain is not None and float(evaluation.grad_norm) >= limits.max_gain * report.grad_norm_before:
                report.stopped = "gain"
                break
            saved = [p.detach().clone() for p in moved_params] if checked and not self.undoes_steps else None
            taken = step(evaluation, length)
            if taken is False:
                report.stopped = "non_finite"
                return report
            report.steps += 1
            after = evaluate(batch)
            reason = None if deferred else self._limit_reached(after, report, guard)
            if reason is None and search and not self._improved(after, evaluation):
                reason = "line_search"
            if reason is not None:
                undo(taken, saved)
                report.steps -= 1
                guard_here = None  # (an undo restores the weights to rounding: measure again)
                if search and rejected < SEARCH_RETRIES:
                    rejected, length = rejected + 1, length * SEARCH_SHRINK
                    continue
                report.stopped = reason
                break
            if deferred:
                undos.append((taken, saved))
            report.step_sizes.append(self.context.step.lr * length)
            evaluation, moved, rejected = after, True, 0
            if search:
                length = min(length * SEARCH_GROWTH, SEARCH_MAX_LENGTH if grow else 1.0)
            if not deferred:
                guard_here = guard.last if guard is not None else None
        if final is not None and moved:
            evaluation = final(batch)
        if deferred and moved:
            reason = self._limit_reached(evaluation, report, guard)
            guard_here = guard.last if guard is not None else None
            while reason is not None and undos:
                undo(*undos.pop())
                report.steps -= 1
                report.step_sizes.pop()
                report.stopped = reason
                evaluation = final(batch)
                reason = self._limit_reached(evaluation, report, guard)
                guard_here = None  # (an undo restores the weights to rounding: measure again)
            moved = report.steps > 0
        report.loss_after = float(evaluation.loss)
        report.grad_norm_after = float(evaluation.grad_norm)
        report.objective_after = float(evaluation.value.detach())
        if guard is not None and moved:
            report.guard_loss_after = guard_here if guard_here is not None else guard.loss()
        if not torch.isfinite(evaluation.value):
            report.stopped = "non_finite"
        return report

    def _improved(self, after: Evaluation, before: Evaluation) -> bool:
        """Whether a step moved the objective the way the ascent goes."""
        new, old = float(after.value.detach()), float(before.value.detach())
        return new > old if self.context.step.ascend else new < old

    def _limit_reached(self, evaluation: Evaluation, report: TeleportReport, guard: _GuardLoss | None) -> str | None:
        """``"drift"`` or ``"guard"`` when the step just taken broke that limit; ``None`` otherwise."""
        limits = self.context.limits
        if guard is not None:
            guard.last = None
        loss = float(evaluation.loss)
        if limits.drift is not None and math.isfinite(loss):
            if abs(loss - report.loss_before) > limits.drift * max(abs(report.loss_before), 1e-30):
                return "drift"
        if guard is not None and limits.guard is not None:
            reference = guard.baseline if guard.baseline is not None else report.guard_loss_before
            if not guard.loss() - reference <= limits.guard * max(abs(reference), 1e-30):
                return "guard"
        return None


class _GuardLoss:
    """The loss on the guard batch (a no-grad forward; the global batch's under data parallelism)."""

    def __init__(self, context: MethodContext, batch: Batch) -> None:
        self.context, self.inputs, self.targets = context, *batch.guard
        self.baseline = batch.guard_baseline  # the guard loss a series of teleports started from
        self.last: float | None = None  # the latest value :meth:`loss` measured

    def loss(self) -> float:
        with torch.no_grad():
            loss = float(self.context.loss_fn(call_model(self.context.model, self.inputs), self.targets))
        self.last = self.context.replicas.mean(loss, batch_size(self.inputs))
        return self.last


def evaluate_objective(objective: Objective, replicas: Replicas) -> Evaluate:
    """The objective's evaluation with the loss detached and the gradient norm filled in
    (those of the global batch under data parallelism)."""

    def evaluate(batch: Batch) -> Evaluation:
        evaluation = objective.evaluate(batch)
        if replicas.size > 1:
            return replicas.combine(evaluation, batch)
        if evaluation.grad_norm is None:
            grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
            evaluation.grad_norm = torch.nn.utils.get_total_norm([g.detach() for g in grads if g is not None])
        evaluation.loss = evaluation.loss.detach()
        return evaluation

    return evaluate


def finite_positive(value: float, name: str) -> float:
    """``value`` as a float if it is a finite positive number; a clear error otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)
