"""``bench.accuracy``: loss drift and gradient-norm gain after 1..T steps, method against method.

The paper's Fig. 1 as a measurement: a LeakyReLU MLP trained briefly on
scikit-learn's digits is teleported from the same point, on the same
batches, for ``T`` steps by null-space teleport (``tau`` = 1 exact, and
0.999, 0.99, 0.9 through the energy threshold), symmetry teleport and
level-set teleport, all with the same ``lr`` (normalised steps). For each
``T`` it reports, averaged over the teleport batches, the relative change
of the teleport-batch loss, the relative change of the loss on the held-out
split and the gradient-norm gain on the teleport batch. The per-step
teleport-batch loss of the longest run is kept too.
"""

from __future__ import annotations

import copy
import itertools
import statistics
from pathlib import Path
from typing import Any

from torch.nn import functional as F
from torch.utils.data import DataLoader

from torch_teleport import Limits, Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    leaky_mlp,
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    teleport_loader,
    train_briefly,
    write_outputs,
)
from torch_teleport.lab.experiment import evaluate_loss, save_figure, seed_everything
from torch_teleport.registry import default_registry

NAME = "accuracy"
FLOOR = 1e-9
"""Drifts below this are drawn at it (log axes); the JSON keeps the measured values."""

FULL = {
    "hidden": [128, 128],
    "train_epochs": 10,
    "train_lr": 0.05,
    "batch": 32,
    "batches": 4,
    "steps": [1, 2, 4, 8, 16, 32],
    "taus": [1.0, 0.999, 0.99, 0.9],
    "lr": 0.02,
    "seed": 0,
}
TINY = {"hidden": [16], "train_epochs": 1, "batches": 1, "steps": [1, 2], "taus": [1.0, 0.9]}


def methods(taus: list[float]) -> dict[str, dict[str, Any]]:
    """Teleporter options per compared method, by label."""
    compared = {}
    for tau in taus:
        label = "null-space, tau = 1" if tau == 1 else f"null-space, tau = {tau:g}"
        compared[label] = {
            "method": "null_space",
            "null_space": "exact" if tau == 1 else "svd",
            "tau": tau,
        }
    compared["symmetry"] = {"method": "symmetry"}
    compared["level-set"] = {"method": "level_set"}
    return compared


@restores_threads
def run_accuracy(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    registry = default_registry()
    splits = registry.get("dataset", "digits")()
    seed_everything(options["seed"])
    model = leaky_mlp([64, *options["hidden"], splits.num_classes], registry).to(device)
    train_briefly(
        model,
        F.cross_entropy,
        splits,
        epochs=options["train_epochs"],
        lr=options["train_lr"],
        seed=options["seed"],
        device=device,
    )
    held_out = DataLoader(splits.test, batch_size=1024)
    loader = teleport_loader(splits, options)
    batches = [
        (x.to(device), y.to(device)) for x, y in itertools.islice(loader, options["batches"])
    ]
    test_before = evaluate_loss(model, held_out, F.cross_entropy, device)
    results = {}
    for label, teleport_options in methods(options["taus"]).items():
        print(f"accuracy: {label}", flush=True)
        rows = []
        for steps in sorted(options["steps"]):
            runs = []
            for inputs, targets in batches:
                subject = copy.deepcopy(model)
                teleporter = Teleporter(
                    subject,
                    F.cross_entropy,
                    lr=options["lr"],
                    steps=steps,
                    registry=registry,
                    limits=Limits(drift=None),  # the drift is what this benchmark measures
                    **teleport_options,
                )
                report = teleporter.teleport(inputs, targets)
                test_after = evaluate_loss(subject, held_out, F.cross_entropy, device)
                runs.append((report, test_after))
            rows.append(
                {
                    "steps": steps,
                    "batch_loss_change": statistics.fmean(r.loss_change for r, _ in runs),
                    "held_out_loss_change": statistics.fmean(
                        abs(t - test_before) / test_before for _, t in runs
                    ),
                    "held_out_loss_delta": statistics.fmean(t - test_before for _, t in runs),
                    "grad_norm_gain": statistics.fmean(
                        r.gain for r, _ in runs
                    ),
                    "steps_taken": min(r.steps for r, _ in runs),
                    "stopped": sorted({r.stopped for r, _ in runs}),
                }
            )
        longest = runs[0][0]  # the first batch's run with the most steps
        trajectory = [
            abs(loss - longest.loss_before) / longest.loss_before
            for loss in [*longest.losses[1:], longest.loss_after]
        ]
        results[label] = {
            "options": teleport_options,
            "by_steps": rows,
            "batch_loss_change_per_step": trajectory,
        }
    widths = "-".join(map(str, options["hidden"]))
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "data": splits.description,
            "model": f"LeakyReLU(0.1) MLP 64-{widths}-10, float32, trained with SGD",
            "held_out_loss_before": test_before,
            "methods": results,
        },
    )
    _plot(results, figure)
    for label, result in results.items():
        last = result["by_steps"][-1]
        print(
            f"{label:>24}: after {last['steps']} steps batch loss change {last['batch_loss_change']:.2e}, "
            f"held-out {last['held_out_loss_change']:.2e}, grad-norm gain {last['grad_norm_gain']:.3g}x"
        )


def _plot(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    panels = (
        ("batch_loss_change", "teleport-batch loss, relative change", True),
        ("held_out_loss_change", "held-out loss, relative change", True),
        ("grad_norm_gain", "gradient-norm gain (after / before)", False),
    )
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 3.8))
    for ax, (key, title, floor) in zip(axes, panels, strict=False):
        for label, result in results.items():
            steps = [row["steps"] for row in result["by_steps"]]
            values = [max(row[key], FLOOR) if floor else row[key] for row in result["by_steps"]]
            ax.plot(steps, values, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("teleport steps")
        ax.set_title(title, fontsize="medium")
    trade = axes[-1]
    for result in results.values():  # same colours in the same order as the other panels
        gains = [row["grad_norm_gain"] for row in result["by_steps"]]
        trade.plot(
            gains, [max(row["batch_loss_change"], FLOOR) for row in result["by_steps"]], marker="o"
        )
    trade.set_xscale("log")
    trade.set_xlabel("gradient-norm gain")
    trade.set_title("batch-loss change at equal gain", fontsize="medium")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(f"(values below {FLOOR:g} drawn at {FLOOR:g})", fontsize="small")
    axes[2].legend(fontsize="small")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_accuracy)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_accuracy))
