"""The null-space interface: from a representation matrix to a basis of its core space.

A :class:`NullSpace` decides how many leading singular directions of a
layer's representation form the *core* space (the span the update must
avoid); :class:`CoreBasis` applies the projection ``G - G B B^T``.

The spectrum is computed in float64 (a float32 basis would leave a residue
of ``eps * cond(R)`` of every update in the core space), by the cheapest
route for the shape:

* for float32 and narrower representations with at least twice as many
  samples as input dimensions, the eigendecomposition of the ``d x d`` Gram
  matrix ``R R^T``; in float64 it resolves singular values down to
  ``1e-8 sigma_max``, below float32 resolution but far above float64's, so
  float64 representations never take a Gram route;
* for float32 and narrower representations with fewer samples than input
  dimensions (a convolution's patches in a wide layer, a feed-forward layer
  about as wide as its tokens), the eigendecomposition of the ``N x N`` Gram
  matrix ``R^T R``, the left singular vectors ``R V / S`` made orthonormal
  again, and a second Gram for what those leave where it can hold a
  direction above the SVD's tolerance: as accurate, in a fraction of the
  thin SVD's memory (no float64 copy of ``R``, no LAPACK work space of
  ``d x N``); where only the strong directions count (``leading``), one such
  eigendecomposition without the rest;
* for float32 and narrower representations with between one and two samples
  per dimension (a feed-forward layer at a few more tokens than its width),
  the eigendecomposition of the ``d x d`` Gram matrix ``R R^T``, and, in the
  space its directions below the Gram's noise floor span, a second Gram of
  ``R``'s part there: the thin SVD's rank and core space without its ``d x N``
  work space;
* otherwise (float64, or where the orthonormal passes fail) the thin SVD of
  ``R`` (``d x N``).

No dense ``d x d`` projector is ever formed; when the Gram route yields the
whole eigenbasis and the null space is the smaller side, the projection is
applied through the null-space vectors instead (``G N N^T``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm

ROUNDING_LEVEL = 100
"""An update of which less than ``ROUNDING_LEVEL * eps`` survives projection held no null-space direction."""

REPROJECT_BELOW = 0.25
"""Project a second time when less than this fraction of an update's norm survives the first pass."""

GRAM_ROUTE_RATIO = 2
"""Use the Gram route when ``samples >= GRAM_ROUTE_RATIO * dims`` (float32 and below)."""


@dataclass(frozen=True)
class Spectrum:
    """Singular directions of a batch of representations, strongest first."""

    vectors: Tensor  # (groups, dims, m) orthonormal columns
    squared: Tensor  # (groups, m) squared singular values, descending
    complete: bool  # vectors span the whole input space (m == dims)
    samples: int
    dtype: torch.dtype = torch.float64  # of the representation: the basis is cast to it
    from_gram: bool = False  # eigenvalues of R R^T rather than singular values of R

    @property
    def dims(self) -> int:
        return self.vectors.shape[1]

    def rank_tolerance(self) -> Tensor:
        """Squared-singular-value threshold of the numerical rank, per group.

        The spectrum is computed in float64 whatever the representation's
        dtype, so the threshold is float64's noise floor: for the SVD route
        ``sigma_i > sigma_max * max(dims, samples) * eps`` (the NumPy
        ``matrix_rank`` convention), for the Gram route
        ``sigma_i^2 > sigma_max^2 * max(dims, samples) * eps`` (the eigenvalue
        noise of a float64 Gram matrix), ``eps`` of float64. A threshold at
        the representation's own ``eps`` would count real small directions of
        large float32 batches as null (at 25k tokens, everything below
        ``3e-3 sigma_max``) and let the loss drift.
        """
        scale = max(self.dims, self.samples) * torch.finfo(torch.float64).eps
        if not self.from_gram:
            scale = scale**2
        return self.squared[:, :1] * scale if self.squared.shape[1] else self.squared

    def leading(self, ranks: Tensor) -> Tensor:
        """The first ``ranks`` vectors of each group, in float64, zero columns padding the shorter (a
        view of :attr:`vectors` where no group is shorter)."""
        width = int(ranks.max()) if ranks.numel() else 0
        vectors = self.vectors[..., :width].double()
        if not ranks.numel() or int(ranks.min()) == width:
            return vectors
        columns = torch.arange(width, device=self.vectors.device)
        return vectors * (columns[None, :] < ranks[:, None].to(columns.device))[:, None, :]

    def numerical_rank(self) -> Tensor:
        """The number of directions above :meth:`rank_tolerance`, per group: the exact core rank."""
        return (self.squared > self.rank_tolerance()).sum(-1)


