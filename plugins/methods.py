"""The built-in teleport method: null-space gradient projection."""

from __future__ import annotations

from torch_teleport import hookimpl
from torch_teleport.null_space_method import NullSpaceMethod


@hookimpl
def teleport_register_methods(registry) -> None:
    registry.add_method("null_space", NullSpaceMethod)
