"""Training with teleports: any ``torch.optim`` optimizer, teleport events on a schedule."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .events import (
    Device,
    StatePolicy,
    TeleportEvents,
    check_event_options,
    default_schedule,
    on_device,
    positive_int,
)
from .inputs import Inputs, call_model, tensors
from .objective import LossFn
from .report import TeleportReport
from .schedule import Schedule
from .teleporter import Teleporter

AUTOCAST_DTYPES = (None, torch.float16, torch.bfloat16)


@dataclass
class StepResult:
    """One training step (one micro-batch under gradient accumulation).

    ``loss`` is the micro-batch's loss as ``loss_fn`` returns it (not divided by the number of
    accumulation steps, not scaled by a ``GradScaler``); ``teleports`` and ``failures`` are the
    reports and failure messages of the teleports run before it. ``stepped`` says whether the
    optimizer stepped after this micro-batch (always, without accumulation); ``grad_norm`` is the
    total gradient norm before clipping when ``max_grad_norm`` is set and the optimizer stepped
    (after unscaling, under a ``GradScaler``), else ``None``.
    """

    loss: float
    teleports: list[TeleportReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stepped: bool = True
    grad_norm: float | None = None


class TeleportTrainer:
    """A training loop step that runs the teleport events its schedule plans.

    The teleports are a :class:`~torch_teleport.TeleportEvents` (:attr:`events`)
    built from ``teleporter``, ``schedule``, ``teleport_data``, ``guard``,
    ``guard_samples``, ``optimizer_state``, ``on_teleport_failure`` and
    ``shadow_policy``, which mean what they mean there. It exists when
    ``teleport`` is true (the default) and at least one of ``teleporter``,
    ``schedule`` and ``teleport_data`` is given; what is missing takes its
    default: ``Teleporter(model, loss_fn)`` and the events' default schedule
    for ``optimizer`` (:func:`~torch_teleport.events.default_schedule`: one
    teleport every 500 optimizer steps while teleports gain, or one at the
    start for an optimizer that normalises its step per coordinate, such as Adam).
    So ``TeleportTrainer(model, loss_fn, optimizer, teleport_data=loader)``
    teleports with the defaults, and ``TeleportTrainer(model, loss_fn,
    optimizer)`` trains without teleports (:attr:`events`, :attr:`teleporter`
    and :attr:`schedule` are ``None``). ``teleport=False`` always trains
    without teleports and refuses a ``teleporter``, ``schedule`` or
    ``teleport_data`` given with it. An optimizer that keeps its own copy of
    the weights (Lookahead, SAM) is refused when the trainer teleports.

    ``accumulation_steps`` (default 1) accumulates the gradients of that many
    calls of :meth:`step` (micro-batches) before each optimizer step: each
    micro-batch's loss is divided by it, the gradients are zeroed before the
    first micro-batch of a window and the optimizer steps after the last.
    :attr:`global_step` counts optimizer steps, and the events run only
    before the first micro-batch of a window, so a teleport never falls
    between the micro-batches of one optimizer step. :meth:`end_epoch`
    finishes a window the epoch left incomplete, with its gradients rescaled
    to the mean over the micro-batches it holds.

    ``max_grad_norm`` clips the total gradient norm of the optimizer's
    parameters with :func:`torch.nn.utils.clip_grad_norm_` before each
    optimizer step. ``scaler`` (a :class:`torch.amp.GradScaler`) scales each
    loss before ``backward``, unscales the gradients before clipping and
    steps through ``scaler.step(optimizer)`` and ``scaler.update()`` (which
    skip the step when a gradient is not finite). ``autocast_dtype``
    (``torch.float16`` or ``torch.bfloat16``) runs the training forward pass
    and loss, and only these, under :class:`torch.autocast` on the inputs'
    device type; the backward pass and the teleports run outside it.
    ``device`` receives the training and teleport batches.

    :meth:`state_dict` holds the counters and the events' state (schedule,
    place in the teleport data), so a resumed run teleports as the whole run would.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        *,
        teleporter: Teleporter | None = None,
        schedule: Schedule | None = None,
        teleport_data: Iterable[tuple[Tensor, Tensor]] | None = None,
        teleport: bool = True,
        guard: bool = True,
        guard_samples: int = 256,
        lr_scheduler: Any | None = None,
        optimizer_state: StatePolicy = "auto",
        device: Device = None,
        on_teleport_failure: str = "skip",
        shadow_policy: str = "default",
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        policies = {
            "guard_samples": guard_samples,
            "optimizer_state": optimizer_state,
            "on_teleport_failure": on_teleport_failure,
            "shadow_policy": shadow_policy,
        }
        check_event_options(**policies)
        self.accumulation_steps = positive_int("accumulation_steps", accumulation_steps)
        self.max_grad_norm = _max_grad_norm(max_grad_norm)
        self.scaler = _scaler(scaler)
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        parts = {"teleporter": teleporter, "schedule": schedule, "teleport_data": teleport_data}
        self.events = _events(
            model, loss_fn, optimizer, teleport, parts, guard=guard, device=device, **policies
        )
        if self.events is not None:
            self.events.check_optimizer(optimizer)
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device
        self.epoch = 0
        self.global_step = 0
        self._micro = 0  # micro-batches of the current accumulation window done so far
        self._window_loss = 0.0  # the sum of their losses

    @property
    def teleporter(self) -> Teleporter | None:
        """The events' teleporter (``None`` when the trainer does not teleport)."""
        return None if self.events is None else self.events.teleporter

    @property
    def schedule(self) -> Schedule | None:
        """The events' schedule (``None`` when the trainer does not teleport)."""
        return None if self.events is None else self.events.schedule

    def step(self, inputs: Inputs, targets: Tensor) -> StepResult:
        """Train on one (micro-)batch ``(inputs, targets)``, teleporting first if scheduled.

        Without accumulation: the scheduled event, then one optimizer step.
        With ``accumulation_steps=k``: the first micro-batch of each window
        runs the scheduled event and zeroes the gradients; every micro-batch
        adds the gradient of its loss divided by ``k``; the k-th clips
        (``max_grad_norm``), steps the optimizer (through ``scaler`` when
        given) and advances :attr:`global_step`. The forward pass and loss run
        under ``autocast_dtype`` when it is set.
        """
        inputs, targets = on_device(inputs, targets, self.device)
        reports, failures = [], []
        if self._micro == 0:
            if self.events is not None:
                reports, failures = self.events.before_step(
                    self.optimizer,
                    epoch=self.epoch,
                    step=self.global_step,
                    inputs=inputs,
                    targets=targets,
                )
            self.optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        self.model.train()
        with self._autocast(inputs):
            loss = self.loss_fn(call_model(self.model, inputs), targets)
        scaled = loss / self.accumulation_steps if self.accumulation_steps > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        value = float(loss.detach())
        self._window_loss += value
        self._micro += 1
        stepped = self._micro == self.accumulation_steps
        window_loss = self._window_loss / self._micro if stepped else None
        grad_norm = self._optimizer_step() if stepped else None
        if self.events is not None:
            self.events.observe(train_seconds=time.perf_counter() - started, loss=window_loss)
        return StepResult(value, reports, failures, stepped, grad_norm)

    def _autocast(self, inputs: Inputs) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(tensors(inputs)[0].device.type, dtype=self.autocast_dtype)

    def _optimizer_step(self, rescale: float | None = None) -> float | None:
        """Clip, step, update the scaler, zero the window; the norm before clipping, if clipping."""
        params = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if rescale is not None:
            for param in params:
                param.grad.mul_(rescale)
        grad_norm = None
        if self.max_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.global_step += 1
        self._micro, self._window_loss = 0, 0.0
        return grad_norm

    def end_epoch(self) -> None:
        """Finish an incomplete accumulation window, count the epoch, step the LR scheduler if any.

        A window that holds ``m < accumulation_steps`` micro-batches is
        finished with one optimizer step on its gradients multiplied by
        ``accumulation_steps / m``: the mean over the micro-batches it holds,
        as with ``accumulation_steps=m``.
        """
        if self._micro:
            self._optimizer_step(rescale=self.accumulation_steps / self._micro)
        self.epoch += 1
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The trainer's counters beside its events' state (schedule, place in the teleport data).

        ``{"epoch", "global_step", "schedule", "teleport_pass"}``, the last two
        as :meth:`TeleportEvents.state_dict` gives them. Model, optimizer,
        learning-rate scheduler and ``GradScaler`` save themselves. The
        gradients of an unfinished accumulation window are not part of any of
        these states (a warning says so): a resumed run starts a new window.
        Save between windows, e.g. after :meth:`end_epoch`.
        """
        if self._micro:
            warnings.warn(
                f"state_dict taken after {self._micro} of the {self.accumulation_steps} "
                "micro-batches of an accumulation window: their gradients are not saved, "
                "a resumed run starts a new window",
                RuntimeWarning,
                stacklevel=2,
            )
        events = (
            {"schedule": {}, "teleport_pass": None}
            if self.events is None
            else self.events.state_dict()
        )
        return {"epoch": self.epoch, "global_step": self.global_step, **events}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._micro, self._window_loss = 0, 0.0
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if self.events is not None:
            self.events.load_state_dict(state)


def _events(
    model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, teleport: object, parts: dict[str, Any],
    **options: Any,
) -> TeleportEvents | None:
    """The trainer's events: ``None`` without teleport parts, defaults for the parts not given."""
    if not isinstance(teleport, bool):
        raise ValueError(f"teleport must be True or False, got {teleport!r}")
    given = [name for name, value in parts.items() if value is not None]
    if not teleport and given:
        raise ValueError(
            "teleport=False trains without teleports and takes no teleporter, schedule or "
            f"teleport_data; got {', '.join(given)}"
        )
    if not given:
        return None
    teleporter = (
        parts["teleporter"] if parts["teleporter"] is not None else Teleporter(model, loss_fn)
    )
    schedule = parts["schedule"] if parts["schedule"] is not None else default_schedule(optimizer)
    return TeleportEvents(teleporter, schedule, teleport_data=parts["teleport_data"], **options)


def _max_grad_norm(value: object) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"max_grad_norm must be a positive finite number or None, got {value!r}")
    return float(value)


def _scaler(scaler: object) -> torch.amp.GradScaler | None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(
            f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}"
        )
    return scaler


def _autocast_dtype(dtype: object) -> torch.dtype | None:
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be torch.float16, torch.bfloat16 or None, got {dtype!r}"
        )
    return dtype
