"""``bench.trainer_defaults``: does ``TeleportTrainer(model, loss, optimizer, teleport_data=loader)`` pay, and why this schedule?

The paper MLP (d-1024-1024-10) trained for ``epochs`` epochs (batch 32) on
every offline dataset that suits it (digits, MNIST-1D), ``seeds`` seeds, the
same initialisation and batch order for every arm of a seed:

* SGD at the paper's rate (0.01): ``plain`` (also at 2x and 5x the rate: what
  tuning the rate alone buys), ``defaults`` (the trainer's defaults: the
  ``gaining`` schedule, its basis and guard samples, the Teleporter's
  defaults) and every other candidate schedule of ``schedules`` (the table that
  chose the default);
* Adam at 1e-3: ``plain`` and ``defaults`` (the optimizer-state policy ``auto``
  keeps Adam's moments).

Figures per run: the whole training set's loss after every epoch, the process
CPU seconds of the training loop (teleports included) and of the steps that
teleported, beyond the optimizer step each of them also took (``teleport_cpu``),
and each teleport's gradient-norm gain. Per arm, over seeds: the epoch-5 train
loss over plain training's at the same rate and optimizer, the CPU time to plain
training's final loss over plain training's whole run (``None``: never reached),
and teleport CPU over the run's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_teleport as tt
from torch_teleport import hookimpl
from torch_teleport.lab.benchmarks.common import (
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    write_outputs,
)
from torch_teleport.lab.benchmarks.data_level_set import splits
from torch_teleport.lab.config import ConfigError
from torch_teleport.lab.experiment import save_figure
from torch_teleport.plugins.schedules import (
    BudgetSchedule,
    EpochSchedule,
    EveryStepsSchedule,
    GainingSchedule,
    OnceSchedule,
)

NAME = "trainer_defaults"
BATCH = 32
SCHEDULES = {
    "defaults": None,
    "paper (32 x 8 before epochs 0-4)": lambda: EpochSchedule(),
    "once (1 x 8 at the start)": lambda: OnceSchedule(),
    "gaining, every 250": lambda: GainingSchedule(every=250),
    "gaining, every 125": lambda: GainingSchedule(every=125),
    "every 500, never stopping": lambda: EveryStepsSchedule(every=500),
    "budget 10 %": lambda: BudgetSchedule(0.1),
}
"""The candidate schedules (``defaults``: the trainer's own, whatever it is)."""

FULL = {
    "datasets": ["digits", "mnist1d"],
    "seeds": [0, 1, 2],
    "epochs": 10,
    "hidden": [1024, 1024],
    "schedules": list(SCHEDULES),
    "sgd_rates": [1.0, 2.0, 5.0],
    "adam": True,
}
TINY = {
    "datasets": ["digits"],
    "seeds": [0],
    "epochs": 1,
    "hidden": [64, 64],
    "schedules": ["defaults", "paper (32 x 8 before epochs 0-4)"],
    "sgd_rates": [1.0, 2.0],
    "adam": True,
}
SGD_RATE, ADAM_RATE = 0.01, 1e-3


@restores_threads
def run_trainer_defaults(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    unknown = sorted(set(options["schedules"]) - set(SCHEDULES))
    if unknown or "defaults" not in options["schedules"]:
        raise ConfigError(f"schedules: give 'defaults' and any of {sorted(SCHEDULES)}; unknown {unknown}", key="schedules")
    prepare(options)
    results = {dataset: _dataset(dataset, options) for dataset in options["datasets"]}
    figure = write_outputs(NAME, out_dir, options, torch.device("cpu"), {"clock": "process CPU seconds", "datasets": results})
    _plot(results, figure)
    for dataset, arms in results.items():
        for arm, summary in arms.items():
            print(f"{dataset}, {arm}: {_line(summary)}", flush=True)


def _dataset(dataset: str, options: dict[str, Any]) -> dict[str, Any]:
    train = splits(dataset)[0]
    arms: dict[str, tuple[str, float, Any]] = {}
    for multiplier in options["sgd_rates"]:
        arms["sgd, plain" + (f", lr x{multiplier:g}" if multiplier != 1 else "")] = ("sgd", SGD_RATE * multiplier, False)
    for name in options["schedules"]:
        arms[f"sgd, {name}"] = ("sgd", SGD_RATE, SCHEDULES[name] or True)
    if options["adam"]:
        arms["adam, plain"] = ("adam", ADAM_RATE, False)
        arms["adam, defaults"] = ("adam", ADAM_RATE, True)
    runs = {arm: [] for arm in arms}
    for seed in options["seeds"]:
        for arm, (optimizer, rate, schedule) in arms.items():
            print(f"trainer defaults: {dataset}, {arm}, seed {seed}", flush=True)
            runs[arm].append(_train(train, options, optimizer, rate, schedule, seed))
    return {arm: _summary(seeds, runs[f"{arm.split(',')[0]}, plain"]) for arm, seeds in runs.items()}


def _train(train, options: dict[str, Any], optimizer: str, rate: float, schedule, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = tt.default_registry().get("model", "mlp")(input_dim=train[0].shape[1], hidden=options["hidden"])
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=rate)
    data = TensorDataset(*train)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    extra: dict[str, Any] = {}
    if schedule:
        extra["teleport_data"] = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed + 100))
        if callable(schedule):
            extra["schedule"] = schedule()
    trainer = tt.TeleportTrainer(model, F.cross_entropy, opt, **extra)
    run = {"train_loss": [_loss(model, train)], "cpu_seconds": [0.0], "gains": [], "teleport_cpu": 0.0}
    clock, plain_steps, teleporting = 0.0, [], []
    for _ in range(options["epochs"]):
        for inputs, targets in loader:
            started = time.process_time()
            result = trainer.step(inputs, targets)
            spent = time.process_time() - started
            clock += spent
            (teleporting if result.teleports or result.failures else plain_steps).append(spent)
            run["gains"] += [r.gain for r in result.teleports if r.grad_norm_before > 0]
        trainer.end_epoch()
        run["train_loss"].append(_loss(model, train))
        run["cpu_seconds"].append(clock)
    step = statistics.median(plain_steps) if plain_steps else 0.0
    run["teleport_cpu"] = sum(teleporting) - step * len(teleporting)  # beyond the optimizer steps they also took
    return run


