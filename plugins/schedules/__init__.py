"""The built-in schedules, one module each: ``epochs`` (the paper's), ``every`` N steps, ``budget`` of time."""

from .budget import BudgetSchedule
from .epochs import EpochSchedule
from .every_steps import EveryStepsSchedule

__all__ = ["BudgetSchedule", "EpochSchedule", "EveryStepsSchedule"]
