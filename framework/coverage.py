"""Which projector moves which parameter, and which parameters stay fixed and why."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from .projector import Projector, Site
from .registry import Registry

POLICIES = ("error", "warn", "freeze")


class UncoveredParametersError(ValueError):
    """Trainable parameters that no projector covers, under the ``"error"`` policy."""


@dataclass
class CoveredModule:
    name: str
    module: nn.Module
    projector: Projector
    sites: list[Site]

    def qualified(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local


@dataclass
class Coverage:
    """The modules a teleport moves and the trainable parameters it leaves fixed."""

    modules: list[CoveredModule] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)

    def movable(self) -> dict[str, nn.Parameter]:
        """Every parameter some site moves, by qualified name."""
        params: dict[str, nn.Parameter] = {}
        for covered in self.modules:
            for site in covered.sites:
                for local in filter(None, (site.weight, site.bias)):
                    params[covered.qualified(local)] = covered.module.get_parameter(local)
        return params


def find_coverage(model: nn.Module, registry: Registry, policy: str = "warn") -> Coverage:
    """Assign projectors to ``model``'s modules (parents before children).

    A parameter shared between modules, or a site with a parameter that does
    not require grad, stays fixed: moving it would need the intersection of
    several null spaces. Trainable parameters that no projector covers are
    handled by ``policy``: ``"error"`` raises, ``"warn"`` warns and freezes,
    ``"freeze"`` freezes; all of them are listed in the report either way.
    """
    if policy not in POLICIES:
        raise ValueError(f"uncovered-parameter policy must be one of {POLICIES}, got {policy!r}")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    claimed: set[int] = set()
    coverage = Coverage()
    instances: dict[type, Projector] = {}
    for module_name, module in model.named_modules():
        projector_class = registry.projector_for(module)
        if projector_class is None:
            continue
        projector = instances.setdefault(projector_class, projector_class())
        covered = CoveredModule(module_name, module, projector, [])
        site_params = {
            local: module.get_parameter(local)
            for site in projector.sites(module)
            for local in filter(None, (site.weight, site.bias))
        }
        frozen = projector.frozen(module)
        owned = [module.get_parameter(local) for local in (*site_params, *frozen)]
        if all(id(p) in claimed for p in owned):
            continue
        claimed.update(id(p) for p in owned)
        for local, reason in frozen.items():
            if module.get_parameter(local).requires_grad:
                coverage.frozen[covered.qualified(local)] = reason
        for site in projector.sites(module):
            params = [module.get_parameter(local) for local in filter(None, (site.weight, site.bias))]
            if all(p.requires_grad and uses[id(p)] == 1 for p in params):
                covered.sites.append(site)
                continue
            reason = (
                "shared between modules"
                if any(uses[id(p)] > 1 for p in params)
                else "its site has a parameter with requires_grad=False"
            )
            for p in params:
                if p.requires_grad:
                    coverage.frozen[names[id(p)]] = reason
        if covered.sites:
            coverage.modules.append(covered)
    uncovered = [name for pid, name in names.items() if pid not in claimed]
    if uncovered and policy == "error":
        raise UncoveredParametersError(f"no projector covers these parameters: {', '.join(uncovered)}")
    if uncovered and policy == "warn":
        warnings.warn(f"teleport leaves these parameters fixed (no projector): {', '.join(uncovered)}", stacklevel=3)
    for name in uncovered:
        coverage.frozen[name] = "no projector for its module"
    if not coverage.modules:
        raise ValueError(
            f"no parameter of {type(model).__name__} can be teleported: no registered projector "
            f"covers any of its trainable layers ({', '.join(names.values()) or 'none'})"
        )
    return coverage
