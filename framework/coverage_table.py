"""What a teleport could move in a model, per module, on one example batch: the coverage table.

Room is judged with the core space the teleport would keep (the same null
space and ``tau``, resolved by :func:`~torch_teleport.core_space.resolve_null_space`).
Two kinds of null direction are counted apart, as no real room:

- *rounding*: directions the null space finds in the representation's dtype but
  not in the same batch run through a float64 copy of the model. The batch does
  reach into them, below the dtype's precision: they are null only because
  rounding hides that, not by the null space's own rule.
- *LayerNorm's mean direction*: after a LayerNorm with gain ``gamma`` and shift
  ``beta`` every output ``x`` satisfies ``sum((x - beta) / gamma) = 0``, so the
  folded-bias representation of a layer reading it has the null direction
  ``[1 / gamma, -sum(beta / gamma)]``; a step along it changes the layer's output
  for no input at all, so it moves nothing.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .bases import MIN_ROOM, SiteRepresentations, site_basis
from .core_space import DEFAULT_NULL_SPACE, resolve_null_space
from .coverage import UNCOVERED_REASON, Coverage, assign_projectors, capture_inputs
from .inputs import Inputs, batch_size
from .model_state import preserved_state
from .null_space import CoreBasis, NullSpace, Spectrum, spectrum
from .projector import Site
from .registry import Registry, default_registry

STATUSES = ("covered", "frozen", "uncovered")

SiteKey = tuple[str, str]
"""``(module name, site name)``."""


@dataclass(frozen=True)
class SiteCheck:
    """One site of a covered module on the example batch: how much room a teleport has there.

    ``input_dim`` counts the folded bias and adds up over groups, as
    ``null_dim`` does; ``null_dim`` is ``None`` when the module did not run.
    ``rounding_dim`` and ``layer_norm_dim`` count the null directions that are
    no room (see the module docstring); :attr:`room` is what is left.
    """

    name: str
    input_dim: int
    null_dim: int | None
    samples: int
    groups: int = 1
    rounding_dim: int = 0
    layer_norm_dim: int = 0

    @property
    def room(self) -> int | None:
        """The null directions a teleport can use: ``null_dim`` less the two kinds of no room."""
        if self.null_dim is None:
            return None
        return max(self.null_dim - self.rounding_dim - self.layer_norm_dim, 0)


@dataclass(frozen=True)
class ModuleCheck:
    """One module with trainable parameters: ``covered`` (some site can move), ``frozen`` or
    ``uncovered``.

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
        """Why the module's fixed parameters stay fixed (distinct reasons joined), else ``None``."""
        reasons = list(dict.fromkeys(self.frozen.values()))
        return "; ".join(reasons) if reasons else None


