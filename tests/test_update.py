"""The projected update's algebra: per-module cuts, float64 norms, factored sites, and the step
that adds itself to the weights and takes itself back."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unchanged, snapshot
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.coverage import find_coverage
from torch_teleport.update import FactoredSite, MovedWeights, ProjectedStep, ProjectedUpdate

seeds = st.integers(0, 2**31 - 1)


def two_layers(seed: int, samples: int = 3):
    """A 5-4-3 MLP whose first layer takes a dense update and whose head a factored one (``samples``
    columns), drawn from ``seed``: the model, the update and each parameter's module."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    coverage = find_coverage(model, tt.default_registry())
    head = next(covered for covered in coverage.modules if covered.name == "2")

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    dense = {"0.weight": draw(4, 5), "0.bias": draw(4)}
    factored = FactoredSite(head, head.sites[0], draw(1, 3, samples), draw(1, samples, 5))
    module_of = {name: name.split(".")[0] for name, _ in model.named_parameters()}
    return model, ProjectedUpdate(dense, [factored]), module_of


def module_norms(update: ProjectedUpdate, scales: list[float]) -> dict[str, float]:
    """How far each module moves under ``scales`` (from the dense product of a factored part)."""
    first = math.sqrt(
        sum(
            float((s * u).square().sum())
            for s, u in zip(scales, update.dense.values(), strict=False)
        )
    )
    part = update.factored[0]
    return {"0": first, "2": abs(scales[-1]) * float((part.left @ part.right).norm())}


@given(
    seed=seeds,
    scale=st.floats(-4.0, 4.0).filter(lambda s: abs(s) > 1e-3),
    fractions=st.tuples(st.floats(0.05, 2.0), st.floats(0.05, 2.0)),
)
def test_a_module_that_would_move_beyond_its_limit_is_cut_to_it_with_one_factor_for_all_its_parts(
    seed, scale, fractions
):
    _, update, module_of = two_layers(seed)
    uncut = module_norms(update, [scale] * 3)
    limits = {
        module: fraction * uncut[module]
        for module, fraction in zip(("0", "2"), fractions, strict=True)
    }
    scales = update.scales(scale, module_of, limits)
    assert scales[0] == scales[1]  # the weight and the bias of module 0: one factor
    moved = module_norms(update, scales)
    for module, fraction in zip(("0", "2"), fractions, strict=True):
        if fraction < 1:
            assert moved[module] == pytest.approx(limits[module], rel=1e-12)
        else:
            assert moved[module] == pytest.approx(uncut[module], rel=1e-15)
    assert all(math.copysign(1.0, s) == math.copysign(1.0, scale) for s in scales)


def test_without_limits_or_with_a_zero_limit_nothing_is_cut():
    _, update, module_of = two_layers(0)
    assert update.scales(2.5, module_of, None) == [2.5] * 3
    assert update.scales(2.5, module_of, {"0": 0.0, "2": 0.0}) == [2.5] * 3  # a module of zero norm


def test_squares_are_taken_in_float64_where_float32_would_overflow():
    big = torch.full((4,), 1e20, dtype=torch.float32)
    update = ProjectedUpdate({"w": big}, [])
    assert update.squares == [pytest.approx(4e40, rel=1e-6)] and update.norm() == pytest.approx(
        2e20, rel=1e-6
    )
    model, _, _ = two_layers(0)
    coverage = find_coverage(model, tt.default_registry())
    head = coverage.modules[-1]
    part = FactoredSite(
        head, head.sites[0], big[:3].reshape(1, 3, 1), torch.cat([big, big[:1]]).reshape(1, 1, 5)
    )
    assert float(part.squared_norm()) == pytest.approx(15 * 1e80, rel=1e-6)


