"""Plugin lookup: what the plugins provide, by kind and name.

A :class:`Registry` is a plain object that hooks fill in; it is built by a factory, never at
import time, and has its :class:`~torch_teleport.plugin_manager.PluginManager` load the plugins of
a kind on the first lookup of that kind. Who registered an entry decides what may replace it
(:class:`Precedence`): a registration made on the registry by hand wins over every hook, before
or after the first lookup, and another distribution's plugin wins over this distribution's
built-ins, whichever loads first.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .plugin_manager import PluginManager

BY_HAND_ORIGIN = "registered by hand"


class UnknownPluginError(KeyError):
    """A name that no registered plugin provides; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class Precedence(enum.IntEnum):
    """Who registered an entry: a registration never replaces an entry of higher precedence."""

    BUILTIN = 0
    """A hook of this distribution's plugins."""
    PLUGIN = 1
    """A hook of another distribution's plugin, or of a module registered on the manager by hand."""
    EXPLICIT = 2
    """A call on the registry outside any hook."""


@dataclass(frozen=True)
class Entry:
    """One registered plugin object, the distribution it came from and who registered it."""

    kind: str
    name: str
    target: Any
    origin: str
    precedence: Precedence


class Registry:
    """What the plugins provide, by kind and name.

    With ``plugins``, the first lookup of a kind loads that kind's plugins
    and runs their registration hooks; without, it holds what is added by hand.
    Its ``add_*`` methods are what the hooks of :mod:`torch_teleport.hookspecs`
    (and, for models, datasets and experiments, of ``torch_teleport.lab.hookspecs``) call.
    """

    def __init__(self, plugins: PluginManager | None = None) -> None:
        self._entries: dict[str, dict[str, Entry]] = {}
        self._projector_types: dict[type, Entry] = {}
        self._plugins = plugins
        self._loaded: set[str] = set()
        self._run: set[tuple[str, str]] = set()  # (kind, plugin name) whose hook has run
        self._source = (BY_HAND_ORIGIN, Precedence.EXPLICIT)  # of what is being added now

    # -- registration ----------------------------------------------------------
    def add_projector(self, module_type: type[nn.Module] | str, projector: type) -> None:
        if isinstance(module_type, str):
            self._add("projector", module_type, projector)
        elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
            entry = self._add("projector", _qualified_name(module_type), projector)
            self._projector_types[module_type] = entry
        else:
            raise TypeError(
                "projector key must be an nn.Module subclass or a dotted string, "
                f"got {module_type!r}"
            )

    def add_objective(self, name: str, objective: type) -> None:
        self._add("objective", name, objective)

    def add_null_space(self, name: str, null_space: type) -> None:
        self._add("null_space", name, null_space)

    def add_schedule(self, name: str, schedule: type) -> None:
        self._add("schedule", name, schedule)

    def add_method(self, name: str, method: type) -> None:
        self._add("method", name, method)

    def add_model(self, name: str, factory: Callable[..., nn.Module]) -> None:
        self._add("model", name, factory)

    def add_dataset(self, name: str, factory: Callable[..., Any]) -> None:
        self._add("dataset", name, factory)

    def add_experiment(self, name: str, runner: Callable[..., Any]) -> None:
        self._add("experiment", name, runner)

    def _add(self, kind: str, name: str, target: Any) -> Entry:
        """Register ``name`` unless an entry of higher precedence holds it; return what holds it."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
        origin, precedence = self._source
        entries = self._entries.setdefault(kind, {})
        held = entries.get(name)
        if held is None or held.precedence <= precedence:
            entries[name] = Entry(kind, name, target, origin, precedence)
        return entries[name]

    # -- loading ---------------------------------------------------------------
    def _load(self, kind: str) -> None:
        """On the first lookup of ``kind``: load its plugins, then run every hook not yet run.

        Hooks of kinds looked up before run too, for plugins that register
        several kinds and arrived with this one.
        """
        plugins = self._plugins
        if plugins is None or kind in self._loaded or kind not in plugins.kinds:
            return
        plugins.load(kind)
        self._loaded.add(kind)
        for loaded in plugins.kinds:
            if loaded in self._loaded:
                self._register(plugins, loaded)

    def _register(self, plugins: PluginManager, kind: str) -> None:
        # get_hookimpls() is in registration order: later plugins override earlier ones.
        for impl in plugins.registration_hook(kind).get_hookimpls():
            if (kind, impl.plugin_name) in self._run:
                continue
            self._run.add((kind, impl.plugin_name))
            builtin = plugins.is_builtin(impl.plugin_name)
            self._source = (
                plugins.origin(impl.plugin_name),
                Precedence.BUILTIN if builtin else Precedence.PLUGIN,
            )
            try:
                impl.function(**{arg: self for arg in impl.argnames})
            finally:
                self._source = (BY_HAND_ORIGIN, Precedence.EXPLICIT)

    # -- lookup ----------------------------------------------------------------
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
        return sorted(self._entries.get(kind, {}))

    def entries(self) -> Iterator[Entry]:
        """Every entry, kind by kind (loading every kind)."""
        kinds = self._plugins.kinds if self._plugins is not None else ()
        for kind in dict.fromkeys([*kinds, *self._entries]):
            self._load(kind)
            yield from sorted(self._entries.get(kind, {}).values(), key=lambda e: e.name)

    def projector_for(self, module: nn.Module) -> Any | None:
        """The projector class for ``module``, walking its MRO; ``None`` if none applies.

        A string key ``"pkg.Class"`` matches a class named ``Class`` defined
        anywhere under package ``pkg`` (``"torch.nn.Linear"`` and
        ``"torch.Linear"`` both match ``nn.Linear``), without importing ``pkg``.
        A ``*`` in the class name makes the key a pattern: ``"transformers.*RMSNorm*"``
        matches every class under ``transformers`` whose name contains ``RMSNorm``.
        For one class, the entry of highest precedence wins; among equals the
        class itself, then its full name, then the innermost package, then patterns.
        """
        self._load("projector")
        string_keys = self._entries.get("projector", {})
        for cls in type(module).__mro__:
            keys = (_qualified_name(cls), *_package_keys(cls))
            found = [self._projector_types.get(cls), *(string_keys.get(key) for key in keys)]
            found += [entry for key, entry in string_keys.items() if "*" in key and _matches(key, cls)]
            candidates = [entry for entry in found if entry is not None]
            if candidates:
                return max(candidates, key=lambda entry: entry.precedence).target
        return None


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _matches(pattern: str, cls: type) -> bool:
    """Whether the key ``"pkg.Glob"`` matches ``cls``: defined under ``pkg``, its name matching ``Glob``."""
    package, _, name = pattern.rpartition(".")
    under = cls.__module__ == package or cls.__module__.startswith(package + ".")
    return under and fnmatch.fnmatchcase(cls.__qualname__, name)


def _package_keys(cls: type) -> list[str]:
    """``"pkg.Class"`` for every package enclosing the class's module, innermost first."""
    parts = cls.__module__.split(".")
    return [f"{'.'.join(parts[:end])}.{cls.__qualname__}" for end in range(len(parts) - 1, 0, -1)]


def build_registry(pm: PluginManager | None = None) -> Registry:
    """A fresh registry, loading each kind from ``pm`` (by default every installed plugin) on its
    first lookup."""
    return Registry(pm if pm is not None else PluginManager())


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of every installed plugin, built on first use."""
    return build_registry()
