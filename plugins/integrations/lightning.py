"""A PyTorch Lightning callback that teleports on a schedule (optional: needs ``lightning``).

Install with ``pip install torch-teleport[lightning]``. The module imports
without Lightning; only building :class:`TeleportCallback` needs it.

The callback runs the scheduled teleports of a
:class:`~torch_teleport.TeleportTrainer` at the start of each optimizer
step (the first micro-batch when gradients are accumulated), on the
LightningModule itself (or the submodule ``module`` picks), so:

* under Lightning's DDP strategies every rank teleports the global batch
  through :class:`~torch_teleport.distributed.Replicas` and the replicas
  stay identical (``verify=True`` checks it after each teleport);
* failures follow ``on_teleport_failure``, the optimizer state follows
  ``optimizer_state``, and optimizer wrappers or averaging callbacks that
  keep stale copies of the weights are refused or warned about
  (``shadow_policy``), exactly as in :class:`~torch_teleport.TeleportTrainer`;
* ``teleport/*`` metrics are logged with ``LightningModule.log``;
* its state (schedule, step counters, place in the teleport data) is
  saved in Lightning checkpoints and restored from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from torch_teleport import Schedule, Teleporter, TeleportReport, TeleportTrainer
from torch_teleport.distributed import Replicas
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
            :class:`~torch_teleport.TeleportTrainer`.
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
        optimizer_state: str | Callable = "reset",
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
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.module = module
        self.teleport_data = teleport_data
        self.optimizer_state = optimizer_state
        self.on_teleport_failure = on_teleport_failure
        self.shadow_policy = shadow_policy
        self.guard_samples = guard_samples
        self.verify = verify
        self.teleporter_options = teleporter_options
        self.events: TeleportTrainer | None = None
        self.reports: list[TeleportReport] = []
        self._pending_state: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        target = self.module(pl_module) if self.module is not None else pl_module
        if len(trainer.optimizers) != 1:
            raise ValueError(f"TeleportCallback supports one optimizer, the trainer has {len(trainer.optimizers)}")
        check_shadows([c for c in trainer.callbacks if c is not self], policy=self.shadow_policy)
        teleporter = Teleporter(
            target, self.loss_fn, replicas=Replicas(verify=self.verify), **self.teleporter_options
        )
        self.events = TeleportTrainer(
            target,
            self.loss_fn,
            trainer.optimizers[0],
            teleporter=teleporter,
            schedule=self.schedule,
            teleport_data=self.teleport_data,
            optimizer_state=self.optimizer_state,
            device=pl_module.device,
            on_teleport_failure=self.on_teleport_failure,
            shadow_policy=self.shadow_policy,
            guard_samples=self.guard_samples,
        )
        if self._pending_state is not None:
            self.events.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches:  # not the first micro-batch of an optimizer step
            return
        events = self.events
        events.epoch, events.global_step = trainer.current_epoch, trainer.global_step
        inputs, targets = (batch[0], batch[1]) if self.teleport_data is None else (None, None)
        reports, failures = events.scheduled_teleports(inputs, targets)
        self.reports += reports
        if reports or failures:
            pl_module.log_dict(_metrics(reports, failures), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        if self.events is not None:
            return self.events.state_dict()
        return self._pending_state or {"schedule": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state_dict["schedule"])
        if self.events is not None:
            self.events.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict


def _metrics(reports: list[TeleportReport], failures: list[str]) -> dict[str, float]:
    """One teleport event in numbers: gains averaged, loss change at its worst, time summed."""
    moved = [r for r in reports if not r.rolled_back]
    gains = [r.grad_norm_after / r.grad_norm_before for r in moved if r.grad_norm_before > 0]
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
