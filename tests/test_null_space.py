"""The core's null-space machinery (spectrum routes, ``CoreBasis``, projection) against dense
float64 references; ``test_null_space_<name>.py`` test the built-in null spaces.

Rank-deficient matrices are built from small integers, so they are exactly
rank deficient in float32 and float64 alike and the dense reference
(``torch.linalg``) gives the ground truth.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from conftest import (
    exact,
    integer_matrix,
    rank_deficient,
    reference_null_projection,
    reference_rank,
)
from hypothesis import given
from hypothesis import strategies as st

from torch_teleport import CoreBasis
from torch_teleport import null_space as null_space_module


def projection_matrix(basis: CoreBasis) -> torch.Tensor:
    """The dense ``d x d`` null-space projector of ``basis`` (small ``d`` only), per group."""
    groups = basis.vectors.shape[0]
    identity = torch.eye(basis.input_dim, dtype=basis.vectors.dtype).expand(groups, -1, -1).clone()
    projected, _ = basis.project(identity, None)
    return projected


def core_projector(spectrum, rank: int) -> torch.Tensor:
    """``V_k V_k^T`` in float64 from the leading ``rank`` directions of a spectrum (one group)."""
    core = spectrum.vectors[0, :, :rank]
    return core @ core.T


@given(seed=st.integers(0, 2**31 - 1), dims=st.integers(2, 12), extra=st.integers(0, 40))
def test_gram_and_svd_routes_give_the_same_core_space(seed, dims, extra):
    """float32 inputs with samples >= 2 * dims take the Gram route; forcing SVD changes nothing."""
    generator = torch.Generator().manual_seed(seed)
    samples = 2 * dims + extra
    rank = int(torch.randint(1, dims + 1, (), generator=generator))
    representation = integer_matrix(generator, dims, samples, rank, torch.float32).unsqueeze(0)
    gram_spectrum = null_space_module.spectrum(representation)
    gram = exact().basis(representation)
    with mock.patch.object(null_space_module, "GRAM_ROUTE_RATIO", math.inf):
        svd_spectrum = null_space_module.spectrum(representation)
        svd = exact().basis(representation)
    rank = reference_rank(representation[0], torch.float32)
    assert gram.ranks == svd.ranks == (rank,)
    assert gram_spectrum.vectors.shape[-1] == dims  # the Gram route really ran: a full eigenbasis
    left, _, _ = torch.linalg.svd(representation[0].double())
    dense = left[:, :rank] @ left[:, :rank].T
    for spectrum in (gram_spectrum, svd_spectrum):
        torch.testing.assert_close(core_projector(spectrum, rank), dense, rtol=0, atol=1e-10)


def test_float64_representations_never_take_the_gram_route():
    """A Gram matrix squares the condition number: in float64 it would miscount the rank."""
    generator = torch.Generator().manual_seed(3)
    matrix = torch.randn(8, 5, generator=generator, dtype=torch.float64) @ torch.randn(
        5, 100, generator=generator, dtype=torch.float64
    )
    spectrum = null_space_module.spectrum(matrix.unsqueeze(0))
    singular = torch.linalg.svdvals(matrix)
    torch.testing.assert_close(
        spectrum.squared[0].sqrt(), singular, rtol=1e-12, atol=1e-12 * float(singular[0])
    )
    assert exact().basis(matrix.unsqueeze(0)).ranks == (5,)


@given(
    seed=st.integers(0, 2**31 - 1),
    dims=st.integers(2, 12),
    samples=st.integers(1, 30),
    ranks=st.lists(st.integers(0, 12), min_size=2, max_size=4),
    bias=st.booleans(),
)
def test_grouped_ranks_project_exactly(seed, dims, samples, ranks, bias):
    """Groups of different rank share one zero-padded basis and each projects exactly."""
    generator = torch.Generator().manual_seed(seed)
    ranks = [min(rank, dims) for rank in ranks]
    representation = torch.stack(
        [integer_matrix(generator, dims, samples, max(rank, 1)) * (rank > 0) for rank in ranks]
    )
    basis = exact().basis(representation)
    expected_ranks = tuple(reference_rank(r, torch.float64) for r in representation)
    assert basis.ranks == expected_ranks
    update = torch.randn(len(ranks), 3, dims, generator=generator, dtype=torch.float64)
    if bias:  # the last input is the folded bias: project [W | b] in two pieces
        weight, bias_out = basis.project(update[..., :-1].clone(), update[..., -1:].clone())
        projected = torch.cat([weight, bias_out], dim=-1)
    else:
        projected, _ = basis.project(update.clone(), None)
    for group, rank in enumerate(expected_ranks):
        expected = reference_null_projection(update[group], representation[group], rank)
        torch.testing.assert_close(
            projected[group], expected, rtol=0, atol=1e-12 * float(update.norm())
        )
        kept = basis.ranks[group] if not basis.spans_null_space else dims - basis.ranks[group]
        assert torch.count_nonzero(basis.vectors[group].norm(dim=0)) == kept


@given(rank_deficient(dtypes=(torch.float64,)))
def test_projecting_twice_is_idempotent(matrix):
    generator = torch.Generator().manual_seed(matrix.shape[1])
    update = torch.randn(1, 4, matrix.shape[0], generator=generator, dtype=torch.float64)
    basis = exact().basis(matrix.unsqueeze(0))
    once, _ = basis.project(update, None)
    twice, _ = basis.project(once, None)
    torch.testing.assert_close(twice, once, rtol=0, atol=1e-13 * float(update.norm()))


@given(seed=st.integers(0, 2**31 - 1), dims=st.integers(2, 16), rank=st.integers(0, 16))
def test_null_side_and_core_side_project_alike(seed, dims, rank):
    generator = torch.Generator().manual_seed(seed)
    rank = min(rank, dims)
    left, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=torch.float64))
    core = CoreBasis(left[None, :, :rank], (rank,), dims)
    null = CoreBasis(left[None, :, rank:], (rank,), dims, spans_null_space=True)
    update = torch.randn(1, 6, dims, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        core.project(update, None)[0], null.project(update, None)[0], rtol=0, atol=1e-13
    )
    assert core.null_dim == null.null_dim == dims - rank


def test_builder_stores_the_smaller_side():
    """Many samples and a large rank: the basis holds the few null directions, not the core."""
    generator = torch.Generator().manual_seed(1)
    representation = integer_matrix(generator, 9, 60, 7).unsqueeze(0)
    basis = exact().basis(representation)
    assert basis.spans_null_space and basis.vectors.shape == (1, 9, 2)
    expected = reference_null_projection(torch.eye(9, dtype=torch.float64), representation[0], 7)
    torch.testing.assert_close(projection_matrix(basis)[0], expected, rtol=0, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1), groups=st.integers(1, 3), dims=st.integers(3, 16), short=st.integers(1, 3))
def test_a_few_null_directions_beside_a_thin_spectrum_are_completed(seed, groups, dims, short):
    """Fewer samples than dimensions but a large rank (a layer about as wide as its batch): the thin
    spectrum holds no null direction, so the basis completes the core's few missing ones and projects
    as the core form does (one group may have one direction less)."""
    generator = torch.Generator().manual_seed(seed)
    samples = max(1, dims - short)
    parts = [integer_matrix(generator, dims, samples, samples - (group == 1)) for group in range(groups)]
    representation = torch.stack(parts)
    basis = exact().basis(representation)
    ranks = [reference_rank(part, torch.float64) for part in parts]
    assert basis.ranks == tuple(ranks)
    assert basis.spans_null_space == (dims - min(ranks) < max(ranks))
    update = torch.randn(groups, 5, dims, generator=generator, dtype=torch.float64)
    projected, _ = basis.project(update, None)
    for group, part in enumerate(parts):
        expected = reference_null_projection(update[group], part, ranks[group])
        torch.testing.assert_close(projected[group], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_layers_get_a_thin_basis(dtype):
    """samples < dims: the basis is d x k with k <= samples, never a dense d x d projector."""
    generator = torch.Generator().manual_seed(2)
    dims, samples = 3000, 12
    representation = torch.randn(1, dims, samples, generator=generator).to(dtype)
    basis = exact().basis(representation)
    assert not basis.spans_null_space
    assert basis.vectors.shape[:2] == (1, dims) and basis.vectors.shape[2] <= samples
    assert basis.ranks == (samples,) and basis.null_dim == dims - samples


def float32_parts(generator: torch.Generator, kind: str, groups: int, dims: int, samples: int, rank: int) -> list:
    """``groups`` float32 ``dims x samples`` matrices of rank ``rank``: exact integers, a float32 product
    of low-rank factors (whose rounding spans every direction), or such a product with a graded spectrum."""
    if kind == "integer":
        return [integer_matrix(generator, dims, samples, rank, torch.float32) for _ in range(groups)]
    scale = torch.logspace(0, -12, rank) if kind == "graded" else torch.ones(rank)
    return [
        (torch.randn(dims, rank, generator=generator) * scale) @ torch.randn(rank, samples, generator=generator)
        for _ in range(groups)
    ]


def assert_the_svds_core_space(part: torch.Tensor, core: torch.Tensor) -> None:
    """``core`` has the thin SVD's numerical rank of ``part``, orthonormal columns, and holds every
    sample of ``part`` to float64 rounding."""
    dims, samples = part.shape
    singular = torch.linalg.svdvals(part.double())
    assert core.shape[1] == int((singular > singular[0] * max(dims, samples) * torch.finfo(torch.float64).eps).sum())
    torch.testing.assert_close(core.T @ core, torch.eye(core.shape[1], dtype=torch.float64), rtol=0, atol=1e-12)
    wide = part.double()
    assert torch.linalg.matrix_norm(wide - core @ (core.T @ wide)) <= 1e-13 * torch.linalg.matrix_norm(wide)


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    dims=st.integers(4, 48),
    fraction=st.floats(0.0, 1.0),
    rank=st.integers(0, 48),
    kind=st.sampled_from(["integer", "product", "graded"]),
)
def test_wide_float32_representations_get_the_svds_core_space(seed, groups, dims, fraction, rank, kind):
    """Fewer samples than dimensions, float32: the samples' Gram route (a second Gram for what the
    first leaves) finds the thin SVD's numerical rank, orthonormal columns and a core space that holds
    every sample to float64 rounding: the SVD's core space, but for directions the samples hold at
    their rounding (which neither route fixes). A float32 product of low-rank factors spans every
    direction by its rounding, which only the second Gram resolves; rows are summed a few at a time."""
    generator = torch.Generator().manual_seed(seed)
    samples = max(1, min(dims - 1, int(fraction * dims)))
    rank = min(rank, samples)
    parts = float32_parts(generator, kind, groups, dims, samples, rank)
    representation = torch.stack(parts)
    with mock.patch.object(null_space_module, "GRAM_BLOCK", 3 * samples):
        found = null_space_module.spectrum(representation)
    ranks = found.numerical_rank().tolist()
    assert found.vectors.shape[-1] == max(ranks)  # the Gram route ran: only the directions found
    for group, part in enumerate(parts):
        assert_the_svds_core_space(part, found.vectors[group, :, : ranks[group]])


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    dims=st.integers(2, 40),
    extra=st.floats(0.0, 0.99),
    rank=st.integers(0, 40),
    kind=st.sampled_from(["integer", "product", "graded"]),
)
def test_float32_representations_with_one_to_two_samples_per_dimension_get_the_svds_core_space(
    seed, groups, dims, extra, rank, kind
):
    """Between one and two samples per dimension, float32: the Gram route with a second Gram in
    what the first leaves below its floor finds the thin SVD's numerical rank, a complete orthonormal
    basis, and a core space that holds every sample to float64 rounding (a float32 product of
    low-rank factors, whose rounding spans every direction, needs the second Gram); samples are
    summed a few at a time."""
    generator = torch.Generator().manual_seed(seed)
    samples = dims + int(extra * (dims - 1))
    rank = min(rank, dims)
    parts = float32_parts(generator, kind, groups, dims, samples, rank)
    with mock.patch.object(null_space_module, "GRAM_BLOCK", 3 * dims), mock.patch.object(null_space_module, "GRAM_MIN_WIDTH", 3):
        found = null_space_module.spectrum(torch.stack(parts))
    assert found.complete and found.vectors.shape == (groups, dims, dims)
    ranks = found.numerical_rank().tolist()
    for group, part in enumerate(parts):
        basis = found.vectors[group]
        torch.testing.assert_close(basis.T @ basis, torch.eye(dims, dtype=torch.float64), rtol=0, atol=1e-12)
        assert_the_svds_core_space(part, basis[:, : ranks[group]])


@given(seed=st.integers(0, 2**16), groups=st.integers(1, 3), dims=st.integers(1, 9), samples=st.integers(1, 40))
def test_the_float64_gram_summed_a_block_at_a_time_equals_the_whole_product(seed, groups, dims, samples):
    generator = torch.Generator().manual_seed(seed)
    representation = torch.randn(groups, dims, samples, generator=generator)
    wide = representation.double()
    # blocks of 3+ samples: several per call
    with mock.patch.object(null_space_module, "GRAM_BLOCK", 8), mock.patch.object(null_space_module, "GRAM_MIN_WIDTH", 3):
        gram = null_space_module.float64_gram(representation)
    torch.testing.assert_close(gram, wide @ wide.transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_a_non_finite_value_in_any_block_is_refused(monkeypatch):
    monkeypatch.setattr(null_space_module, "GRAM_BLOCK", 4)
    monkeypatch.setattr(null_space_module, "GRAM_MIN_WIDTH", 2)
    representation = torch.ones(1, 2, 12)
    representation[0, 1, 11] = float("inf")  # in the last block
    with pytest.raises(ValueError, match="representation contains non-finite values"):
        null_space_module.spectrum(representation)
