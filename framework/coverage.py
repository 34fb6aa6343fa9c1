"""Which projector moves which parameter, and which parameters stay fixed and why."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .inputs import Inputs, call_model
from .projector import Projector, Site
from .registry import Registry

POLICIES = ("error", "warn", "freeze")

UNCOVERED_REASON = "no projector for its module"
"""Why a trainable parameter that no projector claims stays fixed."""


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
    owners: dict[str, str] = field(default_factory=dict)
    """The module of every trainable parameter: the one whose projector claims it, else its
    holder."""

    def movable(self) -> dict[str, nn.Parameter]:
        """Every parameter some site moves, by qualified name."""
        params: dict[str, nn.Parameter] = {}
        for covered in self.modules:
            for site in covered.sites:
                for local in filter(None, (site.weight, site.bias)):
                    params[covered.qualified(local)] = covered.module.get_parameter(local)
        return params

    def uncovered(self) -> list[str]:
        """The trainable parameters no projector claims."""
        return [name for name, reason in self.frozen.items() if reason == UNCOVERED_REASON]


HOW_TO_ADD = (
    "To move a module type, register a projector for it: registry.add_projector(ModuleType, "
    "ProjectorClass), from a teleport_register_projectors hook for a plugin (see docs/plugins.md)"
)


def capture_inputs(
    coverage: Coverage, model: nn.Module, inputs: Inputs
) -> dict[tuple[str, str], list[Tensor]]:
    """Every covered module's input streams on ``inputs``, keyed by (module name, stream).

    A no-grad forward of its own, with the projectors' capture hooks removed
    afterwards even on error: other forwards (an objective's perturbed ones)
    must not enter the representations.
    """
    captured: dict[tuple[str, str], list[Tensor]] = defaultdict(list)

    def recorder(module_name: str):
        def record(stream: str, tensor: Tensor) -> None:
            captured[(module_name, stream)].append(tensor.detach())

        return record

    handles = []
    try:
        for covered in coverage.modules:
            handles += covered.projector.capture(covered.module, recorder(covered.name))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def find_coverage(model: nn.Module, registry: Registry, policy: str = "warn") -> Coverage:
    """Assign projectors to ``model``'s modules (parents before children).

    A parameter shared between modules, or a site with a parameter that does
    not require grad, stays fixed: moving it would need the intersection of
    several null spaces. Trainable parameters that no projector covers are
    handled by ``policy``: ``"error"`` raises, ``"warn"`` warns and freezes,
    ``"freeze"`` freezes; all of them are listed in the report either way.
    Messages group parameters by module type, so a model with hundreds of
    uncovered parameters still gets a readable one.
    """
    if policy not in POLICIES:
        raise ValueError(f"uncovered-parameter policy must be one of {POLICIES}, got {policy!r}")
    coverage = assign_projectors(model, registry)
    uncovered = coverage.uncovered()
    if uncovered and policy == "error":
        raise UncoveredParametersError(
            f"no projector covers these parameters: {_names(uncovered)}; by module type: "
            f"{_groups(model, coverage, uncovered, names_too=False)}. {HOW_TO_ADD}; to leave them "
            'fixed, use the uncovered policy "warn" or "freeze"'
        )
    if uncovered and policy == "warn":
        warnings.warn(
            "teleport leaves these parameters fixed (no projector for their module): "
            f"{_groups(model, coverage, uncovered)}. Every name is listed in the report's frozen "
            f"dict. {HOW_TO_ADD}",
            stacklevel=3,
        )
    if not coverage.modules:
        raise ValueError(_nothing_moves(model, coverage))
    return coverage


def assign_projectors(model: nn.Module, registry: Registry) -> Coverage:
    """The coverage of ``model`` before any policy: uncovered parameters are listed, not refused.

    Modules are visited parents first; a module whose parameters an ancestor's projector already
    claimed is skipped. A projector whose site or ``frozen()`` names a parameter the module does
    not have raises :class:`ProjectorSiteError`.
    """
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    claims = _Claims(Coverage(), uses, names, set())
    instances: dict[type, Projector] = {}
    for module_name, module in model.named_modules():
        projector_class = registry.projector_for(module)
        if projector_class is not None:
            projector = instances.setdefault(projector_class, projector_class())
            claims.claim(CoveredModule(module_name, module, projector, []))
    claims.leave_unclaimed(model)
    return claims.coverage


class ProjectorSiteError(ValueError):
    """A projector names a parameter its module lacks (a bias the module was built without)."""


@dataclass
class _Claims:
    """What the projectors claimed so far while :func:`assign_projectors` walks the model."""

    coverage: Coverage
    uses: Counter  # modules holding each parameter, by id
    names: dict[int, str]  # each trainable parameter's qualified name, by id
    claimed: set[int]

    def claim(self, covered: CoveredModule) -> None:
        """Claim what ``covered``'s projector moves or keeps fixed, unless already claimed."""
        module, projector = covered.module, covered.projector
        sites: list[tuple[Site, list[nn.Parameter]]] = []
        fixed: dict[str, tuple[nn.Parameter, str]] = {}  # qualified name -> (parameter, reason)
        for site in projector.sites(module):
            tensors = [local for local in (site.weight, site.bias) if local]
            reason = next(
                filter(None, (_parametrization(module, local) for local in tensors)), None
            )
            if reason is None:
                sites.append((site, [_parameter(covered, local, site) for local in tensors]))
            else:  # a parametrization computes the site's weight: its own tensors stay fixed
                for local in tensors:
                    fixed.update(_fixed(covered, local, reason))
        for local, reason in projector.frozen(module).items():
            fixed.update(_fixed(covered, local, _parametrization(module, local) or reason))
        owned = [p for _, params in sites for p in params] + [p for p, _ in fixed.values()]
        if all(id(p) in self.claimed for p in owned):
            return
        self.claimed.update(id(p) for p in owned)
        for name, (param, reason) in fixed.items():
            if param.requires_grad:
                self.coverage.frozen[name] = reason
                self.coverage.owners[name] = covered.name
        for site, params in sites:
            self._take(covered, site, params)
        if covered.sites:
            self.coverage.modules.append(covered)

    def _take(self, covered: CoveredModule, site: Site, params: list[nn.Parameter]) -> None:
        """Move ``site`` if its parameters are trainable and not shared, else keep them fixed."""
        if all(p.requires_grad and self.uses[id(p)] == 1 for p in params):
            covered.sites.append(site)
            for local in (site.weight, site.bias):
                if local:
                    self.coverage.owners[covered.qualified(local)] = covered.name
            return
        reason = (
            "shared between modules"
            if any(self.uses[id(p)] > 1 for p in params)
            else "its site has a parameter with requires_grad=False"
        )
        for p in params:
            if p.requires_grad:
                self.coverage.frozen[self.names[id(p)]] = reason
                self.coverage.owners.setdefault(self.names[id(p)], covered.name)

    def leave_unclaimed(self, model: nn.Module) -> None:
        """Every trainable parameter no projector claimed: fixed, owned by the module holding it
        (by the parametrized module for a parametrization's tensors)."""
        holders: dict[int, str] = {}
        for module_name, module in model.named_modules():
            if isinstance(module, parametrize.ParametrizationList):
                module_name = module_name.rpartition("parametrizations.")[0].removesuffix(".")
            for _, p in module.named_parameters(recurse=False):
                holders.setdefault(id(p), module_name)
        for pid, name in self.names.items():
            if pid not in self.claimed:
                self.coverage.frozen[name] = UNCOVERED_REASON
                self.coverage.owners[name] = holders[pid]


def _parametrization(module: nn.Module, local: str) -> str | None:
    """Why ``module``'s tensor ``local`` cannot move if a parametrization computes it, else None."""
    prefix, _, leaf = local.rpartition(".")
    owner = _submodule(module, prefix)
    if owner is None or not parametrize.is_parametrized(owner, leaf):
        return None
    kinds = ", ".join(type(step).__name__ for step in owner.parametrizations[leaf])
    return (
        f"{leaf} is parametrized by {kinds} (torch.nn.utils.parametrize): a teleport step in "
        "weight space cannot be mapped through it"
    )


def _fixed(covered: CoveredModule, local: str, reason: str) -> dict[str, tuple[nn.Parameter, str]]:
    """``local`` kept fixed for ``reason``: the tensor itself, or the parametrization's own tensors
    (``parametrizations.weight.original0``, ...) where a parametrization computes it."""
    prefix, _, leaf = local.rpartition(".")
    owner = _submodule(covered.module, prefix)
    if owner is not None and parametrize.is_parametrized(owner, leaf):
        base = f"{prefix}.parametrizations.{leaf}" if prefix else f"parametrizations.{leaf}"
        tensors = owner.parametrizations[leaf].named_parameters()
        return {covered.qualified(f"{base}.{name}"): (p, reason) for name, p in tensors}
    return {covered.qualified(local): (_parameter(covered, local), reason)}


def _parameter(covered: CoveredModule, local: str, site: Site | None = None) -> nn.Parameter:
    """The parameter ``local`` of ``covered``'s module; a projector naming one it lacks is told."""
    prefix, _, leaf = local.rpartition(".")
    owner = _submodule(covered.module, prefix)
    value = getattr(owner, leaf, None) if owner is not None else None
    if isinstance(value, nn.Parameter):
        return value
    if owner is None or not hasattr(owner, leaf):
        found = "the module has no such attribute"
    elif value is None:
        found = "it is None (the module was built without it)"
    else:
        found = f"it is a {type(value).__name__}, not an nn.Parameter"
    role = (
        f"the {'bias' if local == site.bias else 'weight'} of site {site.name!r}"
        if site
        else "a frozen parameter"
    )
    where = f"module {covered.name!r}" if covered.name else "the model itself"
    raise ProjectorSiteError(
        f"{type(covered.projector).__name__} names parameter {local!r} as {role} of {where} "
        f"({type(covered.module).__name__}), but {found}; a site names only parameters its module "
        "has (bias=None for a module without a bias)"
    )


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


# -- messages --------------------------------------------------------------------------
NAMES_SHOWN = 6
"""How many parameter names a message lists before it only counts them."""


def _names(names: list[str], shown: int = NAMES_SHOWN) -> str:
    if len(names) <= shown:
        return ", ".join(names)
    return ", ".join(names[:shown]) + f", ... ({len(names)} in all)"


def _groups(
    model: nn.Module, coverage: Coverage, names: list[str], *, names_too: bool = True
) -> str:
    """``names`` grouped by the type of their module: ``"Gain x12 (1.gain, 1.shift, ...)"``."""
    groups: dict[str, tuple[set[str], list[str]]] = {}
    for name in names:
        owner = coverage.owners[name]
        modules, params = groups.setdefault(type(model.get_submodule(owner)).__name__, (set(), []))
        modules.add(owner)
        params.append(name)
    return "; ".join(
        f"{kind} x{len(modules)} ({_names(params, 3) if names_too else _count(params)})"
        for kind, (modules, params) in groups.items()
    )


def _count(params: list[str]) -> str:
    return f"{len(params)} parameter{'s' if len(params) != 1 else ''}"


def _nothing_moves(model: nn.Module, coverage: Coverage) -> str:
    """Why no parameter of ``model`` can move: the uncovered module types apart from the frozen."""
    head = f"no parameter of {type(model).__name__} can be teleported"
    if not coverage.frozen:
        return f"{head}: it has no trainable parameters"
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    parts = [f"{head} ({len(trainable)} trainable: {_names(trainable)})"]
    uncovered = coverage.uncovered()
    if uncovered:
        parts.append(f"No projector for the module types {_groups(model, coverage, uncovered)}")
    by_reason: dict[str, list[str]] = {}
    for name, reason in coverage.frozen.items():
        if reason != UNCOVERED_REASON:
            by_reason.setdefault(reason, []).append(name)
    if by_reason:
        parts.append(
            "Kept fixed: "
            + "; ".join(
                f"{_groups(model, coverage, names)}, reason: {reason}"
                for reason, names in by_reason.items()
            )
        )
    parts.append(HOW_TO_ADD)
    return ". ".join(parts)
