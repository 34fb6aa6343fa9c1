"""The ``exact`` null space (tau = 1) against dense float64 references on rank-deficient matrices."""

from __future__ import annotations

import torch
from conftest import (
    PROJECTION_TOL,
    exact,
    rank_deficient,
    reference_null_projection,
    reference_rank,
)
from hypothesis import given


@given(rank_deficient())
def test_exact_rank_is_the_numerical_rank(matrix):
    basis = exact().basis(matrix.unsqueeze(0))
    assert basis.ranks == (reference_rank(matrix, matrix.dtype),)
    assert basis.null_dim == matrix.shape[0] - basis.ranks[0]


@given(rank_deficient())
def test_exact_projection_matches_dense_reference(matrix):
    """The update keeps no component in the span of the inputs, and nothing else is removed."""
    generator = torch.Generator().manual_seed(matrix.shape[0] * 1000 + matrix.shape[1])
    update = torch.randn(1, 5, matrix.shape[0], generator=generator, dtype=torch.float64)
    basis = exact().basis(matrix.unsqueeze(0))
    assert basis.vectors.dtype == matrix.dtype  # the basis is applied in the parameters' dtype
    tol = PROJECTION_TOL[matrix.dtype] * float(update.norm())
    projected, _ = basis.project(update.to(matrix.dtype), None)
    expected = reference_null_projection(update[0], matrix, basis.ranks[0])
    torch.testing.assert_close(projected[0].double(), expected, rtol=0, atol=tol)
    residual = projected[0].double() @ matrix.double()
    assert float(residual.norm()) <= tol * float(matrix.double().norm())