def spectrum(representation: Tensor, *, leading: bool = False) -> Spectrum:
    """The spectrum of ``representation`` (``groups x dims x samples``) by the cheapest accurate route.

    With ``leading`` only the strong directions need to be accurate (an energy threshold keeps
    them, never the weak ones): fewer samples than dimensions then take the eigendecomposition of
    the ``samples x samples`` Gram matrix ``R^T R`` instead of the SVD of ``R``.
    """
    if representation.dim() != 3:
        raise ValueError(f"representation must be (groups, dims, samples), got shape {tuple(representation.shape)}")
    if not torch.stack([block.isfinite().all() for block in sample_blocks(representation)]).all():  # one sync
        raise ValueError("representation contains non-finite values")
    _, dims, samples = representation.shape
    if uses_gram_route(dims, samples, representation.dtype):
        return gram_spectrum(float64_gram(representation), samples, representation.dtype)
    if leading and samples < dims:
        return _sample_gram_spectrum(representation.double(), representation.dtype)
    if representation.dtype != torch.float64 and samples:
        found = _tall_spectrum(representation) if samples >= dims else _wide_spectrum(representation)
        if found is not None:
            return found
    wide = representation.double()
    vectors, singular, _ = torch.linalg.svd(wide, full_matrices=False)
    return Spectrum(vectors, singular.square(), samples >= dims, samples, representation.dtype)


def _sample_gram_spectrum(wide: Tensor, dtype: torch.dtype) -> Spectrum:
    """The leading spectrum of ``wide`` (float64) from the eigendecomposition of ``R^T R``:
    ``R = U S V^T``, so ``U = R V / S`` for the directions whose ``S`` stands above the noise."""
    values, right = torch.linalg.eigh(wide.transpose(-1, -2) @ wide)
    values, right = values.flip(-1).clamp_min(0), right.flip(-1)
    floor = values[..., :1] * wide.shape[-1] * torch.finfo(torch.float64).eps
    scale = torch.where(values > floor, values.sqrt(), torch.ones_like(values))
    vectors = (wide @ right) / scale.unsqueeze(-2) * (values > floor).unsqueeze(-2)
    return Spectrum(vectors, values * (values > floor), False, wide.shape[-1], dtype, from_gram=True)


def _tall_spectrum(representation: Tensor) -> Spectrum:
    """The spectrum of a float32 ``R`` with between one and two samples per dimension, to the thin
    SVD's rank tolerance, from float64 eigendecompositions of ``dims x dims`` Gram matrices: the
    eigenvectors of ``R R^T`` above its noise floor, then, in the space ``W`` the others span, those
    of ``(W^T R)(W^T R)^T`` (formed a block of samples at a time), whose floor lies as far below the
    first's. A complete orthonormal basis; the directions about the first floor, where the two sets
    meet, stand far above the rank tolerance, so their order does not decide the rank."""
    groups, dims, samples = representation.shape
    values, vectors = torch.linalg.eigh(float64_gram(representation))
    values, vectors = values.flip(-1).clamp_min(0), vectors.flip(-1)
    floors = values[:, 0] * max(dims, samples) * torch.finfo(torch.float64).eps
    for group in range(groups):
        strong = int((values[group] > floors[group]).sum())
        if strong == dims:
            continue
        weak = vectors[group, :, strong:]
        gram = weak.new_zeros(dims - strong, dims - strong)
        for block in sample_blocks(representation[group : group + 1]):
            part = weak.transpose(-1, -2) @ block[0].double()
            gram.addmm_(part, part.transpose(-1, -2))
        rest, rotation = torch.linalg.eigh(gram)
        vectors[group, :, strong:] = weak @ rotation.flip(-1)
        values[group, strong:] = rest.flip(-1).clamp_min(0)
    return Spectrum(vectors, values, True, samples, representation.dtype)


