"""The method interface: how a teleport moves along the level set.

A :class:`TeleportMethod` is a method's options, checked when it is built
(``NullSpaceMethod(null_space="exact")``), with what the teleporter must
know before anything else is built as class attributes (its default drift
tolerance, whether it takes a guard or a basis sample). :meth:`~TeleportMethod.bind`
gives the :class:`Mover` for one model, built once per teleporter (which
parameters it moves; a model it cannot move fails there). A mover turns
each teleport batch into a :class:`~torch_teleport.climb.Climb` that the
ascent loop follows. No method calls back into the teleporter or the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .climb import Climb
from .distributed import Replicas
from .objective import Batch, Evaluation, LossFn, Objective
from .registry import Registry

Evaluate = Callable[[Batch], Evaluation]


@dataclass(frozen=True)
class MethodContext:
    """What a method works with: the model, its loss and objective, how to evaluate it, the replicas and
    the registry (where a method resolves the names among its options)."""

    model: nn.Module
    loss_fn: LossFn
    objective: Objective
    evaluate: Evaluate
    replicas: Replicas
    registry: Registry


class Mover(ABC):
    """A method bound to one model: what it may move, and the climb of each teleport batch."""

    def __init__(self, context: MethodContext) -> None:
        self.context = context

    def moved_parameters(self) -> list[nn.Parameter]:
        """The parameters a teleport may change (all trainable ones unless the method knows better):
        what the teleporter saves for a roll-back."""
        return [p for p in self.context.model.parameters() if p.requires_grad]

    @abstractmethod
    def climb(self, batch: Batch) -> Climb:
        """The climb of one teleport batch, its first evaluation taken."""

    def continuation(self, batch: Batch, climb: Climb) -> Climb | None:
        """Where ``climb`` stopped on the drift limit with steps left: a climb from the current point
        whose steps keep the batch's loss to rounding, or ``None`` (the default: the teleport ends)."""
        return None


class TeleportMethod(ABC):
    """Base class of teleport methods: their options, and the :class:`Mover` they bind to a model."""

    default_drift: ClassVar[float | None] = None
    """The drift tolerance ``Limits(drift="auto")`` stands for with this method (off by default)."""

    honours_limits: ClassVar[bool] = True
    """Whether the shared limits (drift, guard, gain, module step) apply; a method that keeps the loss
    its own way (level-set teleport) takes no guard batch."""

    keeps_replicas_in_sync: ClassVar[bool] = False
    """Whether its climbs reduce through ``context.replicas`` (required under data parallelism)."""

    takes_basis_sample: ClassVar[bool] = False
    """Whether its core space is built from a basis sample (``batch.basis``) too."""

    @abstractmethod
    def bind(self, context: MethodContext) -> Mover:
        """The mover of ``context.model``; raises for a model this method cannot move."""


def evaluate_objective(objective: Objective, replicas: Replicas) -> Evaluate:
    """The objective's evaluation with the loss detached and the gradient norm filled in
    (those of the global batch under data parallelism)."""

    def evaluate(batch: Batch) -> Evaluation:
        evaluation = objective.evaluate(batch)
        if replicas.size > 1:
            return replicas.combine(evaluation, batch)
        if evaluation.grad_norm is None:
            grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
            evaluation.grad_norm = torch.nn.utils.get_total_norm([g.detach() for g in grads if g is not None])
        evaluation.loss = evaluation.loss.detach()
        return evaluation

    return evaluate
