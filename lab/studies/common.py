"""What the studies share: config tables, data, the LeakyReLU MLP, measurements and output files."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from torch_teleport import TeleportTrainer
from torch_teleport.lab.config import OPTIONS, Option, Table, at_least, non_empty, one_of, positive
from torch_teleport.lab.data import DataSplits
from torch_teleport.lab.experiment import (
    Loaders,
    build_optimizer,
    evaluate_loss,
    generator,
    make_loaders,
    write_json,
)
from torch_teleport.objectives.curvature import PAIRS, measure_curvature
from torch_teleport.objectives.sharpness import measure_sharpness
from torch_teleport.registry import Registry

PAPER_DATA = "MNIST, FashionMNIST and CIFAR-10"

DATASET = Table({"name": Option("digits", str), "root": Option("data", str), "options": OPTIONS})

MODEL = Table(
    {
        "hidden": Option([16, 10], list, items=int, check=non_empty),
        "negative_slope": Option(0.1, float, check=positive),
    }
)
"""The paper's small LeakyReLU MLP (784-16-10-10 on MNIST); input and output sizes come from the data."""

TRAINING = {
    "optimizer": Option("sgd", str),
    "lr": Option(0.01, float, check=positive),
    "batch_size": Option(20, int, check=at_least(1)),
    "eval_batch_size": Option(1024, int, check=at_least(1)),
}

MEASURE = Table(
    {
        "batches": Option(8, int, check=at_least(1)),
        "batch_size": Option(200, int, check=at_least(1)),
        "radii": Option([0.25, 0.5, 0.75, 1.0], list, items=float, check=non_empty),
        "directions": Option(8, int, check=at_least(1)),
        "generators": Option(8, int, check=at_least(1)),
        "pairs": Option("all", str, check=one_of(*PAIRS)),
        "seed": Option(12345, int),
    }
)
"""How sharpness and curvature are measured: on fixed random training batches."""


THREADS = Option(1, int, check=at_least(1))
"""CPU threads of a study: one is fastest for these small models on a shared 2-core machine."""


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run with ``count`` torch CPU threads, restoring the previous number afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_data(dataset: dict[str, Any], registry: Registry) -> tuple[DataSplits, str]:
    """The dataset a config names, and the line a study prints about it."""
    splits = registry.get("dataset", dataset["name"])(dataset["root"], **dataset["options"])
    note = f"data: {splits.description}"
    if dataset["name"] == "digits":
        note += f" (run on scikit-learn digits instead of the paper's {PAPER_DATA})"
    return splits, note


def leaky_mlp(splits: DataSplits, hidden: list[int], negative_slope: float) -> nn.Sequential:
    """Flatten, then Linear layers joined by LeakyReLU(``negative_slope``): curvature is defined on it."""
    widths = [int(np.prod(splits.input_shape)), *hidden, splits.num_classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


def study_loaders(splits: DataSplits, training: dict[str, Any], seed: int) -> Loaders:
    """Loaders batched as the ``training`` table says; one place so every study batches alike."""
    return make_loaders(
        splits,
        batch_size=training["batch_size"],
        teleport_batch_size=training["batch_size"],
        eval_batch_size=training["eval_batch_size"],
        seed=seed,
    )


def train_val_losses(model: nn.Module, loaders: Loaders) -> dict[str, float]:
    """Cross-entropy on the whole train and test splits; one place so every study measures alike."""
    return {
        "train": evaluate_loss(model, loaders.eval_train, F.cross_entropy, "cpu"),
        "val": evaluate_loss(model, loaders.eval_test, F.cross_entropy, "cpu"),
    }


def train_epochs(trainer: TeleportTrainer, loaders: Loaders, epochs: int) -> None:
    """``epochs`` passes over the shuffled training batches."""
    for _ in range(epochs):
        for inputs, targets in loaders.train:
            trainer.step(inputs, targets)
        trainer.end_epoch()


def plain_trainer(model: nn.Module, training: dict[str, Any]) -> TeleportTrainer:
    """A trainer without teleports, with the optimizer the ``training`` table names."""
    optimizer = build_optimizer(training["optimizer"], model.parameters(), training["lr"])
    return TeleportTrainer(model, F.cross_entropy, optimizer)


def random_batches(dataset: Dataset, count: int, batch_size: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` random batches of ``dataset``, the same for every model of a study."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator(seed, 2))
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append((batch[0], batch[1]))
            if len(batches) == count:
                break
    return batches


def measure(model: nn.Module, batches: list[tuple[Tensor, Tensor]], options: dict[str, Any]) -> dict[str, float]:
    """Sharpness phi and curvature psi of ``model`` on ``batches``."""
    return {
        "sharpness": measure_sharpness(
            model,
            F.cross_entropy,
            batches,
            radii=options["radii"],
            directions=options["directions"],
            seed=options["seed"],
        ),
        "curvature": measure_curvature(
            model,
            [inputs for inputs, _ in batches],
            generators=options["generators"],
            seed=options["seed"],
            pairs=options["pairs"],
        ),
    }


def correlation(x: list[float], y: list[float]) -> dict[str, float]:
    """Pearson's r (with its two-sided p-value) and Spearman's rho of two samples."""
    from scipy import stats

    pearson = stats.pearsonr(x, y)
    return {
        "pearson": float(pearson.statistic),
        "p_value": float(pearson.pvalue),
        "spearman": float(stats.spearmanr(x, y).statistic),
    }


def write_outputs(out_dir: Path, *, title: str, notes: list[str], tables: list[str], data: Any) -> str:
    """``table.md`` (title, notes, Markdown tables) and ``results.json`` in ``out_dir``; returns the Markdown."""
    parts = [f"# {title}\n", *(f"{note}\n" for note in notes), *tables]
    markdown = "\n".join(parts)
    (out_dir / "table.md").write_text(markdown, encoding="utf-8")
    write_json(out_dir / "results.json", data)
    return markdown


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
