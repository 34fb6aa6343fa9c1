"""``bench.gradient_paths``: the structured and the full gradient path against each other at tau < 1.

At ``tau = 1`` the structured path (first derivatives only) gives the full
path's projected ascent direction exactly. Below 1 the thresholded null
space no longer removes the part of ``H g`` that moves the pre-activations,
so the two directions differ; this benchmark measures which one serves a
teleport better. For every zoo model (the inputs, targets and loss of
:data:`~torch_teleport.lab.benchmarks.step_cost.PROBES`), every ``tau``
in ``taus`` and both paths, on a model built from a fixed seed and a
teleport batch and a held-out batch of the same size drawn from a seeded
generator, one default teleport (``null_space = "svd"``, at most 8 steps, the
default ``lr``, uncovered parameters frozen) of a copy of the model
records:

* the relative change of the teleport-batch loss (``report.loss_change``);
* the relative change of the held-out loss (``torch.no_grad``, eval mode,
  before and after; BatchNorm layers use their running statistics there,
  while the teleport itself sees batch statistics);
* the gradient-norm gain on the teleport batch
  (``grad_norm_after / grad_norm_before``);
* steps taken, why it stopped, whether it rolled back, the paths its sites
  took, and its time.

Each figure is a median over ``seeds`` (model and batches both seeded), the
per-seed values kept. Per ``tau`` a summary takes, over the models, the
median ratio structured / full of the batch-loss change, the held-out change
and the gain, and of both changes per unit of ``ln(gain)`` (drift at equal
gain), which the verdict reads: the path whose drift at equal gain is
smaller by more than 10 % drifts less.

``drift_tolerance`` is passed to the teleporter: ``"auto"`` (default) leaves
the teleporter's own default (which may end a teleport early, ``stopped =
"drift"``, so the paths compete on the gain they reach within the drift
budget), ``"none"`` turns the check off (every teleport takes its 8 steps,
so the paths compete on drift at equal gain), a number sets it.
"""

from __future__ import annotations

import copy
import math
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from torch_teleport import Limits, Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    clock,
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    synchronize,
    write_outputs,
)
from torch_teleport.lab.benchmarks.step_cost import PROBES, SKIPPED, Probe, probe_for
from torch_teleport.lab.experiment import save_figure
from torch_teleport.registry import default_registry

NAME = "gradient_paths"
GRADIENTS = ("structured", "full")
TIE = 0.1
"""Median ratios within this fraction of 1 count as a tie in the verdict."""

MIN_GAIN = 1.001
"""Below this gradient-norm gain a run has no drift at equal gain (``None``)."""

FLOOR = 1e-12
"""Values below this are drawn at it on log axes; the JSON keeps the measured values."""

FULL = {
    "models": [],
    "mlp_hidden": [256, 256],
    "batch": 32,
    "taus": [0.99, 0.999],
    "seeds": [0, 1, 2],
    "drift_tolerance": "auto",
}
TINY = {
    "models": ["mlp"],
    "mlp_hidden": [8, 8],
    "batch": 4,
    "taus": [0.99],
    "seeds": [0],
}

FIGURES = ("loss_change", "held_out_change", "gain", "steps", "seconds")
"""The numbers of one run that rows report as medians over seeds."""

HELD_OUT = (
    "loss on a second batch of the same size, drawn after the teleport batch from the same "
    "seeded generator, with torch.no_grad in eval mode before and after the teleport, on the "
    "teleported copy; BatchNorm layers use their running statistics there (eval mode) while "
    "the teleport sees batch statistics (train mode)"
)


def teleporter_options(drift_tolerance: str) -> dict[str, Any]:
    """Keyword arguments for :class:`Teleporter` from the ``drift_tolerance`` setting.

    ``"auto"`` passes nothing (the teleporter's default), ``"none"`` turns the
    drift check off, a number sets it.
    """
    if drift_tolerance == "auto":
        return {}
    if drift_tolerance == "none":
        return {"limits": Limits(drift=None)}
    try:
        return {"limits": Limits(drift=float(drift_tolerance))}
    except ValueError:
        raise ValueError(
            f"drift_tolerance must be 'auto', 'none' or a number, got {drift_tolerance!r}"
        ) from None


