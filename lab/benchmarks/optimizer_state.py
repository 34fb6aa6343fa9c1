"""What should an optimizer keep across a teleport: its state, none of it, or its state rescaled?

For each optimizer family (SGD, SGD with momentum 0.9, Adam, AdamW, Adagrad)
at its usual rate, on every offline dataset that suits the paper-style MLP
(scikit-learn's digits, MNIST-1D), seeds 0, 1 and 2, the same initialisation
and batch order for every run of a seed: the MLP d-``width``-``width``-10
trained ``epochs`` epochs with batch 32 by a ``TeleportTrainer`` whose events
follow ``--schedule``: ``default``, ``GainingSchedule()`` for every family (the
trainer's default for SGD; with Adam, AdamW and Adagrad the trainer teleports once,
at the start, where no state exists yet, so the policy matters only on a schedule
like this one: a teleport every 500 steps, so the runs must be long enough to
teleport at a trained point), or ``paper``, the paper's
(``EpochSchedule()``: 32 teleports before each of epochs 0-4), with the
trainer's default guard, and
``optimizer_state`` in ``keep``, ``reset`` and ``rescale``, and without
teleports. Figures: the whole training set's and the test set's loss after
each epoch; the summary gives each arm's final train loss (mean and spread
over seeds) against the run without teleports, and which policy ``auto``
should pick per family (the lowest mean final train loss, ``keep`` where
the others are not better beyond the spread of the seeds).

Usage: ``python -m torch_teleport.lab.benchmarks.optimizer_state [--schedule default|paper] [--width 256]
[--epochs 12]``; writes ``lab/benchmarks/results/optimizer_state.json`` (``optimizer_state_paper.json``
for the paper's schedule) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torch_teleport as tt
from torch_teleport.lab.benchmarks.data_level_set import splits
from torch_teleport.plugins.schedules import EpochSchedule, GainingSchedule

OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-3}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01}),
}
"""Each family at its usual rate (the paper's 0.01 for SGD, PyTorch's defaults otherwise)."""

POLICIES = ("none", "keep", "reset", "rescale")
SEEDS = (0, 1, 2)
BATCH = 32


SCHEDULES = {"default": GainingSchedule, "paper": EpochSchedule}


def run(data, seed: int, optimizer: str, policy: str, width: int, epochs: int, schedule: str = "default") -> dict:
    """One training run; ``policy="none"`` trains without teleports."""
    train, test = data
    torch.manual_seed(seed)
    model = tt.default_registry().get("model", "mlp")(input_dim=train[0].shape[1], hidden=[width, width])
    cls, options = OPTIMIZERS[optimizer]
    opt = cls(model.parameters(), **options)
    dataset = TensorDataset(*train)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed))
    extra = {}
    if policy != "none":
        teleports = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed + 100))
        extra = {"teleport_data": teleports, "optimizer_state": policy, "schedule": SCHEDULES[schedule]()}
    trainer = tt.TeleportTrainer(model, F.cross_entropy, opt, **extra)
    result = {"train_loss": [_loss(model, train)], "test_loss": [_loss(model, test)], "teleport_steps": 0}
    started = time.process_time()
    for _ in range(epochs):
        for inputs, targets in loader:
            result["teleport_steps"] += sum(r.steps for r in trainer.step(inputs, targets).teleports)
        trainer.end_epoch()
        result["train_loss"].append(_loss(model, train))
        result["test_loss"].append(_loss(model, test))
    result["cpu_seconds"] = time.process_time() - started
    return result


def _loss(model, split) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(split[0]), split[1]))


def summary(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per optimizer: each policy's final train loss over the seeds (mean and spread)."""
    table = {}
    for optimizer, by_policy in runs.items():
        finals = {policy: [r["train_loss"][-1] for r in results] for policy, results in by_policy.items()}
        table[optimizer] = {"stats": {p: {"mean": statistics.mean(v), "spread": max(v) - min(v)} for p, v in finals.items()}}
    return table


def choice(summaries: list[dict], optimizer: str) -> str:
    """What ``auto`` should pick for ``optimizer``: a policy other than ``keep`` when it trains better
    than ``keep`` beyond the spread of the seeds on some dataset and worse beyond it on none."""
    def beyond(stats: dict, better: str, worse: str) -> bool:
        return stats[worse]["mean"] - stats[better]["mean"] > max(stats[worse]["spread"], stats[better]["spread"])

    for policy in ("reset", "rescale"):
        tables = [s[optimizer]["stats"] for s in summaries]
        if any(beyond(t, policy, "keep") for t in tables) and not any(beyond(t, "keep", policy) for t in tables):
            return policy
    return "keep"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="default")
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"settings": vars(args), "datasets": {}}
    for dataset in args.datasets:
        data = splits(dataset)
        runs = {
            optimizer: {
                policy: [run(data, seed, optimizer, policy, args.width, args.epochs, args.schedule) for seed in SEEDS]
                for policy in POLICIES
            }
            for optimizer in OPTIMIZERS
        }
        results["datasets"][dataset] = {"runs": runs, "summary": summary(runs)}
        _print(dataset, results["datasets"][dataset]["summary"])
        summaries = [entry["summary"] for entry in results["datasets"].values()]
        results["auto"] = {optimizer: choice(summaries, optimizer) for optimizer in OPTIMIZERS}
        name = "optimizer_state" + ("" if args.schedule == "default" else f"_{args.schedule}")
        out = Path(__file__).resolve().parent / "results" / f"{name}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
    print("\nauto picks: " + ", ".join(f"{name} {policy}" for name, policy in results["auto"].items()))


def _print(dataset: str, table: dict) -> None:
    print(f"\n{dataset}: final train loss, mean (spread over {len(SEEDS)} seeds)\n")
    print("| optimizer | no teleport | keep | reset | rescale |")
    print("|---|---|---|---|---|")
    for optimizer, row in table.items():
        cells = " | ".join(f"{row['stats'][p]['mean']:.4f} ({row['stats'][p]['spread']:.4f})" for p in POLICIES)
        print(f"| {optimizer} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
