"""The ``batch_exact`` null space, the default: the teleport batch's span exactly, the basis sample's
directions by energy beyond it, the exact null space without a basis sample, the thresholded one
where no layer has room; and what that gives a teleport: the batch loss kept to rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import PROJECTION_TOL, batch_loss, exact, integer_matrix, rank_deficient
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.bases import MIN_ROOM
from torch_teleport.core_space import DEFAULT_NULL_SPACE, resolve_null_space
from torch_teleport.null_space import CoreBasis
from torch_teleport.plugins.null_spaces.batch_exact import BatchExactNullSpace
from torch_teleport.plugins.null_spaces.threshold import ThresholdNullSpace
from torch_teleport.testing import conv_problems, mlp_problems

ROUNDING = {torch.float32: 1e-6, torch.float64: 1e-12}
"""Largest relative change of the batch loss a teleport keeping the batch's span may make: float32's
well below the engine's drift tolerance (1e-5), so that tolerance never has to act."""


class Parts:
    """A site's representations (``groups x dims x samples``) on the batch and on the other samples."""

    def __init__(self, batch: torch.Tensor, samples: torch.Tensor | None = None) -> None:
        self._batch, self._samples = batch, samples

    def batch(self) -> torch.Tensor:
        return self._batch

    def samples(self) -> torch.Tensor | None:
        return self._samples

    def everything(self) -> torch.Tensor:
        return self._batch if self._samples is None else torch.cat([self._batch, self._samples], -1)


def null_projector(basis: CoreBasis, groups: int) -> torch.Tensor:
    """``I - B B^T`` per group, in float64: what the basis's projection leaves of every input."""
    eye = torch.eye(basis.input_dim, dtype=basis.vectors.dtype).repeat(groups, 1, 1)
    return basis.project(eye, None)[0].double()


# -- the core space --------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.integers(1, 3),
    dims=st.integers(2, 24),
    data=st.data(),
)
def test_the_core_space_holds_the_batch_span_exactly(seed, groups, dims, data):
    """Whatever the basis sample (none, fewer or more samples than dims) and however weak some of
    the batch's directions (samples scaled over four decades, far below any energy threshold): the
    projection leaves nothing of the batch's inputs, to float64 rounding."""
    rank = data.draw(st.integers(1, dims))
    batch_size = data.draw(st.integers(rank, 2 * dims))
    others = data.draw(st.integers(0, 3 * dims))
    generator = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -4, batch_size, dtype=torch.float64)
    batch = torch.stack(
        [integer_matrix(generator, dims, batch_size, rank) * scales for _ in range(groups)]
    )
    samples = torch.randn(groups, dims, others, generator=generator, dtype=torch.float64)
    found = BatchExactNullSpace().site_basis(Parts(batch, samples if others else None))
    assert found.keeps_batch and found.samples == batch_size + others
    left = null_projector(found.basis, groups) @ batch
    assert float(left.norm()) <= 1e-12 * float(batch.norm())


@pytest.mark.parametrize(("tau", "kept"), [(0.5, 1), (0.99, 1), (0.999, 2), (1.0, 3)])
@given(seed=st.integers(0, 2**31 - 1), dims=st.integers(6, 20), data=st.data())
def test_the_core_space_holds_the_basis_samples_leading_directions_beyond_the_batch(
    tau, kept, seed, dims, data
):
    """The samples reach beyond the batch's span along three directions, of singular values 10, 1
    and 1e-3 (squared: 100, 1, 1e-6 of the energy there), and far more along the batch's own span,
    which must not count: the fewest leading ones holding ``tau`` of the energy beyond the batch
    join the core space, the others stay in the null space."""
    rank = data.draw(st.integers(1, dims - 4))
    generator = torch.Generator().manual_seed(seed)
    axes, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=torch.float64))
    spanned, beyond, untouched = axes[:, :rank], axes[:, rank : rank + 3], axes[:, rank + 3 :]
    batch = spanned @ torch.randn(rank, rank + 2, generator=generator, dtype=torch.float64)
    count = data.draw(st.integers(3, 30))
    mixing, _ = torch.linalg.qr(torch.randn(count, 3, generator=generator, dtype=torch.float64))
    samples = beyond @ torch.diag(torch.tensor([10.0, 1.0, 1e-3], dtype=torch.float64)) @ mixing.T
    samples = samples + 100 * spanned @ torch.randn(rank, count, generator=generator, dtype=torch.float64)
    found = BatchExactNullSpace(tau).site_basis(Parts(batch[None], samples[None]))
    assert found.basis.ranks == (rank + kept,)
    null = null_projector(found.basis, 1)[0]
    assert float((null @ spanned).norm()) <= 1e-12
    # (a direction of the samples is found to float64 rounding of the samples over its own size)
    assert float((null @ beyond[:, :kept]).norm()) <= 1e-9
    rest = torch.cat([beyond[:, kept:], untouched], 1)
    assert float((null @ rest - rest).norm()) <= 1e-9  # wholly in the null space


