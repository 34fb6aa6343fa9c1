"""The method interface: how a teleport moves along the level set."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from .objective import Batch
from .report import TeleportReport

if TYPE_CHECKING:
    from .engine import Teleporter


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