@restores_threads
def run_gradient_paths(config: dict[str, Any], out_dir: Path) -> None:
    tolerance = config.get("drift_tolerance")
    if isinstance(tolerance, int | float) and not isinstance(tolerance, bool):
        config = {**config, "drift_tolerance": repr(tolerance)}  # `--set drift_tolerance=1e-4`
    options = settings(config, FULL, TINY)
    extra = teleporter_options(options["drift_tolerance"])
    device = prepare(options)
    registry = default_registry()
    names = options["models"] or ["mlp", *(n for n in PROBES if n != "mlp")]
    models, rows = [], []
    for name in names:
        probe = probe_for(name, options["mlp_hidden"])
        if probe is None:
            models.append({"model": name, "skipped": SKIPPED})
            continue
        print(f"gradient paths: {name}", flush=True)
        try:
            factory = registry.get("model", name)
        except Exception as error:  # a probe for a model no longer registered: say so, go on
            models.append({"model": name, "error": f"{type(error).__name__}: {error}"})
            continue
        info, model_rows = _measure(name, factory, probe, options, extra, device)
        models.append(info)
        rows += model_rows
    summary = [_summary(tau, rows) for tau in options["taus"]]
    verdict = _overall(summary)
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "method": (
                "one default teleport (null_space='svd', at most 8 steps, default lr, uncovered "
                "parameters frozen) of a copy of the model per model, tau, gradient path and "
                "seed; figures are medians over seeds"
            ),
            "drift_tolerance": (
                "the teleporter's default"
                if not extra
                else "off" if extra["drift_tolerance"] is None else extra["drift_tolerance"]
            ),
            "held_out": HELD_OUT,
            "batch_loss_change": "report.loss_change: |after - before| / |before| on the teleport batch",
            "gain": "report.gain (grad_norm_after / grad_norm_before) on the teleport batch",
            "seconds": f"{clock(device)[1]} of the teleport call",
            "per_log_gain": (
                f"a relative loss change / ln(gain): drift at equal gain (none below a gain of "
                f"{MIN_GAIN:g})"
            ),
            "tie": f"median ratios within {TIE:.0%} of 1 read as a tie",
            "models": models,
            "rows": rows,
            "summary": summary,
            "verdict": verdict,
        },
    )
    _plot(rows, options["taus"], figure)
    _print(models, rows, summary, verdict)


