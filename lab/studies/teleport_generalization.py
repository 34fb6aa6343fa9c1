"""Study: teleport to change sharpness or curvature, keep training, compare validation loss (Fig. 4).

For each seed a LeakyReLU MLP is trained for ``pretrain_epochs``; from
those same weights each condition (no teleport; sharpness descended or
ascended; curvature ascended or descended) teleports on the same random
teleport batches with the null-space method and that objective, then
training goes on for ``epochs_after`` epochs on the same batch order.
Sharpness and curvature are measured before and after the teleport on
fixed training batches the teleport never sees.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch.nn import functional as F

from torch_teleport import Teleporter, hookimpl
from torch_teleport.lab.config import (
    OPTIONS,
    Option,
    Table,
    at_least,
    non_empty,
    one_of,
    positive,
    resolve,
)
from torch_teleport.lab.experiment import (
    format_mean_std,
    markdown_table,
    progress_bar,
    save_figure,
    seed_everything,
)
from torch_teleport.registry import default_registry

from .common import (
    DATASET,
    MEASURE,
    MODEL,
    THREADS,
    TRAINING,
    leaky_mlp,
    load_data,
    measure,
    plain_trainer,
    pyplot,
    random_batches,
    study_loaders,
    threads,
    train_epochs,
    train_val_losses,
    write_outputs,
)

KIND = "study_teleport_generalization"
CONDITIONS = (
    ("no teleport", None, None),
    ("sharpness, descend", "sharpness", "descend"),
    ("sharpness, ascend", "sharpness", "ascend"),
    ("curvature, ascend", "curvature", "ascend"),
    ("curvature, descend", "curvature", "descend"),
)

SCHEMA = Table(
    {
        "kind": Option(KIND, str, check=one_of(KIND)),
        "threads": THREADS,
        "dataset": DATASET,
        "model": MODEL,
        "training": Table(
            {
                **TRAINING,
                "lr": Option(0.05, float, check=positive),
                "seeds": Option([0, 1, 2, 3, 4], list, items=int, check=non_empty),
                "pretrain_epochs": Option(10, int, check=at_least(1)),
                "epochs_after": Option(10, int, check=at_least(1)),
            }
        ),
        "teleport": Table(
            {
                "batches": Option(10, int, check=at_least(1)),
                "batch_size": Option(8, int, check=at_least(1)),
                "steps": Option(10, int, check=at_least(1)),
                "lr": Option(0.02, float, check=positive),
                "null_space": Option("exact", str),
                "tau": Option(1.0, float),
                "sharpness": OPTIONS,
                "curvature": OPTIONS,
            }
        ),
        "measure": MEASURE,
    }
)


def run_teleport_generalization(config: dict[str, Any], out_dir: Path) -> None:
    """Every seed and condition; writes the table, ``results.json`` and the loss curves."""
    config = resolve(config, SCHEMA)
    with threads(config["threads"]):
        _run(config, Path(out_dir))


def _run(config: dict[str, Any], out_dir: Path) -> None:
    training, teleport, options = config["training"], config["teleport"], config["measure"]
    splits, data_note = load_data(config["dataset"], default_registry())
    out_dir.mkdir(parents=True, exist_ok=True)
    print(data_note)
    probes = random_batches(splits.train, options["batches"], options["batch_size"], options["seed"])
    runs = []
    started = time.perf_counter()
    with progress_bar(len(training["seeds"]) * len(CONDITIONS), "runs", unit="run") as bar:
        for seed in training["seeds"]:
            seed_everything(seed)
            base = leaky_mlp(splits, **config["model"])
            loaders = study_loaders(splits, training, seed)
            before = [train_val_losses(base, loaders)]
            trainer = plain_trainer(base, training)
            for _ in range(training["pretrain_epochs"]):
                train_epochs(trainer, loaders, 1)
                before.append(train_val_losses(base, loaders))
            teleport_batches = random_batches(splits.train, teleport["batches"], teleport["batch_size"], seed + 1)
            measured_before = measure(base, probes, options)
            for label, objective, direction in CONDITIONS:
                model = copy.deepcopy(base)
                reports = [] if objective is None else _teleport(model, objective, direction, teleport, teleport_batches)
                after_teleport = train_val_losses(model, loaders)
                measured_after = measure(model, probes, options)
                continued = study_loaders(splits, training, seed + 1000)  # the same batch order for every condition
                trainer = plain_trainer(model, training)
                history = [after_teleport]
                for _ in range(training["epochs_after"]):
                    train_epochs(trainer, continued, 1)
                    history.append(train_val_losses(model, continued))
                runs.append(
                    {
                        "seed": seed,
                        "condition": label,
                        "objective_before": [r.objective_before for r in reports],
                        "objective_after": [r.objective_after for r in reports],
                        "teleport_batch_loss_change": max((r.loss_change for r in reports), default=0.0),
                        "measured_before": measured_before,
                        "measured_after": measured_after,
                        "pretrain": before,
                        "after": history,
                    }
                )
                bar.update(1)
    rows = _summary(runs)
    notes = [
        data_note,
        f"{len(training['seeds'])} seeds; MLP {config['model']['hidden']} LeakyReLU({config['model']['negative_slope']}); "
        f"{training['optimizer']} lr {training['lr']}, batch {training['batch_size']}: {training['pretrain_epochs']} epochs, "
        f"teleport ({teleport['batches']} batches of {teleport['batch_size']} x {teleport['steps']} steps, lr {teleport['lr']}, "
        f"{teleport['null_space']} null space), then {training['epochs_after']} epochs; {time.perf_counter() - started:.0f} s.",
        "Differences are paired with the no-teleport run of the same seed (mean ± std over seeds).",
    ]
    header = [
        "condition",
        "objective change on teleport batches (relative)",
        "held-out sharpness change",
        "held-out curvature change",
        "val loss change at teleport",
        "final val loss",
        "final val loss - no teleport",
        "max teleport-batch loss change",
    ]
    markdown = write_outputs(
        out_dir,
        title="Teleporting to change sharpness or curvature",
        notes=notes,
        tables=[markdown_table(header, rows)],
        data={"config": config, "dataset": splits.description, "runs": runs},
    )
    _plot(runs, training["pretrain_epochs"], out_dir / "teleport_generalization.png")
    print(markdown, end="")


def _teleport(model, objective: str, direction: str, teleport: dict[str, Any], batches) -> list:
    teleporter = Teleporter(
        model,
        F.cross_entropy,
        objective=default_registry().get("objective", objective)(direction=direction, **teleport[objective]),
        null_space=teleport["null_space"],
        tau=teleport["tau"],
        lr=teleport["lr"],
        steps=teleport["steps"],
    )
    return [teleporter.teleport(inputs, targets) for inputs, targets in batches]


def _paired(runs: list[dict], label: str, value) -> list[float]:
    by_seed = {r["seed"]: r for r in runs if r["condition"] == "no teleport"}
    return [value(r) - value(by_seed[r["seed"]]) for r in runs if r["condition"] == label]


def _summary(runs: list[dict]) -> list[list[str]]:
    rows = []
    for label, _, _ in CONDITIONS:
        mine = [r for r in runs if r["condition"] == label]
        changes = {
            metric: [r["measured_after"][metric] - r["measured_before"][metric] for r in mine]
            for metric in ("sharpness", "curvature")
        }
        at_teleport = [r["after"][0]["val"] - r["pretrain"][-1]["val"] for r in mine]
        on_batches = [
            (after - before) / abs(before)
            for r in mine
            for before, after in zip(r["objective_before"], r["objective_after"], strict=True)
        ]
        final = [r["after"][-1]["val"] for r in mine]
        rows.append(
            [
                label,
                format_mean_std(on_batches, 3) if on_batches else "-",
                format_mean_std(changes["sharpness"], 3),
                format_mean_std(changes["curvature"], 3),
                format_mean_std(at_teleport, 3),
                format_mean_std(final, 4),
                "-" if label == "no teleport" else format_mean_std(_paired(runs, label, lambda r: r["after"][-1]["val"]), 3),
                f"{max(r['teleport_batch_loss_change'] for r in mine):.1e}",
            ]
        )
    return rows


def _plot(runs: list[dict], pretrain_epochs: int, path: Path) -> None:
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, (label, _, _) in enumerate(CONDITIONS):
        color = f"C{index}"
        mine = [r for r in runs if r["condition"] == label]
        curve = np.array([[h["val"] for h in r["pretrain"] + r["after"]] for r in mine])
        epochs = np.concatenate([np.arange(pretrain_epochs + 1), pretrain_epochs + np.arange(curve.shape[1] - pretrain_epochs - 1)])
        left.plot(epochs, curve.mean(axis=0), color=color, label=label)
        if label != "no teleport":
            diffs = np.array(
                [[a["val"] - b["val"] for a, b in zip(r["after"], _reference(runs, r)["after"], strict=True)] for r in mine]
            )
            mean, std = diffs.mean(axis=0), (diffs.std(axis=0, ddof=1) if len(diffs) > 1 else 0 * diffs[0])
            x = pretrain_epochs + np.arange(len(mean))
            right.plot(x, mean, color=color, label=label)
            right.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
    left.axvline(pretrain_epochs, color="grey", linestyle=":", label="teleport")
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("validation loss (mean over seeds)")
    right.axhline(0, color="grey", linewidth=0.8)
    right.set_xlabel("epoch")
    right.set_ylabel("validation loss - no teleport (same seed)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, path)


def _reference(runs: list[dict], run: dict) -> dict:
    return next(r for r in runs if r["seed"] == run["seed"] and r["condition"] == "no teleport")


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(KIND, run_teleport_generalization)
