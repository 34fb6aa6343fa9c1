"""What every experiment kind shares: seeds, optimizers, loaders, logs, figures and tables.

Experiment kinds (``train``, benchmarks, later architectures) differ in
what they run; they should not differ in how a run is seeded, how an
optimizer is named in a config, or how curves and tables are written.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from torch_teleport.objective import LossFn
from torch_teleport.registry import UnknownPluginError

from .data import DataSplits

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "momentum": functools.partial(torch.optim.SGD, momentum=0.9),
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "rmsprop": torch.optim.RMSprop,
}
"""Optimizers by config name; ``momentum`` is SGD with momentum 0.9 unless options say otherwise."""


def build_optimizer(
    name: str,
    parameters: Iterable[nn.Parameter],
    lr: float,
    options: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (see :data:`OPTIMIZERS`) with learning rate ``lr`` and ``options``."""
    if name not in OPTIMIZERS:
        raise UnknownPluginError(
            f"unknown optimizer {name!r}; registered: {', '.join(sorted(OPTIMIZERS))}"
        )
    return OPTIMIZERS[name](parameters, lr=lr, **(options or {}))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so model initialisation is a function of ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(seed: int, stream: int) -> torch.Generator:
    """An independent torch generator for one random stream (shuffling, teleport batches) of a seed."""
    state = np.random.SeedSequence([seed % 2**63, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class Loaders:
    """Shuffled training and teleport batches, and in-order evaluation passes over both splits."""

    train: DataLoader
    teleport: DataLoader
    eval_train: DataLoader
    eval_test: DataLoader


def make_loaders(
    splits: DataSplits,
    *,
    batch_size: int,
    teleport_batch_size: int,
    eval_batch_size: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
) -> Loaders:
    """Data loaders for one run; the shuffles of training and teleport batches are drawn from ``seed``.

    The teleport loader has its own random stream, so runs with and without
    teleport see the same training batches in the same order. Under data
    parallelism rank ``rank`` of ``world`` trains and teleports on every
    ``world``-th training sample from ``rank`` on, with streams of its own;
    evaluation passes cover the whole splits on every rank.
    """
    shard = (
        splits.train if world == 1 else Subset(splits.train, range(rank, len(splits.train), world))
    )
    return Loaders(
        train=DataLoader(
            shard, batch_size=batch_size, shuffle=True, generator=generator(seed, 2 * rank)
        ),
        teleport=DataLoader(
            shard,
            batch_size=teleport_batch_size,
            shuffle=True,
            generator=generator(seed, 2 * rank + 1),
        ),
        eval_train=DataLoader(splits.train, batch_size=eval_batch_size),
        eval_test=DataLoader(splits.test, batch_size=eval_batch_size),
    )


def evaluate_loss(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], loss_fn: LossFn, device: torch.device
) -> float:
    """Mean of ``loss_fn`` over every sample of ``loader`` in eval mode; the model's mode is restored."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                total += float(loss_fn(model(inputs), targets)) * len(targets)
                count += len(targets)
    finally:
        model.train(was_training)
    return total / count


def summary_writer(log_dir: Path, resume_step: int | None = None):
    """A TensorBoard ``SummaryWriter`` for one run; event files of an earlier run there are removed.

    A resumed run (``resume_step`` given) keeps them and drops only what was
    logged after that step.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        for stale in log_dir.glob("events.out.tfevents.*"):
            stale.unlink()
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step)


def progress_bar(total: int, description: str, unit: str = "it", disable: bool = False):
    """The tqdm bar experiments show while they run (``disable`` on ranks other than 0)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, disable=disable)


# -- numbers ----------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 4) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}g} ± {std:.{digits - 2}g}" if len(values) > 1 else f"{mean:.{digits}g}"


def first_reaching(values: Sequence[float], target: float) -> int | None:
    """Index of the first value at or below ``target`` (``None`` if none is)."""
    return next((i for i, value in enumerate(values) if value <= target), None)


# -- files ------------------------------------------------------------------------
def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON; non-finite numbers (a diverged run) are written as ``null``."""
    path.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(figure: Any, path: Path) -> None:
    """Lay out, write at 120 dpi and close ``figure``; one place so every plot is saved alike."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


Curves = Mapping[str, Mapping[str, Mapping[str, Sequence[Sequence[float]]]]]
"""``curves[row][panel][line]`` = one curve per seed, e.g. ``curves["train loss"]["sgd"]["teleport"]``."""


def plot_curves(curves: Curves, path: Path, *, xlabel: str = "epoch", log_y: bool = True) -> None:
    """A grid of panels (rows x panels), each line drawn as its mean over seeds with a +-1 std band.

    The layout of the paper's Fig. 2: one panel per optimizer, lines with
    and without teleport, shaded spread across seeds.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(curves)
    panels = list(dict.fromkeys(panel for row in rows for panel in curves[row]))
    figure, axes = plt.subplots(
        len(rows), len(panels), figsize=(3.6 * len(panels), 3.0 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            for line, per_seed in curves[row].get(panel, {}).items():
                values = np.asarray(per_seed, dtype=float)
                mean = values.mean(axis=0)
                std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
                x = np.arange(len(mean))
                ax.plot(x, mean, label=line)
                ax.fill_between(x, mean - std, mean + std, alpha=0.25)
            if log_y:
                ax.set_yscale("log")
            ax.set_title(panel if r == 0 else "")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(row if c == 0 else "")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    save_figure(figure, path)
