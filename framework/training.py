"""Training with teleports: any ``torch.optim`` optimizer, teleports on a :class:`Schedule`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import Teleporter
from .objective import LossFn
from .report import TeleportReport
from .schedule import Schedule

StatePolicy = str | Callable[[torch.optim.Optimizer, list[TeleportReport]], None]


@dataclass
class StepResult:
    loss: float
    teleports: list[TeleportReport] = field(default_factory=list)


class TeleportTrainer:
    """A training loop step that teleports when the schedule says so.

    ``teleport_data`` yields ``(inputs, targets)`` teleport batches (a
    shuffled ``DataLoader`` gives the paper's random batches; it is cycled);
    without it the teleport uses the current training batch.
    ``optimizer_state`` says what happens to the optimizer's state after a
    teleport: ``"reset"`` (default: moments from the old point are stale),
    ``"keep"``, or a callable ``(optimizer, reports)``.
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
    ) -> None:
        if (teleporter is None) != (schedule is None):
            raise ValueError("give both a teleporter and a schedule, or neither")
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
        self.epoch = 0
        self.global_step = 0
        self._teleport_batches: Iterator | None = None

    def step(self, inputs: Tensor, targets: Tensor) -> StepResult:
        """Teleport if scheduled, then take one optimizer step on ``(inputs, targets)``."""
        inputs, targets = self._to_device(inputs, targets)
        reports: list[TeleportReport] = []
        plan = self.schedule.plan(epoch=self.epoch, step=self.global_step) if self.schedule else None
        if plan is not None:
            for _ in range(plan.batches):
                tele_inputs, tele_targets = self._teleport_batch(inputs, targets)
                reports.append(self.teleporter.teleport(tele_inputs, tele_targets, steps=plan.steps, cap=plan.cap))
            self._apply_state_policy(reports)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(inputs), targets)
        loss.backward()
        self.optimizer.step()
        self.global_step += 1
        return StepResult(float(loss.detach()), reports)

    def end_epoch(self) -> None:
        """Count the epoch and step the learning-rate scheduler, if any."""
        self.epoch += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def _teleport_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.teleport_data is None:
            return inputs, targets
        if self._teleport_batches is None:
            self._teleport_batches = iter(self.teleport_data)
        try:
            batch = next(self._teleport_batches)
        except StopIteration:
            self._teleport_batches = iter(self.teleport_data)
            batch = next(self._teleport_batches)
        return self._to_device(*batch)

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
        """The trainer's own counters and its schedule's state (model and optimizer save themselves)."""
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "schedule": self.schedule.state_dict() if self.schedule else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
