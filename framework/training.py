"""Training with teleports: any ``torch.optim`` optimizer, teleports on a :class:`Schedule`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import Teleporter
from .objective import LossFn
from .report import TeleportReport
from .schedule import Schedule
from .wrappers import check_shadows

StatePolicy = str | Callable[[torch.optim.Optimizer, list[TeleportReport]], None]

FAILURE_POLICIES = ("skip", "raise")


class TeleportFailedError(RuntimeError):
    """A teleport failed under ``on_teleport_failure="raise"``; the weights are those before it."""


@dataclass
class StepResult:
    """One training step: its loss, its teleports' reports and what went wrong in them."""

    loss: float
    teleports: list[TeleportReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class TeleportTrainer:
    """A training loop step that teleports when the schedule says so.

    ``teleport_data`` yields ``(inputs, targets)`` teleport batches (a
    shuffled ``DataLoader`` gives the paper's random batches; it is cycled);
    without it the teleport uses the current training batch.
    ``optimizer_state`` says what happens to the optimizer's state after a
    teleport: ``"reset"`` (default: moments from the old point are stale),
    ``"keep"``, or a callable ``(optimizer, reports)``; it is applied when at
    least one teleport of the event moved the weights.

    A teleport *fails* when it is rolled back (a non-finite value, or a loss
    change beyond the teleporter's ``max_loss_change``) or rejects its batch
    or its starting point (``ValueError``: empty or non-finite batch,
    non-finite loss). Either way no value of it reaches the weights.
    ``on_teleport_failure`` says what the run does next: ``"skip"`` (default)
    warns, lists the failure in :attr:`StepResult.failures` and trains on;
    ``"raise"`` raises :class:`TeleportFailedError`. Under data parallelism
    every rank sees the same failure, so all ranks skip or raise together.

    An optimizer that keeps its own copy of the weights (Lookahead, SAM)
    is refused, since it would undo teleports; ``shadow_policy`` is handed
    to :func:`~torch_teleport.wrappers.check_shadows`.

    When ``teleport_data`` has a ``generator`` (a shuffled ``DataLoader``),
    :meth:`state_dict` records where in its pass the trainer is, so a
    resumed run draws the same teleport batches.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        teleporter: Teleporter | None = None,
        schedule: Schedule | None = None,
        teleport_data: Iterable[tuple[Tensor, Tensor]] | None = None,
        lr_scheduler: Any | None = None,
        optimizer_state: StatePolicy = "reset",
        device: torch.device | str | None = None,
        on_teleport_failure: str = "skip",
        shadow_policy: str = "default",
    ) -> None:
        if on_teleport_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_teleport_failure must be one of {FAILURE_POLICIES}, got {on_teleport_failure!r}")
        if (teleporter is None) != (schedule is None):
            raise ValueError("give both a teleporter and a schedule, or neither")
        if teleporter is not None:
            check_shadows(optimizer, policy=shadow_policy)
        if not callable(optimizer_state) and optimizer_state not in ("reset", "keep"):
            raise ValueError(f"optimizer_state must be 'reset', 'keep' or a callable, got {optimizer_state!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.teleporter = teleporter
        self.schedule = schedule
        self.teleport_data = teleport_data
        self.lr_scheduler = lr_scheduler
        self.optimizer_state = optimizer_state
        self.device = device
        self.on_teleport_failure = on_teleport_failure
        self.epoch = 0
        self.global_step = 0
        self._teleport_batches: Iterator | None = None
        self._pass_start: Tensor | None = None  # teleport_data's generator state when the pass began
        self._drawn = 0  # teleport batches drawn in the current pass

    def step(self, inputs: Tensor, targets: Tensor) -> StepResult:
        """Teleport if scheduled, then take one optimizer step on ``(inputs, targets)``."""
        inputs, targets = self._to_device(inputs, targets)
        reports, failures = self.scheduled_teleports(inputs, targets)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.global_step += 1
        return StepResult(float(loss.detach()), reports, failures)

    def scheduled_teleports(self, inputs: Tensor, targets: Tensor) -> tuple[list[TeleportReport], list[str]]:
        """The teleports the schedule plans before the current step, with the failure and state policies.

        ``(inputs, targets)`` is the training batch, used when there is no
        ``teleport_data``. Returns the reports and the failure messages.
        Training loops of other frameworks call this before their step.
        """
        reports: list[TeleportReport] = []
        failures: list[str] = []
        plan = self.schedule.plan(epoch=self.epoch, step=self.global_step) if self.schedule else None
        if plan is None:
            return reports, failures
        for _ in range(plan.batches):
            tele_inputs, tele_targets = self._teleport_batch(inputs, targets)
            try:
                report = self.teleporter.teleport(tele_inputs, tele_targets, steps=plan.steps, cap=plan.cap)
            except ValueError as error:
                failures.append(self._failed(f"teleport rejected at step {self.global_step}: {error}", error))
                continue
            reports.append(report)
            if report.rolled_back:
                failures.append(self._failed(f"teleport at step {self.global_step} {report.summary()}"))
        if any(not report.rolled_back for report in reports):
            self._apply_state_policy(reports)
        return reports, failures

    def _failed(self, message: str, error: Exception | None = None) -> str:
        if self.on_teleport_failure == "raise":
            raise TeleportFailedError(message) from error
        warnings.warn(f"{message}; training goes on (on_teleport_failure='skip')", RuntimeWarning, stacklevel=4)
        return message

    def end_epoch(self) -> None:
        """Count the epoch and step the learning-rate scheduler, if any."""
        self.epoch += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _teleport_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.teleport_data is None:
            return inputs, targets
        if self._teleport_batches is None:
            self._start_teleport_pass()
        try:
            batch = next(self._teleport_batches)
        except StopIteration:
            self._start_teleport_pass()
            batch = next(self._teleport_batches)
        self._drawn += 1
        return self._to_device(*batch)

    def _start_teleport_pass(self, state: Tensor | None = None) -> None:
        generator = getattr(self.teleport_data, "generator", None)
        if generator is not None:
            if state is not None:
                generator.set_state(state)
            self._pass_start = generator.get_state()
        self._teleport_batches = iter(self.teleport_data)
        self._drawn = 0

    def _apply_state_policy(self, reports: list[TeleportReport]) -> None:
        if callable(self.optimizer_state):
            self.optimizer_state(self.optimizer, reports)
        elif self.optimizer_state == "reset":
            self.optimizer.state.clear()

    def _to_device(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.device is None:
            return inputs, targets
        return inputs.to(self.device), targets.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """The trainer's counters, its schedule's state and its place in the teleport data.

        Model, optimizer and learning-rate scheduler save themselves.
        """
        started = self._teleport_batches is not None and self._pass_start is not None
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "schedule": self.schedule.state_dict() if self.schedule else {},
            "teleport_pass": {"start": self._pass_start, "drawn": self._drawn} if started else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        place = state.get("teleport_pass")
        if place is not None and self.teleport_data is not None:
            self._start_teleport_pass(place["start"])
            for _ in range(int(place["drawn"])):  # replay the pass up to where it was
                next(self._teleport_batches)
            self._drawn = int(place["drawn"])
