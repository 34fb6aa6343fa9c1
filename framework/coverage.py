"""Which projector moves which parameter, and which parameters stay fixed and why."""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .inputs import Inputs, batch_size, call_model
from .model_state import preserved_state
from .null_space import spectrum
from .projector import Projector, Site
from .registry import Registry, default_registry

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
    """The module of every trainable parameter: the one whose projector claims it, else its holder."""

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


def capture_inputs(coverage: Coverage, model: nn.Module, inputs: Inputs) -> dict[tuple[str, str], list[Tensor]]:
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
            f"{_groups(model, coverage, uncovered, names_too=False)}. {HOW_TO_ADD}; to leave them fixed, use the "
            'uncovered policy "warn" or "freeze"'
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
    """The coverage of ``model`` before any policy: uncovered parameters listed, nothing raised."""
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
                coverage.owners[covered.qualified(local)] = module_name
        for site in projector.sites(module):
            params = [
                module.get_parameter(local) for local in filter(None, (site.weight, site.bias))
            ]
            if all(p.requires_grad and uses[id(p)] == 1 for p in params):
                covered.sites.append(site)
                for local in filter(None, (site.weight, site.bias)):
                    coverage.owners[covered.qualified(local)] = module_name
                continue
            reason = (
                "shared between modules"
                if any(uses[id(p)] > 1 for p in params)
                else "its site has a parameter with requires_grad=False"
            )
            for p in params:
                if p.requires_grad:
                    coverage.frozen[names[id(p)]] = reason
                    coverage.owners.setdefault(names[id(p)], module_name)
        if covered.sites:
            coverage.modules.append(covered)
    holders = {}
    for module_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            holders.setdefault(id(p), module_name)
    for pid, name in names.items():
        if pid not in claimed:
            coverage.frozen[name] = UNCOVERED_REASON
            coverage.owners[name] = holders[pid]
    return coverage


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
    """Why no parameter of ``model`` can move: the uncovered module types apart from the frozen ones."""
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


# -- checking a model ---------------------------------------------------------------------
STATUSES = ("covered", "frozen", "uncovered")


@dataclass(frozen=True)
class SiteCheck:
    """One site of a covered module on the example batch: how much room a teleport has there.

    ``input_dim`` counts the folded bias and adds up over groups, as
    ``null_dim`` does; ``null_dim`` is ``None`` when the module did not run.
    """

    name: str
    input_dim: int
    null_dim: int | None
    samples: int
    groups: int = 1


@dataclass(frozen=True)
class ModuleCheck:
    """One module with trainable parameters: ``covered`` (some site can move), ``frozen`` or ``uncovered``.

    ``frozen`` maps the module's parameters that stay fixed to the reason,
    also for a covered module (an LSTM's output projection).
    """

    name: str
    type: str
    status: str
    parameters: tuple[str, ...]
    sites: tuple[SiteCheck, ...] = ()
    frozen: dict[str, str] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        """Why the module's fixed parameters stay fixed (distinct reasons joined), ``None`` if none do."""
        reasons = list(dict.fromkeys(self.frozen.values()))
        return "; ".join(reasons) if reasons else None