def _wide_spectrum(representation: Tensor) -> Spectrum | None:
    """The spectrum of a float32 ``R`` with fewer samples than dimensions, to the thin SVD's rank
    tolerance, from float64 eigendecompositions of ``samples x samples`` Gram matrices summed over
    blocks of rows: the directions above the Gram's noise floor, then, where those leave any, the
    directions of what they leave of ``R`` above the SVD's tolerance (a Gram of its own, whose floor
    lies as far below the first's), each set orthonormal (``None`` where that fails: the SVD then
    decides)."""
    groups, dims, samples = representation.shape
    step = max(1, GRAM_BLOCK // samples)
    tolerance = (max(dims, samples) * torch.finfo(torch.float64).eps) ** 2  # the SVD's, on squares
    found: list[tuple[Tensor, Tensor]] = []
    for group in range(groups):
        matrix = representation[group]

        def rows(start: int, matrix: Tensor = matrix) -> Tensor:
            return matrix[start : start + step].double()

        strong = _gram_directions(rows, dims, samples, step)
        if strong is None:
            return None
        vectors, squared = strong
        if 0 < vectors.shape[1] < samples:
            coordinates = sum(vectors[start : start + step].transpose(-1, -2) @ rows(start) for start in range(0, dims, step))

            def rest(start: int, rows=rows, vectors: Tensor = vectors, coordinates: Tensor = coordinates) -> Tensor:
                return rows(start) - vectors[start : start + step] @ coordinates

            weak = _gram_directions(rest, dims, samples, step, floor=float(squared[0]) * tolerance)
            del rest, coordinates
            if weak is None:
                return None
            more = weak[0]
            if more.shape[1]:
                more -= vectors @ (vectors.transpose(-1, -2) @ more)  # orthogonal to the first set to rounding
                if not _orthonormalize(more, step):
                    return None
                vectors, squared = torch.cat([vectors, more], 1), torch.cat([squared, weak[1]])
        found.append((vectors, squared))
    width = max(vectors.shape[1] for vectors, _ in found)
    vectors = representation.new_zeros(groups, dims, width, dtype=torch.float64)
    squared = representation.new_zeros(groups, width, dtype=torch.float64)
    for group, (directions, values) in enumerate(found):
        vectors[group, :, : directions.shape[1]], squared[group, : values.shape[0]] = directions, values
    return Spectrum(vectors, squared, False, samples, representation.dtype)


def _gram_directions(
    rows: Callable[[int], Tensor], dims: int, samples: int, step: int, floor: float = 0.0
) -> tuple[Tensor, Tensor] | None:
    """The left singular directions of a ``dims x samples`` float64 matrix given ``step`` rows at a time,
    above its Gram matrix's noise floor and above ``floor`` on squares (``(dims, rank)`` orthonormal
    columns, ``(rank,)`` squared singular values, strongest first), or ``None`` where they cannot be
    made orthonormal. A Gram whose trace (the sum of its eigenvalues) is within ``floor`` holds none,
    and is not decomposed."""
    gram = torch.zeros(samples, samples, dtype=torch.float64, device=rows(0).device)
    for start in range(0, dims, step):
        block = rows(start)
        gram.addmm_(block.transpose(-1, -2), block)
    if gram.trace() <= floor:
        return gram.new_zeros(dims, 0), gram.new_zeros(0)
    values, right = torch.linalg.eigh(gram)
    del gram
    values = values.flip(-1).clamp_min(0)
    rank = int((values > max(float(values[0]) * max(dims, samples) * torch.finfo(torch.float64).eps, floor)).sum())
    coefficients = right.flip(-1)[:, :rank] / values[:rank].sqrt()
    del right
    vectors = torch.empty(dims, rank, dtype=torch.float64, device=values.device)
    for start in range(0, dims, step):  # U = A V / S
        vectors[start : start + step] = rows(start) @ coefficients
    return (vectors, values[:rank]) if _orthonormalize(vectors, step) else None


def _orthonormalize(vectors: Tensor, step: int) -> bool:
    """Make the columns of ``vectors`` orthonormal in place by two Cholesky QR passes (``U <- U L^-T``
    with ``U^T U = L L^T``; each leading set of columns keeps its span); false where a pass fails."""
    for _ in range(2):
        factor, failed = torch.linalg.cholesky_ex(vectors.transpose(-1, -2) @ vectors)
        if failed:
            return False
        for part in vectors.split(step):
            part.copy_(torch.linalg.solve_triangular(factor.transpose(-1, -2), part, upper=True, left=False))
    return True


GRAM_BLOCK = 2**16
"""Elements of a representation cast to float64 at a time when forming its Gram matrix (at least
:data:`GRAM_MIN_WIDTH` samples, so that each block's product stays a matrix product)."""
GRAM_MIN_WIDTH = 256


def sample_blocks(representation: Tensor) -> tuple[Tensor, ...]:
    """``representation`` (``groups x dims x samples``) in blocks of samples of about
    :data:`GRAM_BLOCK` elements: what a check or a float64 cast handles at a time."""
    groups, dims, _ = representation.shape
    return representation.split(max(GRAM_MIN_WIDTH, GRAM_BLOCK // max(1, groups * dims)), dim=-1)


def float64_gram(representation: Tensor) -> Tensor:
    """``R R^T`` in float64 for ``R`` (``groups x dims x samples``), summed over blocks of samples so
    that no float64 copy of the whole representation is made."""
    groups, dims, _ = representation.shape
    gram = representation.new_zeros(groups, dims, dims, dtype=torch.float64)
    for block in sample_blocks(representation):
        wide = block.double()
        gram.baddbmm_(wide, wide.transpose(-1, -2))
    return gram


def uses_gram_route(dims: int, samples: int, dtype: torch.dtype) -> bool:
    """Whether :func:`spectrum` takes the Gram route for a representation of this shape and dtype."""
    return samples >= GRAM_ROUTE_RATIO * dims and dtype != torch.float64


def gram_spectrum(gram: Tensor, samples: int, dtype: torch.dtype) -> Spectrum:
    """The spectrum from the float64 Gram matrix ``R R^T`` (``groups x dims x dims``).

    ``R`` has ``samples`` columns in ``dtype``. Gram matrices add up over
    column blocks, so replicas can sum theirs instead of sharing ``R``.
    """
    values, vectors = torch.linalg.eigh(gram)
    return Spectrum(vectors.flip(-1), values.flip(-1).clamp_min(0), True, samples, dtype, from_gram=True)


@dataclass(frozen=True)
class CoreBasis:
    """An orthonormal basis of one site's core space, per group, and its projection.

    ``vectors`` holds the core basis, or the null-space basis when
    ``spans_null_space`` is true (whichever side is smaller; where the
    spectrum holds fewer directions than dimensions, the null side is the
    orthogonal complement of the core's). Groups of lower rank are padded
    with zero columns, which leave the projection exact.
    """

    vectors: Tensor  # (groups, dims, k)
    ranks: tuple[int, ...]
    input_dim: int
    spans_null_space: bool = False

    @property
    def null_dim(self) -> int:
        return sum(self.input_dim - rank for rank in self.ranks)

    def project(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Project ``[weight | bias]`` (``groups x rows x inputs``) onto the null space.

        The core form ``G - G B B^T`` leaves a rounding residue of
        ``eps * ||G||`` in the core space; when most of ``G`` lies in the core
        (less than ``REPROJECT_BELOW`` of its norm survives), that residue is
        large next to the result, and a second pass cuts it to ``eps`` of
        what is left. The null-space form ``G N N^T`` builds its result inside
        the null space and needs one pass. An update of which only rounding
        noise survives (less than ``ROUNDING_LEVEL * eps`` of its norm) becomes zero.
        """
        weight_out, bias_out = self._project_once(weight, bias)
        before = get_total_norm([t for t in (weight, bias) if t is not None])
        kept = get_total_norm([t for t in (weight_out, bias_out) if t is not None])
        if kept <= ROUNDING_LEVEL * torch.finfo(weight.dtype).eps * before:
            # Nothing but rounding noise survived: the update lay wholly in the core space, and
            # scaling the noise up (a normalised step) would move the weights at random.
            return torch.zeros_like(weight), (torch.zeros_like(bias) if bias is not None else None)
        if not self.spans_null_space and kept < REPROJECT_BELOW * before:
            weight_out, bias_out = self._project_once(weight_out, bias_out)
        return weight_out, bias_out

    def _project_once(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        inputs = weight.shape[-1]
        on_weight, on_bias = self.vectors[:, :inputs], self.vectors[:, inputs:]
        coefficients = weight @ on_weight
        if bias is not None:
            coefficients = coefficients + bias @ on_bias
        weight_part = coefficients @ on_weight.transpose(-1, -2)
        bias_part = coefficients @ on_bias.transpose(-1, -2) if bias is not None else None
        if self.spans_null_space:
            return weight_part, bias_part
        return weight - weight_part, (bias - bias_part if bias is not None else None)


def _complement(core: Tensor) -> Tensor:
    """An orthonormal basis of the orthogonal complement of ``core``'s orthonormal float64 columns: seeded
    random directions with the core projected out twice, orthonormalised (the same on every process)."""
    dims, rank = core.shape
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(dims, dims - rank, generator=generator, dtype=torch.float64).to(core.device)
    for _ in range(2):
        directions = torch.linalg.qr(directions - core @ (core.transpose(-1, -2) @ directions)).Q
    return directions


class RepresentationParts(Protocol):
    """One site's representations on the data a teleport keeps (each ``None`` where that data did not
    reach the site on this process): the teleport batch's, the other samples' (guard, basis), and all
    of them together."""

    def everything(self) -> Tensor | None: ...

    def batch(self) -> Tensor | None: ...

    def samples(self) -> Tensor | None: ...


SpectrumOf = Callable[..., "Spectrum | None"]
"""The spectrum of a representation (of the global batch under data parallelism; ``None`` when no
process has samples), with :func:`spectrum`'s ``leading`` keyword: :func:`local_spectrum` in one
process, ``Replicas.spectrum`` across several."""


def local_spectrum(representation: Tensor | None, *, leading: bool = False) -> Spectrum | None:
    return None if representation is None else spectrum(representation, leading=leading)


@dataclass(frozen=True)
class SiteBasis:
    """A site's core basis, with the number of samples it was built from and their dtype, and
    whether its core space holds the teleport batch's whole span (steps then keep the batch's
    pre-activations exactly)."""

    basis: CoreBasis
    samples: int
    dtype: torch.dtype
    keeps_batch: bool = False


class NullSpace(ABC):
    """Base class of null-space builders: subclasses choose the core rank per group.

    The core space of a site is built from all the data a teleport keeps at
    once (:meth:`site_basis`); a null space that treats the teleport batch
    apart from the other samples overrides it.
    """

    def __init__(self, tau: float = 1.0) -> None:
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {tau!r}")
        self.tau = float(tau)

    @property
    def exact(self) -> bool:
        """Whether the core space is the whole numerical span (``tau = 1``): projected steps are then
        exact and every forward quantity on the batch stays constant, which the closed form of
        :mod:`~torch_teleport.chain` relies on. Override when ``core_rank`` keeps less at ``tau = 1``."""
        return self.tau >= 1.0

    @abstractmethod
    def core_rank(self, spectrum: Spectrum) -> Tensor:
        """How many leading directions form the core space, per group (int tensor)."""

    @property
    def fallback(self) -> NullSpace | None:
        """The null space to build instead where this one leaves no site room (none by default)."""
        return None

    def site_basis(self, parts: RepresentationParts, spectrum_of: SpectrumOf = local_spectrum) -> SiteBasis | None:
        """The core basis of one site from its representations (``None`` when no sample reached it)."""
        spec = spectrum_of(parts.everything())
        return None if spec is None else SiteBasis(self.basis_of(spec), spec.samples, spec.dtype, self.exact)

    def basis(self, representation: Tensor) -> CoreBasis:
        """The core basis of ``representation`` (``groups x dims x samples``), in its dtype."""
        return self.basis_of(spectrum(representation))

    def basis_of(self, spec: Spectrum) -> CoreBasis:
        """The core basis for a spectrum, in the dtype of its representation."""
        return self.with_ranks(spec, self.core_rank(spec))

    @staticmethod
    def with_ranks(spec: Spectrum, ranks: Tensor) -> CoreBasis:
        """The core basis of the leading ``ranks`` directions of a spectrum, per group."""
        ranks = ranks.clamp(0, spec.dims)
        rank_list = tuple(int(r) for r in ranks)
        max_rank = max(rank_list, default=0)
        null_max = spec.dims - min(rank_list, default=0)
        if not spec.complete and null_max < max_rank:  # the few null directions, completed
            vectors = torch.zeros(spec.vectors.shape[0], spec.dims, null_max, dtype=torch.float64, device=spec.vectors.device)
            for group, rank in enumerate(rank_list):
                vectors[group, :, : spec.dims - rank] = _complement(spec.vectors[group, :, :rank])
            return CoreBasis(vectors.to(spec.dtype), rank_list, spec.dims, spans_null_space=True)
        if spec.complete and null_max < max_rank:
            vectors = spec.vectors[..., spec.dims - null_max :]
            if min(rank_list) != max_rank:  # zero the core columns a group of lower rank holds
                columns = torch.arange(spec.vectors.shape[-1], device=spec.vectors.device)
                keep = columns[None, :] >= ranks[:, None].to(columns.device)
                vectors = vectors * keep[:, None, spec.dims - null_max :]
            return CoreBasis(vectors.to(spec.dtype, copy=True), rank_list, spec.dims, spans_null_space=True)
        return CoreBasis(spec.leading(ranks).to(spec.dtype, copy=True), rank_list, spec.dims)
