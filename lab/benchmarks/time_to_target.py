"""``bench.time_to_target``: does teleport pay against a baseline whose learning rate is tuned as carefully?

For each model x dataset pair (``pairs``) and optimizer family (``optimizers``), every arm trains
over the same grid of learning rates (``rates``: the family's usual rate times ``multipliers``, six
rates spanning 50x by default), ``seeds`` seeds each, for ``epochs`` epochs with batch 32; all arms
of a seed share the initialisation and the batch order:

* ``none``: plain training;
* ``teleport``: a :class:`~torch_teleport.TeleportTrainer` with the library's defaults (grad-norm
  ascent, the default schedule with its basis and guard samples, the optimizer-state policy ``auto``);
* ``reset``: plain training whose optimizer state is cleared before the steps at which the teleport
  arm teleported, at the same rate and seed (the control: how much of a teleport arm's effect is the
  reset alone; the same as ``none`` for plain SGD, which keeps no state);
* ``sharpness``: teleports that descend the sharpness objective instead (a flatter point, at which a
  larger rate may stay stable), where ``sharpness_pairs`` and ``sharpness_optimizers`` say;
* ``spike``: the same sharpness-descent teleports, only when the training loss spikes
  (:class:`~torch_teleport.plugins.schedules.SpikeSchedule`: its mean over 25 steps reaches twice its
  lowest), the stabilising teleport at a rate near the edge of stability.

Figures per run: the whole training set's loss after every epoch and the CPU seconds of the training
loop (process time, teleports included). Per pair, optimizer and arm the *best rate* has the lowest
mean final train loss. The verdict per pair: whether an arm at its best rate reaches the best plain
rate's final train loss in fewer epochs on every seed and in no more CPU time than the plain run's
fastest seed (beyond the spread of the seeds), and whether teleport moves the best rate.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
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
from torch_teleport.lab.config import ConfigError
from torch_teleport.lab.experiment import save_figure
from torch_teleport.objectives.sharpness import Sharpness
from torch_teleport.plugins.schedules import SpikeSchedule
from torch_teleport.registry import default_registry

NAME = "time_to_target"
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}, 0.01),
    "momentum": (torch.optim.SGD, {"momentum": 0.9}, 0.002),
    "adam": (torch.optim.Adam, {}, 2e-4),
    "adamw": (torch.optim.AdamW, {}, 2e-4),
    "adagrad": (torch.optim.Adagrad, {}, 0.002),
}
"""Each family's lowest rate of the grid; ``multipliers`` spread it upwards."""

PAIRS = {
    "mlp-256 / digits": ("mlp", {"input_dim": 64, "hidden": [256, 256]}, "digits", {}),
    "mlp-1024 / digits": ("mlp", {"input_dim": 64, "hidden": [1024, 1024]}, "digits", {}),
    "mlp-256 / mnist1d": ("mlp", {"input_dim": 40, "hidden": [256, 256]}, "mnist1d", {}),
    "mlp-1024 / mnist1d": ("mlp", {"input_dim": 40, "hidden": [1024, 1024]}, "mnist1d", {}),
    "cnn / digits": ("cnn", {"in_channels": 1, "image_size": 8}, "digits", {}),
    "transformer / digits": ("transformer_classifier", {"input_dim": 8, "seq_len": 8, "layers": 2, "heads": 2}, "digits_sequence", {"level": "row"}),
}
"""Model (registry name and options) and dataset (registry name and options) of each pair."""

FULL = {
    "pairs": list(PAIRS),
    "optimizers": list(OPTIMIZERS),
    "multipliers": [1.0, 2.5, 5.0, 10.0, 25.0, 50.0],
    "seeds": [0, 1, 2],
    "epochs": 10,
    "arms": ["none", "teleport", "reset", "sharpness", "spike"],
    "sharpness_pairs": ["mlp-256 / digits", "mlp-256 / mnist1d"],
    "sharpness_optimizers": ["sgd", "adam"],
}
TINY = {
    "pairs": ["mlp-256 / digits"],
    "optimizers": ["sgd", "adam"],
    "multipliers": [1.0, 5.0],
    "seeds": [0],
    "epochs": 1,
    "arms": ["none", "teleport", "reset", "sharpness", "spike"],
    "sharpness_pairs": ["mlp-256 / digits"],
    "sharpness_optimizers": ["sgd"],
}
BATCH = 32


