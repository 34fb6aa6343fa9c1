"""Plugin discovery and lookup.

A :class:`Registry` is a plain object that hooks fill in; it is built by a
factory, never at import time, and loads the plugins of a kind on the first
lookup of that kind. Built-ins are declared, not listed here: the library's
are the modules of its rooms (:data:`ROOMS`, one package per kind), the
lab's are this distribution's entry points. Third-party plugins come from
the same ``torch_teleport`` entry-point group, and one registering an
existing name replaces the built-in, whichever of the two loads first.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy
from torch import nn

from . import hookspecs

ROOMS: dict[str, str] = {
    "projector": "torch_teleport.projectors",
    "objective": "torch_teleport.objectives",
    "null_space": "torch_teleport.plugins.null_spaces",
    "method": "torch_teleport.plugins.methods",
    "schedule": "torch_teleport.plugins.schedules",
}
"""The library's room of each kind: every module of the package is a built-in plugin."""

DISTRIBUTION = "torch-teleport"
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
    """What the plugins provide, by kind and name.

    With ``plugins``, the first lookup of a kind loads that kind's plugins
    and runs their registration hooks; without, it holds what is added by hand.
    """

    def __init__(self, plugins: PluginManager | None = None) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._projector_types: dict[type, Entry] = {}
        self._origin = BUILTIN_ORIGIN
        self._plugins = plugins
        self._loaded: set[str] = set()
        self._run: set[tuple[str, str]] = set()  # (kind, plugin name) whose hook has run
        self._registering_builtin = False
        self._not_builtin: set[tuple[str, str]] = set()  # (kind, name) a built-in never replaces

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
        # Kinds load one at a time, so a third party's entry may come before the built-in it replaces.
        if self._registering_builtin and (kind, name) in self._not_builtin:
            return self._entries[kind][name]
        if not self._registering_builtin:
            self._not_builtin.add((kind, name))
        entry = Entry(kind, name, target, self._origin)
        self._entries[kind][name] = entry
        return entry

    # -- loading --------------------------------------------------------------
    def _load(self, kind: str) -> None:
        """On the first lookup of ``kind``: load its plugins, then run every hook not yet run.

        Hooks of kinds looked up before run too, for plugins that register
        several kinds and arrived with this one.
        """
        if kind in self._loaded or kind not in KINDS or self._plugins is None:
            return
        self._plugins.load(kind)
        self._loaded.add(kind)
        for loaded in KINDS:
            if loaded in self._loaded:
                self._register(loaded)

    def _register(self, kind: str) -> None:
        plugins = self._plugins
        hook = getattr(plugins.hook, f"teleport_register_{kind}s")
        # get_hookimpls() is in registration order: later plugins override earlier ones.
        for impl in hook.get_hookimpls():
            if (kind, impl.plugin_name) in self._run:
                continue
            self._run.add((kind, impl.plugin_name))
            self._origin = plugins.origins.get(impl.plugin_name, BUILTIN_ORIGIN)
            self._registering_builtin = impl.plugin_name in plugins.builtins
            try:
                impl.function(**{arg: self for arg in impl.argnames})
            finally:
                self._origin, self._registering_builtin = BUILTIN_ORIGIN, False

    # -- lookup ---------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The object registered as ``name``; unknown names list what is known."""
        self._load(kind)
        try:
            return self._entries[kind][name].target
        except KeyError:
            known = ", ".join(sorted(self._entries.get(kind, {}))) or "none"
            raise UnknownPluginError(
                f"unknown {kind.replace('_', ' ')} {name!r}; registered: {known}"
            ) from None

    def names(self, kind: str) -> list[str]:
        self._load(kind)
        return sorted(self._entries[kind])

    def entries(self) -> Iterator[Entry]:
        for kind in KINDS:
            self._load(kind)
            yield from sorted(self._entries[kind].values(), key=lambda e: e.name)

    def projector_for(self, module: nn.Module) -> Any | None:
        """The projector class for ``module``, walking its MRO; ``None`` if none applies.

        A string key ``"pkg.Class"`` matches a class named ``Class`` defined
        anywhere under package ``pkg`` (``"torch.nn.Linear"`` and
        ``"torch.Linear"`` both match ``nn.Linear``; the innermost package
        wins), without importing ``pkg``.
        """
        self._load("projector")
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


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, loading the plugins that may provide a kind on the first :meth:`load` of it.

    A kind brings its room's modules and the entry points named
    ``"<kind>:<name>"``; entry points named otherwise come with the first
    kind loaded. ``builtins`` (module names, registered at once) replaces this
    distribution's own plugins; ``entry_points=False`` leaves out every
    other distribution's.
    """

    def __init__(self, builtins: Iterable[str] | None = None, *, entry_points: bool = True) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self.builtins: set[str] = set()
        """Names of the plugins this distribution declares (their entries yield to third parties')."""
        self.origins: dict[str, str] = {}
        """``"<distribution> <version>"`` of each plugin from another distribution, by plugin name."""
        self._own = builtins is None
        self._others = entry_points
        self._loaded: set[str] = set()
        self._waiting: list[tuple[Any, Any]] | None = None  # entry points not loaded yet, with their distribution
        for name in builtins or ():
            self._register_builtin(importlib.import_module(name), name)
        self.check_pending()

    def load(self, kind: str) -> None:
        """Register the plugins that may provide ``kind`` (once), then check for misspelt hooks."""
        if kind not in self._loaded:
            self._loaded.add(kind)
            if self._own and kind in ROOMS:
                room = importlib.import_module(ROOMS[kind])
                for module in pkgutil.iter_modules(room.__path__, f"{room.__name__}."):
                    if not self.has_plugin(module.name):
                        self._register_builtin(importlib.import_module(module.name), module.name)
            for entry_point, distribution in self._entry_points(kind):
                if self.has_plugin(entry_point.name) or self.is_blocked(entry_point.name):
                    continue
                plugin = entry_point.load()
                if _is_this_distribution(distribution):
                    self._register_builtin(plugin, entry_point.name)
                else:
                    self.register(plugin, name=entry_point.name)
                    self.origins[entry_point.name] = f"{distribution.metadata['name']} {distribution.version}"
        self.check_pending()

    def _register_builtin(self, plugin: object, name: str) -> None:
        self.register(plugin, name=name)
        self.builtins.add(name)

    def _entry_points(self, kind: str) -> list[tuple[Any, Any]]:
        """The entry points of ``kind`` not loaded yet; on the first call also those of no kind."""
        if self._waiting is None:
            self._waiting = [
                (entry_point, distribution)
                for distribution in importlib.metadata.distributions()
                for entry_point in distribution.entry_points
                if entry_point.group == hookspecs.ENTRY_POINT_GROUP
                and (self._own if _is_this_distribution(distribution) else self._others)
            ]
        due, waiting = [], []
        for pair in self._waiting:
            (due if _entry_point_kind(pair[0].name) in (kind, None) else waiting).append(pair)
        self._waiting = waiting
        return due


def _entry_point_kind(name: str) -> str | None:
    """The kind an entry point named ``"<kind>:<name>"`` provides; ``None`` for any other name."""
    kind, colon, _ = name.partition(":")
    return kind if colon and kind in KINDS else None


def _is_this_distribution(distribution: Any) -> bool:
    return re.sub(r"[-_.]+", "-", distribution.metadata["name"] or "").lower() == DISTRIBUTION


def build_plugin_manager(
    builtins: Iterable[str] | None = None, *, entry_points: bool = True
) -> PluginManager:
    """A plugin manager with every kind loaded now, so a misspelt hook fails here.

    It holds this distribution's plugins (or ``builtins``) and, unless
    ``entry_points=False``, every other distribution's.
    """
    pm = PluginManager(builtins, entry_points=entry_points)
    for kind in KINDS:
        pm.load(kind)
    return pm


def build_registry(pm: PluginManager | None = None) -> Registry:
    """A fresh registry, loading each kind from ``pm`` (by default every installed plugin) on its first lookup."""
    return Registry(pm if pm is not None else PluginManager())


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of every installed plugin, built on first use."""
    return build_registry()
