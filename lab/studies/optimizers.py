"""Study: teleport with SGD, momentum, AdaGrad, RMSprop and Adam, against epochs and wall-clock (Figs. 5, 13).

A ``train`` experiment under another name: the config is a ``train``
config (see ``docs/cli.md``) with ``kind = "study_optimizers"`` and an
optional ``threads``; the runs, the table and the loss-per-epoch figure
are the ``train`` experiment's own. This study adds the loss against
wall-clock and CPU time (training and teleports, evaluation excluded),
which is where a teleport's cost shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from torch_teleport import hookimpl
from torch_teleport.lab.config import ConfigError
from torch_teleport.lab.experiment import plot_curves, save_figure
from torch_teleport.lab.train import loss_curves, prepare, summarize, table, train_all

from .common import PAPER_DATA, pyplot, threads, write_outputs

KIND = "study_optimizers"


def run_optimizers(config: dict[str, Any], out_dir: Path) -> None:
    """Train every optimizer with and without teleport; table, loss per epoch and per second."""
    config = dict(config)
    if config.get("kind", KIND) != KIND:
        raise ConfigError(f"kind must be {KIND!r}, got {config['kind']!r}", key="kind")
    count = config.pop("threads", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigError(f"threads must be a positive integer, got {count!r}", key="threads")
    setup = prepare({**config, "kind": "train"})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    note = f"data: {setup.splits.description}"
    if setup.config["dataset"]["name"] == "digits":
        note += f" (run on scikit-learn digits instead of the paper's {PAPER_DATA})"
    print(note)
    with threads(count):
        results = train_all(setup, out_dir)
    target = setup.training["target_loss"]
    rows = summarize(results, target)
    model = setup.config["model"]
    teleport = setup.config["teleport"]
    notes = [
        note,
        f"model {model['name']} {model['options']}; {setup.training['epochs']} epochs, batch {setup.training['batch_size']}, "
        f"seeds {setup.training['seeds']}; teleport: {teleport['objective']} objective, {teleport['null_space']} null space, "
        f"schedule {teleport['schedule']['name']} {teleport['schedule']['options']}, {teleport['steps']} steps, "
        f"lr {teleport['lr']}, teleport batch {teleport['batch_size']}; {count} thread(s).",
    ]
    markdown = write_outputs(
        out_dir,
        title="Teleport with different optimizers",
        notes=notes,
        tables=[table(rows, target)],
        data={
            "config": {**setup.config, "kind": KIND, "threads": count},
            "dataset": setup.splits.description,
            "summary": rows,
            "runs": results,
        },
    )
    plot_curves(loss_curves(results), out_dir / "loss_vs_epoch.png")
    _plot_time(results, out_dir / "loss_vs_time.png")
    print(markdown, end="")


def _plot_time(results: list[dict], path: Path) -> None:
    """Training loss against wall-clock and CPU seconds: per optimizer, mean over seeds of both.

    CPU seconds (process time) are the fairer clock on a shared machine,
    where wall-clock also counts the time other processes held the cores.
    """
    plt = pyplot()
    optimizers = list(dict.fromkeys(r["optimizer"] for r in results))
    clocks = [("seconds", "wall-clock seconds"), ("cpu_seconds", "CPU seconds")]
    figure, axes = plt.subplots(
        len(clocks), len(optimizers), figsize=(3.6 * len(optimizers), 3.0 * len(clocks)), squeeze=False
    )
    for row, (key, label) in enumerate(clocks):
        for ax, optimizer in zip(axes[row], optimizers, strict=True):
            for teleport in (False, True):
                runs = [r for r in results if r["optimizer"] == optimizer and r["teleport"] == teleport]
                if not runs:
                    continue
                seconds = np.mean([r[key] for r in runs], axis=0)
                loss = np.mean([r["train_loss"] for r in runs], axis=0)
                ax.plot(seconds, loss, marker=".", label="teleport" if teleport else "no teleport")
            ax.set_yscale("log")
            ax.set_title(optimizer if row == 0 else "")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        axes[row][0].set_ylabel("train loss")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(KIND, run_optimizers)
