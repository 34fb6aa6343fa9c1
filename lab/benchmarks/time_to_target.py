"""``bench.time_to_target``: epochs and wall-clock to a fixed train loss, teleport against a tuned baseline.

The number a user cares about, measured so that teleport does not win by an untuned baseline. It
runs offline ``train`` configs of the zoo (``runs``: ``default`` is the embedded default, the paper's
MLP on digits; any other name is ``<config_dir>/<name>.toml``). For each optimizer of a config the
baseline (no teleport) trains at the config's learning rate times each of ``multipliers``, and the
best of these (least wall-clock to the config's ``target_loss``, else least final train loss) is
set against one teleport run at the config's rate. Teleport runs use the library's defaults: the
config's ``[teleport]`` table is dropped, so the runs follow whatever :class:`~torch_teleport.Teleporter`
and the ``train`` experiment default to (``set`` can still change ``teleport.*`` keys). All runs of
an optimizer share the initialisation and the batch order; times are the training loop's
(teleports included, evaluation excluded). Per optimizer the output gives every run's train loss
per epoch, its epochs and seconds to the target (``None``: not reached by every seed), the ratios
teleport / best baseline and a ``winner`` with a one-line ``verdict``. Seeds, epochs or anything
else can be overridden for all configs through ``set`` (``--set`` syntax).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from torch_teleport import hookimpl
from torch_teleport.lab.benchmarks.common import (
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    write_outputs,
)
from torch_teleport.lab.config import ConfigError, apply_overrides, load_config
from torch_teleport.lab.experiment import mean_std, save_figure
from torch_teleport.lab.train import TrainSetup, resolve_config, summarize, table, train_all
from torch_teleport.lab.train import prepare as prepare_training

NAME = "time_to_target"
FULL = {
    "runs": ["default", "digits_transformer", "mnist1d_mlp"],
    "config_dir": "",
    "multipliers": [1.0, 2.0, 5.0],
    "set": ["training.seeds=[0]"],
}
TINY = {
    "runs": ["default"],
    "multipliers": [1.0, 2.0],
    "set": [
        "training.seeds=[0]",
        "training.epochs=1",
        "training.target_loss=2.15",
        'training.optimizers=[{ name = "sgd", lr = 0.05 }]',
        "model.options.hidden=[16]",
        "teleport.steps=1",
        "teleport.schedule.options.batches=1",
    ],
}
MEASURES = ("epochs_to_target", "seconds_to_target", "cpu_seconds_to_target")


@restores_threads
def run_time_to_target(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    if not options["multipliers"] or min(options["multipliers"]) <= 0:
        raise ConfigError("multipliers: give one or more positive numbers", key="multipliers")
    device = prepare(options)
    folder = _config_dir(options["config_dir"])
    runs = {}
    with tempfile.TemporaryDirectory() as logs:  # TensorBoard logs are not a benchmark result
        for name in options["runs"]:
            loaded = load_config(None if name == "default" else folder / f"{name}.toml")
            loaded.pop("teleport", None)  # the library's defaults, not the config's choices
            runs[name] = _compare_run(
                name,
                apply_overrides(loaded, options["set"]),
                options["multipliers"],
                Path(logs) / name,
            )
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
        for optimizer, comparison in run["optimizers"].items():
            print(f"{optimizer}: {comparison['verdict']}")


def _compare_run(
    name: str, config: dict[str, Any], multipliers: list[float], logs: Path
) -> dict[str, Any]:
    """Every optimizer of ``config``: the baseline at each multiplier of its rate, then teleport."""
    resolved = resolve_config(config)
    if resolved["training"]["target_loss"] is None:
        key = "training.target_loss"
        raise ConfigError(f"{key}: run {name!r} has no target train loss to time", key=key)
    optimizers = resolved["training"]["optimizers"]  # labels and options filled in
    grid = {o["label"]: [_scaled(o, m) for m in multipliers] for o in optimizers}
    training = {
        **config["training"],
        "optimizers": [entry for entries in grid.values() for entry in entries],
        "with_teleport": [False, True],
    }
    setup = prepare_training({**config, "training": training})  # checks every run before any trains
    target = setup.training["target_loss"]
    print(
        f"time to target: {name} ({setup.config['model']['name']}, {setup.splits.description})",
        flush=True,
    )
    rows, comparisons = [], {}
    for optimizer in optimizers:
        label = optimizer["label"]
        plan = [(m, entry, False) for m, entry in zip(multipliers, grid[label], strict=True)]
        plan.append((1.0, _scaled(optimizer, 1.0), True))
        entries = []
        for multiplier, entry, teleport in plan:
            results = train_all(
                _only(setup, entry, teleport),
                logs / f"{entry['label']}-{'teleport' if teleport else 'plain'}",
            )
            (row,) = summarize(results, target)
            rows.append(row)
            entries.append(_entry(multiplier, row, results))
        comparisons[label] = _compare(label, optimizer["lr"], entries[:-1], entries[-1], target)
    return {
        "model": setup.config["model"],
        "data": setup.splits.description,
        "target_train_loss": target,
        "epochs": setup.training["epochs"],
        "seeds": setup.training["seeds"],
        "multipliers": multipliers,
        "teleport": setup.config["teleport"],
        "optimizers": comparisons,
        "rows": rows,
        "table": table(rows, target),
    }


def _scaled(optimizer: dict[str, Any], multiplier: float) -> dict[str, Any]:
    return {
        **optimizer,
        "lr": optimizer["lr"] * multiplier,
        "label": f"{optimizer['label']} x{multiplier:g}",
    }


def _only(setup: TrainSetup, optimizer: dict[str, Any], teleport: bool) -> TrainSetup:
    """``setup`` reduced to one optimizer entry, with or without teleport; the data stay loaded."""
    training = {**setup.training, "optimizers": [optimizer], "with_teleport": [teleport]}
    reduced = TrainSetup({**setup.config, "training": training}, setup.registry, setup.device)
    reduced.splits = setup.splits
    return reduced


def _entry(multiplier: float, row: dict[str, Any], results: list[dict]) -> dict[str, Any]:
    """One setting's numbers; a time to target only where every seed reached the target."""
    every_seed = row["target_reached"] == row["seeds"]
    return {
        "multiplier": multiplier,
        "lr": results[0]["lr"],
        "target_reached": row["target_reached"],
        **{key: mean_std(row[key])[0] if every_seed else None for key in MEASURES},
        "final_train_loss": row["final_train_loss_mean"],
        "teleport_seconds": row["teleport_seconds_mean"],
        "train_loss": [result["train_loss"] for result in results],
        "seconds": [result["seconds"] for result in results],
    }


