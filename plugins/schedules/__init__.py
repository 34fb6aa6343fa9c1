"""The built-in schedules, one module each: ``epochs`` (the paper's), ``every`` N steps, ``budget`` of
time, and ``gaining`` (every N steps while teleports gain)."""

from .budget import BudgetSchedule
from .epochs import EpochSchedule
from .every_steps import EveryStepsSchedule
from .gaining import GainingSchedule

__all__ = ["BudgetSchedule", "EpochSchedule", "EveryStepsSchedule", "GainingSchedule"]
