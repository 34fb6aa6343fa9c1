"""Training with teleports: any ``torch.optim`` optimizer, teleports on a :class:`Schedule`."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .engine import Teleporter
from .inputs import Inputs, call_model, concatenate, tensors, to_device
from .objective import LossFn
from .report import TeleportReport
from .schedule import Schedule
from .wrappers import check_shadows

StatePolicy = str | Callable[[torch.optim.Optimizer, list[TeleportReport]], None]

FAILURE_POLICIES = ("skip", "raise")


class TeleportFailedError(RuntimeError):
    """A teleport failed under ``on_teleport_failure="raise"``; the weights are those before it."""


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
    """A training loop step that teleports when the schedule says so.

    Teleports happen when ``teleport`` is true (the default) and at least one
    of ``teleporter``, ``schedule`` and ``teleport_data`` is given; what is
    missing takes its default: ``Teleporter(model, loss_fn)`` and
    :class:`~torch_teleport.plugins.schedules.EpochSchedule` ``()`` (the
    paper's schedule: 32 batches x 8 steps at the start of epochs 0 to 4).
    So ``TeleportTrainer(model, loss_fn, optimizer, teleport_data=loader)``
    teleports with the defaults, and ``TeleportTrainer(model, loss_fn,
    optimizer)`` trains without teleports (``teleporter`` and ``schedule``
    stay ``None``). ``teleport=False`` always trains without teleports and
    refuses a ``teleporter``, ``schedule`` or ``teleport_data`` given with it.

    ``teleport_data`` yields ``(inputs, targets)`` teleport batches (a
    shuffled ``DataLoader`` gives the paper's random batches; it is cycled);
    without it the teleport uses the current training batch. With
    ``teleport_data`` and ``guard=True`` (the default) each teleport event
    first draws a guard sample: batches of ``teleport_data`` joined until it
    holds at least ``guard_samples`` samples (default 256). Its inputs join
    every teleport's core space, and a step of any of the event's teleports
    that raises its loss beyond the teleporter's ``guard_tolerance``,
    relative to its loss when the event began, is undone (so the event's
    teleports cannot compound small rises). On digits and MNIST-1D a guard
    of 32 samples let the paper's round raise the training loss by up to
    20%; 256 held it within 0.1% (``lab/benchmarks/data_level_set.py``).
    ``optimizer_state`` says what happens to the optimizer's state after a
    teleport: ``"reset"`` (default: moments from the old point are stale),
    ``"keep"``, or a callable ``(optimizer, reports)``; it is applied when at
    least one teleport of the event moved the weights.

    ``accumulation_steps`` (default 1) accumulates the gradients of that many
    calls of :meth:`step` (micro-batches) before each optimizer step: each
    micro-batch's loss is divided by it, the gradients are zeroed before the
    first micro-batch of a window and the optimizer steps after the last.
    :attr:`global_step` counts optimizer steps, and the schedule is asked
    only before the first micro-batch of a window, so a teleport never falls
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

    A teleport *fails* when it is rolled back (a non-finite value, or a loss
    change beyond the teleporter's ``max_loss_change``) or rejects its batch
    or its starting point (``ValueError``: empty or non-finite batch,
    non-finite loss). Either way no value of it reaches the weights.
    ``on_teleport_failure`` says what the run does next: ``"skip"`` (default)
    warns, lists the failure in :attr:`StepResult.failures` and trains on;
    ``"raise"`` raises :class:`TeleportFailedError`. Under data parallelism
    every rank sees the same failure, so all ranks skip or raise together.

    An optimizer that keeps its own copy of the weights (Lookahead, SAM)
    is refused when the trainer teleports, since it would undo teleports;
    ``shadow_policy`` is handed to
    :func:`~torch_teleport.wrappers.check_shadows`.

    When ``teleport_data`` has a ``generator`` (a shuffled ``DataLoader``),
    :meth:`state_dict` records where in its pass the trainer is, so a
    resumed run draws the same teleport batches.
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
        optimizer_state: StatePolicy = "reset",
        device: torch.device | str | None = None,
        on_teleport_failure: str = "skip",
        shadow_policy: str = "default",
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        if on_teleport_failure not in FAILURE_POLICIES:
            raise ValueError(f"on_teleport_failure must be one of {FAILURE_POLICIES}, got {on_teleport_failure!r}")
        if not isinstance(teleport, bool):
            raise ValueError(f"teleport must be True or False, got {teleport!r}")
        if not callable(optimizer_state) and optimizer_state not in ("reset", "keep"):
            raise ValueError(f"optimizer_state must be 'reset', 'keep' or a callable, got {optimizer_state!r}")
        if isinstance(guard_samples, bool) or not isinstance(guard_samples, int) or guard_samples < 1:
            raise ValueError(f"guard_samples must be a positive int, got {guard_samples!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool)
            or not isinstance(max_grad_norm, int | float)
            or not math.isfinite(max_grad_norm)
            or max_grad_norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
        if autocast_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be torch.float16, torch.bfloat16 or None, got {autocast_dtype!r}")
        parts = {"teleporter": teleporter, "schedule": schedule, "teleport_data": teleport_data}
        given = [name for name, value in parts.items() if value is not None]
        if not teleport and given:
            raise ValueError(
                "teleport=False trains without teleports and takes no teleporter, schedule or "
                f"teleport_data; got {', '.join(given)}"
            )
        if given:
            check_shadows(optimizer, policy=shadow_policy)
            if teleporter is None:
                teleporter = Teleporter(model, loss_fn)
            if schedule is None:
                # imported here: the plugins import this package
                from torch_teleport.plugins.schedules import EpochSchedule

                schedule = EpochSchedule()
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.teleporter = teleporter
        self.schedule = schedule
        self.teleport_data = teleport_data
        self.guard = bool(guard)
        self.guard_samples = guard_samples
        self.lr_scheduler = lr_scheduler
        self.optimizer_state = optimizer_state
        self.device = device
        self.on_teleport_failure = on_teleport_failure
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.epoch = 0
        self.global_step = 0
        self._micro = 0  # micro-batches of the current accumulation window done so far
        self._teleport_batches: Iterator | None = None
        self._pass_start: Tensor | None = None  # teleport_data's generator state when the pass began
        self._drawn = 0  # teleport batches drawn in the current pass

    def step(self, inputs: Tensor, targets: Tensor) -> StepResult:
        """Train on one (micro-)batch ``(inputs, targets)``, teleporting first if scheduled.

        Without accumulation: teleport if scheduled, then one optimizer step.
        With ``accumulation_steps=k``: the first micro-batch of each window
        runs the scheduled teleports and zeroes the gradients; every
        micro-batch adds the gradient of its loss divided by ``k``; the k-th
        clips (``max_grad_norm``), steps the optimizer (through ``scaler``
        when given) and advances :attr:`global_step`. The forward pass and
        loss run under ``autocast_dtype`` when it is set.
        """
        inputs, targets = self._to_device(inputs, targets)
        reports: list[TeleportReport] = []
        failures: list[str] = []
        started = time.perf_counter()
        if self._micro == 0:
            reports, failures = self._run_schedule(inputs, targets)
        teleported = time.perf_counter()
        teleport_seconds = teleported - started if reports or failures else 0.0
        if self._micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        with self._autocast(inputs):
            loss = self.loss_fn(call_model(self.model, inputs), targets)
        scaled = loss / self.accumulation_steps if self.accumulation_steps > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        self._micro += 1
        stepped = self._micro == self.accumulation_steps
        grad_norm = self._optimizer_step() if stepped else None
        if self.schedule is not None:
            self.schedule.observe(train_seconds=time.perf_counter() - teleported, teleport_seconds=teleport_seconds)
        return StepResult(float(loss.detach()), reports, failures, stepped, grad_norm)

    def scheduled_teleports(
        self, inputs: Tensor | None, targets: Tensor | None
    ) -> tuple[list[TeleportReport], list[str]]:
        """Run the teleports the schedule plans before the current step, then count the step.

        For training loops that take their own optimizer steps: call this
        exactly once per optimizer step, before its forward pass (before the
        first micro-batch when accumulating gradients). It asks the schedule
        about step :attr:`global_step`, runs the teleports with the failure
        and state policies, and then advances :attr:`global_step` by one, so
        that ``EveryStepsSchedule(every=5)`` teleports before steps 0, 5,
        10, ... of the loop. A loop that sets :attr:`global_step` itself
        before each call (from its framework's step counter) gets the same.
        :meth:`step` runs the schedule itself: do not call both for one step.

        ``(inputs, targets)`` is the training batch, used when there is no
        ``teleport_data``. Returns the reports and the failure messages. When
        a teleport failure is raised (``on_teleport_failure="raise"``) the
        step is not counted.
        """
        if self._micro:
            raise RuntimeError(
                f"scheduled_teleports called after {self._micro} of the {self.accumulation_steps} "
                "micro-batches of an accumulation window that step() is in: a teleport there would "
                "fall between the micro-batches of one optimizer step"
            )
        reports, failures = self._run_schedule(inputs, targets)
        self.global_step += 1
        return reports, failures

    def _run_schedule(self, inputs: Tensor | None, targets: Tensor | None) -> tuple[list[TeleportReport], list[str]]:
        reports: list[TeleportReport] = []
        failures: list[str] = []
        plan = self.schedule.plan(epoch=self.epoch, step=self.global_step) if self.schedule else None
        if plan is None:
            return reports, failures
        if self.schedule.measures_time and self.teleporter.replicas.size > 1:
            raise ValueError(
                f"{type(self.schedule).__name__} decides by each process's own clock, so data-parallel "
                "ranks could disagree on whether to teleport; use a step-based schedule"
            )
        guard = self._guard_sample() if self.guard and self.teleport_data is not None else None
        baseline = None  # the guard loss when the event began: the event's teleports cannot compound
        for _ in range(plan.batches):
            tele_inputs, tele_targets = self._teleport_batch(inputs, targets)
            try:
                report = self.teleporter.teleport(
                    tele_inputs, tele_targets, guard=guard, guard_baseline=baseline, steps=plan.steps, cap=plan.cap
                )
            except ValueError as error:
                failures.append(self._failed(f"teleport rejected at step {self.global_step}: {error}", error))
                continue
            reports.append(report)
            if baseline is None and report.guard_loss_before is not None:
                baseline = report.guard_loss_before
            if report.rolled_back:
                failures.append(self._failed(f"teleport at step {self.global_step} {report.summary()}"))
        if any(not report.rolled_back for report in reports):
            self._apply_state_policy(reports)
        return reports, failures

    def _autocast(self, inputs: Tensor) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(tensors(inputs)[0].device.type, dtype=self.autocast_dtype)

    def _optimizer_step(self, rescale: float | None = None) -> float | None:
        """Clip, step and update the scaler; zero the window. The norm before clipping, when clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
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
        self._micro = 0
        return grad_norm

    def _failed(self, message: str, error: Exception | None = None) -> str:
        if self.on_teleport_failure == "raise":
            raise TeleportFailedError(message) from error
        warnings.warn(f"{message}; training goes on (on_teleport_failure='skip')", RuntimeWarning, stacklevel=4)
        return message

    def end_epoch(self) -> None:
        """Finish an incomplete accumulation window, count the epoch and step the LR scheduler, if any.

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

    def _teleport_batch(self, inputs: Tensor | None, targets: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.teleport_data is None:
            return inputs, targets
        if self._teleport_batches is None:
            self._start_teleport_pass()
        try:
            batch = next(self._teleport_batches)
        except StopIteration:
            self._start_teleport_pass()
            batch = next(self._teleport_batches)
        self._drawn += 1
        return self._to_device(*batch)

    def _guard_sample(self) -> tuple[Inputs, Tensor]:
        """Batches of ``teleport_data`` joined until they hold ``guard_samples`` samples (fewer, with a
        warning, when the batches cannot be joined: token batches padded to different lengths)."""
        parts = [self._teleport_batch(None, None)]
        while sum(len(targets) for _, targets in parts) < self.guard_samples:
            parts.append(self._teleport_batch(None, None))
        try:
            return concatenate([i for i, _ in parts]), torch.cat([t for _, t in parts])
        except ValueError as error:
            warnings.warn(f"the guard sample is one batch: {error}", RuntimeWarning, stacklevel=3)
            return parts[0]

    def _start_teleport_pass(self, state: Tensor | None = None) -> None:
        generator = getattr(self.teleport_data, "generator", None)
        if generator is not None:
            if state is not None:
                generator.set_state(state)
            self._pass_start = generator.get_state()
        self._teleport_batches = iter(self.teleport_data)
        self._drawn = 0

    def _apply_state_policy(self, reports: list[TeleportReport]) -> None:
        if callable(self.optimizer_state):
            self.optimizer_state(self.optimizer, reports)
        elif self.optimizer_state == "reset":
            self.optimizer.state.clear()

    def _to_device(self, inputs: Inputs, targets: Tensor) -> tuple[Inputs, Tensor]:
        if self.device is None:
            return inputs, targets
        return to_device(inputs, self.device), targets.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """The trainer's counters, its schedule's state and its place in the teleport data.

        Model, optimizer, learning-rate scheduler and ``GradScaler`` save
        themselves. The gradients of an unfinished accumulation window are not
        part of any of these states (a warning says so): a resumed run starts
        a new window. Save between windows, e.g. after :meth:`end_epoch`.
        """
        if self._micro:
            warnings.warn(
                f"state_dict taken after {self._micro} of the {self.accumulation_steps} micro-batches "
                "of an accumulation window: their gradients are not saved, a resumed run starts a new window",
                RuntimeWarning,
                stacklevel=2,
            )
        started = self._teleport_batches is not None and self._pass_start is not None
        return {
            "epoch": self.epoch,
            "global_step": self.global_step,
            "schedule": self.schedule.state_dict() if self.schedule else {},
            "teleport_pass": {"start": self._pass_start, "drawn": self._drawn} if started else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._micro = 0
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        if self.schedule is not None:
            self.schedule.load_state_dict(state["schedule"])
        place = state.get("teleport_pass")
        if place is not None and self.teleport_data is not None:
            self._start_teleport_pass(place["start"])
            for _ in range(int(place["drawn"])):  # replay the pass up to where it was
                next(self._teleport_batches)
            self._drawn = int(place["drawn"])

