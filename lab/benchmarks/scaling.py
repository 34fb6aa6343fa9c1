"""``bench.scaling``: time of one teleport, null-space against symmetry teleport, as t, d, n, l, b vary.

The paper's Fig. 5 on LeakyReLU MLPs ``input - d x (l - 1) - classes``: one
teleport is ``b`` batches of ``n`` random samples, ``t`` ascent steps each.
Every sweep varies one of them around a base point; both methods are timed
in turns on copies of the same model, and each point reports the ratio
(symmetry / null-space). Growth exponents in ``d`` and ``n`` are least-squares
slopes of log time against log size. A separate point times the paper's
setting (784-1024-1024-10, n = 32, t = 8), the target of a 20x speed-up, with the
null-space method also on its full (double-backward) path there, for the figure before the
structured step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from torch_teleport import Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    growth_exponent,
    interleaved_medians,
    leaky_mlp,
    prepare,
    pyplot,
    restores_threads,
    script_main,
    settings,
    write_outputs,
)
from torch_teleport.lab.experiment import save_figure

NAME = "scaling"
METHODS = ("null_space", "symmetry")
TARGET_SPEEDUP = 20.0
SWEEPS = {"t": "steps", "d": "widths", "n": "batch_sizes", "l": "depths", "b": "batches"}
"""Each swept variable and the settings key listing its values."""

FULL = {
    "input_dim": 784,
    "classes": 10,
    "base_t": 8,
    "base_d": 512,
    "base_n": 32,
    "base_l": 3,
    "base_b": 1,
    "steps": [1, 2, 4, 8, 16],
    "widths": [128, 256, 512, 1024, 2048],
    "batch_sizes": [8, 16, 32, 64, 128],
    "depths": [2, 3, 4, 5],
    "batches": [1, 2, 4],
    "paper_d": 1024,
    "paper_n": 32,
    "paper_t": 8,
    "paper_l": 3,
    "repeats": 3,
    "warmup": 1,
    "lr": 1e-3,
}
TINY = {
    "input_dim": 16,
    "base_t": 2,
    "base_d": 8,
    "base_n": 4,
    "steps": [1, 2],
    "widths": [8, 16],
    "batch_sizes": [2, 4],
    "depths": [2, 3],
    "batches": [1, 2],
    "paper_d": 16,
    "paper_n": 4,
    "paper_t": 2,
    "repeats": 1,
    "warmup": 0,
}


@restores_threads
def run_scaling(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    base = {variable: options[f"base_{variable}"] for variable in SWEEPS}
    sweeps = {}
    for variable, key in SWEEPS.items():
        points = []
        for value in options[key]:
            point = {**base, variable: value}
            print(f"scaling: {variable} = {value}", flush=True)
            points.append({**point, **_time_point(point, options, device)})
        sweeps[variable] = points
    paper_point = {
        **{variable: options[f"paper_{variable}"] for variable in ("t", "d", "n", "l")},
        "b": 1,
    }
    print("scaling: the paper's setting", flush=True)
    paper = {**paper_point, **_time_point(paper_point, options, device, full_path=True)}
    exponents = {
        variable: {
            method: growth_exponent(
                [p[variable] for p in sweeps[variable]], [p[method] for p in sweeps[variable]]
            )
            for method in METHODS
        }
        for variable in ("d", "n")
    }
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "unit": "seconds per teleport (b batches x t steps), median of interleaved repeats",
            "sweeps": sweeps,
            "exponents": exponents,
            "paper_setting": paper,
            "target_speedup": TARGET_SPEEDUP,
            "target_met": paper["ratio"] >= TARGET_SPEEDUP,
        },
    )
    _plot(sweeps, figure)
    for variable, points in sweeps.items():
        ratios = ", ".join(f"{p[variable]}: {p['ratio']:.1f}x" for p in points)
        print(f"{variable}: symmetry / null-space = {ratios}")
    for variable, fitted in exponents.items():
        print(
            f"growth exponent in {variable}: "
            + ", ".join(f"{m} {e:.2f}" for m, e in fitted.items())
        )
    print(
        f"paper setting (d = {paper['d']}): symmetry / null-space = {paper['ratio']:.1f}x "
        f"(null-space on the full path: {paper['ratio_full_path']:.1f}x)"
    )


def _time_point(
    point: dict[str, int], options: dict, device: torch.device, full_path: bool = False
) -> dict[str, Any]:
    """Median seconds of one teleport (``b`` batches x ``t`` steps) for each method, and their ratio.

    With ``full_path`` the null-space method is timed a second time with ``gradient="full"``.
    """
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    widths = [options["input_dim"], *[point["d"]] * (point["l"] - 1), options["classes"]]
    model = leaky_mlp(widths).to(device)
    batches = [
        (
            torch.randn(point["n"], options["input_dim"], generator=generator).to(device),
            torch.randint(0, options["classes"], (point["n"],), generator=generator).to(device),
        )
        for _ in range(point["b"])
    ]
    teleporters = {
        method: Teleporter(
            copy.deepcopy(model), F.cross_entropy, method=method, lr=options["lr"], steps=point["t"]
        )
        for method in METHODS
    }
    if full_path:
        teleporters["null_space_full"] = Teleporter(
            copy.deepcopy(model),
            F.cross_entropy,
            lr=options["lr"],
            steps=point["t"],
            gradient="full",
        )
    reports: dict[str, list] = {method: [] for method in teleporters}

    def teleport(method: str):
        return lambda: reports[method].extend(
            teleporters[method].teleport(x, y) for x, y in batches
        )

    medians = interleaved_medians(
        {method: teleport(method) for method in teleporters},
        repeats=options["repeats"],
        warmup=options["warmup"],
        device=device,
    )
    result: dict[str, Any] = dict(medians)
    result["ratio"] = medians["symmetry"] / medians["null_space"]
    if full_path:
        result["ratio_full_path"] = medians["symmetry"] / medians["null_space_full"]
    for method in teleporters:
        last = reports[method][-1]
        result[f"{method}_steps"] = last.steps
        result[f"{method}_stopped"] = last.stopped
        result[f"{method}_loss_change"] = last.loss_change
    return result


def _plot(sweeps: dict[str, list[dict]], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(2, len(sweeps), figsize=(3.2 * len(sweeps), 5.6), squeeze=False)
    for column, (variable, points) in enumerate(sweeps.items()):
        values = [p[variable] for p in points]
        top, bottom = axes[0][column], axes[1][column]
        for method, label in (
            ("symmetry", "symmetry teleport"),
            ("null_space", "null-space teleport"),
        ):
            top.plot(values, [p[method] for p in points], marker="o", label=label)
        bottom.plot(values, [p["ratio"] for p in points], marker="o", color="black")
        bottom.axhline(1.0, color="grey", linewidth=1)
        for ax in (top, bottom):
            if variable in ("t", "d", "n"):
                ax.set_xscale("log", base=2)
            ax.set_xticks(values, [str(v) for v in values])
            ax.grid(alpha=0.3, which="both")
        top.set_yscale("log")
        bottom.set_xlabel(variable)
    axes[0][0].set_ylabel("seconds per teleport")
    axes[1][0].set_ylabel("symmetry / null-space")
    axes[0][0].legend(fontsize="small")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_scaling)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_scaling))
