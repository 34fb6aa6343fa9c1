"""Study: do sharpness and curvature predict validation loss? (the paper's Table 1, Figs. 9-10)

Trains ``models`` LeakyReLU MLPs that differ only in their seed
(initialisation and batch order), then measures on each its sharpness phi,
curvature psi, training loss and validation loss (the test split), and
reports the correlation coefficients (Pearson and Spearman, with their
sign) of phi and psi with the validation loss and the generalisation gap.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from torch_teleport import hookimpl
from torch_teleport.lab.config import Option, Table, at_least, one_of, resolve
from torch_teleport.lab.experiment import (
    markdown_table,
    progress_bar,
    save_figure,
    seed_everything,
)
from torch_teleport.registry import default_registry

from .common import (
    DATASET,
    MEASURE,
    MODEL,
    THREADS,
    TRAINING,
    correlation,
    leaky_mlp,
    load_data,
    measure,
    plain_trainer,
    pyplot,
    random_batches,
    study_loaders,
    threads,
    train_epochs,
    train_val_losses,
    write_outputs,
)

KIND = "study_correlation"
METRICS = ("sharpness", "curvature")
TARGETS = {"validation loss": "val_loss", "generalisation gap": "gap"}

SCHEMA = Table(
    {
        "kind": Option(KIND, str, check=one_of(KIND)),
        "threads": THREADS,
        "dataset": DATASET,
        "model": MODEL,
        "training": Table(
            {
                **TRAINING,
                "models": Option(24, int, check=at_least(3)),
                "first_seed": Option(0, int),
                "epochs": Option(20, int, check=at_least(1)),
            }
        ),
        "measure": MEASURE,
    }
)


def run_correlation(config: dict[str, Any], out_dir: Path) -> None:
    """Train the models, measure them, write the correlation table and the scatter plots."""
    config = resolve(config, SCHEMA)
    with threads(config["threads"]):
        _run(config, Path(out_dir))


def _run(config: dict[str, Any], out_dir: Path) -> None:
    training, options = config["training"], config["measure"]
    splits, data_note = load_data(config["dataset"], default_registry())
    out_dir.mkdir(parents=True, exist_ok=True)
    print(data_note)
    batches = random_batches(splits.train, options["batches"], options["batch_size"], options["seed"])
    models = []
    started = time.perf_counter()
    with progress_bar(training["models"], "models", unit="model") as bar:
        for seed in range(training["first_seed"], training["first_seed"] + training["models"]):
            seed_everything(seed)
            model = leaky_mlp(splits, **config["model"])
            loaders = study_loaders(splits, training, seed)
            train_epochs(plain_trainer(model, training), loaders, training["epochs"])
            losses = train_val_losses(model, loaders)
            train_loss, val_loss = losses["train"], losses["val"]
            models.append(
                {"seed": seed, "train_loss": train_loss, "val_loss": val_loss, "gap": val_loss - train_loss}
                | measure(model, batches, options)
            )
            bar.update(1)
    correlations = {
        metric: {target: correlation([m[metric] for m in models], [m[key] for m in models]) for target, key in TARGETS.items()}
        for metric in METRICS
    }
    rows = [
        [metric, target, f"{values['pearson']:+.3f}", f"{values['p_value']:.2g}", f"{values['spearman']:+.3f}"]
        for metric, by_target in correlations.items()
        for target, values in by_target.items()
    ]
    spread = [
        [name, f"{min(m[key] for m in models):.4g}", f"{max(m[key] for m in models):.4g}"]
        for name, key in (("sharpness", "sharpness"), ("curvature", "curvature"), ("validation loss", "val_loss"), ("generalisation gap", "gap"))
    ]
    notes = [
        data_note,
        f"{training['models']} MLPs ({_architecture(splits, config['model'])}), "
        f"{training['epochs']} epochs of {training['optimizer']} (lr {training['lr']}, batch {training['batch_size']}), "
        f"seeds {training['first_seed']}..{training['first_seed'] + training['models'] - 1}; "
        f"measured on {options['batches']} training batches of {options['batch_size']}; "
        f"{time.perf_counter() - started:.0f} s.",
    ]
    markdown = write_outputs(
        out_dir,
        title="Correlation of sharpness and curvature with validation loss",
        notes=notes,
        tables=[markdown_table(["measure", "against", "Pearson r", "p-value", "Spearman rho"], rows), markdown_table(["quantity", "min", "max"], spread)],
        data={"config": config, "dataset": splits.description, "correlations": correlations, "models": models},
    )
    _scatter(models, correlations, out_dir / "correlation.png")
    print(markdown, end="")


def _architecture(splits, model: dict[str, Any]) -> str:
    widths = [str(math.prod(splits.input_shape)), *map(str, model["hidden"]), str(splits.num_classes)]
    return f"{'-'.join(widths)}, LeakyReLU({model['negative_slope']})"


def _scatter(models: list[dict], correlations: dict, path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(len(TARGETS), len(METRICS), figsize=(8, 6.5), squeeze=False)
    for row, (target, key) in enumerate(TARGETS.items()):
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            ax.scatter([m[metric] for m in models], [m[key] for m in models], s=14)
            r = correlations[metric][target]["pearson"]
            ax.set_title(f"{metric} vs {target}: r = {r:+.2f}", fontsize="medium")
            ax.set_xlabel(f"{metric} ({'phi' if metric == 'sharpness' else 'psi'})")
            ax.set_ylabel(target)
            ax.grid(alpha=0.3)
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(KIND, run_correlation)
