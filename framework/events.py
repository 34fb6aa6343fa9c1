"""Teleport events: when a training run teleports, on which data, and what its optimizer keeps.

:class:`TeleportEvents` is what every training loop shares:
:class:`~torch_teleport.TeleportTrainer`, a loop of your own and the Lightning callback each call
:meth:`TeleportEvents.before_step` once per optimizer step and keep their own optimizer, counters
and gradients.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from . import optimizer_state as optimizer_state_policy
from .inputs import Inputs, call_model, concatenate, to_device
from .model_state import preserved_state
from .optimizer_state import StatePolicy
from .report import TeleportReport
from .schedule import Schedule, TeleportPlan
from .sharding import sharded_parameters
from .teleporter import Teleporter
from .wrappers import POLICIES as SHADOW_POLICIES
from .wrappers import check_shadows

FAILURE_POLICIES = ("skip", "raise")
Device = torch.device | str | None

_CORE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class TeleportFailedError(RuntimeError):
    """A teleport failed under ``on_teleport_failure="raise"``; the weights are those before it."""


def positive_int(name: str, value: object) -> int:
    """``value`` if it is a positive int (``True`` is not), else a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_event_options(
    *,
    guard_samples: object,
    optimizer_state: object,
    on_teleport_failure: object,
    shadow_policy: object,
) -> None:
    """Refuse event options that cannot work, naming the option.

    Shared with :class:`~torch_teleport.TeleportTrainer`, which checks them even when it does not
    teleport, so that a typo is found before the run that would have used it.
    """
    positive_int("guard_samples", guard_samples)
    optimizer_state_policy.check_policy(optimizer_state)
    if on_teleport_failure not in FAILURE_POLICIES:
        raise ValueError(
            f"on_teleport_failure must be one of {FAILURE_POLICIES}, got {on_teleport_failure!r}"
        )
    if shadow_policy not in SHADOW_POLICIES:
        raise ValueError(f"shadow_policy must be one of {SHADOW_POLICIES}, got {shadow_policy!r}")


def on_device(inputs: Inputs, targets: Tensor, device: Device) -> tuple[Inputs, Tensor]:
    """The batch moved to ``device`` (as it is when ``device`` is ``None``)."""
    if device is None:
        return inputs, targets
    return to_device(inputs, device), targets.to(device)