@given(matrix=rank_deficient())
def test_without_a_basis_sample_the_bases_are_the_exact_null_spaces(matrix):
    representation = matrix[None]
    found = BatchExactNullSpace().site_basis(Parts(representation))
    reference = exact().basis(representation)
    assert found.keeps_batch and found.basis.ranks == reference.ranks
    difference = null_projector(found.basis, 1) - null_projector(reference, 1)
    assert float(difference.norm()) <= PROJECTION_TOL[matrix.dtype] * matrix.shape[0]


def test_a_teleport_without_a_basis_sample_is_the_exact_null_spaces():
    """A batch smaller than the layers: the default teleport moves as the exact null space's does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(6, 12, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    default, reference = copy.deepcopy(model), copy.deepcopy(model)
    report = tt.Teleporter(default, F.cross_entropy).teleport(inputs, targets)
    expected = tt.Teleporter(reference, F.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert report.steps > 0 and report.layers == expected.layers and report.keeps_batch
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), reference.parameters(), strict=True))


# -- where no layer has room ---------------------------------------------------------------------


def filled_mlp(batch: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP whose every layer has 30 inputs and a bias (31 dimensions)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(30, 30), nn.Tanh(), nn.Linear(30, 3)).double()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, 30, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randint(0, 3, (batch,), generator=generator)


@pytest.mark.parametrize("tau", [None, 0.99])
def test_where_the_batch_leaves_no_layer_room_the_thresholded_null_space_builds_the_bases(tau):
    """40 samples fill both layers' 31 dimensions: the exact spans leave no room, so the default
    teleport is the thresholded null space's (at the same tau), on the structured path."""
    model, inputs, targets = filled_mlp(40)
    options = {} if tau is None else {"tau": tau}
    default, thresholded = copy.deepcopy(model), copy.deepcopy(model)
    report = tt.Teleporter(default, F.cross_entropy, **options).teleport(inputs, targets)
    expected = tt.Teleporter(thresholded, F.cross_entropy, null_space="svd", **options).teleport(
        inputs, targets
    )
    assert report.steps > 0 and report.layers == expected.layers
    assert {layer.gradient for layer in report.layers} == {"structured"}
    assert all(torch.equal(a, b) for a, b in zip(default.parameters(), thresholded.parameters(), strict=True))
    exact_report = tt.Teleporter(copy.deepcopy(model), F.cross_entropy, null_space="exact").teleport(
        inputs, targets
    )
    assert exact_report.stopped == "no_room"


@pytest.mark.parametrize(("batch", "falls_back"), [(27, False), (28, True)])
def test_a_layer_has_room_from_min_room_of_its_inputs(batch, falls_back):
    """27 samples leave 4 of 31 dimensions (at least ``MIN_ROOM``): the batch is kept exactly, on the
    closed form; 28 leave 3 (less): the thresholded null space builds the bases."""
    assert (31 - batch >= MIN_ROOM * 31) != falls_back
    model, inputs, targets = filled_mlp(batch)
    report = tt.Teleporter(model, F.cross_entropy, steps=1).teleport(inputs, targets)
    assert {layer.gradient for layer in report.layers} == {"structured" if falls_back else "closed_form"}
    if not falls_back:
        assert [layer.null_dim for layer in report.layers] == [31 - batch] * 2