def _loss(model, train) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(train[0]), train[1]))


def _summary(seeds: list[dict], plain: list[dict]) -> dict[str, Any]:
    """Per seed against plain training of the same seed and optimizer at its base rate."""
    at = min(5, len(seeds[0]["train_loss"]) - 1)
    epoch5 = [run["train_loss"][at] / base["train_loss"][at] for run, base in zip(seeds, plain, strict=True)]
    final = [run["train_loss"][-1] / base["train_loss"][-1] for run, base in zip(seeds, plain, strict=True)]
    times = [_time_to(run, base["train_loss"][-1], base["cpu_seconds"][-1]) for run, base in zip(seeds, plain, strict=True)]
    return {
        "epoch": at,
        "epoch_ratio": epoch5,
        "final_ratio": final,
        "time_ratio": times,
        "teleport_fraction": [run["teleport_cpu"] / max(run["cpu_seconds"][-1], 1e-12) for run in seeds],
        "teleports": [len(run["gains"]) for run in seeds],
        "runs": seeds,
    }


def _time_to(run: dict, target: float, whole: float) -> float | None:
    """CPU seconds at the end of the first epoch at most ``target``, over ``whole``."""
    for loss, seconds in zip(run["train_loss"], run["cpu_seconds"], strict=True):
        if loss <= target:
            return seconds / whole
    return None


def _line(summary: dict[str, Any]) -> str:
    def spread(values):
        known = [v for v in values if v is not None]
        if len(known) < len(values):
            return "never" if not known else f"{statistics.mean(known):.2f} ({len(values) - len(known)} never)"
        return f"{statistics.mean(known):.2f} ({min(known):.2f}-{max(known):.2f})"

    return (
        f"epoch-{summary['epoch']} loss / plain {spread(summary['epoch_ratio'])}, final / plain {spread(summary['final_ratio'])}, "
        f"CPU to plain's final / plain's {spread(summary['time_ratio'])}, teleport CPU {spread(summary['teleport_fraction'])}, "
        f"teleports {summary['teleports']}"
    )


def _plot(results: dict[str, Any], figure: Path) -> None:
    """Train loss against CPU seconds per dataset: plain SGD (1x, 5x), the defaults, and Adam with and without."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    shown = {"sgd, plain": "C0", "sgd, plain, lr x5": "C2", "sgd, defaults": "C1", "adam, plain": "C4", "adam, defaults": "C3"}
    for ax, (dataset, arms) in zip(axes.flat, results.items(), strict=True):
        for arm, color in shown.items():
            for i, run in enumerate(arms.get(arm, {"runs": []})["runs"]):
                ax.plot(run["cpu_seconds"], run["train_loss"], "--" if "defaults" in arm else "-", color=color, label=arm if i == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("process CPU seconds (teleports included)")
        ax.set_ylabel("whole-train loss")
        ax.set_title(f"paper MLP, {dataset}")
        ax.legend(fontsize=7)
    save_figure(fig, figure)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_trainer_defaults)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_trainer_defaults))
