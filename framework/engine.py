"""The teleport engine: the :class:`Teleporter` facade every method runs behind."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import Replicas, underlying_module
from .inputs import Inputs, batch_size, tensors
from .method import (
    Limits,
    MethodContext,
    StepRule,
    TeleportMethod,
    evaluate_objective,
    finite_positive,
)
from .model_state import double_backward_safe, preserved_state
from .null_space import NullSpace
from .objective import Batch, LossFn, Objective
from .registry import Registry, default_registry
from .report import TeleportReport

INITIAL_LR = 0.005
"""The step-length search's first step: half a percent of the moved weights' norm (normalised)."""


class Teleporter:
    """Teleports ``model`` along the level set of ``loss_fn`` on a teleport batch.

    With the default method, each step moves every covered layer by the
    objective's gradient projected onto the null space of that layer's
    inputs on the batch (one basis per batch), so with ``tau = 1`` the batch
    loss is invariant to floating point.

    Args:
        model: the network; its parameters are updated in place. A
            ``DistributedDataParallel`` or ``torch.compile`` wrapper is
            teleported through the module it wraps.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
        method: a registered teleport method (``"null_space"``, or a baseline).
        objective: a registered objective name or an :class:`Objective`.
        null_space, tau, uncovered, gradient: options of the null-space
            method, passed to it when given (see
            :class:`~torch_teleport.null_space_method.NullSpaceMethod`; its
            defaults: ``"svd"`` with ``tau = 0.999``, the core space of the
            data the teleport sees, ``"warn"``, ``"auto"``).
        lr: step size; ``None`` (default) searches for it: the first step is
            :data:`INITIAL_LR`, and each next one grows while the drift and guard
            limits accept it and the objective improves, shrinking and retrying
            when not (see :meth:`~torch_teleport.method.TeleportMethod.ascend`;
            ``report.step_sizes`` says what it chose). With ``normalize=True``
            (default) each step moves the movable parameters by ``lr`` times
            their norm (at the start of the teleport), which makes one default
            work across models and training stages; with ``normalize=False`` it
            is the plain ascent rate of eq. 5. A given ``lr`` is fixed: the
            first step a limit rejects ends the teleport.
        steps: ascent steps per teleport (the paper's t).
        cap: stop once the gradient norm reaches this value (the paper's CAP).
        replicas: the data-parallel replicas to keep identical; by default
            every rank of an initialised ``torch.distributed`` default group
            (see :class:`~torch_teleport.distributed.Replicas`).
        max_loss_change: roll the teleport back (``stopped="loss_changed"``)
            when the relative change of the teleport-batch loss exceeds
            this; ``None`` (default) never does.
        drift_tolerance: a step after which the teleport-batch loss has moved
            by more than this (relative) is undone and the teleport ends at
            the last good step (``stopped="drift"``). ``"auto"`` (default): the
            method's own default (null space: ``1e-5``, float32's invariance,
            whatever the null space); ``None`` checks nothing.
        guard_tolerance: with a ``guard`` batch, a step after which the guard
            loss rose by more than this (relative) is undone (``stopped="guard"``).
        max_gain: stop once the gradient norm reaches this multiple of its
            starting value (``stopped="gain"``); ``None`` never does.
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
        null_space: str | NullSpace | None = None,
        tau: float | None = None,
        uncovered: str | None = None,
        gradient: str | None = None,
        lr: float | None = None,
        steps: int = 8,
        cap: float | None = None,
        normalize: bool = True,
        replicas: Replicas | None = None,
        max_loss_change: float | None = None,
        drift_tolerance: float | str | None = "auto",
        guard_tolerance: float = 0.01,
        max_gain: float | None = 10.0,
        objective_options: dict[str, Any] | None = None,
        method_options: dict[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        search = lr is None
        lr = INITIAL_LR if search else finite_positive(lr, "lr")
        self.steps = _check_steps(steps)
        self.cap = _check_cap(cap)
        if normalize and lr > 1:
            raise ValueError(
                f"lr is relative to the weights' norm when normalize=True: {lr} would move them by more "
                "than their own size per step; use lr <= 1, or leave it out to search for it"
            )
        if max_loss_change is not None and not max_loss_change >= 0:
            raise ValueError(f"max_loss_change must be None or a non-negative number, got {max_loss_change!r}")
        self.model = underlying_module(model)
        self.loss_fn = loss_fn
        if isinstance(objective, Objective):
            self.objective = objective
        else:
            self.objective = self.registry.get("objective", objective)(**(objective_options or {}))
        self.replicas = replicas or Replicas()
        self.max_loss_change = max_loss_change
        self.evaluate = evaluate_objective(self.objective, self.replicas)
        context = MethodContext(
            model=self.model,
            loss_fn=loss_fn,
            objective=self.objective,
            evaluate=self.evaluate,
            replicas=self.replicas,
            step=StepRule(lr, bool(normalize), self.objective.ascend, search),
            registry=self.registry,
            limits=Limits(
                drift=None,
                guard=finite_positive(guard_tolerance, "guard_tolerance"),
                max_gain=None if max_gain is None else _at_least_one(max_gain),
            ),
        )
        given = {"null_space": null_space, "tau": tau, "uncovered": uncovered, "gradient": gradient}
        options = {**{k: v for k, v in given.items() if v is not None}, **(method_options or {})}
        method_class = self.registry.get("method", method)
        try:
            self.method: TeleportMethod = method_class(context, **options)
        except TypeError as error:
            if "unexpected keyword argument" not in str(error):
                raise
            raise TypeError(f"the {method!r} method does not take that option: {error}") from None
        if drift_tolerance == "auto":
            drift_tolerance = self.method.default_drift()
        elif drift_tolerance is not None:
            drift_tolerance = finite_positive(drift_tolerance, "drift_tolerance")
        self.method.context = replace(context, limits=replace(context.limits, drift=drift_tolerance))

    def teleport(
        self,
        inputs: Inputs,
        targets: Tensor,
        *,
        guard: tuple[Inputs, Tensor] | None = None,
        guard_baseline: float | None = None,
        basis: Inputs | None = None,
        steps: int | None = None,
        cap: float | None = None,
    ) -> TeleportReport:
        """Run one teleport on the batch ``(inputs, targets)`` and report what happened.

        ``inputs`` is what the model takes: a tensor (``model(inputs)``), a
        sequence (``model(*inputs)``) or a mapping (``model(**inputs)``, e.g. a
        Hugging Face tokenizer's output); ``loss_fn`` receives the model's
        output as it is.

        ``guard`` is an ``(inputs, targets)`` batch of other training data: a
        step that raises its loss by more than ``guard_tolerance`` is undone
        and the teleport ends there (the report gives the guard loss before
        and after). ``guard_baseline`` compares the guard loss with this value
        instead (the guard loss at the start of a series of teleports on the
        same guard batch, e.g. ``report.guard_loss_before`` of the first), so
        a round of teleports cannot compound small rises. ``basis`` is the
        inputs of a larger sample of the training data (no targets): the
        null-space method builds its core space from those inputs and the
        guard's too, so the loss of the data they represent stays nearly
        fixed (with the default ``null_space="svd"``, ``tau = 0.999``, the
        core space is the thresholded basis of all of them, GPM's use of the
        energy threshold), while the ascent's objective is the teleport
        batch's. The model is left as found (modes, buffers, hooks), apart
        from the parameter update; on an exception, or when a non-finite
        value appears, the parameters are restored too and the report says so.
        """
        steps = self.steps if steps is None else _check_steps(steps)
        cap = self.cap if cap is None else _check_cap(cap)
        if guard is not None:
            if not self.method.honours_limits:
                raise ValueError(f"the {type(self.method).__name__} keeps the loss its own way and takes no guard batch")
            if not (isinstance(guard, tuple | list) and len(guard) == 2):
                raise TypeError("guard must be an (inputs, targets) pair")
            self.replicas.check_together(_check_batch, *guard)
        if self.replicas.size > 1 and not self.method.keeps_replicas_in_sync:
            raise NotImplementedError(f"{type(self.method).__name__} cannot keep data-parallel replicas identical")
        self.replicas.check_together(_check_batch, inputs, targets)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if basis is not None:
            if not self.method.takes_basis_sample:
                raise ValueError(f"the {type(self.method).__name__} builds no null space and takes no basis sample")
            self.replicas.check_together(_check_inputs, basis, "basis")
        if guard_baseline is not None:
            if guard is None:
                raise ValueError("guard_baseline needs a guard batch")
            if not math.isfinite(guard_baseline):
                raise ValueError(f"guard_baseline must be finite, got {guard_baseline!r}")
        batch = Batch(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            trainable,
            None if guard is None else tuple(guard),
            basis,
            None if guard_baseline is None else float(guard_baseline),
        )
        moved = self.method.moved_parameters(batch)
        saved = [p.detach().clone() for p in moved]
        started = time.perf_counter()
        try:
            with preserved_state(self.model), double_backward_safe(tensors(inputs)[0].device.type):
                report = self.method.run(batch, steps, cap)
        except BaseException:
            _restore(moved, saved)
            raise
        if not math.isfinite(report.loss_after):
            report.stopped = "non_finite"
        elif self.max_loss_change is not None and report.loss_change > self.max_loss_change:
            report.stopped = "loss_changed"
        if report.stopped in ("non_finite", "loss_changed"):
            _restore(moved, saved)
            report.rolled_back = True
            report.loss_after = report.loss_before
            report.grad_norm_after = report.grad_norm_before
            report.objective_after = report.objective_before
        report.seconds = time.perf_counter() - started
        self.replicas.verify(self.model)
        return report


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    return int(steps)


def _at_least_one(value: object) -> float:
    value = finite_positive(value, "max_gain")
    if value < 1:
        raise ValueError(f"max_gain is a multiple of the starting gradient norm and must be at least 1, got {value}")
    return value


def _check_cap(cap: object) -> float | None:
    return None if cap is None else finite_positive(cap, "cap")


def _restore(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)


def _check_inputs(inputs: Inputs, label: str = "inputs") -> None:
    given = tensors(inputs)  # raises for a form that is none of tensor, sequence, mapping
    if not given:
        raise TypeError(f"{label} hold no tensor")
    for tensor in given:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{label} contain non-finite values")
    _check_samples(given[0], label)


def _check_samples(tensor: Tensor, label: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] == 0:
        raise ValueError(f"{label} must hold at least one sample, got shape {tuple(tensor.shape)}")


def _check_batch(inputs: Inputs, targets: Tensor) -> None:
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
    _check_inputs(inputs)
    if targets.is_floating_point() and not torch.isfinite(targets).all():
        raise ValueError("targets contain non-finite values")
    _check_samples(targets, "targets")
    samples = batch_size(inputs)
    if samples != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the batch size: {samples} vs {targets.shape[0]}")