@dataclass
class CoverageTable:
    """What a teleport could move in a model, per module, on one example batch.

    ``null_space`` names the core space the room was judged with, e.g. ``"svd (tau = 0.999)"``.
    """

    model: str
    batch: int
    modules: list[ModuleCheck]
    null_space: str

    def __getitem__(self, name: str) -> ModuleCheck:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(f"no module {name!r} with trainable parameters in the table")

    def count(self, status: str) -> int:
        return sum(module.status == status for module in self.modules)

    def to_dict(self) -> dict:
        """The table as plain data; each site also gives its ``room`` and its ``note``."""
        data = asdict(self)
        for module, row in zip(self.modules, data["modules"], strict=True):
            for site, site_row in zip(module.sites, row["sites"], strict=True):
                site_row.update(room=site.room, note=_site_note(site))
        return data

    def summary(self) -> str:
        sites = [site for module in self.modules for site in module.sites]
        room = sum(bool(site.room) for site in sites)
        spurious = sum(bool(site.null_dim) and not site.room for site in sites)
        more = f" ({spurious} more only LayerNorm's mean direction or rounding)" if spurious else ""
        return (
            f"{self.model}: {len(self.modules)} modules with trainable parameters: "
            f"{self.count('covered')} covered, {self.count('frozen')} frozen, "
            f"{self.count('uncovered')} uncovered; {room} of {len(sites)} sites have room on this "
            f"batch of {self.batch}{more}"
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
            notes: dict[str, list[str]] = {}
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
    if site.null_dim == 0:
        return "no room on this batch"
    parts = []
    if site.layer_norm_dim:
        parts.append("LayerNorm's mean direction (moves nothing)")
    if site.rounding_dim:
        parts.append(f"{site.rounding_dim} below the inputs' precision (rounding)")
    if not parts:
        return ""
    if site.room == 0:
        return "no real room: only " + " and ".join(parts)
    return f"real room {site.room}; the rest: " + " and ".join(parts)


NOTE_WIDTH = 80
"""Longest reason a table cell shows; ``to_dict`` keeps the full text."""


def _short(reason: str) -> str:
    """The first clause of a reason, cut to :data:`NOTE_WIDTH` characters, for one table cell."""
    clause = reason.split(":")[0]
    if len(clause) <= NOTE_WIDTH:
        return clause
    return clause[: NOTE_WIDTH - 3].rsplit(" ", 1)[0] + " ..."


def check_coverage(
    model: nn.Module,
    inputs: Inputs,
    *,
    null_space: str | NullSpace = DEFAULT_NULL_SPACE,
    tau: float | None = None,
    basis: Inputs | None = None,
    registry: Registry | None = None,
) -> CoverageTable:
    """Which modules of ``model`` a teleport moves, which stay fixed and why, and the room it has.

    ``inputs`` is a batch as a teleport gets it; ``null_space``, ``tau`` and
    ``basis`` (a sample whose inputs join the core space) are the teleport's
    options, with its defaults. One no-grad forward of each, in eval mode, with
    the projectors' capture hooks; hooks, train/eval flags and buffers are
    restored. Where a representation narrower than float64 shows room, a
    float64 copy of the model (memory: twice the model's in float32) runs the
    same samples, to tell rounding apart. Nothing is raised for a model that
    cannot move at all; its table says why.
    """
    registry = registry or default_registry()
    space = resolve_null_space(null_space, tau, registry)
    coverage = assign_projectors(model, registry)
    samples = [inputs] if basis is None else [inputs, basis]
    bases = _site_bases(model, coverage, samples, space)
    rounding = _rounding_dims(model, registry, space, samples, bases)
    norms = _layer_norm_directions(model)
    sites: dict[str, list[SiteCheck]] = {}
    for covered in coverage.modules:
        for site in covered.sites:
            key = (covered.name, site.name)
            if key not in bases:
                input_dim = covered.projector.input_dim(covered.module, site) * site.groups
                check = SiteCheck(site.name, input_dim, None, 0, site.groups)
            else:
                core, spec = bases[key]
                check = SiteCheck(
                    site.name,
                    core.input_dim * site.groups,
                    core.null_dim,
                    spec.samples,
                    site.groups,
                    rounding.get(key, 0),
                    _layer_norm_dims(site, core, spec, norms),
                )
            sites.setdefault(covered.name, []).append(check)
    name = null_space if isinstance(null_space, str) else type(null_space).__name__
    rows = _module_rows(model, coverage, sites)
    return CoverageTable(
        type(model).__name__, batch_size(inputs), rows, f"{name} (tau = {space.tau:g})"
    )


def _site_bases(
    model: nn.Module, coverage: Coverage, samples: list[Inputs], space: NullSpace
) -> dict[SiteKey, tuple[CoreBasis, Spectrum]]:
    """Each site's core basis, as a teleport builds it (the first sample the teleport batch, the rest
    the basis sample), and the spectrum of all its inputs (none: not run)."""
    with preserved_state(model):
        captured = capture_inputs(coverage, model, samples[0])
        others: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
        for sample in samples[1:]:
            for key, tensors in capture_inputs(coverage, model, sample).items():
                others[key] += tensors
    bases = _with(coverage, captured, others, space)
    room = any(basis.null_dim >= MIN_ROOM * basis.input_dim for basis, _ in bases.values())
    if space.fallback is not None and not room:  # as a teleport does where its null space leaves none
        bases = _with(coverage, captured, others, space.fallback)
    return bases


def _with(coverage: Coverage, captured: dict, others: dict, space: NullSpace) -> dict[SiteKey, tuple[CoreBasis, Spectrum]]:
    bases = {}
    for covered in coverage.modules:
        for site in covered.sites:
            found = site_basis(covered, site, captured, others, space)
            if found is not None:
                key = (covered.name, site.stream)
                parts = SiteRepresentations(covered, site, captured.get(key, []), others.get(key, []))
                bases[(covered.name, site.name)] = (found.basis, spectrum(parts.everything()))
    return bases


def _rounding_dims(
    model: nn.Module,
    registry: Registry,
    space: NullSpace,
    samples: list[Inputs],
    bases: dict[SiteKey, tuple[CoreBasis, Spectrum]],
) -> dict[SiteKey, int]:
    """Each site's null directions that the samples through a float64 copy of the model lack."""
    if not any(spec.dtype != torch.float64 and core.null_dim for core, spec in bases.values()):
        return {}
    try:
        wide = copy.deepcopy(model).double()
        wide_bases = _site_bases(
            wide, assign_projectors(wide, registry), [_widened(s) for s in samples], space
        )
    except Exception as error:  # a kernel without float64, a model that cannot be copied
        warnings.warn(
            f"check_coverage could not run a float64 copy of {type(model).__name__} "
            f"({type(error).__name__}: {error}), so rounding is not told apart from room",
            RuntimeWarning,
            stacklevel=3,
        )
        return {}
    return {
        key: max(core.null_dim - wide_bases[key][0].null_dim, 0)
        for key, (core, spec) in bases.items()
        if spec.dtype != torch.float64 and key in wide_bases
    }


def _widened(inputs: Inputs) -> Inputs:
    """``inputs`` with every floating-point tensor in float64 (token ids and masks as they are)."""

    def widen(value: object) -> object:
        return value.double() if isinstance(value, Tensor) and value.is_floating_point() else value

    if isinstance(inputs, Tensor):
        return widen(inputs)
    if isinstance(inputs, Mapping):
        return {key: widen(value) for key, value in inputs.items()}
    return type(inputs)(widen(value) for value in inputs)


def _layer_norm_directions(model: nn.Module) -> dict[int, list[Tensor]]:
    """``[1 / gamma, -sum(beta / gamma)]`` of each LayerNorm over one axis, in float64, by width."""
    directions: dict[int, list[Tensor]] = defaultdict(list)
    for module in model.modules():
        if not (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1):
            continue
        width = module.normalized_shape[0]
        gamma = (
            module.weight.detach().double()
            if module.weight is not None
            else torch.ones(width, dtype=torch.float64)
        )
        beta = module.bias.detach().double() if module.bias is not None else torch.zeros_like(gamma)
        if bool(
            (gamma != 0).all()
        ):  # a zero gain makes its channel constant: another null direction
            directions[width].append(torch.cat([1 / gamma, -(beta / gamma).sum().reshape(1)]).cpu())
    return directions


def _layer_norm_dims(
    site: Site, core: CoreBasis, spec: Spectrum, norms: dict[int, list[Tensor]]
) -> int:
    """How many null directions of the site are a LayerNorm's mean direction.

    A direction counts when the site's inputs have no extent along it beyond
    the precision of their dtype (relative ``sqrt(eps)``) and it lies in the
    site's null space. Only sites of one group whose input width matches a
    LayerNorm's are looked at.
    """
    width = core.input_dim - (site.bias is not None)
    if site.groups != 1 or not core.null_dim or width not in norms:
        return 0
    tolerance = torch.finfo(spec.dtype).eps ** 0.5
    vectors, squared = spec.vectors[0].cpu(), spec.squared[0].cpu()
    basis = core.vectors[0].double().cpu()
    found = []
    for direction in norms[width]:
        if site.bias is None:
            if direction[-1].abs() > tolerance * direction[:-1].norm():
                continue  # the mean direction needs the bias column when beta is not zero
            direction = direction[:-1]
        unit = direction / direction.norm()
        extent = ((vectors.T @ unit).square() * squared).sum().sqrt()
        along = basis @ (basis.T @ unit)  # the part in the span of the basis vectors
        outside_null = (unit - along if core.spans_null_space else along).norm()
        if extent <= tolerance * squared[0].sqrt() and outside_null <= tolerance:
            found.append(unit)
    if not found:
        return 0
    return min(int(torch.linalg.matrix_rank(torch.stack(found), rtol=tolerance)), core.null_dim)


def _module_rows(
    model: nn.Module, coverage: Coverage, sites: dict[str, list[SiteCheck]]
) -> list[ModuleCheck]:
    """One row per module with trainable parameters, in the model's order."""
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
    return rows