def _measure(
    name: str, factory, probe: Probe, options: dict, extra: dict, device: torch.device
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the model is, and one row per (tau, gradient) with its per-seed runs."""
    info: dict[str, Any] = {"model": name, "options": probe.options}
    runs: dict[tuple[float, str], list[dict[str, Any]]] = {
        (tau, gradient): [] for tau in options["taus"] for gradient in GRADIENTS
    }
    for seed in options["seeds"]:
        try:
            generator = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            model = factory(**probe.options).to(device)
            inputs, targets = probe.batch(generator, options["batch"], device)
            held_inputs, held_targets = probe.batch(generator, options["batch"], device)
        except Exception as error:  # a zoo model whose factory changed: say so, go on
            info["error"] = f"{type(error).__name__}: {error}"
            for seeds in runs.values():
                seeds.append({"seed": seed, "error": info["error"]})
            continue
        if "parameters" not in info:
            info.update(
                input_shape=list(inputs.shape),
                parameters=sum(p.numel() for p in model.parameters()),
                batchnorm=any(isinstance(m, _BatchNorm) for m in model.modules()),
            )
            if info["batchnorm"]:
                info["held_out_mode"] = "eval (BatchNorm running statistics)"
            for tau in options["taus"][:1]:
                _warm_up(model, probe, tau, extra, (inputs, targets))
        for (tau, gradient), seeds in runs.items():
            try:
                run = _teleport(
                    model,
                    probe,
                    tau,
                    gradient,
                    extra,
                    (inputs, targets),
                    (held_inputs, held_targets),
                    device,
                )
            except Exception as error:  # one path failing on one model is a result too
                run = {"error": f"{type(error).__name__}: {error}"}
            seeds.append({"seed": seed, **run})
    rows = [
        _row(name, tau, gradient, seeds, info.get("batchnorm", False))
        for (tau, gradient), seeds in runs.items()
    ]
    return info, rows


def _teleport(
    model: nn.Module,
    probe: Probe,
    tau: float,
    gradient: str,
    extra: dict[str, Any],
    batch: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    device: torch.device,
) -> dict[str, Any]:
    subject = copy.deepcopy(model)
    teleporter = Teleporter(
        subject,
        probe.loss,
        null_space="svd",
        tau=tau,
        uncovered="freeze",
        gradient=gradient,
        **extra,
    )
    held_before = _held_out_loss(subject, probe, *held_out)
    timer, _ = clock(device)
    synchronize(device)
    started = timer()
    report = teleporter.teleport(*batch)
    synchronize(device)
    seconds = timer() - started
    held_after = _held_out_loss(subject, probe, *held_out)
    return {
        "loss_change": report.loss_change,
        "held_out_change": abs(held_after - held_before) / max(abs(held_before), 1e-30),
        "gain": report.gain,
        "steps": report.steps,
        "stopped": report.stopped,
        "rolled_back": report.rolled_back,
        "paths": sorted({layer.gradient for layer in report.layers}),
        "seconds": seconds,
        "loss_before": report.loss_before,
        "held_out_before": held_before,
        "grad_norm_before": report.grad_norm_before,
    }


def _warm_up(
    model: nn.Module, probe: Probe, tau: float, extra: dict[str, Any], batch: tuple[Tensor, Tensor]
) -> None:
    """One untimed step per path on a throwaway copy, so no path's time holds first-call costs."""
    for gradient in GRADIENTS:
        try:
            Teleporter(
                copy.deepcopy(model),
                probe.loss,
                null_space="svd",
                tau=tau,
                uncovered="freeze",
                gradient=gradient,
                **extra,
            ).teleport(*batch, steps=1)
        except Exception:  # the measured run records the error
            pass


def _held_out_loss(model: nn.Module, probe: Probe, inputs: Tensor, targets: Tensor) -> float:
    """The loss on ``(inputs, targets)`` in eval mode without a graph; the modes are restored."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return float(probe.loss(model(inputs), targets))
    finally:
        for module, training in modes:
            module.training = training


def _row(
    name: str, tau: float, gradient: str, seeds: list[dict[str, Any]], batchnorm: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "tau": tau, "gradient": gradient, "batchnorm": batchnorm}
    done = [run for run in seeds if "error" not in run]
    errors = [f"seed {run['seed']}: {run['error']}" for run in seeds if "error" in run]
    if errors:
        row["error"] = "; ".join(errors)
    if done:
        row.update({key: statistics.median(run[key] for run in done) for key in FIGURES})
        row["loss_change_per_log_gain"] = _per_log_gain(row["loss_change"], row["gain"])
        row["held_out_per_log_gain"] = _per_log_gain(row["held_out_change"], row["gain"])
        row["stopped"] = sorted({run["stopped"] for run in done})
        row["rolled_back"] = sum(run["rolled_back"] for run in done)
        row["paths"] = sorted({path for run in done for path in run["paths"]})
    row["seeds"] = seeds
    return row


def _per_log_gain(change: float, gain: float) -> float | None:
    """A loss change per unit of ``ln(gain)``; ``None`` where the gradient norm grew by less than
    :data:`MIN_GAIN` (a change over almost no gain is noise over noise)."""
    if not (math.isfinite(gain) and gain >= MIN_GAIN):
        return None
    return change / math.log(gain)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return None
    return numerator / denominator


RATIOS = (
    "loss_change",
    "held_out_change",
    "gain",
    "loss_change_per_log_gain",
    "held_out_per_log_gain",
)
"""The figures the summary compares as structured / full."""

DRIFTS = {"batch_loss": "loss_change_per_log_gain", "held_out": "held_out_per_log_gain"}
"""The drifts at equal gain the verdict reads."""


def _summary(tau: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the models of structured / full, per figure, at ``tau``."""
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["tau"] == tau and "gain" in row:
            by_model.setdefault(row["model"], {})[row["gradient"]] = row
    per_model = {}
    for model, paths in by_model.items():
        if set(GRADIENTS) <= set(paths):
            structured, full = paths["structured"], paths["full"]
            per_model[model] = {key: _ratio(structured[key], full[key]) for key in RATIOS}
    medians: dict[str, Any] = {}
    for key in RATIOS:
        values = [ratios[key] for ratios in per_model.values() if ratios[key] is not None]
        medians[key] = statistics.median(values) if values else None
        medians[f"{key}_models"] = len(values)
    drifts_less = {drift: _winner(medians[key]) for drift, key in DRIFTS.items()}
    by_winner = {
        drift: {
            winner: [model for model, ratios in per_model.items() if _winner(ratios[key]) == winner]
            for winner in (*GRADIENTS, "tie")
        }
        for drift, key in DRIFTS.items()
    }
    return {
        "tau": tau,
        "models": len(per_model),
        "structured_over_full": medians,
        "per_model": per_model,
        "drifts_less": drifts_less,
        "models_drifting_less": by_winner,
        "verdict": _verdict(tau, len(per_model), medians, drifts_less, by_winner),
    }


def _winner(ratio: float | None) -> str | None:
    """Which path drifts less, from the median ratio structured / full of a drift at equal gain."""
    if ratio is None:
        return None
    if ratio < 1 - TIE:
        return "structured"
    if ratio > 1 + TIE:
        return "full"
    return "tie"


def _verdict(
    tau: float, models: int, medians: dict[str, Any], drifts_less: dict, by_winner: dict
) -> str:
    def fmt(key: str) -> str:
        value = medians[key]
        return "n/a" if value is None else f"{value:.3g}x"

    figures = (
        f"tau = {tau:g}, structured / full (median over {models} models): "
        f"batch-loss change {fmt('loss_change')}, held-out change {fmt('held_out_change')}, "
        f"gain {fmt('gain')}; per unit of log gain: batch loss "
        f"{fmt('loss_change_per_log_gain')}, held-out {fmt('held_out_per_log_gain')}"
    )
    counts = ", ".join(
        f"{label} {len(by_winner[drift]['structured'])} / {len(by_winner[drift]['full'])}"
        for drift, label in (("batch_loss", "batch loss"), ("held_out", "held-out"))
    )
    return (
        f"{figures} -> {_reading(drifts_less)}; models where structured / full drifts less "
        f"at equal gain: {counts}"
    )


def _reading(drifts_less: dict[str, str | None]) -> str:
    batch, held = drifts_less["batch_loss"], drifts_less["held_out"]
    if batch is None and held is None:
        return "no comparison (no model grew its gradient norm on both paths)"
    if batch == held:
        if batch == "tie":
            return f"neither path drifts less at equal gain (within {TIE:.0%})"
        return f"{batch} drifts less at equal gain (batch and held-out loss)"
    return f"at equal gain: batch loss {batch or 'n/a'}, held-out loss {held or 'n/a'}"


def _overall(summary: list[dict[str, Any]]) -> str:
    taus = ", ".join(f"{entry['tau']:g}" for entry in summary)
    readings = {_reading(entry["drifts_less"]) for entry in summary}
    if len(readings) == 1:
        return f"at every tau measured ({taus}): {readings.pop()}"
    parts = "; ".join(f"tau = {e['tau']:g}: {_reading(e['drifts_less'])}" for e in summary)
    return f"depends on tau: {parts}"


def _plot(rows: list[dict[str, Any]], taus: list[float], path: Path) -> None:
    plt = pyplot()
    measured = [row for row in rows if "gain" in row]
    names = list(dict.fromkeys(row["model"] for row in measured))
    table = {(row["model"], row["tau"], row["gradient"]): row for row in measured}
    bars = [(tau, gradient) for tau in taus for gradient in GRADIENTS]
    figure, axes = plt.subplots(3, 1, figsize=(max(7.0, 1.3 * len(names) + 3), 9.5), sharex=True)
    panels = (
        ("loss_change", "batch loss, relative change"),
        ("held_out_change", "held-out loss, relative change"),
        ("gain", "gradient-norm gain"),
    )
    width = 0.8 / len(bars)
    colours = plt.get_cmap("tab20").colors
    for ax, (key, label) in zip(axes, panels, strict=True):
        values = []
        for i, (tau, gradient) in enumerate(bars):
            offset = (i - (len(bars) - 1) / 2) * width
            heights = []
            for name in names:
                row = table.get((name, tau, gradient))
                value = row[key] if row is not None else float("nan")
                heights.append(max(value, FLOOR) if key != "gain" else value)
            values += [h for h in heights if math.isfinite(h)]
            ax.bar(
                [p + offset for p in range(len(names))],
                heights,
                width,
                color=colours[i % len(colours)],
                hatch="" if gradient == "structured" else "//",
                label=f"{gradient}, tau = {tau:g}",
            )
        positive = [v for v in values if v > 0]
        if positive and (key != "gain" or max(positive) / min(positive) > 10):
            ax.set_yscale("log")
        if key == "gain":
            ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].set_title("gradient paths, svd null space (medians over seeds)", fontsize="medium")
    axes[-1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    save_figure(figure, path)


def _print(models, rows, summary, verdict) -> None:
    header = (
        f"{'model':>24} {'tau':>6} {'gradient':>10} {'batch loss':>10} {'held-out':>10} "
        f"{'gain':>8} {'steps':>5} {'stopped':>12} {'rolled':>6} {'paths':>17} {'seconds':>8}"
    )
    print(header)
    for row in rows:
        lead = f"{row['model']:>24} {row['tau']:>6g} {row['gradient']:>10}"
        if "gain" not in row:
            print(f"{lead} error: {row.get('error')}")
            continue
        print(
            f"{lead} {row['loss_change']:>10.2e} {row['held_out_change']:>10.2e} "
            f"{row['gain']:>8.4g} {row['steps']:>5g} {'+'.join(row['stopped']):>12} "
            f"{row['rolled_back']:>6} {'+'.join(row['paths']):>17} {row['seconds']:>8.3f}"
            + (f"  ({row['error']})" if "error" in row else "")
        )
    for info in models:
        if "error" in info or "skipped" in info:
            print(f"{info['model']:>24}: {info.get('error') or info.get('skipped')}")
    for entry in summary:
        print(entry["verdict"])
    print(verdict)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_gradient_paths)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_gradient_paths))
