"""Hypothesis profiles (``ci``, the default for ``make test``, and ``dev``), one torch thread,
and the helpers that several test modules share (``from conftest import ...``): no test module
imports another."""

from __future__ import annotations

import contextlib
import sys
import time
from datetime import timedelta
from itertools import chain
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import torch_teleport as tt
from torch_teleport.distributed import Replicas
from torch_teleport.lab.launch import free_port, local_group
from torch_teleport.limits import Guard
from torch_teleport.null_space import uses_gram_route

settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread, as `make test` sets: the suite's models are tiny, and on a shared
    2-core machine a second thread's idle waits cost them far more than it gains (results do
    not depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def transformers_unloaded():
    """These tests check that nothing here imports ``transformers``; other test modules of the same
    run may have loaded it (``test_real_models``; ``pytorch_lightning`` through ``torchmetrics``
    when the ``models`` extra is installed), so it leaves ``sys.modules`` while they run."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in sys.modules if n.partition(".")[0] == "transformers"]:
            patch.delitem(sys.modules, name)
        yield


# -- teleports of random MLPs ------------------------------------------------------------------

STEPS = 8
"""Ascent steps per teleport batch (the paper's t)."""

LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""Allowed relative change of the teleport batch's loss, per dtype."""


def batch_loss(problem, model=None) -> float:
    """The teleport-batch loss as the engine sees it (dropout-free MLPs: eval mode)."""
    model = problem.model if model is None else model
    with torch.no_grad():
        return float(problem.loss_fn(model(problem.inputs), problem.targets))


# -- the model as found ---------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict:
    """Everything a teleport must leave alone (or restore), copied."""
    return {
        "tensors": {
            name: tensor.detach().clone()
            for name, tensor in chain(model.named_parameters(), model.named_buffers())
        },
        "objects": [id(p) for p in model.parameters()],
        "storage": [p.data_ptr() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(m._backward_pre_hooks),
            )
            for m in model.modules()
        ],
    }


def assert_unchanged(model: nn.Module, before: dict, *, parameters: bool = True) -> None:
    """``model`` matches ``before`` bit for bit (parameters only when ``parameters``)."""
    after = snapshot(model)
    for key in ("objects", "storage", "requires_grad", "modes", "hooks"):
        assert after[key] == before[key], f"{key} changed"
    param_names = {name for name, _ in model.named_parameters()}
    for name, saved in before["tensors"].items():
        if name in param_names and not parameters:
            continue
        now = after["tensors"][name]
        assert now.dtype == saved.dtype and torch.equal(
            now.reshape(-1).view(torch.uint8), saved.reshape(-1).view(torch.uint8)
        ), f"{name} changed"


# -- objectives -----------------------------------------------------------------------------------


def assert_gradient_matches_finite_differences(objective: tt.Objective, problem, seed: int) -> None:
    """Central differences of the objective along random directions match autograd (float64)."""
    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]

    def value() -> torch.Tensor:
        batch = tt.Batch(model, problem.loss_fn, problem.inputs, problem.targets, params)
        return objective.evaluate(batch).value

    grads = torch.autograd.grad(value(), params, allow_unused=True)
    grads = [
        g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)
    ]
    generator = torch.Generator().manual_seed(seed)
    eps = 1e-6
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum(d.square().sum() for d in direction))
        direction = [d / norm for d in direction]
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
        values = []
        for step in (eps, -2 * eps, eps):
            with torch.no_grad():
                for p, d in zip(params, direction, strict=True):
                    p.add_(step * d)
            values.append(float(value().detach()))
        plus, minus = values[:2]
        numeric = (plus - minus) / (2 * eps)
        grad_norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
        scale = max(abs(analytic), abs(numeric), grad_norm, 1e-12)
        assert abs(analytic - numeric) <= 1e-6 * scale, (analytic, numeric)


def leaky_mlp_problem(seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 LeakyReLU MLP (12-32-24-4) and a batch of 10 for it, all drawn from ``seed``."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 32), nn.LeakyReLU(0.1), nn.Linear(32, 24), nn.LeakyReLU(0.1), nn.Linear(24, 4)
    )
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(10, 12, generator=generator, dtype=torch.float64)
    return model.double(), inputs, torch.randint(0, 4, (10,), generator=generator)


