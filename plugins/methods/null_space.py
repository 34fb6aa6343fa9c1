"""The default teleport method, null-space gradient projection: the core's :class:`NullSpaceMethod`, by name."""

from __future__ import annotations

from torch_teleport import hookimpl
from torch_teleport.null_space_method import NullSpaceMethod


@hookimpl
def teleport_register_methods(registry) -> None:
    registry.add_method("null_space", NullSpaceMethod)