@given(
    seed=seeds,
    groups=st.integers(1, 3),
    rows=st.integers(1, 6),
    samples=st.integers(1, 5),
    inputs=st.integers(1, 7),
)
def test_a_factored_sites_squared_norm_is_the_dense_products(seed, groups, rows, samples, inputs):
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(groups, rows, samples, generator=generator, dtype=torch.float64)
    right = torch.randn(groups, samples, inputs, generator=generator, dtype=torch.float64)
    part = FactoredSite(None, None, left, right)
    dense = float((left @ right).square().sum())
    assert float(part.squared_norm()) == pytest.approx(dense, rel=1e-12)


def test_the_moved_weights_know_their_joint_norm_and_each_modules():
    model, _, module_of = two_layers(1)
    params = dict(model.named_parameters())
    weights = MovedWeights(params, module_of)
    flat = {
        m: torch.cat([p.detach().flatten() for n, p in params.items() if module_of[n] == m])
        for m in ("0", "2")
    }
    assert weights.module_norms == pytest.approx(
        {m: float(v.norm()) for m, v in flat.items()}, rel=1e-14
    )
    assert weights.reference == pytest.approx(
        float(torch.cat(list(flat.values())).norm()), rel=1e-14
    )


@given(
    seed=seeds,
    scale=st.floats(-2.0, 2.0).filter(lambda s: abs(s) > 1e-3),
    module_limit=st.one_of(st.none(), st.floats(0.01, 1.0)),
)
def test_a_step_adds_each_part_at_its_scale_and_its_undo_takes_it_back(seed, scale, module_limit):
    model, update, module_of = two_layers(seed)
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    weights = MovedWeights(params, module_of)
    step = ProjectedStep(update, weights)
    assert step.norm == pytest.approx(math.sqrt(sum(update.squares)), rel=1e-15)
    limits = (
        None
        if module_limit is None
        else {m: module_limit * n for m, n in weights.module_norms.items()}
    )
    scales = update.scales(scale, module_of, limits)
    applied = step.apply(scale, module_limit)
    part = update.factored[0]
    head = (part.left @ part.right)[0]
    expected = {
        "0.weight": before["0.weight"] + scales[0] * update.dense["0.weight"],
        "0.bias": before["0.bias"] + scales[1] * update.dense["0.bias"],
        "2.weight": before["2.weight"] + scales[2] * head[:, :4],
        "2.bias": before["2.bias"] + scales[2] * head[:, 4],
    }
    for name, value in expected.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=1e-13)
    applied.undo()
    for name, value in before.items():
        torch.testing.assert_close(params[name].detach(), value, rtol=0, atol=1e-13)


def test_a_step_at_scale_zero_moves_nothing_not_even_the_sign_of_a_zero():
    model, update, module_of = two_layers(2)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for param in params.values():
            param.view(-1)[0] = -0.0  # -0.0 + 0.0 is +0.0: adding a zero step would flip it
    before = snapshot(model)
    applied = ProjectedStep(update, MovedWeights(params, module_of)).apply(0.0, 0.3)
    assert_unchanged(model, before)
    applied.undo()
    assert_unchanged(model, before)


# -- the per-module limit in a teleport ----------------------------------------------------------


def test_no_normalised_step_moves_a_module_by_more_than_its_limit():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
    ).double()
    with torch.no_grad():
        model[-1].weight.mul_(
            1e-3
        )  # a head far smaller than the body: the joint norm would dwarf it
        model[-1].bias.mul_(1e-3)
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(16, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,), generator=generator)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    report = tt.Teleporter(model, F.cross_entropy, null_space="exact", lr=0.5, steps=1).teleport(
        inputs, targets
    )
    assert report.steps == 1
    limit = tt.Limits().module_step
    params = dict(model.named_parameters())

    def norms(index: int) -> tuple[float, float]:
        names = [f"{index}.weight", f"{index}.bias"]
        moved = torch.cat([(params[n].detach() - before[n]).flatten() for n in names]).norm()
        return float(moved), float(torch.cat([before[n].flatten() for n in names]).norm())

    for index in (0, 2, 4):
        moved, size = norms(index)
        assert moved <= limit * size * (1 + 1e-9)
    moved, size = norms(4)
    assert moved > 0.5 * limit * size  # the head moved by about its own limit, not the body's
