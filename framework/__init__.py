"""torch-teleport: teleport neural networks along the loss level set of a batch.

The core defines the interfaces (:class:`Projector`, :class:`NullSpace`,
:class:`Objective`, :class:`Schedule`), the plugin hooks and the engine
(:class:`Teleporter`); every concrete projector, objective, null space,
schedule and method is a plugin in a room of the library, loaded on first
use. Models, datasets and experiments are the lab's (``torch_teleport.lab``),
which the library never imports.
"""

# The engine and trainer import the interfaces above; keep them last.
from .engine import Teleporter  # noqa: E402
from .hookspecs import hookimpl
from .method import TeleportMethod  # noqa: E402
from .null_space import CoreBasis, NullSpace
from .null_space_method import NullSpaceMethod  # noqa: E402
from .objective import Batch, Evaluation, Objective
from .projector import Projector, Site
from .registry import Registry, UnknownPluginError, build_registry, default_registry
from .report import LayerReport, TeleportReport
from .schedule import Schedule, TeleportPlan
from .training import TeleportTrainer  # noqa: E402

__all__ = [
    "Batch",
    "CoreBasis",
    "Evaluation",
    "LayerReport",
    "NullSpaceMethod",
    "NullSpace",
    "Objective",
    "Projector",
    "Registry",
    "Schedule",
    "Site",
    "TeleportPlan",
    "TeleportMethod",
    "TeleportReport",
    "TeleportTrainer",
    "Teleporter",
    "UnknownPluginError",
    "build_registry",
    "default_registry",
    "hookimpl",
]
__version__ = "0.1.0"
