"""torch-teleport: teleport neural networks along the loss level set of a batch.

The core defines the interfaces (:class:`Projector`, :class:`NullSpace`,
:class:`Objective`, :class:`Schedule`), the plugin hooks and the engine
(:class:`Teleporter`, its :class:`Limits` and :class:`LineSearch`); every concrete projector, objective, null space,
schedule and method is a plugin in a room of the library, loaded on first
use. Models, datasets and experiments are the lab's (``torch_teleport.lab``),
which the library never imports.
"""

# The engine and trainer import the interfaces above; keep them last.
from .coverage_table import check_coverage
from .events import TeleportEvents, default_schedule  # noqa: E402
from .hookspecs import hookimpl
from .limits import Limits
from .line_search import LineSearch
from .method import Mover, TeleportMethod
from .null_space import CoreBasis, NullSpace
from .objective import Batch, Evaluation, Objective
from .projector import Projector, Site
from .registry import Registry, UnknownPluginError, build_registry, default_registry
from .report import LayerReport, TeleportReport
from .schedule import Schedule, TeleportPlan
from .teleporter import Teleporter  # noqa: E402
from .training import TeleportTrainer  # noqa: E402

__all__ = [
    "Batch",
    "CoreBasis",
    "Evaluation",
    "LayerReport",
    "Limits",
    "LineSearch",
    "Mover",
    "NullSpace",
    "Objective",
    "Projector",
    "Registry",
    "Schedule",
    "Site",
    "TeleportEvents",
    "TeleportPlan",
    "TeleportMethod",
    "TeleportReport",
    "TeleportTrainer",
    "Teleporter",
    "UnknownPluginError",
    "build_registry",
    "check_coverage",
    "default_registry",
    "default_schedule",
    "hookimpl",
]
__version__ = "0.1.0"
