"""The schedule interface: when to teleport during training, and how much."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .report import TeleportReport


@dataclass(frozen=True)
class TeleportPlan:
    """One teleport event: ``batches`` random teleport batches, ``steps`` ascent steps each.

    With ``samples``, each teleport batch joins batches of the teleport data until it holds at
    least that many samples (one large teleport instead of several small ones); without it each
    is one batch of the data.
    """

    batches: int
    steps: int
    cap: float | None = None
    samples: int | None = None

    def __post_init__(self) -> None:
        if self.batches < 1 or self.steps < 1 or (self.samples is not None and self.samples < 1):
            raise ValueError(f"a teleport plan needs at least one batch, one step and one sample, got {self}")


class Schedule(ABC):
    """Base class of teleport schedules.

    :class:`~torch_teleport.TeleportEvents` asks :meth:`plan` once before every
    optimisation step (before the first micro-batch of a gradient-accumulation
    window), with ``step`` the number of optimizer steps taken so far; a
    schedule keeps whatever it needs to remember in :meth:`state_dict`.
    """

    measures_time = False
    """Whether :meth:`plan` decides by measured time (then it is not reproducible step for step, and
    data-parallel ranks could disagree: :class:`~torch_teleport.TeleportEvents` refuses it there)."""

    hears_loss = False
    """Whether the schedule wants each step's training loss (:meth:`observe_loss`; under data
    parallelism the ranks' mean, one all-reduce per step, which the others are spared)."""

    @abstractmethod
    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        """The teleport to run before global ``step`` (in ``epoch``), or ``None``."""

    def observe(self, *, train_seconds: float = 0.0, teleport_seconds: float = 0.0) -> None:
        """The compute spent since the last report: training steps and teleports.

        :meth:`TeleportEvents.observe <torch_teleport.TeleportEvents.observe>` reports after every
        step; schedules that budget teleports by compute use it, the others ignore it.
        """
        return None

    def observe_loss(self, loss: float) -> None:
        """The training loss of the optimizer step just taken (its micro-batches' mean, the ranks'
        mean under data parallelism), where :attr:`hears_loss` asks for it and the loop reports it
        (:meth:`TeleportEvents.observe <torch_teleport.TeleportEvents.observe>`)."""
        return None

    def outcome(self, reports: Sequence[TeleportReport]) -> None:
        """What the event this schedule planned did (its teleports' reports, the global batch's
        figures under data parallelism, so every rank hears the same); schedules that stop when
        teleports stop gaining use it, the others ignore it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")
