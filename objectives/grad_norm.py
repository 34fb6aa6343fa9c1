"""The squared gradient norm, 0.5 ||grad L||^2 (eq. 4): the default teleport objective."""

from __future__ import annotations

from torch import Tensor

from torch_teleport import hookimpl
from torch_teleport.objective import GradientNormObjective


class GradNorm(GradientNormObjective):
    """Half the squared norm of the loss gradient over all trainable parameters.

    Its gradient is the Hessian-vector product ``H g``: by a double backward on
    the general path, from first derivatives on the structured one.
    """

    def of_squared_norm(self, squared: Tensor) -> Tensor:
        return 0.5 * squared


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("grad_norm", GradNorm)
