"""The ``batch_exact`` null space: the teleport batch's inputs exactly, the rest of the data by energy.

The core space of a site is the exact span of the teleport batch's inputs
(tau = 1: the batch's loss is invariant to rounding, so the drift tolerance
never binds on a correct projector), plus, of what the batch does not
already span, the leading directions of the basis sample holding a fraction
``tau`` of its energy there. Without a basis sample it is the exact null
space. A site the batch alone fills (a batch larger than its width, the
patches of an early convolution) has no room; where no site has room, the
core spaces are the data's by energy instead, as with ``svd``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_teleport import NullSpace, hookimpl
from torch_teleport.null_space import (
    CoreBasis,
    RepresentationParts,
    SiteBasis,
    Spectrum,
    SpectrumOf,
    local_spectrum,
)
from torch_teleport.plugins.null_spaces.threshold import ThresholdNullSpace


class BatchExactNullSpace(NullSpace):
    """Keep the teleport batch's span exactly and a fraction ``tau`` of the other samples' energy
    outside it (GPM's energy threshold, measured on what the batch does not span)."""

    def __init__(self, tau: float = 0.999) -> None:
        super().__init__(tau)

    @property
    def exact(self) -> bool:
        """The batch is kept exactly whatever ``tau`` at every site it leaves room in (each site's
        ``SiteBasis.keeps_batch`` says whether it does)."""
        return True

    def core_rank(self, spectrum: Spectrum) -> Tensor:
        return spectrum.numerical_rank()

    @property
    def fallback(self) -> NullSpace:
        """Where the batch leaves no room anywhere (a batch larger than every layer's width): all the
        data by energy, as ``svd`` keeps it."""
        return ThresholdNullSpace(self.tau)

    def site_basis(self, parts: RepresentationParts, spectrum_of: SpectrumOf = local_spectrum) -> SiteBasis | None:
        batch = spectrum_of(parts.batch())
        if batch is None:
            return None
        core = batch.leading(batch.numerical_rank())
        samples = parts.samples()
        if samples is not None:  # what the batch does not span, in float64, in the samples' dtype
            wide = samples.double()
            samples = (wide - core @ (core.transpose(-1, -2) @ wide)).to(samples.dtype)
        # Every process asks, whether it holds samples or not. Below tau = 1 only the strong directions
        # count: fewer samples than dimensions may take the samples' Gram matrix (cheaper, and as
        # accurate for a direction of energy r of the largest as eps / r).
        rest = spectrum_of(samples, leading=self.tau < 1)
        if rest is None:
            return SiteBasis(self.basis_of(batch), batch.samples, batch.dtype, keeps_batch=True)
        # Directions of the rest below the batch's rounding level are the rounding of what it spans.
        real = torch.minimum(rest.numerical_rank(), (rest.squared > batch.rank_tolerance()).sum(-1))
        kept = torch.minimum(_energy_rank(rest, self.tau), real)
        others = rest.leading(kept)
        others = others - core @ (core.transpose(-1, -2) @ others)  # orthogonal to the batch's span
        ranks = tuple(int(r) for r in batch.numerical_rank() + kept)
        basis = CoreBasis(torch.cat([core, others], -1).to(batch.dtype), ranks, batch.dims)
        return SiteBasis(basis, batch.samples + rest.samples, batch.dtype, keeps_batch=True)


def _energy_rank(spectrum: Spectrum, tau: float) -> Tensor:
    """The fewest leading directions holding a fraction ``tau`` of the energy, per group."""
    energy = spectrum.squared.double().cumsum(-1)
    return (energy < tau * energy[:, -1:]).sum(-1) + 1


@hookimpl
def teleport_register_null_spaces(registry) -> None:
    registry.add_null_space("batch_exact", BatchExactNullSpace)
