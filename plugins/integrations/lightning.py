"""A PyTorch Lightning callback that teleports on a schedule (optional: needs ``lightning``).

Install with ``pip install torch-teleport[lightning]``. The module imports
without Lightning; only building :class:`TeleportCallback` needs it.

The callback runs a :class:`~torch_teleport.TeleportEvents` at the start of
each optimizer step (the first micro-batch when gradients are accumulated),
on the LightningModule itself (or the submodule ``module`` picks), with the
epoch, step and optimizer of Lightning's trainer, so:

* under Lightning's DDP strategies every rank teleports the global batch
  through :class:`~torch_teleport.distributed.Replicas` and the replicas
  stay identical (``verify=True`` checks it after each teleport);
* failures follow ``on_teleport_failure``, the optimizer state follows
  ``optimizer_state``, and optimizer wrappers or averaging callbacks that
  keep stale copies of the weights are refused or warned about
  (``shadow_policy``), as for any :class:`~torch_teleport.TeleportEvents`;
* a compute-budget schedule is told the seconds between optimizer steps;
* ``teleport/*`` metrics are logged with ``LightningModule.log``;
* the events' state (schedule, place in the teleport data) is saved in
  Lightning checkpoints and restored from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from torch_teleport import Schedule, Teleporter, TeleportEvents, TeleportReport
from torch_teleport.distributed import Replicas
from torch_teleport.events import StatePolicy, check_event_options
from torch_teleport.objective import LossFn
from torch_teleport.wrappers import check_shadows

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the callback cannot be built; the module stays importable
    Callback = object
    LIGHTNING_MISSING = True
else:
    LIGHTNING_MISSING = False


class TeleportCallback(Callback):
    """Teleport the model during ``Trainer.fit`` when ``schedule`` says so.

    Args:
        loss_fn: ``loss_fn(module(inputs), targets)``, the loss the teleport keeps level.
        schedule: when to teleport and how much (a :class:`~torch_teleport.Schedule`).
        module: picks the module to teleport from the LightningModule (default: itself).
        teleport_data: ``(inputs, targets)`` batches to teleport on (cycled); by
            default the training batch, which must then be an ``(inputs, targets)`` pair.
        optimizer_state, on_teleport_failure, shadow_policy, guard_samples: as for
            :class:`~torch_teleport.TeleportEvents`.
        verify: compare parameter checksums across ranks after each teleport.
        teleporter_options: keyword arguments of :class:`~torch_teleport.Teleporter`
            (``lr``, ``steps``, ``objective``, ``null_space``, ...).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        schedule: Schedule,
        *,
        module: Callable[[nn.Module], nn.Module] | None = None,
        teleport_data: Iterable[tuple[Tensor, Tensor]] | None = None,
        optimizer_state: StatePolicy = "auto",
        on_teleport_failure: str = "skip",
        shadow_policy: str = "default",
        guard_samples: int = 256,
        verify: bool = False,
        **teleporter_options: Any,
    ) -> None:
        if LIGHTNING_MISSING:
            raise ImportError(
                "TeleportCallback needs PyTorch Lightning: pip install 'torch-teleport[lightning]' "
                "(or pip install lightning)"
            )
        super().__init__()
        event_options = {
            "guard_samples": guard_samples,
            "optimizer_state": optimizer_state,
            "on_teleport_failure": on_teleport_failure,
            "shadow_policy": shadow_policy,
        }
        check_event_options(**event_options)
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.module = module
        self.teleport_data = teleport_data
        self._event_options = event_options
        self.verify = verify
        self.teleporter_options = teleporter_options
        self.events: TeleportEvents | None = None
        self.reports: list[TeleportReport] = []
        self._pending_state: dict[str, Any] | None = None
        self._last_step_end: float | None = None  # when the previous optimizer step's events ended
        self._losses: list[float] = []  # the training losses of the micro-batches since then

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        target = self.module(pl_module) if self.module is not None else pl_module
        if len(trainer.optimizers) != 1:
            raise ValueError(
                "TeleportCallback supports one optimizer, "
                f"the trainer has {len(trainer.optimizers)}"
            )
        check_shadows(
            [c for c in trainer.callbacks if c is not self],
            policy=self._event_options["shadow_policy"],
        )
        teleporter = Teleporter(
            target, self.loss_fn, replicas=Replicas(verify=self.verify), **self.teleporter_options
        )
        self.events = TeleportEvents(
            teleporter,
            self.schedule,
            teleport_data=self.teleport_data,
            device=pl_module.device,
            **self._event_options,
        )
        self.events.check_optimizer(trainer.optimizers[0])
        if self._pending_state is not None:
            self.events.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_step_end = None

    def on_train_batch_start(
        self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        if (
            batch_idx % trainer.accumulate_grad_batches
        ):  # not the first micro-batch of an optimizer step
            return
        if self._last_step_end is not None:
            loss = sum(self._losses) / len(self._losses) if self._losses else None
            self.events.observe(train_seconds=time.perf_counter() - self._last_step_end, loss=loss)
        self._losses = []
        inputs, targets = (batch[0], batch[1]) if self.teleport_data is None else (None, None)
        reports, failures = self.events.before_step(
            trainer.optimizers[0],
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            inputs=inputs,
            targets=targets,
        )
        self._last_step_end = time.perf_counter()
        self.reports += reports
        if reports or failures:
            pl_module.log_dict(
                _metrics(reports, failures), on_step=True, on_epoch=False, batch_size=1
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the micro-batch's training loss (``training_step``'s tensor or its ``"loss"``) for
        a schedule that watches the loss (others are spared the device sync)."""
        if not self.schedule.hears_loss:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(float(loss.detach()))

    def state_dict(self) -> dict[str, Any]:
        if self.events is not None:
            return self.events.state_dict()
        return self._pending_state or {
            "schedule": self.schedule.state_dict(),
            "teleport_pass": None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (step counters that older checkpoints hold beside it are
        ignored: the callback reads them from Lightning's trainer)."""
        if self.events is None:
            self._pending_state = state_dict  # for the events built at fit start
        else:
            self.events.load_state_dict(state_dict)


def _metrics(reports: list[TeleportReport], failures: list[str]) -> dict[str, float]:
    """One teleport event in numbers: gains averaged, loss change at its worst, time summed."""
    moved = [r for r in reports if not r.rolled_back]
    gains = [r.gain for r in moved if r.grad_norm_before > 0]
    metrics = {
        "teleport/teleports": float(len(moved)),
        "teleport/failures": float(len(failures)),
        "teleport/seconds": float(sum(r.seconds for r in reports)),
    }
    if moved:
        metrics["teleport/loss_change"] = max(r.loss_change for r in moved)
        metrics["teleport/grad_norm_after"] = moved[-1].grad_norm_after
        metrics["teleport/steps"] = float(sum(r.steps for r in moved))
    if gains:
        metrics["teleport/grad_norm_gain"] = sum(gains) / len(gains)
    return metrics
