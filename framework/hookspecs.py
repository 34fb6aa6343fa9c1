"""The plugin hooks of torch-teleport.

Every hook receives a :class:`~torch_teleport.registry.Registry` and adds
entries to it, so a plugin is one class plus one ``@hookimpl`` function.
Built-in plugins are registered through the very same hooks as third-party
ones (see :mod:`torch_teleport.registry`).

This module is the plugin reference: each hook documents its argument, and
``tests/test_docs.py`` checks that every hook appears in ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import Registry

PROJECT_NAME = "torch_teleport"
ENTRY_POINT_GROUP = "torch_teleport"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def teleport_register_projectors(registry: Registry) -> None:
    """Register projectors with ``registry.add_projector(module_type, projector_class)``.

    ``module_type`` is an ``nn.Module`` subclass or a dotted ``"package.Class"``
    string; a string key matches without importing the package, so a plugin
    can support an optional dependency (``"mamba_ssm.Mamba"``) for free.
    Lookup walks the module's MRO, so a projector for ``nn.Linear`` also
    serves its subclasses.
    """


@hookspec
def teleport_register_objectives(registry: Registry) -> None:
    """Register teleport objectives with ``registry.add_objective(name, objective_class)``."""


@hookspec
def teleport_register_null_spaces(registry: Registry) -> None:
    """Register null-space builders with ``registry.add_null_space(name, null_space_class)``."""


@hookspec
def teleport_register_schedules(registry: Registry) -> None:
    """Register teleport schedules with ``registry.add_schedule(name, schedule_class)``."""


@hookspec
def teleport_register_models(registry: Registry) -> None:
    """Register model factories with ``registry.add_model(name, factory)``.

    ``factory(**options)`` returns an ``nn.Module``; configs name models by
    this key.
    """


@hookspec
def teleport_register_datasets(registry: Registry) -> None:
    """Register dataset factories with ``registry.add_dataset(name, factory)``.

    ``factory(root, **options)`` returns a :class:`~torch_teleport.lab.data.DataSplits`.
    """


@hookspec
def teleport_register_methods(registry: Registry) -> None:
    """Register teleport methods with ``registry.add_method(name, method_class)``.

    A method is a :class:`~torch_teleport.method.TeleportMethod`: the
    null-space projection (``"null_space"``, the default) or a baseline such
    as symmetry or level-set teleport, selected by ``Teleporter(method=...)``.
    """


@hookspec
def teleport_register_experiments(registry: Registry) -> None:
    """Register experiment kinds with ``registry.add_experiment(name, runner)``.

    ``runner(config, out_dir)`` runs a parsed config (a dict) whose
    ``kind`` is ``name`` and writes its results under ``out_dir``;
    ``teleport run`` dispatches on the config's ``kind``.
    """