@restores_threads
def run_time_to_target(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    _check(options)
    device = prepare(options)
    path = Path(out_dir) / f"{NAME}.partial.json"
    results = _measured(path, options)
    for pair in options["pairs"]:
        if pair in results:
            print(f"time to target: {pair} kept from {path}", flush=True)
            continue
        results[pair] = _pair(pair, options, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"options": _grid(options), "pairs": results}) + "\n")
    results = {pair: results[pair] for pair in options["pairs"]}
    figure = write_outputs(NAME, out_dir, options, device, {"clock": "process CPU seconds of the training loop", "pairs": results})
    path.unlink(missing_ok=True)
    _plot(results, figure)
    for pair, by_optimizer in results.items():
        for optimizer, summary in by_optimizer.items():
            print(f"{pair}, {optimizer}: {summary['verdict']}", flush=True)


def _grid(options: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' pairs comparable: every option but the list of pairs."""
    return {key: value for key, value in options.items() if key not in ("pairs", "figures")}


def _measured(path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The pairs a long run interrupted with the same options already measured (the run goes on
    from there); nothing where the file is absent, unreadable or made with other options."""
    try:
        partial = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(partial, dict) or partial.get("options") != _grid(options):
        return {}
    return dict(partial.get("pairs", {}))


def _check(options: dict[str, Any]) -> None:
    if len(options["multipliers"]) < 2 or min(options["multipliers"]) <= 0:
        raise ConfigError("multipliers: give two or more positive numbers", key="multipliers")
    if "none" not in options["arms"] or not set(options["arms"]) <= set(FULL["arms"]):
        raise ConfigError(f"arms: plain training (none) and any of {FULL['arms']}", key="arms")
    for key, known in (("pairs", PAIRS), ("optimizers", OPTIMIZERS)):
        unknown = sorted(set(options[key]) - set(known))
        if unknown:
            raise ConfigError(f"{key}: unknown {unknown}; known: {sorted(known)}", key=key)


def _pair(pair: str, options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Every optimizer of one pair: each arm over the rate grid, and the verdict."""
    data = _data(pair)
    by_optimizer = {}
    for optimizer in options["optimizers"]:
        rates = [OPTIMIZERS[optimizer][2] * m for m in options["multipliers"]]
        arms = _arms(pair, optimizer, options)
        runs = {arm: {} for arm in arms}
        for rate in rates:
            for seed in options["seeds"]:
                print(f"time to target: {pair}, {optimizer}, lr {rate:g}, seed {seed}", flush=True)
                teleported = None
                for arm in arms:
                    run = _train(pair, data, optimizer, rate, seed, arm, options["epochs"], device, teleported)
                    teleported = run["teleported_at"] if arm == "teleport" else teleported
                    runs[arm].setdefault(f"{rate:g}", []).append(run)
        by_optimizer[optimizer] = _summary(runs, options["epochs"])
    return by_optimizer


def _arms(pair: str, optimizer: str, options: dict[str, Any]) -> list[str]:
    arms = [arm for arm in options["arms"] if arm != "sharpness"]
    if "sharpness" in options["arms"] and pair in options["sharpness_pairs"] and optimizer in options["sharpness_optimizers"]:
        arms.append("sharpness")
    return arms


@functools.cache
def _data(pair: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The pair's training split as two tensors (inputs, targets)."""
    _, _, name, dataset_options = PAIRS[pair]
    splits = default_registry().get("dataset", name)(**dataset_options)
    inputs, targets = zip(*(splits.train[i] for i in range(len(splits.train))), strict=True)
    return torch.stack(inputs).float(), torch.as_tensor(targets)


def _train(pair, data, optimizer, rate, seed, arm, epochs, device, teleported) -> dict[str, Any]:
    """One run; ``teleported``: the steps the teleport arm of the same rate and seed teleported at."""
    model_name, model_options, _, _ = PAIRS[pair]
    torch.manual_seed(seed)
    model = default_registry().get("model", model_name)(**model_options).to(device)
    cls, extra, _ = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), lr=rate, **extra)
    dataset = TensorDataset(*(t.to(device) for t in data))
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = tt.TeleportTrainer(model, F.cross_entropy, opt, **_teleport_options(arm, model, dataset, seed))
    run = {"train_loss": [_loss(model, data, device)], "cpu_seconds": [0.0], "teleported_at": [], "teleport_cpu": 0.0}
    clock, resets = 0.0, set(teleported or []) if arm == "reset" else set()
    for _ in range(epochs):
        for inputs, targets in loader:
            started = time.process_time()
            if trainer.global_step in resets:
                opt.state.clear()
            result = trainer.step(inputs, targets)
            spent = time.process_time() - started
            clock += spent
            if result.teleports:
                run["teleported_at"].append(trainer.global_step - 1)
                run["teleport_cpu"] += spent
        trainer.end_epoch()
        run["train_loss"].append(_loss(model, data, device))
        run["cpu_seconds"].append(clock)
    return run


def _teleport_options(arm: str, model: nn.Module, dataset, seed: int) -> dict[str, Any]:
    if arm in ("none", "reset"):
        return {}
    teleport_data = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed + 100))
    options: dict[str, Any] = {"teleport_data": teleport_data}
    if arm in ("sharpness", "spike"):
        options["teleporter"] = tt.Teleporter(model, F.cross_entropy, objective=Sharpness(direction="descend"))
    if arm == "spike":
        options["schedule"] = SpikeSchedule()
    return options


