"""``bench.time_to_target``: wall-clock and epochs to a fixed train loss, with and without teleport.

The number a user cares about. It runs the offline real-data (digits)
``train`` configs of the zoo models: the embedded default (the paper's MLP)
and ``configs/digits_<model>.toml`` — each optimizer with and without
teleport from the same initialisation and batch order — and reports, per
optimizer, the epochs and the training wall-clock (teleports included,
evaluation excluded) until the train loss first reaches the config's
``target_loss``, "not reached" where it does not, and the time spent in
teleports. Seeds, epochs or anything else can be overridden for all
configs through ``set`` (``--set`` syntax).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch_teleport import hookimpl
from torch_teleport.config import apply_overrides, load_config
from torch_teleport.experiment import save_figure
from torch_teleport.plugins.benchmarks.common import (
    prepare,
    pyplot,
    restores_threads,
    settings,
    write_outputs,
)
from torch_teleport.plugins.train import prepare as prepare_training
from torch_teleport.plugins.train import summarize, table, train_all

NAME = "time_to_target"
FULL = {
    "runs": ["default", "digits_cnn", "digits_transformer", "digits_mamba"],
    "config_dir": "",
    "set": ["training.seeds=[0]"],
}
TINY = {
    "runs": ["default"],
    "set": [
        "training.seeds=[0]",
        "training.epochs=1",
        "training.target_loss=2.0",
        'training.optimizers=[{ name = "sgd", lr = 0.05 }]',
        "model.options.hidden=[16]",
        "teleport.steps=1",
        "teleport.schedule.options.batches=1",
    ],
}


@restores_threads
def run_time_to_target(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    folder = _config_dir(options["config_dir"])
    runs = {}
    with tempfile.TemporaryDirectory() as logs:  # TensorBoard logs are not a benchmark result
        for name in options["runs"]:
            train_config = apply_overrides(
                load_config(None if name == "default" else folder / f"{name}.toml"), options["set"]
            )
            setup = prepare_training(train_config)
            print(
                f"time to target: {name} ({setup.config['model']['name']}, {setup.splits.description})",
                flush=True,
            )
            target = setup.training["target_loss"]
            rows = summarize(train_all(setup, Path(logs) / name), target)
            runs[name] = {
                "model": setup.config["model"],
                "data": setup.splits.description,
                "target_train_loss": target,
                "epochs": setup.training["epochs"],
                "seeds": setup.training["seeds"],
                "teleport": {
                    key: setup.config["teleport"][key] for key in ("lr", "steps", "cap", "schedule")
                },
                "rows": rows,
                "table": table(rows, target),
            }
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {"clock": "wall-clock (training loop, teleports included)", "runs": runs},
    )
    _plot(runs, figure)
    for name, run in runs.items():
        print(
            f"\n{name}: {run['data']}, target train loss {run['target_train_loss']}\n{run['table']}",
            end="",
        )


def _config_dir(given: str) -> Path:
    """``given``, else ``./configs``, else the repository's ``configs`` folder."""
    candidates = (
        [Path(given)]
        if given
        else [Path.cwd() / "configs", Path(__file__).resolve().parents[2] / "configs"]
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no configs folder at {' or '.join(map(str, candidates))}; set config_dir"
    )


def _plot(runs: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    measures = (
        ("seconds_to_target", "wall-clock s to target"),
        ("cpu_seconds_to_target", "CPU s to target"),
        ("epochs_to_target", "epochs to target"),
    )
    figure, axes = plt.subplots(
        len(measures), len(runs), figsize=(4.2 * len(runs), 3.0 * len(measures)), squeeze=False
    )
    for column, (name, run) in enumerate(runs.items()):
        optimizers = list(dict.fromkeys(row["optimizer"] for row in run["rows"]))
        for r, (key, label) in enumerate(measures):
            ax = axes[r][column]
            for offset, teleport in ((-0.2, False), (0.2, True)):
                rows = {row["optimizer"]: row for row in run["rows"] if row["teleport"] == teleport}
                heights = [_mean(rows[o][key]) if o in rows else 0.0 for o in optimizers]
                positions = [i + offset for i in range(len(optimizers))]
                bars = ax.bar(
                    positions, heights, 0.4, label="teleport" if teleport else "no teleport"
                )
                for bar, optimizer in zip(bars, optimizers, strict=True):
                    if optimizer in rows and not rows[optimizer][key]:
                        centre = bar.get_x() + bar.get_width() / 2
                        ax.annotate(
                            "n/r",
                            (centre, 0),
                            ha="center",
                            va="bottom",
                            fontsize="x-small",
                        )
            ax.set_xticks(range(len(optimizers)), optimizers)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
            if r == 0:
                ax.set_title(
                    f"{name}: train loss <= {run['target_train_loss']:g}", fontsize="medium"
                )
        axes[0][column].legend(fontsize="small")
    figure.suptitle("n/r: the target was not reached within the run's epochs", fontsize="small")
    save_figure(figure, path)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_time_to_target)
