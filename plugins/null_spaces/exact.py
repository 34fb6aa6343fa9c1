"""The ``exact`` null space (tau = 1): the core space is the numerical span of the inputs."""

from __future__ import annotations

from torch import Tensor

from torch_teleport import NullSpace, hookimpl
from torch_teleport.null_space import Spectrum


class ExactNullSpace(NullSpace):
    """The exact null space: the core space is the numerical span of the inputs.

    Rank tolerance: float64's noise floor, ``sigma_i > sigma_max * max(dims, samples) * eps``
    on the SVD route (see :meth:`Spectrum.rank_tolerance` for the Gram route).
    """

    def __init__(self, tau: float = 1.0) -> None:
        if tau != 1.0:
            raise ValueError(f"the exact null space needs tau = 1, got {tau}; use null_space='svd' for tau < 1")
        super().__init__(tau)

    def core_rank(self, spectrum: Spectrum) -> Tensor:
        return spectrum.numerical_rank()


@hookimpl
def teleport_register_null_spaces(registry) -> None:
    registry.add_null_space("exact", ExactNullSpace)
