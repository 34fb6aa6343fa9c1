"""The built-in schedules, one module each: ``epochs`` (the paper's), ``every`` N steps, ``budget`` of
time, ``gaining`` (every N steps while teleports gain), ``once`` and ``spike`` (when the training loss
spikes)."""

from .budget import BudgetSchedule
from .epochs import EpochSchedule
from .every_steps import EveryStepsSchedule
from .gaining import GainingSchedule
from .once import OnceSchedule
from .spike import SpikeSchedule

__all__ = ["BudgetSchedule", "EpochSchedule", "EveryStepsSchedule", "GainingSchedule", "OnceSchedule", "SpikeSchedule"]
