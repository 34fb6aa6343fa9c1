"""The squared gradient norm, 0.5 ||grad L||^2 (eq. 4): the default teleport objective."""

from __future__ import annotations

import torch

from torch_teleport import Batch, Evaluation, Objective, hookimpl


class GradNorm(Objective):
    """Half the squared norm of the loss gradient over all trainable parameters.

    Its gradient is a Hessian-vector product ``H g``, obtained by one double
    backward pass.
    """

    def evaluate(self, batch: Batch) -> Evaluation:
        loss = batch.loss()
        grads = torch.autograd.grad(loss, batch.parameters, create_graph=True, allow_unused=True)
        value = 0.5 * sum(g.square().sum() for g in grads if g is not None)
        return Evaluation(value=value, loss=loss, grad_norm=torch.sqrt(2 * value.detach()))


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("grad_norm", GradNorm)
