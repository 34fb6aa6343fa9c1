"""The teleport engine: the :class:`Teleporter` facade every method runs behind."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from .distributed import Replicas, underlying_module
from .method import TeleportMethod
from .model_state import double_backward_safe, preserved_state
from .null_space import NullSpace
from .objective import Batch, Evaluation, LossFn, Objective
from .registry import Registry, default_registry
from .report import TeleportReport


class Teleporter:
    """Teleports ``model`` along the level set of ``loss_fn`` on a teleport batch.

    With the default method, each step moves every covered layer by the
    objective's gradient projected onto the null space of that layer's
    inputs on the batch (one basis per batch), so with ``tau = 1`` the batch
    loss is invariant to floating point.

    Args:
        model: the network; its parameters are updated in place.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
        method: a registered teleport method (``"null_space"``, or a baseline).
        objective: a registered objective name or an :class:`Objective`.
        null_space: a registered null-space name (``"exact"``, ``"svd"``) or a
            :class:`NullSpace`.
        tau: energy threshold of the ``"svd"`` null space (eq. 3); must be 1 for ``"exact"``.
        lr: step size. With ``normalize=True`` (default) each step moves the
            movable parameters by ``lr`` times their norm, which makes one
            default work across models and training stages; with
            ``normalize=False`` it is the plain ascent rate of eq. 5.
        steps: ascent steps per teleport (the paper's t).
        cap: stop once the gradient norm reaches this value (the paper's CAP).
        uncovered: what to do with trainable parameters no projector covers:
            ``"error"``, ``"warn"`` (default) or ``"freeze"``.
        replicas: the data-parallel replicas to keep identical; by default
            every rank of an initialised ``torch.distributed`` default group
            (see :class:`~torch_teleport.distributed.Replicas`). A
            ``DistributedDataParallel`` model is teleported through its
            underlying module.
        max_loss_change: roll the teleport back (``stopped="loss_changed"``)
            when the relative change of the teleport-batch loss exceeds
            this; ``None`` (default) never does.
        objective_options: keyword arguments for a named objective.
        method_options: keyword arguments for the method.
        registry: where names are looked up; the installed plugins by default.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: str = "null_space",
        objective: str | Objective = "grad_norm",
        null_space: str | NullSpace = "exact",
        tau: float = 1.0,
        lr: float = 0.005,
        steps: int = 8,
        cap: float | None = None,
        normalize: bool = True,
        uncovered: str = "warn",
        replicas: Replicas | None = None,
        max_loss_change: float | None = None,
        objective_options: dict[str, Any] | None = None,
        method_options: dict[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps!r}")
        if max_loss_change is not None and not max_loss_change >= 0:
            raise ValueError(f"max_loss_change must be None or a non-negative number, got {max_loss_change!r}")
        self.model = underlying_module(model)
        self.loss_fn = loss_fn
        if isinstance(objective, Objective):
            self.objective = objective
        else:
            self.objective = self.registry.get("objective", objective)(**(objective_options or {}))
        self.null_space = null_space
        self.tau = tau
        self.lr = float(lr)
        self.steps = int(steps)
        self.cap = cap
        self.normalize = normalize
        self.uncovered = uncovered
        self.replicas = replicas or Replicas()
        self.max_loss_change = max_loss_change
        self.method: TeleportMethod = self.registry.get("method", method)(self, **(method_options or {}))

    def teleport(
        self, inputs: Tensor, targets: Tensor, *, steps: int | None = None, cap: float | None = None
    ) -> TeleportReport:
        """Run one teleport on the batch ``(inputs, targets)`` and report what happened.

        The model is left as found (modes, buffers, hooks), apart from the
        parameter update; on an exception, or when a non-finite value appears,
        the parameters are restored too and the report says so.
        """
        if self.replicas.size > 1 and not self.method.keeps_replicas_in_sync:
            raise NotImplementedError(f"{type(self.method).__name__} cannot keep data-parallel replicas identical")
        self.replicas.check_together(_check_batch, inputs, targets)
        steps = self.steps if steps is None else steps
        cap = self.cap if cap is None else cap
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in trainable]
        batch = Batch(self.model, self.loss_fn, inputs, targets, trainable)
        started = time.perf_counter()
        try:
            with preserved_state(self.model), double_backward_safe(inputs.device.type):
                report = self.method.run(batch, steps, cap)
        except BaseException:
            _restore(trainable, saved)
            raise
        if not math.isfinite(report.loss_after):
            report.stopped = "non_finite"
        elif self.max_loss_change is not None and report.loss_change > self.max_loss_change:
            report.stopped = "loss_changed"
        if report.stopped in ("non_finite", "loss_changed"):
            _restore(trainable, saved)
            report.rolled_back = True
            report.loss_after = report.loss_before
            report.grad_norm_after = report.grad_norm_before
            report.objective_after = report.objective_before
        report.seconds = time.perf_counter() - started
        self.replicas.verify(self.model)
        return report

    def evaluate(self, batch: Batch) -> Evaluation:
        """The objective on ``batch``, with the loss detached and the gradient norm filled in."""
        evaluation = self.objective.evaluate(batch)
        if self.replicas.size > 1:
            return self.replicas.combine(evaluation, batch)
        if evaluation.grad_norm is None:
            grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
            evaluation.grad_norm = get_total_norm([g.detach() for g in grads if g is not None])
        evaluation.loss = evaluation.loss.detach()
        return evaluation


def _restore(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)


def _check_batch(inputs: Tensor, targets: Tensor) -> None:
    for label, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise ValueError(f"{label} must hold at least one sample, got shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{label} contain non-finite values")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}")
