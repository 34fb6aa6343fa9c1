"""Study: how the curvature of a minimum relates to its displacement under distribution shift (Fig. 7).

The paper's model: the minima form a curve ``gamma`` through the current
minimum ``w`` (the origin); a shift of the data distribution moves the
point of interest to a random ``w'`` at distance ``r`` from ``w``; the
displacement is ``dist(w', gamma)``. Its expectation over directions,
``E_theta dist((r cos theta, r sin theta), gamma) / r``, is computed as a
function of the curvature ``kappa`` of ``gamma`` at ``w`` for two curves:

* the parabola ``y = (kappa / 2) x^2`` (curvature ``kappa`` at the origin);
* the circle of radius ``1 / kappa`` through the origin, tangent to the x-axis.

Distances are exact (the parabola's nearest point solves a cubic; the
circle's is closed-form); the angle integral is the midpoint rule on
``angles`` points, exact to rounding for these smooth periodic integrands.
No data or network is involved, so the study is the same on every dataset.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from torch_teleport import hookimpl
from torch_teleport.lab.config import (
    ConfigError,
    Option,
    Table,
    at_least,
    non_empty,
    one_of,
    positive,
    resolve,
)
from torch_teleport.lab.experiment import markdown_table, save_figure

from .common import pyplot, write_outputs

KIND = "study_displacement"
LINE = 2 / math.pi
"""``E |sin theta|``: the expected displacement over ``r`` when the curve is a straight line."""
SPIKE = 0.5 + 1 / math.pi
"""The limit of a parabola much narrower than ``r``: half the circle sees the spike, half the vertex."""


def _curve_table(radii: list[float], low: float, high: float) -> Table:
    return Table(
        {
            "radii": Option(radii, list, items=float, check=non_empty),
            "curvature_min": Option(low, float),
            "curvature_max": Option(high, float, check=positive),
            "points": Option(41, int, check=at_least(2)),
        }
    )


SCHEMA = Table(
    {
        "kind": Option(KIND, str, check=one_of(KIND)),
        "angles": Option(2048, int, check=at_least(16)),
        "parabola": _curve_table([2.0, 1.0, 0.5, 0.2, 0.1], 0.0, 80.0),
        "circle": _curve_table([0.1, 0.05, 0.02, 0.01, 0.005], 0.1, 10.0),
    }
)


def parabola_distance(points: np.ndarray, curvature: float) -> np.ndarray:
    """Distance from each point (``N x 2``) to the parabola ``y = (curvature / 2) x^2``.

    The nearest ``x`` is a real root of ``2 a^2 x^3 + (1 - 2 a y) x - x_p = 0``
    (``a = curvature / 2``), found as eigenvalues of the companion matrices.
    """
    px, py = points[:, 0], points[:, 1]
    a = curvature / 2
    if a == 0:
        return np.abs(py)
    p = (1 - 2 * a * py) / (2 * a * a)
    q = -px / (2 * a * a)
    companion = np.zeros((len(points), 3, 3))
    companion[:, 0, 1] = -p
    companion[:, 0, 2] = -q
    companion[:, 1, 0] = 1
    companion[:, 2, 1] = 1
    roots = np.linalg.eigvals(companion)
    xs = np.where(np.abs(roots.imag) <= 1e-9 * (1 + np.abs(roots.real)), roots.real, np.nan)
    distances = np.hypot(xs - px[:, None], a * xs**2 - py[:, None])
    return np.nanmin(distances, axis=1)


def circle_distance(points: np.ndarray, curvature: float) -> np.ndarray:
    """Distance from each point to the circle of radius ``1 / curvature`` centred at ``(0, 1 / curvature)``."""
    radius = 1 / curvature
    return np.abs(np.hypot(points[:, 0], points[:, 1] - radius) - radius)


def expected_displacement(distance, curvature: float, r: float, angles: int) -> float:
    """``E_theta dist((r cos theta, r sin theta), gamma) / r`` by the midpoint rule."""
    theta = (np.arange(angles) + 0.5) * 2 * np.pi / angles
    points = r * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return float(distance(points, curvature).mean() / r)


CURVES = {"parabola": parabola_distance, "circle": circle_distance}


def run_displacement(config: dict[str, Any], out_dir: Path) -> None:
    """Tabulate and plot the expected displacement against curvature for both curves."""
    config = resolve(config, SCHEMA)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, distance in CURVES.items():
        options = config[name]
        low, high = options["curvature_min"], options["curvature_max"]
        if not 0 <= low < high or (name == "circle" and low == 0):
            raise ConfigError(
                f"{name}: need 0 <= curvature_min < curvature_max (and curvature_min > 0 for the circle), "
                f"got {low} and {high}",
                key=f"{name}.curvature_min",
            )
        grid = np.linspace(low, high, options["points"])
        results[name] = {
            "curvatures": grid.tolist(),
            "radii": options["radii"],
            "expected": [[expected_displacement(distance, k, r, config["angles"]) for k in grid] for r in options["radii"]],
        }
    rows = []
    for name, result in results.items():
        for r, values in zip(result["radii"], result["expected"], strict=True):
            k = result["curvatures"]
            lowest = int(np.argmin(values))
            rows.append(
                [name, f"{r:g}", f"{values[0]:.4f} (kappa {k[0]:g})", f"{values[lowest]:.4f} (kappa {k[lowest]:g})",
                 f"{values[-1]:.4f} (kappa {k[-1]:g})"]
            )
    notes = [
        "A geometric computation (no data): the same on every dataset.",
        f"Reference values: a straight line gives 2/pi = {LINE:.4f}; a parabola far narrower than r tends to "
        f"1/2 + 1/pi = {SPIKE:.4f}. {config['angles']} angles; {time.perf_counter() - started:.1f} s.",
    ]
    header = ["curve", "r", "E dist / r at the lowest kappa", "smallest E dist / r", "at the highest kappa"]
    markdown = write_outputs(
        out_dir,
        title="Expected displacement of a minimum against its curvature",
        notes=notes,
        tables=[markdown_table(header, rows)],
        data={"config": config, "line": LINE, "spike": SPIKE, "curves": results},
    )
    _plot(results, out_dir / "displacement.png")
    print(markdown, end="")


def _plot(results: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"parabola": "parabola y = (kappa/2) x^2", "circle": "circle of radius 1/kappa"}
    for ax, (name, result) in zip(axes, results.items(), strict=True):
        for r, values in zip(result["radii"], result["expected"], strict=True):
            ax.plot(result["curvatures"], values, label=f"r = {r:g}")
        ax.axhline(LINE, color="grey", linestyle=":", linewidth=1, label="straight line (2/pi)")
        ax.set_title(labels[name])
        ax.set_xlabel("curvature kappa at the minimum")
        ax.set_ylabel("E dist(w', gamma) / r")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(KIND, run_displacement)
