"""The plugin hooks of the library.

Every hook receives the registry being filled and adds entries to it, so a plugin is one class
plus one ``@hookimpl`` function. Built-in plugins are registered through the very same hooks as
third-party ones (see :mod:`torch_teleport.plugin_manager`).

This module is the plugin reference: each hook documents its argument, and
``tests/test_docs.py`` checks that every hook appears in ``docs/plugins.md``. It describes the
registry by the :class:`Registrar` protocol instead of importing it, so that it depends on no
other module of the library (the plugin manager imports it). The lab declares its own kinds'
hooks (``torch_teleport.lab.hookspecs``), named in the :data:`HOOKSPEC_GROUP` entry-point group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import pluggy

if TYPE_CHECKING:
    from torch import nn

PROJECT_NAME = "torch_teleport"
ENTRY_POINT_GROUP = "torch_teleport"
"""The entry-point group of plugins: ``"<kind>:<name>"`` (loaded with that kind) or any name."""
HOOKSPEC_GROUP = "torch_teleport.hookspecs"
"""Where this distribution declares the lab's kinds: ``<kind> = "<module of its hookspec>"``."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Registrar(Protocol):
    """What the library's hooks receive: :class:`torch_teleport.Registry` implements it.

    Registering a name that exists replaces it, except that a built-in never replaces another
    distribution's entry and no hook replaces one registered on the registry by hand.
    """

    def add_projector(self, module_type: type[nn.Module] | str, projector: type) -> None: ...

    def add_objective(self, name: str, objective: type) -> None: ...

    def add_null_space(self, name: str, null_space: type) -> None: ...

    def add_schedule(self, name: str, schedule: type) -> None: ...

    def add_method(self, name: str, method: type) -> None: ...


@hookspec
def teleport_register_projectors(registry: Registrar) -> None:
    """Register projectors with ``registry.add_projector(module_type, projector_class)``.

    ``module_type`` is an ``nn.Module`` subclass or a dotted ``"package.Class"``
    string; a string key matches without importing the package, so a plugin
    can support an optional dependency (``"mamba_ssm.Mamba"``) for free.
    Lookup walks the module's MRO, so a projector for ``nn.Linear`` also
    serves its subclasses.
    """


@hookspec
def teleport_register_objectives(registry: Registrar) -> None:
    """Register teleport objectives with ``registry.add_objective(name, objective_class)``."""


@hookspec
def teleport_register_null_spaces(registry: Registrar) -> None:
    """Register null-space builders with ``registry.add_null_space(name, null_space_class)``."""


@hookspec
def teleport_register_schedules(registry: Registrar) -> None:
    """Register teleport schedules with ``registry.add_schedule(name, schedule_class)``."""


@hookspec
def teleport_register_methods(registry: Registrar) -> None:
    """Register teleport methods with ``registry.add_method(name, method_class)``.

    A method is a :class:`~torch_teleport.method.TeleportMethod`: the
    null-space projection (``"null_space"``, the default) or a baseline such
    as symmetry or level-set teleport, selected by ``Teleporter(method=...)``.
    """