def _loss(model: nn.Module, data, device) -> float:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(data[0].to(device)), data[1].to(device)))
    for module, training in modes:
        module.training = training
    return loss


def _summary(runs: dict[str, dict[str, list[dict]]], epochs: int) -> dict[str, Any]:
    """Best rate per arm, and whether an arm at its best rate beats the best plain rate."""
    best = {arm: min(by_rate, key=lambda r: statistics.mean(run["train_loss"][-1] for run in by_rate[r])) for arm, by_rate in runs.items()}
    baseline = runs["none"][best["none"]]
    target = statistics.mean(run["train_loss"][-1] for run in baseline)
    budget = min(run["cpu_seconds"][-1] for run in baseline)
    arms = {}
    for arm, by_rate in runs.items():
        seeds = by_rate[best[arm]]
        reached = [_first(run, target) for run in seeds]
        epochs_to = [e for e, _ in reached]
        cpu_to = [c for _, c in reached]
        wins = arm != "none" and all(e is not None and e < epochs for e in epochs_to) and max(cpu_to) <= budget
        arms[arm] = {
            "best_lr": float(best[arm]),
            "final_train_loss": [run["train_loss"][-1] for run in seeds],
            "epochs_to_target": epochs_to,
            "cpu_to_target": cpu_to,
            "teleport_cpu_fraction": statistics.mean(run["teleport_cpu"] / max(run["cpu_seconds"][-1], 1e-12) for run in seeds),
            "wins": wins,
        }
    return {"target": target, "plain_cpu": budget, "arms": arms, "runs": runs, "verdict": _verdict(arms, target)}


def _first(run: dict, target: float) -> tuple[int | None, float | None]:
    """The first epoch whose train loss is at most ``target``, and the CPU seconds at its end."""
    for epoch, (loss, seconds) in enumerate(zip(run["train_loss"], run["cpu_seconds"], strict=True)):
        if loss <= target:
            return epoch, seconds
    return None, None


def _verdict(arms: dict[str, dict], target: float) -> str:
    plain = arms["none"]
    winners = [arm for arm, figures in arms.items() if figures["wins"]]
    moved = [arm for arm, figures in arms.items() if arm != "none" and figures["best_lr"] != plain["best_lr"]]
    lead = f"{', '.join(winners)} beats" if winners else "nothing beats"
    rates = "; the best rate moves with " + ", ".join(moved) if moved else "; no arm moves the best rate"
    return f"{lead} plain training at its best rate {plain['best_lr']:g} (train loss {target:.4f}){rates}"


def _plot(results: dict[str, Any], figure: Path) -> None:
    """Train loss against CPU seconds, every pair x optimizer, the plain and teleport arms at their best rates."""
    plt = pyplot()
    panels = [(pair, optimizer, summary) for pair, by_optimizer in results.items() for optimizer, summary in by_optimizer.items()]
    columns = len(next(iter(results.values()))) if results else 1
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for ax, (pair, optimizer, summary) in zip(axes.flat, panels, strict=False):
        for arm, style, color in (("none", "-", "C0"), ("teleport", "--", "C1"), ("sharpness", ":", "C2"), ("spike", "-.", "C3")):
            if arm not in summary["arms"]:
                continue
            rate = summary["arms"][arm]["best_lr"]
            for i, run in enumerate(summary["runs"][arm][f"{rate:g}"]):
                ax.plot(run["cpu_seconds"], run["train_loss"], style, color=color, label=f"{arm} lr {rate:g}" if i == 0 else None)
        ax.set_yscale("log")
        ax.set_title(f"{pair}, {optimizer}", fontsize=8)
        ax.set_xlabel("CPU s", fontsize=7)
        ax.legend(fontsize=6)
    save_figure(fig, figure)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_time_to_target)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_time_to_target))
