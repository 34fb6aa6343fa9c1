"""``bench.default_vs_paper``: does the default teleport gain at least what the paper's teleport gains from the same point?

For every zoo model (the inputs, targets and loss of
:data:`~torch_teleport.lab.benchmarks.step_cost.PROBES`) and seed, at two
points, initialisation and after ``train_steps`` SGD steps (rate ``train_lr``)
on fresh batches of the probe's data, two teleports of copies of the same
model on the same batch of ``batch`` samples with the same guard batch of
``guard`` other samples (the same limits for both):

* ``default``: ``Teleporter(model, loss)`` with the library's defaults;
* ``paper``: the paper's teleport, ``null_space="exact"`` at its fixed rate
  ``lr=0.005`` (the same ``steps``).

Recorded per teleport: the gradient-norm gain on the batch, the batch-loss
change, the guard-loss change, steps, why it stopped and after how many steps
it went on in the batch's own room (``exact_from``). A row counts as
*below the paper's* when the default gained less, unless both stopped on the
gain limit (they landed on the same limit, within its landing band):
:func:`~torch_teleport.lab.benchmarks.model_coverage.below_paper`, the rule
the real-model table (``model_coverage``) uses too.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch

from torch_teleport import Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    write_outputs,
)
from torch_teleport.lab.benchmarks.model_coverage import PAPER_MODE, below_paper
from torch_teleport.lab.benchmarks.step_cost import PROBES, Probe, probe_for
from torch_teleport.lab.experiment import save_figure
from torch_teleport.registry import default_registry

NAME = "default_vs_paper"
FULL = {
    "models": [],
    "seeds": [0, 1, 2],
    "batch": 32,
    "guard": 256,
    "steps": 8,
    "train_steps": 100,
    "train_lr": 0.01,
    "mlp_hidden": [1024, 1024],
}
TINY = {
    "models": ["mlp"],
    "seeds": [0],
    "batch": 8,
    "guard": 16,
    "steps": 2,
    "train_steps": 2,
    "mlp_hidden": [16, 16],
}
POINTS = ("initialisation", "trained")


@restores_threads
def run_default_vs_paper(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    names = options["models"] or ["mlp", *(n for n in PROBES if n != "mlp")]
    rows = []
    for name in names:
        probe = probe_for(name, options["mlp_hidden"])
        factory = default_registry().get("model", name)
        for seed in options["seeds"]:
            print(f"default vs paper: {name}, seed {seed}", flush=True)
            rows += _measure(name, factory, probe, seed, options, device)
    below = [row for row in rows if below_paper(row)]
    failed = [row for row in rows if "error" in row]
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "paper_mode": {k: v for k, v in PAPER_MODE.items() if k != "uncovered"},
            "rows": rows,
            "below_paper": len(below),
            "default_failed": len(failed),
            "runs": len(rows),
        },
    )
    _plot(rows, figure)
    for row in rows:
        print(f"{row['model']}, {row['point']}, seed {row['seed']}: {_said(row, '')} against the paper's {_said(row, 'paper_')}")
    print(f"default below the paper's: {len(below)} of {len(rows)} runs; default failed: {len(failed)}")


def _said(row: dict, prefix: str) -> str:
    if row.get(f"{prefix}gain") is None:
        return row.get(f"{prefix}error", "failed")
    return f"gain {row[prefix + 'gain']:.3g} ({row[prefix + 'steps']} steps, {row[prefix + 'stopped']})"


def _measure(name: str, factory, probe: Probe, seed: int, options: dict, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = factory(**probe.options).to(device)
    batch = probe.batch(generator, options["batch"], device)
    guard = probe.batch(generator, options["guard"], device)
    rows = []
    for point in POINTS:
        if point == "trained":
            _train(model, probe, generator, options, device)
        row = {"model": name, "seed": seed, "point": point}
        for prefix, teleporter_options in (("", {"uncovered": "freeze"}), ("paper_", PAPER_MODE)):
            try:
                teleporter = Teleporter(copy.deepcopy(model), probe.loss, steps=options["steps"], **teleporter_options)
                row.update(_figures(teleporter.teleport(*batch, guard=guard), prefix))
            except Exception as error:  # recorded and counted: the other teleport and models go on
                row.update({f"{prefix}gain": None, f"{prefix}error": f"{type(error).__name__}: {error}"[:200]})
        rows.append(row)
    return rows


def _train(model, probe: Probe, generator: torch.Generator, options: dict, device: torch.device) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=options["train_lr"])
    for _ in range(options["train_steps"]):
        inputs, targets = probe.batch(generator, options["batch"], device)
        optimizer.zero_grad()
        probe.loss(model(inputs), targets).backward()
        optimizer.step()


def _figures(report, prefix: str) -> dict[str, Any]:
    guard_change = None
    if report.guard_loss_before:
        guard_change = (report.guard_loss_after - report.guard_loss_before) / abs(report.guard_loss_before)
    return {
        f"{prefix}gain": report.gain,
        f"{prefix}steps": report.steps,
        f"{prefix}stopped": report.stopped,
        f"{prefix}exact_from": report.exact_from,
        f"{prefix}batch_loss_change": report.loss_change,
        f"{prefix}guard_loss_change": guard_change,
    }


def _plot(rows: list[dict], figure: Path) -> None:
    """Per model and point, the median gain over seeds of each teleport."""
    plt = pyplot()
    groups = sorted({(row["model"], row["point"]) for row in rows}, key=lambda g: (g[0], POINTS.index(g[1])))
    def median(key: str, group: tuple) -> float:
        values = [r[key] for r in rows if (r["model"], r["point"]) == group and r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    medians = {key: [median(key, group) for group in groups] for key in ("gain", "paper_gain")}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(groups)), 3.6))
    positions = range(len(groups))
    ax.bar([p - 0.2 for p in positions], medians["gain"], 0.4, label="default", color="C1")
    ax.bar([p + 0.2 for p in positions], medians["paper_gain"], 0.4, label="paper (exact, lr 0.005)", color="C0")
    ax.set_xticks(list(positions), [f"{m}\n{'init' if p == 'initialisation' else p}" for m, p in groups], fontsize=6, rotation=45)
    ax.set_yscale("log")
    ax.set_ylabel("gradient-norm gain (median over seeds)")
    ax.legend(fontsize=7)
    save_figure(fig, figure)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_default_vs_paper)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_default_vs_paper))
