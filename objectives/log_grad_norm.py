"""The log gradient norm, 0.5 log ||grad L||^2: the objective of level-set teleport.

Its gradient is ``H g / ||g||^2``, the gradient-norm objective's ``H g``
divided by a scalar. With the engine's default ``normalize=True`` every step
is rescaled to a fixed size, so both objectives take the same path; with
``normalize=False`` the log damps steps where the gradient is large.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_teleport import hookimpl
from torch_teleport.objective import GradientNormObjective


class LogGradNorm(GradientNormObjective):
    """``0.5 * log ||grad L||^2`` over all trainable parameters (ascend by default)."""

    def of_squared_norm(self, squared: Tensor) -> Tensor:
        return 0.5 * torch.log(squared)


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("log_grad_norm", LogGradNorm)