@dataclass
class CoverageTable:
    """What a teleport could move in a model, per module, on one example batch (exact null space)."""

    model: str
    batch: int
    modules: list[ModuleCheck]

    def __getitem__(self, name: str) -> ModuleCheck:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(f"no module {name!r} with trainable parameters in the table")

    def count(self, status: str) -> int:
        return sum(module.status == status for module in self.modules)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        sites = [site for module in self.modules for site in module.sites]
        room = sum(bool(site.null_dim) for site in sites)
        return (
            f"{self.model}: {len(self.modules)} modules with trainable parameters: "
            f"{self.count('covered')} covered, {self.count('frozen')} frozen, "
            f"{self.count('uncovered')} uncovered; {room} of {len(sites)} sites have room on this "
            f"batch of {self.batch}"
        )

    def __str__(self) -> str:
        rows = [("module", "type", "status", "site", "inputs", "null", "samples", "note")]
        for module in self.modules:
            first = (module.name or "(model)", module.type, module.status)
            lines = [
                (
                    site.name,
                    str(site.input_dim),
                    "-" if site.null_dim is None else str(site.null_dim),
                    str(site.samples),
                    _site_note(site),
                )
                for site in module.sites
            ]
            notes = {}
            for param, reason in module.frozen.items():
                notes.setdefault(_short(reason), []).append(param.removeprefix(module.name + "."))
            lines += [
                (
                    "",
                    "",
                    "",
                    "",
                    ("fixed: " + ", ".join(params) + ": " if module.sites else "") + reason,
                )
                for reason, params in notes.items()
            ]
            for i, line in enumerate(lines):
                rows.append((*(first if i == 0 else ("", "", "")), *line))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        right = {4, 5, 6}
        text = [
            "  ".join(
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=False))
            )
            + "  "
            + row[-1]
            for row in rows
        ]
        return "\n".join(line.rstrip() for line in [*text, "", self.summary()])


def _site_note(site: SiteCheck) -> str:
    if site.null_dim is None:
        return "did not run on the batch"
    return "no room on this batch" if site.null_dim == 0 else ""


NOTE_WIDTH = 80
"""Longest reason a table cell shows; ``to_dict`` keeps the full text."""


def _short(reason: str) -> str:
    """The first clause of a reason, cut to :data:`NOTE_WIDTH` characters, for one table cell."""
    clause = reason.split(":")[0]
    if len(clause) <= NOTE_WIDTH:
        return clause
    return clause[: NOTE_WIDTH - 3].rsplit(" ", 1)[0] + " ..."


def check_coverage(
    model: nn.Module, inputs: Tensor, registry: Registry | None = None
) -> CoverageTable:
    """Which modules of ``model`` a teleport moves, which stay fixed and why, and the room on ``inputs``.

    One no-grad forward of ``inputs`` (a batch, as a teleport gets it) in
    eval mode, with the projectors' capture hooks; each covered site's null
    space is the exact one (tau = 1). Hooks, train/eval flags and buffers
    are restored: the model is left as it was. Nothing is raised for a
    model that cannot move at all; its table says why.
    """
    registry = registry or default_registry()
    coverage = assign_projectors(model, registry)
    with preserved_state(model):
        captured = capture_inputs(coverage, model, inputs)
    exact = registry.get("null_space", "exact")(tau=1.0)
    sites: dict[str, list[SiteCheck]] = {}
    for covered in coverage.modules:
        for site in covered.sites:
            tensors = captured.get((covered.name, site.stream))
            if not tensors:
                input_dim = covered.projector.input_dim(covered.module, site) * site.groups
                check = SiteCheck(site.name, input_dim, None, 0, site.groups)
            else:
                representation = covered.projector.representation(
                    covered.module, site, tensors
                ).detach()
                spec = spectrum(representation)
                basis = exact.basis_of(spec)
                check = SiteCheck(
                    site.name,
                    basis.input_dim * site.groups,
                    basis.null_dim,
                    spec.samples,
                    site.groups,
                )
            sites.setdefault(covered.name, []).append(check)
    params: dict[str, list[str]] = {}
    for name, owner in coverage.owners.items():
        params.setdefault(owner, []).append(name)
    rows = []
    for module_name, module in model.named_modules():
        if module_name not in params:
            continue
        frozen = {
            name: coverage.frozen[name] for name in params[module_name] if name in coverage.frozen
        }
        if module_name in sites:
            status = "covered"
        elif UNCOVERED_REASON in frozen.values():
            status = "uncovered"
        else:
            status = "frozen"
        rows.append(
            ModuleCheck(
                module_name,
                type(module).__name__,
                status,
                tuple(params[module_name]),
                tuple(sites.get(module_name, ())),
                frozen,
            )
        )
    return CoverageTable(type(model).__name__, batch_size(inputs), rows)
