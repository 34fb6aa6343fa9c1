"""The :class:`Teleporter`: one call that teleports a model on a batch, whatever the method.

``teleport`` checks the batch, asks the method's mover for the batch's
climb, runs the shared ascent loop along it, rolls the parameters back
when the run failed, and writes the report, in that order and in this
module only. See docs/architecture.md, "The path of one teleport".
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import time
from typing import Any

import torch
from torch import Tensor, nn

from .ascent import Ascent, Outcome
from .climb import Climb
from .distributed import Replicas, underlying_module
from .inputs import Inputs, check_batch, check_inputs, usable
from .limits import Guard, Limits
from .line_search import LineSearch, StepRule, finite_positive
from .method import MethodContext, TeleportMethod, evaluate_objective
from .model_state import double_backward_safe, float32_inputs, full_precision, preserved_state
from .objective import Batch, LossFn, Objective
from .registry import Registry, default_registry
from .report import TeleportReport
from .sharding import reshard, resharded_after_forward


class Teleporter:
    """Teleports ``model`` along the level set of ``loss_fn`` on a teleport batch.

    With the default method, each step moves every covered layer by the
    objective's gradient projected onto the null space of that layer's
    inputs on the batch (one basis per batch), so with ``tau = 1`` the batch
    loss is invariant to floating point.

    Args:
        model: the network; its parameters are updated in place. A
            ``DistributedDataParallel`` or ``torch.compile`` wrapper is
            teleported through the module it wraps; a model sharded with
            FSDP2's ``fully_shard`` on the blocks each rank holds
            (:mod:`~torch_teleport.sharded_path`).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
        method: a registered method's name (``"null_space"``, the default, or a
            baseline: ``"symmetry"``, ``"level_set"``) with its options as further
            keywords (``null_space="exact"``, ``tau=0.99``, ``gradient="full"``,
            ``uncovered="freeze"``), or a :class:`TeleportMethod` built with them.
        objective: a registered objective's name, or an :class:`Objective`.
        lr: the step: ``None`` (default) searches for its length with the default
            :class:`~torch_teleport.line_search.LineSearch` (or give one); a number
            is a fixed rate, as in the paper: the first step a limit rejects ends
            the teleport. ``report.step_sizes`` says what was taken.
        normalize: with ``True`` (default) each step moves the movable parameters
            by ``lr`` times their norm at the start of the teleport (one default
            for every model and training stage); ``False`` makes ``lr`` the plain
            ascent rate of eq. 5.
        steps: ascent steps per teleport (the paper's t).
        cap: stop once the gradient norm reaches this value (the paper's CAP).
        limits: what a teleport may not do (:class:`~torch_teleport.limits.Limits`:
            drift of the batch loss, rise of a guard batch's loss, gain of the
            gradient norm, the step of one module, the roll-back threshold).
        replicas: the data-parallel replicas to keep identical; by default
            every rank of an initialised ``torch.distributed`` default group.
        registry: where names are looked up; the installed plugins by default.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: str | TeleportMethod = "null_space",
        objective: str | Objective = "grad_norm",
        lr: float | LineSearch | None = None,
        normalize: bool = True,
        steps: int = 8,
        cap: float | None = None,
        limits: Limits | None = None,
        replicas: Replicas | None = None,
        registry: Registry | None = None,
        **method_options: Any,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a torch_teleport.Limits, got {type(limits).__name__}")
        self.registry = registry or default_registry()
        self.model = underlying_module(model)
        self.loss_fn = loss_fn
        self.steps, self.cap = _check_steps(steps), _check_cap(cap)
        self.objective = objective if isinstance(objective, Objective) else self.registry.get("objective", objective)()
        self.rule = StepRule.of(lr, normalize, self.objective.ascend)
        self.method = _method(method, method_options, self.registry)
        limits = (limits or Limits()).with_default_drift(self.method.default_drift)
        self.limits = limits if self.method.honours_limits else limits.kept_by_the_method()
        self.replicas = replicas or Replicas()
        self.evaluate = evaluate_objective(self.objective, self.replicas)
        context = MethodContext(self.model, loss_fn, self.objective, self.evaluate, self.replicas, self.registry)
        self.mover = self.method.bind(context)

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
        step that raises its loss by more than ``limits.guard`` is undone
        and the teleport ends there (the report gives the guard loss before
        and after). ``guard_baseline`` compares the guard loss with this value
        instead (the guard loss at the start of a series of teleports on the
        same guard batch, e.g. ``report.guard_loss_before`` of the first), so
        a round of teleports cannot compound small rises. ``basis`` is the
        inputs of a larger sample of the training data (no targets): the
        null-space method builds its core space from those inputs and the
        guard's too, so the loss of the data they represent stays nearly
        fixed, while the ascent's objective is the teleport batch's. The model
        is left as found (modes, buffers, hooks), apart from the parameter
        update; on an exception, or when a non-finite value appears, the
        parameters are restored too and the report says so. It works inside
        ``torch.no_grad()`` and ``torch.inference_mode()`` as outside.
        """
        steps = self.steps if steps is None else _check_steps(steps)
        cap = self.cap if cap is None else _check_cap(cap)
        reshard(self.model)  # FSDP2: the sharded parameters, not a gathered copy a forward left
        batch = self._batch(inputs, targets, guard, guard_baseline, basis)
        moved = self.mover.moved_parameters()
        saved = [p.detach().clone() for p in moved]
        started = time.perf_counter()
        try:
            with _teleporting(self.model):
                climb = self.mover.climb(batch)
                ascent = Ascent(self.rule, self.limits, steps, cap)
                outcome = ascent.run(climb, self._guard(batch, guard_baseline), lambda: self.mover.continuation(batch, climb))
        except BaseException:
            _restore(moved, saved)
            raise
        rolled_back = self._failed(outcome)
        if rolled_back:
            _restore(moved, saved)
        report = _report(climb, outcome, rolled_back, time.perf_counter() - started)
        self.replicas.verify(self.model)
        return report

    def _batch(
        self, inputs: Inputs, targets: Tensor, guard: Any, guard_baseline: float | None, basis: Inputs | None
    ) -> Batch:
        """The checked batch (on every rank: a bad batch anywhere fails everywhere), its tensors
        usable by autograd."""
        if guard is not None:
            if not self.method.honours_limits:
                raise ValueError(f"the {type(self.method).__name__} keeps the loss its own way and takes no guard batch")
            if not (isinstance(guard, tuple | list) and len(guard) == 2):
                raise TypeError("guard must be an (inputs, targets) pair")
            self.replicas.check_together(check_batch, *guard)
            guard = (self._inputs(guard[0]), usable(guard[1]))
        if self.replicas.size > 1 and not self.method.keeps_replicas_in_sync:
            raise NotImplementedError(f"{type(self.method).__name__} cannot keep data-parallel replicas identical")
        self.replicas.check_together(check_batch, inputs, targets)
        if basis is not None:
            if not self.method.takes_basis_sample:
                raise ValueError(f"the {type(self.method).__name__} builds no null space and takes no basis sample")
            self.replicas.check_together(check_inputs, basis, "basis")
            basis = self._inputs(basis)
        if guard_baseline is not None:
            if guard is None:
                raise ValueError("guard_baseline needs a guard batch")
            if not math.isfinite(guard_baseline):
                raise ValueError(f"guard_baseline must be finite, got {guard_baseline!r}")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return Batch(self.model, self.loss_fn, self._inputs(inputs), usable(targets), trainable, guard, basis)

    def _inputs(self, inputs: Inputs) -> Inputs:
        """``inputs`` usable by autograd, in float32 where the model's half-precision parameters are
        computed in it."""
        return usable(float32_inputs(self.model, inputs))

    def _guard(self, batch: Batch, baseline: float | None) -> Guard | None:
        if batch.guard is None:
            return None
        return Guard(self.model, self.loss_fn, batch.guard, self.replicas, None if baseline is None else float(baseline))

    def _failed(self, outcome: Outcome) -> bool:
        """Whether the run must be rolled back: a non-finite value, or a loss change beyond
        ``limits.max_loss_change`` (``outcome.stopped`` says which)."""
        before, after = float(outcome.first.loss), float(outcome.last.loss)
        if not math.isfinite(after):
            outcome.stopped = "non_finite"
        elif self.limits.max_loss_change is not None and _relative(after, before) > self.limits.max_loss_change:
            outcome.stopped = "loss_changed"
        return outcome.stopped in ("non_finite", "loss_changed")


def _report(climb: Climb, outcome: Outcome, rolled_back: bool, seconds: float) -> TeleportReport:
    """The report of one teleport: the one place it is written."""
    first, last = outcome.first, outcome.first if rolled_back else outcome.last
    return TeleportReport(
        loss_before=float(first.loss),
        loss_after=float(last.loss),
        grad_norm_before=float(first.grad_norm),
        grad_norm_after=float(last.grad_norm),
        objective_before=float(first.value.detach()),
        objective_after=float(last.value.detach()),
        steps=outcome.steps,
        stopped=outcome.stopped,
        rolled_back=rolled_back,
        layers=list(climb.layers),
        frozen=dict(climb.frozen),
        losses=outcome.losses,
        grad_norms=outcome.grad_norms,
        step_sizes=outcome.step_sizes,
        guard_loss_before=outcome.guard_before,
        guard_loss_after=outcome.guard_after,
        basis_seconds=climb.basis_seconds,
        seconds=seconds,
        batch_norm=climb.batch_norm,
        keeps_batch=climb.keeps_batch,
        exact_from=outcome.continued_from,
    )


@contextlib.contextmanager
def _teleporting(model: nn.Module):
    """The state a teleport runs in, on the model's device: its modes and buffers kept, full
    precision (half-precision parameters computed in float32), kernels with second derivatives,
    and autograd on whatever the caller switched off."""
    device_type = next(model.parameters()).device.type
    with (
        preserved_state(model),
        full_precision(model),
        double_backward_safe(device_type),
        resharded_after_forward(model),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        yield


def _method(method: str | TeleportMethod, options: dict[str, Any], registry: Registry) -> TeleportMethod:
    """The method ``method`` names, built with ``options``; a method object is taken as it is."""
    if isinstance(method, TeleportMethod):
        if options:
            raise TypeError(
                f"give the options {sorted(options)} to the {type(method).__name__} itself, not beside it"
            )
        return method
    misplaced = sorted(set(options) & set(Limits.__dataclass_fields__))
    if misplaced:
        raise TypeError(f"{misplaced[0]} is one of the limits: give limits=Limits({misplaced[0]}=...)")
    method_class = registry.get("method", method)
    try:
        inspect.signature(method_class).bind(**options)
    except TypeError as error:
        raise TypeError(f"the {method!r} method does not take these options {sorted(options)}: {error}") from None
    return method_class(**options)


def _relative(after: float, before: float) -> float:
    return abs(after - before) / max(abs(before), 1e-30)


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a whole number, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps!r}")
    return int(steps)


def _check_cap(cap: object) -> float | None:
    return None if cap is None else finite_positive(cap, "cap")


def _restore(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)
