"""The objective interface: the differentiable scalar a teleport climbs or descends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .inputs import Inputs, call_model

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class Batch:
    """What an objective may look at: the model, its loss and the teleport batch.

    ``parameters`` are the trainable parameters (the gradient norm is taken
    over all of them, also those the teleport cannot move).
    """

    model: nn.Module
    loss_fn: LossFn
    inputs: Inputs  # a tensor, a sequence or a mapping of model arguments
    targets: Tensor
    parameters: Sequence[nn.Parameter]
    guard: tuple[Inputs, Tensor] | None = None  # other data whose loss the teleport must not raise
    basis: Inputs | None = None  # a larger sample whose inputs the core space must span too

    def loss(self) -> Tensor:
        """The primary loss on the teleport batch, as a scalar tensor with graph."""
        output = call_model(self.model, self.inputs)
        loss = checked_loss(call_loss(self.loss_fn, output, self.targets))
        if not loss.requires_grad and any(p.requires_grad for p in self.parameters) and torch.is_grad_enabled():
            raise ValueError(
                "loss_fn returned a loss detached from the parameters (no graph): compute it from the "
                "model's output without .detach(), .item() or torch.no_grad()"
            )
        return loss


def call_loss(loss_fn: LossFn, output: object, targets: Tensor) -> object:
    """``loss_fn(output, targets)``; an error it raises keeps its type and message and gains a note
    naming the targets' and the output's shapes (the usual cause is targets the loss cannot take)."""
    try:
        return loss_fn(output, targets)
    except Exception as error:
        shape = tuple(output.shape) if hasattr(output, "shape") else type(output).__name__
        if hasattr(error, "add_note"):
            error.add_note(
                f"raised by loss_fn(model(inputs), targets) with targets of shape {tuple(targets.shape)} "
                f"({targets.dtype}) and a model output of shape {shape}: check that the targets fit the loss"
            )
        raise


def checked_loss(loss: object) -> Tensor:
    """``loss`` if it is a scalar tensor; a clear error otherwise."""
    if not hasattr(loss, "dim") or loss.dim() != 0:
        shape = tuple(loss.shape) if hasattr(loss, "shape") else type(loss).__name__
        raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
    return loss


@dataclass
class Evaluation:
    """One evaluation of an objective.

    ``value`` carries the graph the engine differentiates; ``loss`` is the
    primary batch loss; ``grad_norm`` is filled in when the objective gets it
    for free (the engine computes it otherwise).
    """

    value: Tensor
    loss: Tensor
    grad_norm: Tensor | None = None


class Objective(ABC):
    """Base class of teleport objectives.

    ``ascend`` says whether the teleport maximises (``True``) or minimises
    the objective; each objective has a default and accepts
    ``direction="ascend" | "descend"``.
    """

    default_direction = "ascend"

    def __init__(self, direction: str | None = None) -> None:
        direction = direction or self.default_direction
        if direction not in ("ascend", "descend"):
            raise ValueError(f"direction must be 'ascend' or 'descend', got {direction!r}")
        self.ascend = direction == "ascend"

    @abstractmethod
    def evaluate(self, batch: Batch) -> Evaluation:
        """Evaluate the objective on ``batch`` with a graph through the parameters."""


class GradientNormObjective(Objective):
    """An objective ``f(||grad L||^2)`` of the loss gradient over all trainable parameters.

    Subclasses give ``f`` (:meth:`of_squared_norm`). :meth:`evaluate` is the
    general path (a graph through the gradient: a double backward); because
    the projected gradient of such an objective is
    ``2 f'(s) P(delta^T lambda)``, the null-space method can also take the
    structured path (:mod:`torch_teleport.structured`), with first derivatives only.
    """

    @abstractmethod
    def of_squared_norm(self, squared: Tensor) -> Tensor:
        """``f(s)`` for ``s = ||grad L||^2``; differentiable in ``s``."""

    def evaluate(self, batch: Batch) -> Evaluation:
        loss = batch.loss()
        grads = torch.autograd.grad(loss, batch.parameters, create_graph=True, allow_unused=True)
        squared = sum(g.square().sum() for g in grads if g is not None)
        return Evaluation(self.of_squared_norm(squared), loss, grad_norm=torch.sqrt(squared.detach()))

    def slope(self, squared: Tensor) -> Tensor:
        """``2 f'(s)``: the objective's gradient is ``2 f'(s) H g`` (``H g`` the Hessian-vector product)."""
        point = squared.detach().clone().requires_grad_(True)
        (derivative,) = torch.autograd.grad(self.of_squared_norm(point), point)
        return 2 * derivative
