"""The built-in schedules, one module each: ``epochs`` (the paper's), ``every`` N steps, ``budget`` of
time, ``gaining`` (every N steps while teleports gain) and ``once``."""

from .budget import BudgetSchedule
from .epochs import EpochSchedule
from .every_steps import EveryStepsSchedule
from .gaining import GainingSchedule
from .once import OnceSchedule

__all__ = ["BudgetSchedule", "EpochSchedule", "EveryStepsSchedule", "GainingSchedule", "OnceSchedule"]
