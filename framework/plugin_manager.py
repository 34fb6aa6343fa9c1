"""Plugin discovery: pluggy's manager, loading the plugins that may provide a kind on its first use.

Built-ins are declared, not listed here: the library's are the modules of its rooms
(:data:`ROOMS`, one package per kind), and this distribution's entry points (the lab's) count as
built-ins too. Every other plugin is an entry point of the ``torch_teleport`` group, loaded by
pluggy's own loader; one named ``"<kind>:<name>"`` loads with the first lookup of that kind, any
other with the first kind loaded.

The library's kinds have their hooks in :mod:`torch_teleport.hookspecs`. The lab's kinds (models,
datasets, experiments) are declared in this distribution's ``torch_teleport.hookspecs`` entry-point
group, one entry per kind naming the module of its hookspec; that module is added on the first
lookup of the kind, or as soon as a plugin implementing its hook registers, and never otherwise,
so the library does not import the lab.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
from collections.abc import Iterable
from typing import Any

import pluggy

from . import hookspecs

ROOMS: dict[str, str] = {
    "method": "torch_teleport.plugins.methods",
    "projector": "torch_teleport.projectors",
    "objective": "torch_teleport.objectives",
    "null_space": "torch_teleport.plugins.null_spaces",
    "schedule": "torch_teleport.plugins.schedules",
}
"""The library's room of each of its kinds: every module of the package is a built-in plugin."""

CORE_KINDS = tuple(ROOMS)
"""The kinds whose hooks :mod:`torch_teleport.hookspecs` declares."""

DISTRIBUTION = "torch-teleport"
BUILTIN_ORIGIN = "torch-teleport (built-in)"
HOOK_PREFIX = "teleport_register_"


def hook_name(kind: str) -> str:
    """The registration hook of ``kind``: ``teleport_register_<kind>s``."""
    return f"{HOOK_PREFIX}{kind}s"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, loading the plugins that may provide a kind on its first :meth:`load`.

    ``builtins`` (module names, registered at once) replaces this distribution's own plugins;
    ``entry_points=False`` leaves out every other distribution's.
    """

    def __init__(self, builtins: Iterable[str] | None = None, *, entry_points: bool = True) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.add_hookspecs(hookspecs)
        self._own = builtins is None
        self._others = entry_points
        self._builtins: set[str] = set()
        self._loaded: set[str] = set()
        self._declared_modules: set[str] = set()
        self._waiting, self._specs = self._scan_entry_points()
        self.kinds: tuple[str, ...] = (*CORE_KINDS, *self._specs)
        """Every kind this manager can load: the library's, then the declared ones."""
        for name in builtins or ():
            self._register_builtin(importlib.import_module(name), name)
        self.check_pending()

    def load(self, kind: str) -> None:
        """Register the plugins that may provide ``kind`` (once), then check for misspelt hooks."""
        if kind not in self._loaded:
            self._loaded.add(kind)
            self._declare(kind)
            if self._own and kind in ROOMS:
                self._register_room(ROOMS[kind])
            for name in self._due(kind):
                self.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP, name=name)
        self.check_pending()

    def register(self, plugin: object, name: str | None = None) -> str | None:
        """pluggy's :meth:`~pluggy.PluginManager.register`, declaring first the kinds whose hooks
        the plugin implements, so that ``check_pending`` knows them."""
        plugin_name = super().register(plugin, name)
        for caller in self.get_hookcallers(plugin) or ():
            if not caller.has_spec() and caller.name.startswith(HOOK_PREFIX):
                self._declare(caller.name.removeprefix(HOOK_PREFIX).removesuffix("s"))
        return plugin_name

    def registration_hook(self, kind: str) -> pluggy.HookCaller:
        return getattr(self.hook, hook_name(kind))

    def is_builtin(self, plugin_name: str) -> bool:
        """Whether the plugin is this distribution's (its entries yield to other distributions')."""
        distribution = self._distribution(plugin_name)
        return plugin_name in self._builtins or (
            distribution is not None and _is_this_distribution(distribution)
        )

    def origin(self, plugin_name: str) -> str:
        """``"<distribution> <version>"`` of a plugin, or that it is built in or added by hand."""
        distribution = self._distribution(plugin_name)
        if self.is_builtin(plugin_name):
            return BUILTIN_ORIGIN
        if distribution is None:
            return f"{plugin_name} (registered by hand)"
        return f"{distribution.project_name} {distribution.version}"

    def _distribution(self, plugin_name: str) -> Any | None:
        plugin = self.get_plugin(plugin_name)
        return next((dist for each, dist in self.list_plugin_distinfo() if each is plugin), None)

    def _register_builtin(self, plugin: object, name: str) -> None:
        self.register(plugin, name=name)
        self._builtins.add(name)

    def _register_room(self, package: str) -> None:
        room = importlib.import_module(package)
        for module in pkgutil.iter_modules(room.__path__, f"{room.__name__}."):
            if not self.has_plugin(module.name):
                self._register_builtin(importlib.import_module(module.name), module.name)

    def _declare(self, kind: str) -> None:
        """Add the hookspec module declared for ``kind``, once; nothing for the library's kinds."""
        entry_point = self._specs.get(kind)
        if entry_point is None or entry_point.value in self._declared_modules:
            return
        self._declared_modules.add(entry_point.value)
        self.add_hookspecs(entry_point.load())

    def _due(self, kind: str) -> list[str]:
        """The entry points of ``kind`` not loaded yet; on the first call also those of no kind."""
        due = [
            name for name in self._waiting if _entry_point_kind(name, self.kinds) in (kind, None)
        ]
        self._waiting = [name for name in self._waiting if name not in due]
        return due

    def _scan_entry_points(self) -> tuple[list[str], dict[str, Any]]:
        """Names of the plugin entry points to load, and the hookspec entry point of each kind this
        distribution declares, read from the installed metadata without importing anything."""
        plugins: dict[str, None] = {}
        specs: dict[str, Any] = {}
        for distribution in importlib.metadata.distributions():
            own = _is_this_distribution(distribution)
            wanted = self._own if own else self._others
            for entry_point in distribution.entry_points:
                if entry_point.group == hookspecs.ENTRY_POINT_GROUP and wanted:
                    plugins[entry_point.name] = None
                elif entry_point.group == hookspecs.HOOKSPEC_GROUP and own:
                    specs.setdefault(entry_point.name, entry_point)
        return list(plugins), specs


def _entry_point_kind(name: str, kinds: tuple[str, ...]) -> str | None:
    """The kind an entry point named ``"<kind>:<name>"`` provides; ``None`` for any other name."""
    kind, colon, _ = name.partition(":")
    return kind if colon and kind in kinds else None


def _is_this_distribution(distribution: Any) -> bool:
    return re.sub(r"[-_.]+", "-", distribution.metadata["name"] or "").lower() == DISTRIBUTION


def build_plugin_manager(
    builtins: Iterable[str] | None = None, *, entry_points: bool = True
) -> PluginManager:
    """A plugin manager with every kind loaded now, so a misspelt hook fails here.

    It holds this distribution's plugins (or ``builtins``) and, unless
    ``entry_points=False``, every other distribution's.
    """
    manager = PluginManager(builtins, entry_points=entry_points)
    for kind in manager.kinds:
        manager.load(kind)
    return manager
