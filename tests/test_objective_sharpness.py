"""The sharpness objective: its gradient against finite differences, its definition (mean loss over
radii and unit Gaussian directions) and descending it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_gradient_matches_finite_differences, leaky_mlp_problem
from hypothesis import given, settings
from torch import nn
from torch.nn.functional import cross_entropy

import torch_teleport as tt
from torch_teleport.objectives.sharpness import Sharpness, measure_sharpness, perturbed_loss
from torch_teleport.testing import mlp_problems


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_sharpness_gradient_matches_finite_differences(problem):
    objective = Sharpness(radii=(0.05, 0.1), directions=2, seed=problem.seed % 1000)
    assert_gradient_matches_finite_differences(objective, problem, problem.seed)


def test_sharpness_is_the_mean_over_radii_and_unit_gaussian_directions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (7,))
    radii = (0.1, 0.3)
    generator = torch.Generator().manual_seed(11)
    params = dict(model.named_parameters())
    expected = []
    for _ in range(3):
        draws = {n: torch.randn(p.shape, generator=generator, dtype=torch.float64) for n, p in params.items()}
        norm = torch.sqrt(sum(d.square().sum() for d in draws.values()))
        for r in radii:
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for n, p in moved.named_parameters():
                    p.add_(r * draws[n] / norm)
                expected.append(float(cross_entropy(moved(x), y)))
    with torch.no_grad():
        value = perturbed_loss(model, cross_entropy, x, y, radii=radii, directions=3, seed=11)
    assert float(value) == pytest.approx(sum(expected) / len(expected), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_descending_sharpness_lowers_measured_sharpness(seed):
    model, x, y = leaky_mlp_problem(seed)
    radii = (0.5, 1.0, 1.5)
    # measured with directions the teleport never saw
    before = measure_sharpness(model, cross_entropy, [(x, y)], radii=radii, seed=100)
    tele = tt.Teleporter(model, cross_entropy, objective=Sharpness(radii=radii, directions=4), steps=10, lr=0.05, null_space="exact")
    report = tele.teleport(x, y)
    after = measure_sharpness(model, cross_entropy, [(x, y)], radii=radii, seed=100)
    assert report.objective_after < report.objective_before
    assert after < before - 1e-3, (before, after)
    assert report.loss_change < 1e-10
