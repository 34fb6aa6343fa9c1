"""The log gradient norm, 0.5 log ||grad L||^2: the objective of level-set teleport.

Its gradient is ``H g / ||g||^2``, the gradient-norm objective's ``H g``
divided by a scalar. With the engine's default ``normalize=True`` every step
is rescaled to a fixed size, so both objectives take the same path; with
``normalize=False`` the log damps steps where the gradient is large.
"""

from __future__ import annotations

import torch

from torch_teleport import Batch, Evaluation, Objective, hookimpl


class LogGradNorm(Objective):
    """``0.5 * log ||grad L||^2`` over all trainable parameters (ascend by default)."""

    def evaluate(self, batch: Batch) -> Evaluation:
        loss = batch.loss()
        grads = torch.autograd.grad(loss, batch.parameters, create_graph=True, allow_unused=True)
        squared = sum(g.square().sum() for g in grads if g is not None)
        return Evaluation(value=0.5 * torch.log(squared), loss=loss, grad_norm=torch.sqrt(squared.detach()))


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("log_grad_norm", LogGradNorm)
