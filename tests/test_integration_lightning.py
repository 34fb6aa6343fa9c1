"""The Lightning callback: teleports on schedule, logs, checkpoints, accumulates, and keeps DDP replicas identical."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_teleport as tt
from torch_teleport.plugin_manager import build_plugin_manager
from torch_teleport.plugins.integrations.lightning import TeleportCallback
from torch_teleport.plugins.schedules import EpochSchedule, EveryStepsSchedule
from torch_teleport.wrappers import StaleShadowWarning

PLUGIN = Path(sys.modules[TeleportCallback.__module__].__file__)  # in a source tree or installed


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class RecordTeleports(pl.Callback):
    """Per optimizer step: the loss of the batch about to be trained on, before and after the teleport."""

    def __init__(self, teleport: TeleportCallback, out_dir: Path | None = None) -> None:
        self.teleport, self.out_dir, self.calls = teleport, out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.calls.append((trainer.global_step, batch_idx, len(self.teleport.reports)))

    def on_train_end(self, trainer, pl_module):
        if self.out_dir is not None:
            params = {name: p.detach().clone() for name, p in pl_module.named_parameters()}
            torch.save(params, self.out_dir / f"rank{trainer.global_rank}.pt")


def loader(samples: int = 32, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(samples, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (samples,), generator=generator)
    return DataLoader(TensorDataset(inputs, targets), batch_size=batch_size)


def fit(callbacks, *, root: Path, steps: int = 6, accumulate: int = 1, ckpt_path=None):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=callbacks,
    )
    model = Classifier()
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model



def test_teleports_on_schedule_keep_the_loss_and_log(tmp_path):
    callback = TeleportCallback(F.cross_entropy, EveryStepsSchedule(every=2, steps=3), lr=0.05, null_space="exact")
    trainer, model = fit([callback], root=tmp_path)
    assert len(callback.reports) == 3  # steps 0, 2, 4
    for report in callback.reports:
        assert not report.rolled_back and report.steps == 3
        assert report.loss_change < 1e-10 and report.grad_norm_after > report.grad_norm_before
    assert callback.events.teleporter.model is model  # the LightningModule itself
    logged = trainer.logged_metrics
    assert float(logged["teleport/teleports"]) == 1.0
    assert float(logged["teleport/grad_norm_gain"]) > 1.0


def test_accumulation_teleports_at_optimizer_steps_only(tmp_path):
    callback = TeleportCallback(F.cross_entropy, EveryStepsSchedule(every=1, steps=2))
    record = RecordTeleports(callback)
    fit([callback, record], root=tmp_path, steps=3, accumulate=2)
    # Six micro-batches, three optimizer steps: a teleport before each step's first micro-batch.
    assert [(step, index) for step, index, _ in record.calls] == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    assert len(callback.reports) == 3


class Heard(EveryStepsSchedule):
    """Every second step, and what the callback tells it about time."""

    def __init__(self) -> None:
        super().__init__(every=2, steps=1)
        self.heard: list[tuple[float, float]] = []

    def observe(self, *, train_seconds: float = 0.0, teleport_seconds: float = 0.0) -> None:
        self.heard.append((train_seconds, teleport_seconds))


def test_the_schedule_hears_the_time_between_optimizer_steps(tmp_path):
    schedule = Heard()
    callback = TeleportCallback(F.cross_entropy, schedule)
    fit([callback], root=tmp_path, steps=5)
    assert isinstance(callback.events, tt.TeleportEvents)
    # before each optimizer step after the first: the training time since the previous step's
    # events, and the time of those events (steps 0, 2 and 4 teleport)
    assert len(schedule.heard) == 4 and all(train > 0 for train, _ in schedule.heard)
    assert [teleport > 0 for _, teleport in schedule.heard] == [True, False, True, False]


class HearsLoss(EveryStepsSchedule):
    """Every second step, and the losses the callback tells it."""

    hears_loss = True

    def __init__(self) -> None:
        super().__init__(every=2, steps=1)
        self.heard: list[float] = []

    def observe_loss(self, loss: float) -> None:
        self.heard.append(loss)


class TrainingLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_schedule_that_hears_the_loss_gets_each_optimizer_step_s_mean_loss(tmp_path, accumulate):
    schedule, losses = HearsLoss(), TrainingLosses()
    fit([TeleportCallback(F.cross_entropy, schedule), losses], root=tmp_path, steps=4, accumulate=accumulate)
    windows = [losses.losses[i : i + accumulate] for i in range(0, len(losses.losses), accumulate)]
    # told before each optimizer step after the first: the mean loss of the step before
    assert schedule.heard == pytest.approx([sum(w) / accumulate for w in windows[:3]], rel=1e-12)


class StateAtStart(pl.Callback):
    def __init__(self, teleport: TeleportCallback) -> None:
        self.teleport, self.state = teleport, None

    def on_train_start(self, trainer, pl_module):
        self.state = self.teleport.state_dict()


def shuffled(seed: int = 5) -> DataLoader:
    return DataLoader(loader().dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_state_is_saved_in_and_restored_from_lightning_checkpoints(tmp_path):
    schedule = EpochSchedule(epochs=(0, 1, 2), batches=3, steps=2)
    first = TeleportCallback(F.cross_entropy, schedule, teleport_data=shuffled(), guard_samples=4)
    trainer, _ = fit([first], root=tmp_path, steps=8)  # 8 batches per epoch: epoch 0 only
    assert len(first.reports) == 3
    path = tmp_path / "teleport.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [value for key, value in saved.items() if key.startswith("TeleportCallback")]
    # one basis and one guard batch for the event, then three teleport batches
    assert state["schedule"] == {"done": [0]} and state["teleport_pass"]["drawn"] == 5

    resumed = TeleportCallback(
        F.cross_entropy, EpochSchedule(epochs=(0, 1, 2), batches=3, steps=2), teleport_data=shuffled(), guard_samples=4
    )
    at_start = StateAtStart(resumed)
    fit([resumed, at_start], root=tmp_path, steps=10, ckpt_path=path)
    assert at_start.state["schedule"] == {"done": [0]} and at_start.state["teleport_pass"]["drawn"] == 5
    assert torch.equal(at_start.state["teleport_pass"]["start"], state["teleport_pass"]["start"])
    assert resumed.schedule.done >= {0, 1}  # and it went on teleporting in later epochs


def test_stale_shadow_callbacks_are_reported(tmp_path):
    callback = TeleportCallback(F.cross_entropy, EveryStepsSchedule(every=100))
    averaging = pl.callbacks.StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    with pytest.warns(StaleShadowWarning, match="StochasticWeightAveraging"):
        fit([callback, averaging], root=tmp_path, steps=1)


class VerifiedTeleports(TeleportCallback):
    def __init__(self) -> None:
        super().__init__(F.cross_entropy, EveryStepsSchedule(every=2, steps=3), verify=True, lr=0.05)


@pytest.mark.slow  # spawns processes
def test_replicas_stay_identical_under_lightning_ddp(tmp_path):
    callback = VerifiedTeleports()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback, RecordTeleports(callback, tmp_path)],
    )
    trainer.fit(Classifier(), loader())
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    before = dict(Classifier().named_parameters())
    for name, value in ranks[0].items():
        assert torch.equal(value.view(torch.int64), ranks[1][name].view(torch.int64)), name
        assert not torch.equal(value, before[name].detach())


def test_module_imports_without_lightning_and_stays_out_of_the_builtins(monkeypatch):
    for name in [n for n in sys.modules if n == "lightning" or n.startswith("lightning.")]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import lightning...` fail
    monkeypatch.setitem(sys.modules, "lightning", None)
    spec = importlib.util.spec_from_file_location("lightning_plugin_without_lightning", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ImportError, match=r"pip install 'torch-teleport\[lightning\]'"):
        module.TeleportCallback(F.cross_entropy, EveryStepsSchedule())
    assert not build_plugin_manager(entry_points=False).has_plugin("torch_teleport.plugins.integrations.lightning")
