"""The ``svd`` null space: the core space holds a fraction tau of the inputs' energy (eq. 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from torch_teleport import NullSpace, hookimpl
from torch_teleport.null_space import Spectrum


class ThresholdNullSpace(NullSpace):
    """Keep the fewest leading directions holding a fraction ``tau`` of the energy ``||R||_F^2``.

    With ``tau = 1`` this is the exact null space.
    """

    def __init__(self, tau: float = 0.999) -> None:
        super().__init__(tau)

    def core_rank(self, spectrum: Spectrum) -> Tensor:
        exact = spectrum.numerical_rank()
        if self.tau >= 1.0:
            return exact
        energy = spectrum.squared.double().cumsum(-1)
        needed = self.tau * energy[:, -1:]
        threshold = (energy < needed).sum(-1) + 1
        return torch.minimum(threshold.to(exact.device), exact)


@hookimpl
def teleport_register_null_spaces(registry) -> None:
    registry.add_null_space("svd", ThresholdNullSpace)
