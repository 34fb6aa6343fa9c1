"""The lab's plugin hooks: models, datasets and experiments.

The library never imports this module. ``pyproject.toml`` names it once per kind in the
``torch_teleport.hookspecs`` entry-point group, and the plugin manager adds it on the first lookup
of a model, dataset or experiment, or as soon as a plugin implementing one of these hooks
registers, so that a third-party model zoo loaded with another kind still validates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from torch_teleport.hookspecs import hookspec

if TYPE_CHECKING:
    from torch import nn


class LabRegistrar(Protocol):
    """What the lab's hooks receive: :class:`torch_teleport.Registry` implements it."""

    def add_model(self, name: str, factory: Callable[..., nn.Module]) -> None: ...

    def add_dataset(self, name: str, factory: Callable[..., Any]) -> None: ...

    def add_experiment(self, name: str, runner: Callable[..., Any]) -> None: ...


@hookspec
def teleport_register_models(registry: LabRegistrar) -> None:
    """Register model factories with ``registry.add_model(name, factory)``.

    ``factory(**options)`` returns an ``nn.Module``; configs name models by
    this key.
    """


@hookspec
def teleport_register_datasets(registry: LabRegistrar) -> None:
    """Register dataset factories with ``registry.add_dataset(name, factory)``.

    ``factory(root, **options)`` returns a :class:`~torch_teleport.lab.data.DataSplits`.
    """


@hookspec
def teleport_register_experiments(registry: LabRegistrar) -> None:
    """Register experiment kinds with ``registry.add_experiment(name, runner)``.

    ``runner(config, out_dir)`` runs a parsed config (a dict) whose
    ``kind`` is ``name`` and writes its results under ``out_dir``;
    ``teleport run`` dispatches on the config's ``kind``.
    """
