"""What the benchmarks share: settings, timing, the machine, models, output files and the script entry."""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from torch_teleport import Teleporter
from torch_teleport.coverage import capture_inputs
from torch_teleport.lab.config import Option, Table, apply_overrides, at_least, one_of, resolve
from torch_teleport.lab.data import DataSplits
from torch_teleport.lab.experiment import build_optimizer, generator, seed_everything, write_json
from torch_teleport.model_state import preserved_state
from torch_teleport.registry import Registry, default_registry

COMMON = {
    "kind": Option(None, str),
    "size": Option("full", str, check=one_of("full", "tiny")),
    "threads": Option(1, int, check=at_least(0)),
    "device": Option("cpu", str),
    "figures": Option(None, str),
}
"""Keys every benchmark takes: ``size = "tiny"`` swaps in small defaults (for tests), ``threads = 0``
leaves torch's thread count alone, ``figures`` is where the PNG goes (default: the output folder)."""

LEAKY_SLOPE = 0.1
"""The LeakyReLU slope of the symmetry-teleport references."""


def settings(config: dict[str, Any], full: dict[str, Any], tiny: dict[str, Any]) -> dict[str, Any]:
    """``config`` checked against a benchmark's options.

    Defaults are ``full``, or ``tiny`` where ``size = "tiny"``.
    """
    defaults = {**full, **(tiny if config.get("size") == "tiny" else {})}
    schema = Table({**COMMON, **{name: _option(value) for name, value in defaults.items()}})
    return resolve(config, schema)


def _option(default: Any) -> Option:
    if isinstance(default, list):
        return Option(default, list, items=type(default[0]) if default else None)
    return Option(default, type(default))


def restores_threads(runner: Callable[[dict, Path], None]) -> Callable[[dict, Path], None]:
    """``runner`` with torch's thread count restored afterwards (:func:`prepare` changes it)."""

    @functools.wraps(runner)
    def run(config: dict, out_dir: Path) -> None:
        threads = torch.get_num_threads()
        try:
            runner(config, out_dir)
        finally:
            torch.set_num_threads(threads)

    return run


def prepare(options: dict[str, Any]) -> torch.device:
    """Apply the thread setting and return the device, checked."""
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    device = torch.device(options["device"])
    torch.empty(0, device=device)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> tuple[Callable[[], float], str]:
    """The timer benchmarks use, and its name.

    On a CPU it is the process's CPU time: on a machine shared with other
    work, wall-clock time mostly measures the other work (time slices this
    process waits), while CPU time of a fixed-thread process measures this
    one. A GPU's work is not CPU time, so there it is wall-clock time after
    a synchronisation.
    """
    if device.type == "cpu":
        return time.process_time, "process CPU time"
    return time.perf_counter, "wall-clock time (synchronised)"


def interleaved_medians(
    tasks: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds (see :func:`clock`) of each task; the tasks take turns in every repeat, after
    ``warmup`` untimed rounds.

    Taking turns spreads changes in machine load over all tasks alike, which
    keeps ratios between them meaningful on a shared machine.
    """
    timer, _ = clock(device)
    for _ in range(warmup):
        for task in tasks.values():
            task()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            started = timer()
            task()
            synchronize(device)
            times[name].append(timer() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def growth_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
    """The slope of ``log seconds`` against ``log size`` (least squares): time grows like size**slope."""
    slope, _ = np.polyfit(np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float)), 1)
    return float(slope)


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "clock": clock(device)[1],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        listing = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    for line in listing.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or platform.machine()


def leaky_mlp(widths: Sequence[int], registry: Registry | None = None) -> nn.Sequential:
    """The registry's MLP with widths ``widths`` (input, hidden..., output) and LeakyReLU(0.1).

    LeakyReLU is invertible, so symmetry teleport applies to it too.
    """
    registry = registry or default_registry()
    model = registry.get("model", "mlp")(
        input_dim=widths[0],
        hidden=list(widths[1:-1]),
        output_dim=widths[-1],
        activation="leaky_relu",
    )
    for module in model.modules():
        if isinstance(module, nn.LeakyReLU):
            module.negative_slope = LEAKY_SLOPE
    return model


def train_briefly(
    model: nn.Module,
    loss_fn,
    splits: DataSplits,
    *,
    epochs: int,
    lr: float,
    seed: int,
    device: torch.device,
    optimizer: str = "sgd",
) -> nn.Module:
    """``model`` trained in place (batch 32) for ``epochs``: a "trained" starting point to teleport."""
    seed_everything(seed)
    loader = DataLoader(splits.train, batch_size=32, shuffle=True, generator=generator(seed, 0))
    optimizer = build_optimizer(optimizer, model.parameters(), lr)
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(inputs.to(device)), targets.to(device)).backward()
            optimizer.step()
    return model


def teleport_loader(splits: DataSplits, options: dict[str, Any]) -> DataLoader:
    """Shuffled training batches of ``options["batch"]``; one place so benchmarks teleport on the same data."""
    return DataLoader(
        splits.train,
        batch_size=options["batch"],
        shuffle=True,
        generator=generator(options["seed"], 1),
    )


def representations(teleporter: Teleporter, inputs: Tensor) -> dict[str, Tensor]:
    """Every site's representation on ``inputs``, built by the projectors of a null-space teleporter.

    The model runs once in eval mode without a graph; hooks are removed and
    the mode restored, also on error.
    """
    coverage = teleporter.mover.coverage
    with preserved_state(teleporter.model):
        captured = capture_inputs(coverage, teleporter.model, inputs)
    return {
        covered.qualified(site.name): covered.projector.representation(
            covered.module, site, captured[(covered.name, site.stream)]
        ).detach()
        for covered in coverage.modules
        for site in covered.sites
        if captured.get((covered.name, site.stream))
    }


def write_outputs(
    name: str, out_dir: Path, options: dict[str, Any], device: torch.device, results: dict
) -> Path:
    """``out_dir/<name>.json`` with the settings and the machine; returns where the figure goes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / f"{name}.json",
        {"benchmark": name, "settings": options, "machine": machine(device), **results},
    )
    figures = Path(options["figures"]) if options["figures"] else out_dir
    figures.mkdir(parents=True, exist_ok=True)
    return figures / f"bench_{name}.png"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RESULTS = Path(__file__).resolve().parent / "results"
"""Where a benchmark run as a script writes its JSON: ``lab/benchmarks/results`` in a checkout."""

FIGURES = Path(__file__).resolve().parents[2] / "docs" / "figures"
"""Where a benchmark run as a script draws its figure: ``docs/figures`` in a checkout."""


def script_main(name: str, run: Callable[[dict, Path], None], argv: Sequence[str] | None = None) -> int:
    """``python -m torch_teleport.lab.benchmarks.<name>``: the ``bench.<name>`` experiment, into the checkout."""
    parser = argparse.ArgumentParser(
        description=f"run the {name} benchmark (as `teleport bench {name}`)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figures", type=Path, default=FIGURES)
    args = parser.parse_args(argv)
    config = apply_overrides(
        {"kind": f"bench.{name}", "figures": str(args.figures)}, args.overrides
    )
    run(config, args.out)
    figure = Path(config["figures"]) / f"bench_{name}.png"
    print(f"results in {args.out / (name + '.json')}, figure in {figure}")
    return 0