class TeleportEvents:
    """The teleports of a training run: when (a :class:`Schedule`), on what, and what follows.

    A training loop calls :meth:`before_step` once per optimizer step, before
    its forward pass (before the first micro-batch when it accumulates
    gradients), with the epoch, the number of optimizer steps taken so far
    and its optimizer. When the schedule plans an event there, the event runs
    ``plan.batches`` teleports of ``plan.steps`` steps::

        events = TeleportEvents(Teleporter(model, loss_fn), EveryStepsSchedule(every=100),
                                teleport_data=teleport_loader)
        for step, (inputs, targets) in enumerate(loader):
            reports, failures = events.before_step(optimizer, epoch=0, step=step)
            ...  # forward, backward, optimizer.step(), as the loop always did

    ``schedule`` defaults to :func:`default_schedule` of the optimizer of the first
    :meth:`before_step`: :class:`~torch_teleport.plugins.schedules.GainingSchedule` ``()``
    (one teleport before every 500th optimizer step, first at step 0, until two events in a row
    gain less than 1.5x), or for an optimizer that normalises its step per coordinate (Adam,
    AdamW, Adagrad, RMSprop, ...) one teleport at the start,
    :class:`~torch_teleport.plugins.schedules.OnceSchedule` ``()``. The paper's 32 batches x 8
    steps at epochs 0 to 4 is ``EpochSchedule()``.

    ``teleport_data`` yields ``(inputs, targets)`` teleport batches, cycled
    (a shuffled ``DataLoader`` gives the paper's random batches), moved to
    ``device`` when it is given; without it each event teleports on the
    training batch handed to :meth:`before_step`. With ``teleport_data`` and
    ``guard=True`` each event first draws two samples of the data, each
    batches joined until it holds at least ``guard_samples`` samples: a
    *basis* sample, whose inputs join every teleport's core space (the data's
    directions the teleports keep), and a *guard* sample, whose loss when the
    event begins is the baseline of all the event's teleports: a step that
    raises it beyond the teleporter's guard limit is undone, so the event's
    teleports cannot compound small rises. The guard's inputs stay out of the
    core space, so that its loss measures what the teleports do to data they
    do not keep exactly: with them in it, the paper's event (32 teleports of
    32 samples) raised the training loss of digits 2.3-fold while the guard's
    own loss did not move (``lab/benchmarks/data_level_set.py``).

    ``optimizer_state`` says what the optimizer's state becomes after an
    event in which a teleport moved the weights (:mod:`~torch_teleport.optimizer_state`):
    ``"auto"`` (default: per optimizer family, as measured), ``"keep"``,
    ``"reset"``, ``"rescale"`` (each parameter's moments scaled to its
    gradient's growth over the event, measured on the guard sample, else on
    the training batch), or a callable ``(optimizer, reports)``. An event
    that moved nothing leaves it alone.

    A teleport *fails* when it is rolled back or rejects its batch or its
    starting point (``ValueError``); no value of it reaches the weights.
    ``on_teleport_failure="skip"`` (default) warns and lists the failure;
    ``"raise"`` raises :class:`TeleportFailedError`. Under data parallelism
    every rank sees the same failure, so all ranks skip or raise together;
    a schedule that decides by measured time is refused there (ranks could
    disagree on whether to teleport).

    An optimizer that keeps its own copy of the weights (Lookahead, SAM)
    would undo teleports: :meth:`check_optimizer` refuses or warns about it
    (``shadow_policy``, see :func:`~torch_teleport.wrappers.check_shadows`),
    at the first event of each optimizer or earlier when called.

    :meth:`state_dict` holds the schedule's state and, when ``teleport_data``
    has a ``generator`` (a shuffled ``DataLoader``), the place in its pass,
    so a resumed run draws the same teleport batches. The loop keeps its own
    counters, optimizer and model.
    """

    def __init__(
        self,
        teleporter: Teleporter,
        schedule: Schedule | None = None,
        *,
        teleport_data: Iterable[tuple[Inputs, Tensor]] | None = None,
        guard: bool = True,
        guard_samples: int = 256,
        optimizer_state: StatePolicy = "auto",
        on_teleport_failure: str = "skip",
        shadow_policy: str = "default",
        device: Device = None,
    ) -> None:
        check_event_options(
            guard_samples=guard_samples,
            optimizer_state=optimizer_state,
            on_teleport_failure=on_teleport_failure,
            shadow_policy=shadow_policy,
        )
        if optimizer_state == "rescale" and sharded_parameters(teleporter.model):
            raise ValueError(
                "optimizer_state='rescale' measures each parameter's gradient norm by autograd, which a "
                "sharded model's (FSDP2) parameters do not allow; use 'keep', 'reset' or 'auto'"
            )
        self.teleporter = teleporter
        self.schedule = schedule  # None: default_schedule(optimizer) at the first before_step
        self._loaded: dict[str, Any] | None = None  # a state for the default schedule, loaded before it was built
        self.teleport_data = teleport_data
        self.guard = bool(guard)
        self.guard_samples = guard_samples
        self.optimizer_state = optimizer_state
        self.on_teleport_failure = on_teleport_failure
        self.shadow_policy = shadow_policy
        self._batches = None if teleport_data is None else _TeleportBatches(teleport_data, device)
        self._teleport_seconds = 0.0  # spent in events since the schedule was last told
        self._checked: weakref.ref | None = None  # the optimizer check_optimizer last passed

    def before_step(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int,
        step: int,
        inputs: Inputs | None = None,
        targets: Tensor | None = None,
    ) -> tuple[list[TeleportReport], list[str]]:
        """Run the event the schedule plans before optimizer step ``step`` of ``epoch``, if any.

        ``step`` is the number of optimizer steps taken so far, so
        ``EveryStepsSchedule(every=5)`` teleports before steps 0, 5, 10, ...
        ``(inputs, targets)`` is the training batch, needed only without
        ``teleport_data``. ``optimizer`` gets the state policy. Returns the
        event's reports and failure messages (two empty lists when there is no event).
        """
        if self.schedule is None:
            self.schedule = default_schedule(optimizer)
            if self._loaded is not None:
                self.schedule.load_state_dict(self._loaded)
        if self.schedule.measures_time and self.teleporter.replicas.size > 1:
            raise ValueError(
                f"{type(self.schedule).__name__} decides by each process's own clock, so "
                "data-parallel ranks could disagree on whether to teleport; "
                "use a step-based schedule"
            )
        plan = self.schedule.plan(epoch=epoch, step=step)
        if plan is None:
            return [], []
        started = time.perf_counter()
        try:
            self.check_optimizer(optimizer)
            basis, guard = self._samples()
            state = _StateCarrier(self, optimizer, guard or _batch_or_none(inputs, targets))
            reports, failures = self._teleports(plan, step, inputs, targets, guard, basis)
            self.schedule.outcome(reports)
            if any(report.steps and not report.rolled_back for report in reports):
                state.carry(reports)
        finally:
            self._teleport_seconds += time.perf_counter() - started
        return reports, failures

    def observe(self, *, train_seconds: float, loss: float | None = None) -> None:
        """Tell the schedule the seconds spent training since the last call, and the step's loss.

        The seconds spent in events meanwhile go with them
        (:meth:`Schedule.observe`): a compute-budget schedule such as
        :class:`~torch_teleport.plugins.schedules.BudgetSchedule` needs both.
        ``loss`` is the training loss of the optimizer step just taken (its
        micro-batches' mean), for a schedule that watches it
        (:attr:`Schedule.hears_loss`, such as
        :class:`~torch_teleport.plugins.schedules.SpikeSchedule`); under data
        parallelism every rank reports its own and the schedule hears their
        mean, so the ranks decide alike. Call it after each optimizer step;
        other schedules ignore it.
        """
        if self.schedule is not None:
            self.schedule.observe(train_seconds=train_seconds, teleport_seconds=self._teleport_seconds)
            if loss is not None and self.schedule.hears_loss:
                self.schedule.observe_loss(self.teleporter.replicas.mean(float(loss), 1))
        self._teleport_seconds = 0.0

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse or warn about ``optimizer`` if it keeps a copy of the weights (undoing teleports).

        Runs once per optimizer (a weak reference remembers the last one passed).
        """
        if self._checked is not None and self._checked() is optimizer:
            return
        check_shadows(optimizer, policy=self.shadow_policy)
        self._checked = weakref.ref(optimizer)

    def _teleports(
        self, plan: TeleportPlan, step: int, inputs: Inputs | None, targets: Tensor | None, guard, basis
    ) -> tuple[list[TeleportReport], list[str]]:
        baseline = None  # the guard loss when the event began
        reports: list[TeleportReport] = []
        failures: list[str] = []
        for _ in range(plan.batches):
            batch = self._teleport_batch(inputs, targets, plan.samples)
            try:
                report = self.teleporter.teleport(
                    *batch, guard=guard, guard_baseline=baseline, basis=basis, steps=plan.steps, cap=plan.cap
                )
            except ValueError as error:
                failures.append(self._failed(f"teleport rejected at step {step}: {error}", error))
                continue
            reports.append(report)
            if baseline is None:
                baseline = report.guard_loss_before
            if report.rolled_back:
                failures.append(self._failed(f"teleport at step {step} {report.summary()}"))
        return reports, failures

    def _teleport_batch(
        self, inputs: Inputs | None, targets: Tensor | None, samples: int | None = None
    ) -> tuple[Inputs, Tensor]:
        if self._batches is not None:
            return next(self._batches) if samples is None else self._sample(samples)
        if inputs is None or targets is None:
            raise ValueError(
                "TeleportEvents has no teleport_data, so an event teleports on the training batch: "
                "pass it as before_step(..., inputs=..., targets=...)"
            )
        return inputs, targets

    def _samples(self) -> tuple[Inputs | None, tuple[Inputs, Tensor] | None]:
        """The event's basis and guard samples, each drawn where the teleporter's method takes it."""
        if not (self.guard and self._batches is not None):
            return None, None
        method = self.teleporter.method
        basis = self._sample(self.guard_samples)[0] if method.takes_basis_sample else None
        return basis, self._sample(self.guard_samples) if method.honours_limits else None

    def _sample(self, samples: int) -> tuple[Inputs, Tensor]:
        """Batches of ``teleport_data`` joined until they hold ``samples`` samples (fewer, with a
        warning, when they cannot be joined: token batches padded to different lengths)."""
        parts = [next(self._batches)]
        while sum(len(targets) for _, targets in parts) < samples:
            parts.append(next(self._batches))
        try:
            return concatenate([i for i, _ in parts]), torch.cat([t for _, t in parts])
        except ValueError as error:
            warnings.warn(
                f"the sample is one batch: {error}",
                RuntimeWarning,
                stacklevel=_outside_core(),
            )
            return parts[0]

    def _failed(self, message: str, error: Exception | None = None) -> str:
        if self.on_teleport_failure == "raise":
            raise TeleportFailedError(message) from error
        warnings.warn(
            f"{message}; training goes on (on_teleport_failure='skip')",
            RuntimeWarning,
            stacklevel=_outside_core(),
        )
        return message

    def gradient_norms(self, sample: tuple[Inputs, Tensor]) -> dict[Tensor, float]:
        """Each trainable parameter's gradient norm on ``sample``, in the modes a teleport runs in
        (modes and buffers restored)."""
        model, loss_fn = self.teleporter.model, self.teleporter.loss_fn
        parameters = [p for p in model.parameters() if p.requires_grad]
        with preserved_state(model), torch.enable_grad():
            return optimizer_state_policy.gradient_norms(parameters, lambda: loss_fn(call_model(model, sample[0]), sample[1]))

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state and the place in the pass over ``teleport_data``.

        ``{"schedule": ..., "teleport_pass": {"start": generator state, "drawn": count} or None}``.
        """
        return {
            "schedule": self._loaded if self.schedule is None else self.schedule.state_dict(),
            "teleport_pass": None if self._batches is None else self._batches.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; other keys (a trainer's counters beside it) are ignored."""
        if self.schedule is None:
            self._loaded = state["schedule"]
        else:
            self.schedule.load_state_dict(state["schedule"])
        place = state.get("teleport_pass")
        if place is not None and self._batches is not None:
            self._batches.load_state_dict(place)


class _TeleportBatches(Iterator):
    """``teleport_data`` cycled, with its place in the current pass restorable.

    A shuffled ``DataLoader`` draws its order from its ``generator``: the
    generator's state when the pass began and the number of batches drawn
    since pin the place down, and replaying that many batches returns to it.
    """

    def __init__(self, data: Iterable[tuple[Inputs, Tensor]], device: Device) -> None:
        self.data, self.device = data, device
        self._pass: Iterator | None = None
        self._start: Tensor | None = None  # the generator's state when the pass began
        self._drawn = 0  # batches drawn in the current pass

    def __next__(self) -> tuple[Inputs, Tensor]:
        if self._pass is None:
            self._begin()
        batch = next(self._pass, None)
        if batch is None:
            self._begin()
            batch = next(self._pass, None)
            if batch is None:
                raise ValueError(
                    "teleport_data yields no batch: give it at least one (inputs, targets)"
                )
        self._drawn += 1
        return on_device(*batch, self.device)

    def _begin(self, start: Tensor | None = None) -> None:
        generator = getattr(self.data, "generator", None)
        if generator is not None:
            if start is not None:
                generator.set_state(start)
            self._start = generator.get_state()
        self._pass = iter(self.data)
        self._drawn = 0

    def state_dict(self) -> dict[str, Any] | None:
        if self._pass is None or self._start is None:
            return None
        return {"start": self._start, "drawn": self._drawn}

    def load_state_dict(self, place: dict[str, Any]) -> None:
        self._begin(place["start"])
        drawn = int(place["drawn"])
        for _ in range(drawn):  # replay the pass up to where it was
            next(self._pass)
        self._drawn = drawn


STEP_NORMALISING = ("Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta", "SparseAdam")
"""Optimizers that divide each coordinate's step by a running size of its gradients (by class name,
the MRO walked): a teleport's larger gradient gives them the sharper point without the larger step."""


def default_schedule(optimizer: torch.optim.Optimizer | None = None, *, steps: int = 8, cap: float | None = None) -> Schedule:
    """The schedule a run teleports on when it names none, chosen by measurement (docs/results.md,
    "Trainer defaults" and "Optimizer state"): ``GainingSchedule()``, one teleport every 500
    optimizer steps while teleports gain (within 10% of the run's compute); for an optimizer in
    :data:`STEP_NORMALISING`, ``OnceSchedule()``, one teleport at the start (Adam on MNIST-1D: the
    teleports at trained points raised the epoch-5 loss on every seed, whatever the optimizer-state
    policy; the one at the start is within seed noise). ``steps`` and ``cap`` go to each teleport."""
    # imported here: the plugins import this package
    from torch_teleport.plugins.schedules import GainingSchedule, OnceSchedule

    names = {cls.__name__ for cls in type(optimizer).__mro__} if optimizer is not None else set()
    chosen = OnceSchedule if names.intersection(STEP_NORMALISING) else GainingSchedule
    return chosen(steps=steps, cap=cap)


def _outside_core() -> int:
    """The ``stacklevel`` that makes a warning name the first line outside the core.

    The caller of ``warnings.warn`` is reached from a training loop either
    directly or through the trainer: the warning should point at the loop.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_CORE):
        frame, level = frame.f_back, level + 1
    return level


def _batch_or_none(inputs: Inputs | None, targets: Tensor | None) -> tuple[Inputs, Tensor] | None:
    return None if inputs is None or targets is None else (inputs, targets)


class _StateCarrier:
    """The optimizer-state policy of one event: resolved for the optimizer, and for ``"rescale"`` the
    gradient norms on ``sample`` measured before the event's teleports."""

    def __init__(self, events: TeleportEvents, optimizer: torch.optim.Optimizer, sample) -> None:
        self.events, self.optimizer, self.sample = events, optimizer, sample
        self.policy = optimizer_state_policy.resolved(events.optimizer_state, optimizer)
        rescales = self.policy == "rescale" and sample is not None
        self.before = events.gradient_norms(sample) if rescales else None

    def carry(self, reports: list[TeleportReport]) -> None:
        growth = None
        if self.before is not None:
            growth = optimizer_state_policy.gradient_growth(self.before, self.events.gradient_norms(self.sample))
        optimizer_state_policy.apply(self.policy, self.optimizer, reports, growth)