def test_the_fallback_and_the_defaults_of_each_null_space():
    assert DEFAULT_NULL_SPACE == "batch_exact"
    registry = tt.default_registry()
    assert isinstance(resolve_null_space(DEFAULT_NULL_SPACE, None, registry), BatchExactNullSpace)
    taus = {name: resolve_null_space(name, None, registry).tau for name in ("exact", "svd", "batch_exact")}
    assert taus == {"exact": 1.0, "svd": 0.999, "batch_exact": 0.999}
    assert ThresholdNullSpace().tau == 0.999
    fallback = BatchExactNullSpace(0.95).fallback
    assert type(fallback) is ThresholdNullSpace and fallback.tau == 0.95
    assert exact().fallback is None and ThresholdNullSpace().fallback is None


# -- what the default teleport keeps ----------------------------------------------------------------


def basis_sample(problem, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(problem.seed + 1)
    shape = (count, *problem.inputs.shape[1:])
    return torch.randn(shape, generator=generator, dtype=problem.inputs.dtype)


@pytest.mark.filterwarnings("ignore:teleport cannot move")
@given(
    problem=st.one_of(mlp_problems(max_batch=16), conv_problems(max_batch=3)),
    rate=st.sampled_from([{}, {"lr": 0.05}]),
    data=st.data(),
)
def test_the_default_keeps_the_batch_loss_to_rounding_with_a_basis_sample(problem, rate, data):
    """Where the batch and the basis sample leave a layer room (fewer samples than 90% of a Linear
    layer's inputs), the steps keep the batch's span exactly, so its loss moves by rounding only,
    far below the drift tolerance, which never binds: at the searched rate and at steps of 5% of
    the weights' norm."""
    widest = max(
        layer.in_features + (layer.bias is not None)
        for layer in problem.model.modules()
        if isinstance(layer, nn.Linear)
    )
    room = int((1 - MIN_ROOM) * widest)
    assume(len(problem.inputs) < room)
    count = data.draw(st.integers(1, room - len(problem.inputs)))
    start = copy.deepcopy(problem.model)
    report = tt.Teleporter(problem.model, problem.loss_fn, **rate).teleport(
        problem.inputs, problem.targets, basis=basis_sample(problem, count)
    )
    if not report.keeps_batch:  # no direction where the batch leaves room (only a first layer has
        # any): the fallback, the data's core space by energy, under the drift limit
        event("fell back")
        assert report.stopped in ("steps", "drift", "gain", "no_room") and report.loss_change <= 1e-5
        return
    assert report.stopped != "drift" and not report.rolled_back
    assert report.loss_change <= ROUNDING[problem.inputs.dtype]
    if problem.inputs.dim() == 2:  # an MLP (no dropout, no BatchNorm): measured apart from the engine
        before = batch_loss(problem, start)
        assert abs(batch_loss(problem) - before) <= ROUNDING[problem.inputs.dtype] * abs(before)


# -- going on in the batch's room after the fallback ---------------------------------------------


@given(seed=st.integers(0, 2**16))
def test_where_the_drift_ends_the_fallback_the_teleport_goes_on_in_the_room_the_batch_leaves(seed):
    """38 samples leave 3 of a hidden layer's 41 dimensions (less than ``MIN_ROOM``): the teleport
    climbs on the data's core space by energy until the drift limit ends it, then goes on from there
    in the batch's exact null space, where the batch's loss moves by rounding only (float64) and the
    gradient norm still rises."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    generator = torch.Generator().manual_seed(seed)
    inputs, guard = (torch.randn(n, 10, generator=generator, dtype=torch.float64) for n in (38, 64))
    targets, guard_targets = (torch.randint(0, 4, (n,), generator=generator) for n in (38, 64))
    report = tt.Teleporter(model, F.cross_entropy, steps=8).teleport(inputs, targets, guard=(guard, guard_targets))
    assert not report.keeps_batch and report.loss_change <= 1e-5
    assume(report.exact_from is not None)
    event(f"went on after {report.exact_from} steps")
    went_on = report.losses[report.exact_from]
    assert abs(report.loss_after - went_on) <= ROUNDING[torch.float64] * abs(went_on)
    assert report.steps == report.exact_from or report.grad_norm_after > report.grad_norms[report.exact_from]
