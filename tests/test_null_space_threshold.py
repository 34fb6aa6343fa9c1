"""The ``svd`` null space: the energy threshold tau of eq. 3, and tau = 1 as the exact null space."""

from __future__ import annotations

import torch
from conftest import exact, integer_matrix, reference_rank, threshold
from hypothesis import given
from hypothesis import strategies as st


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    dims=st.integers(2, 16),
    samples=st.integers(1, 40),
    tau=st.floats(0.05, 0.999),
)
def test_energy_threshold_picks_the_smallest_sufficient_rank(seed, groups, dims, samples, tau):
    """Eq. 3: the smallest k with ||R_k||_F^2 >= tau ||R||_F^2 (never above the exact rank)."""
    generator = torch.Generator().manual_seed(seed)
    representation = torch.randn(groups, dims, samples, generator=generator, dtype=torch.float64)
    basis = threshold(tau).basis(representation)
    for group, rank in enumerate(basis.ranks):
        squared = torch.linalg.svdvals(representation[group]).square()
        energy = squared.cumsum(0)
        k = next(i + 1 for i in range(len(energy)) if energy[i] >= tau * energy[-1])
        assert rank == min(k, reference_rank(representation[group], torch.float64))
        kept = energy[rank - 1]
        assert kept >= tau * energy[-1]
        assert rank == 1 or energy[rank - 2] < tau * energy[-1]


def test_threshold_one_is_the_exact_null_space():
    generator = torch.Generator().manual_seed(0)
    representation = integer_matrix(generator, 10, 30, 4).unsqueeze(0)
    assert threshold(1.0).basis(representation).ranks == exact().basis(representation).ranks == (4,)
