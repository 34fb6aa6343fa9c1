"""Does ``TeleportTrainer(model, loss, optimizer, teleport_data=loader)`` help, with its defaults?

The paper MLP (d-1024-1024-10) trained with SGD at the paper's rate (0.01,
batch 32) for 10 epochs on every offline dataset that suits it (digits,
MNIST-1D), seeds 0 and 1, the same initialisation and batch order for every
run of a seed:

* ``plain``: no teleport, at the paper's rate and with the rate tuned (2x, 5x);
* ``teleport``: the trainer's defaults (the paper's schedule, 32 batches x 8 steps
  before epochs 0-4, a guard batch per event, the Teleporter's defaults);
* ``budget``: the same with ``BudgetSchedule(0.1)`` (teleports while they cost at
  most 10% of the run's compute).

Figures: the whole training set's loss after each epoch and the process CPU
time (teleports included), so the time ratios do not depend on what else the
machine runs. ``epoch5_ratio`` is the epoch-5 train loss over plain SGD's at the
same rate; ``time_ratio`` the CPU time to reach plain SGD's final train loss over
plain SGD's whole run (``null``: never reached).

Usage: ``python -m torch_teleport.lab.benchmarks.trainer_defaults``; writes
``lab/benchmarks/results/trainer_defaults.json`` and prints a Markdown table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_teleport as tt
from torch_teleport.lab.benchmarks.data_level_set import splits
from torch_teleport.plugins.schedules import BudgetSchedule

EPOCHS, LR, BATCH = 10, 0.01, 32


def run(train, seed: int, kind: str, lr: float = LR) -> dict:
    torch.manual_seed(seed)
    model = tt.default_registry().get("model", "mlp")(input_dim=train[0].shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    data = TensorDataset(*train)
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    options = {}
    if kind != "plain":
        options["teleport_data"] = DataLoader(
            data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed + 100)
        )
    if kind == "budget":
        options["schedule"] = BudgetSchedule(0.1)
    trainer = tt.TeleportTrainer(model, F.cross_entropy, optimizer, **options)
    losses, seconds, clock, teleport_steps = [_loss(model, train)], [0.0], 0.0, 0
    for _ in range(EPOCHS):
        started = time.process_time()
        for inputs, targets in loader:
            result = trainer.step(inputs, targets)
            teleport_steps += sum(r.steps for r in result.teleports)
        trainer.end_epoch()
        clock += time.process_time() - started
        losses.append(_loss(model, train))
        seconds.append(clock)
    return {"train_loss": losses, "cpu_seconds": seconds, "teleport_steps": teleport_steps}


def _loss(model, train) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(train[0]), train[1]))


def reached(result: dict, target: float) -> float | None:
    """CPU seconds at the end of the first epoch whose train loss is at most ``target``."""
    for loss, seconds in zip(result["train_loss"], result["cpu_seconds"], strict=True):
        if loss <= target:
            return seconds
    return None


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    for dataset in ("digits", "mnist1d"):
        train, _ = splits(dataset)
        for seed in (0, 1):
            runs = {
                "plain": run(train, seed, "plain"),
                "plain, lr x2": run(train, seed, "plain", 2 * LR),
                "plain, lr x5": run(train, seed, "plain", 5 * LR),
                "teleport": run(train, seed, "teleport"),
                "budget": run(train, seed, "budget"),
            }
            plain = runs["plain"]
            for result in runs.values():
                time_to = reached(result, plain["train_loss"][-1])
                result["epoch5_ratio"] = result["train_loss"][5] / plain["train_loss"][5]
                result["time_ratio"] = None if time_to is None else time_to / plain["cpu_seconds"][-1]
            results[f"{dataset}, seed {seed}"] = runs
    out = Path(__file__).resolve().parent / "results" / "trainer_defaults.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| data, seed | run | epoch-5 train loss | / plain | final train loss | CPU time to plain's final / plain's | teleport steps |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        for name, r in runs.items():
            ratio = "never" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
            print(
                f"| {key} | {name} | {r['train_loss'][5]:.4f} | {r['epoch5_ratio']:.2f} | "
                f"{r['train_loss'][-1]:.4f} | {ratio} | {r['teleport_steps']} |"
            )


if __name__ == "__main__":
    main()
