"""``bench.error_control``: how much room each layer has, and what tau buys and costs.

The paper's Fig. 6 as a measurement, on models trained briefly on
scikit-learn's digits (an MLP, the CNN, the sequence Transformer):

(a) per layer (every projector site), the fraction of the input energy
    ``||R||_F^2`` of the teleport batch captured by the top singular
    vectors, against the fraction of input dimensions they span, and the
    core rank each ``tau`` keeps;
(b) the teleport-batch loss and gradient norm at every step of one teleport
    for several ``tau`` (``tau = 1`` is the exact null space) and step sizes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from torch_teleport import Limits, Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    prepare,
    pyplot,
    representations,
    restores_threads,
    script_main,
    settings,
    teleport_loader,
    train_briefly,
    write_outputs,
)
from torch_teleport.lab.experiment import save_figure, seed_everything
from torch_teleport.null_space import spectrum
from torch_teleport.registry import default_registry

NAME = "error_control"
CURVE_POINTS = 100
"""Points per cumulative-energy curve in the JSON."""

MODELS: dict[str, dict[str, Any]] = {
    "mlp": {
        "dataset": "digits",
        "options": {"input_dim": 64, "hidden": [128, 128]},
        "optimizer": "sgd",
        "lr": 0.05,
    },
    "cnn": {
        "dataset": "digits",
        "options": {"in_channels": 1, "image_size": 8},
        "optimizer": "sgd",
        "lr": 0.05,
    },
    "transformer_classifier": {
        "dataset": "digits_sequence",
        "options": {"input_dim": 8, "seq_len": 8},
        "optimizer": "adam",
        "lr": 1e-3,
    },
}
"""The trained models, their offline data and how they are trained."""

FULL = {
    "models": list(MODELS),
    "trajectory_model": "transformer_classifier",
    "train_epochs": 5,
    "batch": 32,
    "taus": [1.0, 0.999, 0.99, 0.9],
    "steps": 16,
    "lrs": [0.02, 0.002],
    "seed": 0,
}
TINY = {
    "models": ["mlp"],
    "trajectory_model": "mlp",
    "train_epochs": 1,
    "taus": [1.0, 0.9],
    "steps": 2,
    "lrs": [0.02],
}


@restores_threads
def run_error_control(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    registry = default_registry()
    unknown = sorted(set(options["models"]) - set(MODELS))
    if unknown or options["trajectory_model"] not in options["models"]:
        raise ValueError(
            f"models must be among {sorted(MODELS)} and include trajectory_model; got {options['models']} "
            f"and {options['trajectory_model']!r}"
        )
    null_spaces = {
        tau: registry.get("null_space", "exact" if tau == 1 else "svd")(tau=tau)
        for tau in options["taus"]
    }
    layers, trajectories = {}, {}
    for name in options["models"]:
        print(f"error control: {name}", flush=True)
        model, inputs, targets = _trained(name, options, device, registry)
        teleporter = Teleporter(model, F.cross_entropy, uncovered="freeze", registry=registry)
        layers[name] = [
            _energy(site, representation, null_spaces)
            for site, representation in representations(teleporter, inputs).items()
        ]
        if name == options["trajectory_model"]:
            trajectories = _trajectories(model, inputs, targets, options, registry)
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "energy": "cumulative squared singular values of each site's representation "
            "on one teleport batch",
            "layers": layers,
            "trajectory_model": options["trajectory_model"],
            "trajectories": trajectories,
        },
    )
    _plot(layers, trajectories, options["trajectory_model"], figure)
    for name, sites in layers.items():
        for site in sites:
            ranks = ", ".join(f"tau {tau}: {rank}" for tau, rank in site["core_rank"].items())
            print(
                f"{name:>24} {site['site']:<36} {site['dims']:>5} dims, "
                f"{site['samples']:>5} samples; core rank {ranks}"
            )
    for lr, by_tau in trajectories.items():
        for tau, run in by_tau.items():
            print(
                f"lr {lr}, tau {tau}: loss {run['loss'][0]:.5g} -> {run['loss'][-1]:.5g}, "
                f"grad norm {run['grad_norm'][0]:.4g} -> {run['grad_norm'][-1]:.4g}"
            )


def _trained(name: str, options: dict, device: torch.device, registry):
    """The model trained briefly on its data, and one teleport batch from the training split."""
    spec = MODELS[name]
    splits = registry.get("dataset", spec["dataset"])()
    seed_everything(options["seed"])
    model = registry.get("model", name)(**spec["options"]).to(device)
    train_briefly(
        model,
        F.cross_entropy,
        splits,
        epochs=options["train_epochs"],
        lr=spec["lr"],
        seed=options["seed"],
        device=device,
        optimizer=spec["optimizer"],
    )
    loader = teleport_loader(splits, options)
    inputs, targets = next(iter(loader))
    return model, inputs.to(device), targets.to(device)


def _energy(site: str, representation: torch.Tensor, null_spaces: dict) -> dict[str, Any]:
    spec = spectrum(representation)
    energy = spec.squared.sum(0).double()  # groups share one curve: their energies add up
    captured = (energy.cumsum(0) / energy.sum()).tolist()
    dims = spec.dims
    picks = sorted(
        {round(i * (len(captured) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)}
    )
    return {
        "site": site,
        "dims": dims,
        "samples": spec.samples,
        "dims_fraction": [(i + 1) / dims for i in picks],
        "energy_fraction": [captured[i] for i in picks],
        "core_rank": {
            str(tau): int(null.core_rank(spec).max()) for tau, null in null_spaces.items()
        },
    }


def _trajectories(
    model, inputs, targets, options: dict, registry
) -> dict[str, dict[str, dict[str, Any]]]:
    """Loss and gradient norm at every step of one teleport from the same point, per lr and tau."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for lr in options["lrs"]:
        for tau in options["taus"]:
            teleporter = Teleporter(
                copy.deepcopy(model),  # every run starts from the same trained point
                F.cross_entropy,
                null_space="exact" if tau == 1 else "svd",
                tau=tau,
                lr=lr,
                steps=options["steps"],
                uncovered="freeze",
                registry=registry,
                limits=Limits(drift=None),  # the drift is what this benchmark measures
            )
            report = teleporter.teleport(inputs, targets)
            runs.setdefault(str(lr), {})[str(tau)] = {
                "loss": [*report.losses, report.loss_after],
                "grad_norm": [*report.grad_norms, report.grad_norm_after],
                "stopped": report.stopped,
            }
    return runs