def _compare(
    optimizer: str,
    base_lr: float,
    baselines: list[dict[str, Any]],
    teleport: dict[str, Any],
    target: float,
) -> dict[str, Any]:
    """The best baseline, the ratios teleport / best baseline, and who reaches the target sooner."""
    best = min(baselines, key=_rank)
    ratios = {
        key: teleport[key] / best[key] if teleport[key] is not None and best[key] else None
        for key in MEASURES
    }
    teleported, plain = teleport["seconds_to_target"], best["seconds_to_target"]
    if teleported is None and plain is None:
        winner = "neither"
    elif plain is None or (teleported is not None and teleported < plain):
        winner = "teleport"
    else:
        winner = "baseline"
    return {
        "base_lr": base_lr,
        "baselines": baselines,
        "best_multiplier": best["multiplier"],
        "best_baseline": best,
        "teleport": teleport,
        "teleport_over_best_baseline": ratios,
        "winner": winner,
        "verdict": _verdict(optimizer, winner, best, teleport, ratios, target),
    }


def _rank(entry: dict[str, Any]) -> tuple[bool, float]:
    """Reached the target sooner first; then, among runs that did not, the lower final train loss."""
    seconds, loss = entry["seconds_to_target"], entry["final_train_loss"]
    if seconds is not None:
        return False, seconds
    return True, loss if math.isfinite(loss) else math.inf


def _verdict(
    optimizer: str,
    winner: str,
    best: dict[str, Any],
    teleport: dict[str, Any],
    ratios: dict[str, float | None],
    target: float,
) -> str:
    goal = f"train loss <= {target:g}"
    baseline = (
        f"{optimizer} without teleport at {best['multiplier']:g}x its rate (lr {best['lr']:g})"
    )
    if winner == "neither":
        return (
            f"neither reaches {goal}: final train loss {teleport['final_train_loss']:.4g} with "
            f"teleport, {best['final_train_loss']:.4g} for {baseline}"
        )
    if teleport["seconds_to_target"] is None:
        return (
            f"teleport loses: it does not reach {goal}; {baseline} does by epoch "
            f"{best['epochs_to_target']:g} ({best['seconds_to_target']:.3g} s)"
        )
    if best["seconds_to_target"] is None:
        return (
            f"teleport wins: it reaches {goal} by epoch {teleport['epochs_to_target']:g} "
            f"({teleport['seconds_to_target']:.3g} s); no baseline rate reaches it"
        )
    times = f"{teleport['seconds_to_target']:.3g} s against {best['seconds_to_target']:.3g} s"
    if ratios["seconds_to_target"] is not None:
        times = f"{ratios['seconds_to_target']:.2f}x the wall-clock ({times})"
    return (
        f"teleport {'wins' if winner == 'teleport' else 'loses'} against {baseline}: {times} "
        f"to {goal}; {teleport['epochs_to_target']:g} against {best['epochs_to_target']:g} epochs"
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
        comparisons = run["optimizers"]
        for r, (key, label) in enumerate(measures):
            ax = axes[r][column]
            for offset, side, legend in (
                (-0.2, "best_baseline", "best tuned baseline"),
                (0.2, "teleport", "teleport (defaults)"),
            ):
                values = [comparison[side][key] for comparison in comparisons.values()]
                positions = [i + offset for i in range(len(values))]
                bars = ax.bar(positions, [v or 0.0 for v in values], 0.4, label=legend)
                for bar, value in zip(bars, values, strict=True):
                    if value is None:
                        centre = bar.get_x() + bar.get_width() / 2
                        ax.annotate(
                            "n/r", (centre, 0), ha="center", va="bottom", fontsize="x-small"
                        )
            ax.set_xticks(
                range(len(comparisons)),
                [f"{o}\n(x{c['best_multiplier']:g})" for o, c in comparisons.items()],
            )
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, axis="y")
            if r == 0:
                ax.set_title(
                    f"{name}: train loss <= {run['target_train_loss']:g}", fontsize="medium"
                )
        axes[0][column].legend(fontsize="small")
    figure.suptitle(
        "n/r: the target was not reached within the run's epochs\n"
        "(xM): the best baseline's multiple of the config's learning rate",
        fontsize="small",
    )
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_time_to_target)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_time_to_target))
