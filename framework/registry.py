"""Plugin discovery and lookup.

A :class:`Registry` is a plain object that hooks fill in; it is built by a
factory, never at import time. Built-in plugins come first from an explicit
tuple, then third-party plugins from the ``torch_teleport`` entry-point
group, so a third party registering an existing name replaces the built-in.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy
from torch import nn

from . import hookspecs

BUILTIN_PLUGINS: tuple[str, ...] = (
    "torch_teleport.projectors.linear",
    "torch_teleport.projectors.conv",
    "torch_teleport.projectors.attention",
    "torch_teleport.projectors.mamba",
    "torch_teleport.projectors.frozen",
    "torch_teleport.projectors.recurrent",
    "torch_teleport.projectors.transposed_linear",
    "torch_teleport.objectives.grad_norm",
    "torch_teleport.objectives.sharpness",
    "torch_teleport.objectives.curvature",
    "torch_teleport.objectives.log_grad_norm",
    "torch_teleport.plugins.null_spaces",
    "torch_teleport.plugins.schedules",
    "torch_teleport.plugins.models",
    "torch_teleport.plugins.models_transformer",
    "torch_teleport.plugins.models_mamba",
    "torch_teleport.plugins.datasets",
    "torch_teleport.plugins.methods",
    "torch_teleport.plugins.train",
    "torch_teleport.plugins.symmetry",
    "torch_teleport.plugins.level_set",
    "torch_teleport.plugins.benchmarks.step_cost",
    "torch_teleport.plugins.benchmarks.scaling",
    "torch_teleport.plugins.benchmarks.accuracy",
    "torch_teleport.plugins.benchmarks.error_control",
    "torch_teleport.plugins.benchmarks.time_to_target",
    "torch_teleport.plugins.benchmarks.gradient_paths",
    "torch_teleport.plugins.studies.correlation",
    "torch_teleport.plugins.studies.teleport_generalization",
    "torch_teleport.plugins.studies.displacement",
    "torch_teleport.plugins.studies.optimizers",
    "torch_teleport.plugins.studies.learn_to_teleport",
)

BUILTIN_ORIGIN = "torch-teleport (built-in)"

KINDS = ("method", "projector", "objective", "null_space", "schedule", "model", "dataset", "experiment")


class UnknownPluginError(KeyError):
    """A name that no registered plugin provides; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    """One registered plugin object and the distribution it came from."""

    kind: str
    name: str
    target: Any
    origin: str


class Registry:
    """What the plugins provide, by kind and name."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._projector_types: dict[type, Entry] = {}
        self._origin = BUILTIN_ORIGIN

    # -- registration (called from hook implementations) ---------------------
    def add_projector(self, module_type: type[nn.Module] | str, projector: type) -> None:
        if isinstance(module_type, str):
            self._add("projector", module_type, projector)
        elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
            entry = self._add("projector", _qualified_name(module_type), projector)
            self._projector_types[module_type] = entry
        else:
            raise TypeError(f"projector key must be an nn.Module subclass or a dotted string, got {module_type!r}")

    def add_objective(self, name: str, objective: type) -> None:
        self._add("objective", name, objective)

    def add_null_space(self, name: str, null_space: type) -> None:
        self._add("null_space", name, null_space)

    def add_schedule(self, name: str, schedule: type) -> None:
        self._add("schedule", name, schedule)

    def add_model(self, name: str, factory: Callable[..., nn.Module]) -> None:
        self._add("model", name, factory)

    def add_dataset(self, name: str, factory: Callable[..., Any]) -> None:
        self._add("dataset", name, factory)

    def add_method(self, name: str, method: type) -> None:
        self._add("method", name, method)

    def add_experiment(self, name: str, runner: Callable[..., Any]) -> None:
        self._add("experiment", name, runner)

    def _add(self, kind: str, name: str, target: Any) -> Entry:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
        entry = Entry(kind, name, target, self._origin)
        self._entries[kind][name] = entry
        return entry

    # -- lookup ---------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name``; unknown names list what is known."""
        try:
            return self._entries[kind][name].target
        except KeyError:
            known = ", ".join(sorted(self._entries.get(kind, {}))) or "none"
            raise UnknownPluginError(
                f"unknown {kind.replace('_', ' ')} {name!r}; registered: {known}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self) -> Iterator[Entry]:
        for kind in KINDS:
            yield from sorted(self._entries[kind].values(), key=lambda e: e.name)

    def projector_for(self, module: nn.Module) -> Any | None:
        """The projector class for ``module``, walking its MRO; ``None`` if none applies.

        A string key ``"pkg.Class"`` matches a class named ``Class`` defined
        anywhere under package ``pkg`` (``"torch.nn.Linear"`` and
        ``"torch.Linear"`` both match ``nn.Linear``; the innermost package
        wins), without importing ``pkg``.
        """
        string_keys = self._entries["projector"]
        for cls in type(module).__mro__:
            if cls in self._projector_types:
                return self._projector_types[cls].target
            for key in (_qualified_name(cls), *_package_keys(cls)):
                if key in string_keys:
                    return string_keys[key].target
        return None


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _package_keys(cls: type) -> list[str]:
    """``"pkg.Class"`` for every package enclosing the class's module, innermost first."""
    parts = cls.__module__.split(".")
    return [f"{'.'.join(parts[:end])}.{cls.__qualname__}" for end in range(len(parts) - 1, 0, -1)]


def build_plugin_manager(
    builtins: tuple[str, ...] = BUILTIN_PLUGINS, *, entry_points: bool = True
) -> pluggy.PluginManager:
    """A fresh plugin manager: built-ins, then entry points, then a check for misspelt hooks."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in builtins:
        pm.register(importlib.import_module(module_name), name=module_name)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


def build_registry(pm: pluggy.PluginManager | None = None) -> Registry:
    """Run every registration hook, built-ins first, recording each entry's distribution."""
    pm = pm if pm is not None else build_plugin_manager()
    origins = {
        id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in pm.list_plugin_distinfo()
    }
    registry = Registry()
    for hook_name in sorted(n for n in dir(hookspecs) if n.startswith("teleport_register_")):
        # get_hookimpls() is in registration order: later plugins override earlier ones.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            registry._origin = origins.get(id(impl.plugin), BUILTIN_ORIGIN)
            impl.function(**{arg: registry for arg in impl.argnames})
    registry._origin = BUILTIN_ORIGIN
    return registry


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of every installed plugin, built on first use."""
    return build_registry()