# -- null spaces against dense references ---------------------------------------------------------

PROJECTION_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
"""Allowed error of a projection, relative to the update's norm."""


def filled_tanh_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 tanh MLP 16-32-32-4 and a batch of 64 that fills every layer's input space: the
    exact null space has no room there, a thresholded one has."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)).double()
    inputs = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randint(0, 4, (64,), generator=generator)


def exact():
    return tt.default_registry().get("null_space", "exact")()


def threshold(tau: float):
    return tt.default_registry().get("null_space", "svd")(tau=tau)


def integer_matrix(generator, rows, cols, rank, dtype=torch.float64):
    """An exact integer ``rows x cols`` matrix of rank at most ``rank``."""
    left = torch.randint(-3, 4, (rows, rank), generator=generator)
    right = torch.randint(-3, 4, (rank, cols), generator=generator)
    return (left @ right).to(dtype)


def reference_rank(matrix: torch.Tensor, dtype: torch.dtype) -> int:
    """Numerical rank with the documented float64 tolerance of the route the spectrum takes:
    sigma_i > sigma_max * max(d, N) * eps (SVD),
    sigma_i^2 > sigma_max^2 * max(d, N) * eps (Gram)."""
    relative = max(matrix.shape) * torch.finfo(torch.float64).eps
    if uses_gram_route(*matrix.shape, dtype):
        relative = relative**0.5
    return int(torch.linalg.matrix_rank(matrix.double(), rtol=relative))


def reference_null_projection(
    update: torch.Tensor, matrix: torch.Tensor, rank: int
) -> torch.Tensor:
    """``G - G U_k U_k^T`` with ``U_k`` the top ``rank`` left singular vectors of ``matrix``."""
    left, _, _ = torch.linalg.svd(matrix.double(), full_matrices=True)
    core = left[:, :rank]
    return update - update @ core @ core.T


@st.composite
def rank_deficient(draw, dtypes=(torch.float64, torch.float32)):
    """A matrix with duplicate columns and zero rows, with samples below and above the dims.

    Built from small integers, so it is exactly rank deficient in float32 and float64 alike and
    the dense reference (``torch.linalg``) gives the ground truth.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    dims = draw(st.integers(2, 24))
    samples = draw(st.integers(1, 4 * dims))
    rank = draw(st.integers(1, dims))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    matrix = integer_matrix(generator, dims, samples, rank)
    zero_rows = draw(st.integers(0, dims - 1))
    matrix[:zero_rows] = 0
    if samples > 1:
        duplicates = draw(st.integers(1, samples - 1))
        matrix[:, -duplicates:] = matrix[:, :1]
    return matrix.to(dtype)


# -- spawned processes ----------------------------------------------------------------------------

DEADLINE_SECONDS = 120
"""Wall-clock bound of one spawned group of processes: a hang fails the test instead of stalling
the suite."""


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int):
    """This spawned rank in a gloo process group of ``world`` on localhost, one thread, torn down after."""
    torch.set_num_threads(1)
    with local_group(rank, world, port, timeout=timedelta(seconds=60)):
        yield


def spawn_ranks(worker, world: int, out_dir: Path) -> list:
    """Run ``worker(rank, world, port, out_dir)`` on ``world`` spawned ranks and load what each saved
    to ``out_dir/rank{rank}.pt``, failing after :data:`DEADLINE_SECONDS`."""
    context = mp.start_processes(
        worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {DEADLINE_SECONDS} s")
    return [torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


# -- a guard batch whose loss a test sets ---------------------------------------------------------


class GuardProbe(nn.Module):
    """A model whose loss (the mean of its output) is ``loss_at()`` whatever the inputs; it counts
    its forwards, so a test sees how often a guard was measured."""

    def __init__(self, loss_at) -> None:
        super().__init__()
        self.loss_at, self.forwards = loss_at, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return torch.full((inputs.shape[0],), float(self.loss_at()), dtype=torch.float64)


def guard_on(loss_at, baseline: float | None = None):
    """A :class:`~torch_teleport.limits.Guard` whose loss is ``loss_at()``, and its probe model."""
    probe = GuardProbe(loss_at)
    batch = (torch.zeros(2, 1), torch.zeros(2))
    return Guard(probe, lambda output, _: output.mean(), batch, Replicas(), baseline), probe
