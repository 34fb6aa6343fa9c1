"""Hypothesis strategies for the lab's own blocks, as :mod:`torch_teleport.testing` has them for
PyTorch's layers (needs the ``test`` extra)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from torch_teleport.testing import PreNormResidual, Problem, TokenClassifier

from .models.mamba_block import MambaBlock


@st.composite
def mamba_problems(
    draw, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32), max_batch: int = 2
) -> Problem:
    """Random classifiers around one Mamba-1 block (pre-norm, residual).

    Draws the width, state size, convolution width, expansion, step rank,
    biases, batch and sequence length.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    width = draw(st.integers(2, 6))
    options = {
        "d_state": draw(st.integers(1, 3)),
        "d_conv": draw(st.integers(2, 4)),
        "expand": draw(st.integers(1, 2)),
        "dt_rank": draw(st.sampled_from(["auto", 1, 2])),
        "bias": draw(st.booleans()),
        "conv_bias": draw(st.booleans()),
    }
    batch, length = draw(st.integers(1, max_batch)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = MambaBlock(width, **options)
        model = TokenClassifier(PreNormResidual(block, width), width, width, 3).to(dtype)
    inputs = torch.randn(batch, length, width, generator=generator, dtype=dtype)
    targets = torch.randint(0, 3, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)