def _plot(layers: dict, trajectories: dict, trajectory_model: str, path: Path) -> None:
    plt = pyplot()
    columns = max(len(layers), 2)
    figure, grid = plt.subplots(2, columns, figsize=(4.6 * columns, 8.0), squeeze=False)
    for ax in grid[1][2:]:
        ax.set_visible(False)
    for ax in grid[0][len(layers) :]:
        ax.set_visible(False)
    for ax, (name, sites) in zip(grid[0], layers.items(), strict=False):
        for site in sites:
            ax.plot(
                site["dims_fraction"],
                site["energy_fraction"],
                label=f"{site['site']} ({site['dims']})",
            )
        ax.set_title(f"{name}: input energy captured", fontsize="medium")
        ax.set_xlabel("fraction of input dimensions (top singular vectors)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small")
    grid[0][0].set_ylabel("fraction of ||R||_F^2")
    loss_ax, grad_ax = grid[1][0], grid[1][1]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for style, (lr, by_tau) in zip(("-", "--", ":", "-."), trajectories.items(), strict=False):
        for colour, (tau, run) in zip(colours, by_tau.items(), strict=False):
            start = run["loss"][0]
            label = f"tau = {tau}, lr = {lr}"
            drift = [abs(value - start) / start for value in run["loss"]]
            loss_ax.plot(drift, style, color=colour, marker=".", label=label)
            grad_ax.plot(run["grad_norm"], style, color=colour, marker=".", label=label)
    loss_ax.set_yscale("symlog", linthresh=1e-7)
    grad_ax.set_yscale("log")
    loss_ax.set_title(
        f"{trajectory_model}: teleport-batch loss, relative change", fontsize="medium"
    )
    grad_ax.set_title(f"{trajectory_model}: gradient norm", fontsize="medium")
    for ax in (loss_ax, grad_ax):
        ax.set_xlabel("teleport step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="xx-small")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_error_control)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_error_control))
