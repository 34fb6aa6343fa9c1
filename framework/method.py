"""The method interface: how a teleport moves along the level set."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .objective import Batch, Evaluation
from .report import TeleportReport

if TYPE_CHECKING:
    from .engine import Teleporter

Evaluate = Callable[[Batch], Evaluation]


class TeleportMethod(ABC):
    """Base class of teleport methods.

    A method is built once per :class:`~torch_teleport.Teleporter` (it reads
    the model, loss, objective, ``lr``, ``steps`` and options from it) and
    runs on one batch at a time. The teleporter wraps every run: it checks
    the batch, keeps the model's modes and buffers, disables autocast and
    restores the parameters when the run raises or reports
    ``stopped="non_finite"``.
    """

    keeps_replicas_in_sync = False
    """Whether :meth:`run` reduces through ``teleporter.replicas`` (required under data parallelism)."""

    def __init__(self, teleporter: Teleporter) -> None:
        self.teleporter = teleporter

    @abstractmethod
    def run(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        """Teleport on ``batch`` for at most ``steps`` steps, stopping at gradient norm ``cap``."""

    def start(
        self, batch: Batch, *, evaluate: Evaluate | None = None, **fields: Any
    ) -> tuple[Evaluation, TeleportReport]:
        """Evaluate the objective before any step and open the report with it (and ``fields``).

        ``evaluate`` is the method's own evaluation (the teleporter's by default).
        A non-finite loss or objective here is bad input, not a failed step: it raises.
        """
        first = (evaluate or self.teleporter.evaluate)(batch)
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
    ) -> TeleportReport:
        """The loop every method shares: record, stop on a non-finite value or the cap, step.

        ``step(evaluation)`` moves the parameters once, in place, and returns
        ``False`` when its update was not finite (nothing moved). ``evaluate``
        (the teleporter's by default) evaluates before each step; the report
        ends with one more evaluation at the final point, by ``final`` (a real
        forward pass; ``evaluate`` by default).
        """
        evaluate = evaluate or self.teleporter.evaluate
        evaluation = first
        for index in range(steps):
            if index:
                evaluation = evaluate(batch)
            report.losses.append(float(evaluation.loss))
            report.grad_norms.append(float(evaluation.grad_norm))
            if not torch.isfinite(evaluation.value):
                report.stopped = "non_finite"
                return report
            if cap is not None and float(evaluation.grad_norm) >= cap:
                report.stopped = "cap"
                break
            if not step(evaluation):
                report.stopped = "non_finite"
                return report
            report.steps += 1
        final = (final or evaluate)(batch)
        report.loss_after = float(final.loss)
        report.grad_norm_after = float(final.grad_norm)
        report.objective_after = float(final.value.detach())
        if not torch.isfinite(final.value):
            report.stopped = "non_finite"
        return report
