"""Tiny runs of every study through the CLI, and the pieces the studies are built from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from torch import nn

from torch_teleport.lab.cli import main
from torch_teleport.lab.config import dumps_toml
from torch_teleport.lab.studies.displacement import (
    LINE,
    SPIKE,
    circle_distance,
    expected_displacement,
    parabola_distance,
)
from torch_teleport.lab.studies.learn_to_teleport import NullSpaceTeleport, Task
from torch_teleport.lab.train import prepare
from torch_teleport.objectives.curvature import Curvature
from torch_teleport.objectives.sharpness import Sharpness
from torch_teleport.registry import default_registry

MEASURE = {"batches": 1, "batch_size": 40, "radii": [0.5], "directions": 1, "generators": 2}

TINY = {
    "study_correlation": {
        "training": {"models": 3, "epochs": 1, "batch_size": 64},
        "measure": MEASURE,
    },
    "study_teleport_generalization": {
        "training": {"seeds": [0], "pretrain_epochs": 1, "epochs_after": 1, "batch_size": 64},
        "teleport": {"batches": 1, "steps": 2, "sharpness": {"directions": 1}, "curvature": {"generators": 2}},
        "measure": MEASURE,
    },
    "study_displacement": {
        "angles": 64,
        "parabola": {"radii": [1.0], "points": 3},
        "circle": {"radii": [0.1], "points": 3},
    },
    "study_optimizers": {
        "model": {"name": "mlp", "options": {"input_dim": 64, "hidden": [24], "output_dim": 10, "activation": "leaky_relu"}},
        "dataset": {"name": "digits"},
        "training": {
            "epochs": 1,
            "batch_size": 128,
            "seeds": [0],
            "target_loss": 1.0,
            "optimizers": [{"name": "sgd", "lr": 0.05}, {"name": "rmsprop", "lr": 0.001}],
        },
        "teleport": {
            "objective": "sharpness",
            "objective_options": {"radii": [0.2], "directions": 1},
            "batch_size": 16,
            "steps": 2,
            "schedule": {"name": "epochs", "options": {"epochs": [0], "batches": 1}},
        },
    },
    "study_learn_to_teleport": {
        "task": {"width": 6, "samples": 3},
        "gd": {"steps": 6, "test_seeds": [0]},
        "teleport": {"teleport_at": [0], "steps": 2},
        "meta": {"meta_runs": 1, "meta_steps": 4, "unroll": 2},
    },
}
PNGS = {
    "study_correlation": ["correlation.png"],
    "study_teleport_generalization": ["teleport_generalization.png"],
    "study_displacement": ["displacement.png"],
    "study_optimizers": ["loss_vs_epoch.png", "loss_vs_time.png"],
    "study_learn_to_teleport": ["learn_to_teleport.png"],
}
ON_DIGITS = {"study_correlation", "study_teleport_generalization", "study_optimizers"}



def _numbers(data):
    """Every number in a JSON document (``None`` counts: it is how non-finite numbers are written)."""
    if isinstance(data, dict):
        for value in data.values():
            yield from _numbers(value)
    elif isinstance(data, list):
        for value in data:
            yield from _numbers(value)
    elif data is None or (isinstance(data, int | float) and not isinstance(data, bool)):
        yield data


@pytest.mark.parametrize("kind", sorted(TINY))
def test_a_tiny_run_of_each_study_writes_its_table_json_and_figures(kind, tmp_path, capsys):
    config_path = tmp_path / "config.toml"
    config_path.write_text(dumps_toml({"kind": kind, **TINY[kind]}), encoding="utf-8")
    out = tmp_path / "run"
    assert main(["run", str(config_path), "--out", str(out)]) == 0
    markdown = (out / "table.md").read_text(encoding="utf-8")
    assert markdown.startswith("# ") and "|---|" in markdown
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    # the train experiment's summary writes None for "not applicable" (no teleport, no target)
    numbers = list(_numbers({k: v for k, v in results.items() if k not in ("config", "summary")}))
    assert numbers and all(n is not None and math.isfinite(n) for n in numbers)
    for name in PNGS[kind]:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert float(np.ptp(image)) > 0  # not a blank canvas
    if kind in ON_DIGITS:
        assert "instead of the paper's MNIST, FashionMNIST and CIFAR-10" in markdown
        assert "instead of the paper's" in capsys.readouterr().out


def test_the_studies_are_listed_as_experiment_kinds(capsys):
    assert main(["plugins"]) == 0
    listing = capsys.readouterr().out
    for name in [*TINY, "sharpness", "curvature", "log_grad_norm"]:
        assert name in listing


def test_a_study_config_with_a_bad_key_fails_before_running(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('kind = "study_correlation"\n[training]\nmodel = 3\n', encoding="utf-8")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "unknown key 'training.model'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


def test_the_objective_is_swapped_by_name_in_a_train_config():
    base = {
        "kind": "train",
        "model": {"name": "mlp", "options": {"input_dim": 64, "hidden": [8], "output_dim": 10, "activation": "leaky_relu"}},
        "dataset": {"name": "digits"},
        "training": {"epochs": 1, "optimizers": [{"name": "sgd", "lr": 0.1}]},
    }
    expected = {"sharpness": Sharpness, "curvature": Curvature}
    for name, cls in expected.items():
        config = {**base, "teleport": {"objective": name, "objective_options": {"seed": 3}}}
        setup = prepare(config, default_registry())
        objective = setup.build_teleporter(setup.build_model()).objective
        assert isinstance(objective, cls) and objective.seed == 3


# -- the pieces ------------------------------------------------------------------------


def test_expected_displacement_matches_the_closed_form_limits():
    # a straight line: E|r sin theta| / r = 2 / pi, for the flat parabola and a huge circle alike
    assert expected_displacement(parabola_distance, 0.0, 0.7, 4096) == pytest.approx(LINE, rel=1e-6)
    assert expected_displacement(circle_distance, 1e-9, 0.7, 4096) == pytest.approx(LINE, rel=1e-6)
    # a parabola far narrower than r: half the circle sees the spike, half the vertex
    assert expected_displacement(parabola_distance, 1e6, 1.0, 4096) == pytest.approx(SPIKE, abs=2e-3)


def test_parabola_distance_is_the_nearest_point_of_a_dense_sampling():
    generator = np.random.default_rng(0)
    points = generator.normal(size=(20, 2))
    assert np.abs(points).max() < 4  # so the nearest point of each lies within |x| <= 2 |p| < 8
    xs = np.linspace(-8, 8, 400_001)
    for curvature in (0.3, 2.0, 15.0):
        curve = np.stack([xs, curvature / 2 * xs**2], axis=1)
        dense = np.array([np.min(np.hypot(*(curve - point).T)) for point in points])
        exact = parabola_distance(points, curvature)
        assert np.all(exact <= dense + 1e-12)
        assert np.allclose(exact, dense, rtol=0, atol=1e-4)


def test_the_learned_teleport_direction_is_projected_onto_the_null_space():
    """A teleport step of the learned kind leaves the task loss unchanged and has the asked size."""
    task = Task.draw(3, width=6, samples=3, negative_slope=0.1)
    task.model.double()
    task.inputs, task.targets = task.inputs.double(), task.targets.double()
    weights = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    directions = {name: torch.randn(w.shape, generator=generator, dtype=torch.float64) for name, w in weights.items()}
    moved = NullSpaceTeleport(task, magnitude=0.05)(weights, directions)
    for name in weights:
        step = moved[name] - weights[name]
        assert float(step.norm()) == pytest.approx(0.05 * float(weights[name].norm()), rel=1e-10)
    before, after = float(task.loss(weights)), float(task.loss(moved))
    assert after == pytest.approx(before, rel=1e-10)


def test_study_mlps_are_the_ones_curvature_accepts():
    from torch_teleport.lab.datasets import digits
    from torch_teleport.lab.studies.common import leaky_mlp
    from torch_teleport.objectives.curvature import mlp_chain

    model = leaky_mlp(digits(), [16, 10], 0.1)
    chain = mlp_chain(model)
    assert [m.out_features for m in chain.linears] == [16, 10, 10]
    assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in chain.activations)


def test_configs_in_the_repository_are_valid_study_configs():
    import tomllib

    from torch_teleport.lab.config import resolve
    from torch_teleport.lab.studies import (
        correlation,
        displacement,
        learn_to_teleport,
        teleport_generalization,
    )

    configs = Path(__file__).resolve().parents[2] / "configs"
    schemas = {
        "study_correlation": correlation.SCHEMA,
        "study_teleport_generalization": teleport_generalization.SCHEMA,
        "study_displacement": displacement.SCHEMA,
        "study_learn_to_teleport": learn_to_teleport.SCHEMA,
    }
    for kind, schema in schemas.items():
        resolve(tomllib.loads((configs / f"{kind}.toml").read_text(encoding="utf-8")), schema)
    optimizers = tomllib.loads((configs / "study_optimizers.toml").read_text(encoding="utf-8"))
    optimizers.pop("threads")
    prepare({**optimizers, "kind": "train"}, default_registry())
