"""The projected update and its algebra: dense per-parameter tensors plus factored sites, as a step.

A site's structured update ``delta^T lambda`` has rank at most the number
of samples; where that is small it stays a product of two factors
(:class:`FactoredSite`), projected, normed and added to the weights without
ever being formed. :class:`ProjectedStep` is the null-space method's step:
the loop scales it, it cuts the scale per module, adds itself to the
weights and takes itself back by subtraction (no copy of the weights).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .climb import Applied, Step
from .coverage import CoveredModule
from .null_space import CoreBasis
from .projector import Site, site_view
from .sharding import norms, squared_norms


@dataclass
class FactoredSite:
    """A site's structured update ``left @ right`` kept as its two factors.

    ``left`` is ``(groups, rows, samples)`` (the output gradients, times the
    objective's slope) and ``right`` ``(groups, samples, inputs)`` (the
    projected tangent inputs, the folded bias last). Never formed as a
    dense matrix before it is added to the weights.
    """

    covered: CoveredModule
    site: Site
    left: Tensor
    right: Tensor

    @classmethod
    def projected(cls, covered: CoveredModule, site: Site, left: Tensor, tangents: Tensor, basis: CoreBasis) -> FactoredSite:
        """The factored update with the tangent factor ``tangents`` (``(groups, samples, inputs)``,
        folded bias last) projected: ``P(left @ tangents) = left @ P(tangents)``."""
        width = site_view(covered.module.get_parameter(site.weight), site).shape[-1]
        weight, bias = basis.project(tangents[..., :width], tangents[..., width:] if site.bias is not None else None)
        return cls(covered, site, left, weight if bias is None else torch.cat([weight, bias], -1))

    def squared_norm(self) -> Tensor:
        """``||left @ right||_F^2`` from the two ``samples x samples`` Gram matrices (in float64)."""
        left, right = self.left.double(), self.right.double()
        return ((left.transpose(-1, -2) @ left) * (right @ right.transpose(-1, -2))).sum()

    def add_to_weights(self, scale: float) -> None:
        module, site = self.covered.module, self.site
        weight = site_view(module.get_parameter(site.weight), site)
        width = weight.shape[-1]
        weight.baddbmm_(self.left, self.right[..., :width], alpha=scale)
        if site.bias is not None:
            bias = site_view(module.get_parameter(site.bias), site, bias=True)
            bias.baddbmm_(self.left, self.right[..., width:], alpha=scale)


@dataclass
class ProjectedUpdate:
    """One projected objective gradient: dense per-parameter tensors plus factored sites."""

    dense: dict[str, Tensor]
    factored: list[FactoredSite]

    @functools.cached_property
    def squares(self) -> list[float]:
        """Each part's squared Frobenius norm (dense parameters in order, then factored sites),
        accumulated in float64 (squares overflow float32); computed once per step and its retries."""
        squares = squared_norms(list(self.dense.values()))  # of the whole tensors, however sharded
        return squares + [float(part.squared_norm()) for part in self.factored]

    def norm(self) -> float:
        """The Frobenius norm over every parameter."""
        return math.sqrt(sum(self.squares))

    def scales(self, scale: float, modules: dict[str, str], limits: dict[str, float] | None) -> list[float]:
        """``scale`` per part (dense parameters in order, then factored sites), cut per module
        where the step would move the module's parameters by more than its entry in ``limits``
        (``modules``: each parameter's module; ``None``: nothing is cut; a limit of 0, a module
        of zero norm, is not applied).

        Every site of a module gets the same factor, so each site's update stays in its null
        space and a shorter step keeps the batch's loss exactly as the whole step does."""
        owners = [modules[name] for name in self.dense] + [part.covered.name for part in self.factored]
        if limits is None:
            return [scale] * len(owners)
        squares: dict[str, float] = defaultdict(float)
        for owner, square in zip(owners, self.squares, strict=True):
            squares[owner] += square
        factor = {}
        for owner, square in squares.items():
            moved, limit = abs(scale) * math.sqrt(square), limits[owner]
            factor[owner] = limit / moved if limit > 0 and moved > limit else 1.0
        return [scale * factor[owner] for owner in owners]

    def add_to_weights(self, params: dict[str, nn.Parameter], scales: list[float], sign: float = 1.0) -> None:
        """Add each part times its scale (from :meth:`scales`), or subtract it with ``sign=-1``."""
        dense = len(self.dense)
        with torch.no_grad():
            for (name, update), scale in zip(self.dense.items(), scales[:dense], strict=True):
                params[name].add_(update, alpha=sign * scale)
            for part, scale in zip(self.factored, scales[dense:], strict=True):
                part.add_to_weights(sign * scale)


class MovedWeights:
    """The parameters a teleport's steps move, with the norms its step rule and module limits refer to.

    ``reference`` is their joint norm at the teleport's start (a normalised
    step is relative to it); each module's own norm bounds how far one step
    may move it.
    """

    def __init__(self, params: dict[str, nn.Parameter], module_of: dict[str, str]) -> None:
        self.params, self.module_of = params, module_of
        sizes = dict(zip(params, norms(list(params.values())), strict=True))  # whole, however sharded
        self.reference = math.sqrt(sum(size**2 for size in sizes.values()))
        squares: dict[str, float] = defaultdict(float)
        for name, size in sizes.items():
            squares[module_of[name]] += size**2
        self.module_norms = {module: math.sqrt(square) for module, square in squares.items()}


class ProjectedStep(Step):
    """A projected update as a step of the ascent: scaled, cut per module, undone by subtraction
    (which restores the weights to rounding; a factored step holds only its factors)."""

    def __init__(self, update: ProjectedUpdate, weights: MovedWeights) -> None:
        self.update, self.weights = update, weights
        self.norm, self.reference = update.norm(), weights.reference

    def apply(self, scale: float, module_limit: float | None) -> Applied:
        if scale == 0:  # every site was wholly in its core space (see CoreBasis.project)
            return Applied()
        limits = None
        if module_limit is not None:
            limits = {module: module_limit * norm for module, norm in self.weights.module_norms.items()}
        scales = self.update.scales(scale, self.weights.module_of, limits)
        self.update.add_to_weights(self.weights.params, scales)
        return Applied(
            undo=lambda: self.update.add_to_weights(self.weights.params, scales, sign=-1.0),
            redo=lambda: self.update.add_to_weights(self.weights.params, scales),
        )
