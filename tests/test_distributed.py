"""Teleporting DistributedDataParallel replicas, for real: gloo, 2 and 3 processes on localhost.

Each rank holds a shard of one global teleport batch (shards of unequal
size, in rank order). After teleports, training steps with the teleporting
trainer, and gradient accumulation with a teleport between micro-batches,
every rank must hold bit-identical parameters, and the loss on the global
batch, computed here in one process, must be unchanged by each teleport.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import gloo_group, spawn_ranks
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.distributed import (
    InvalidBatchElsewhereError,
    ReplicaDivergenceError,
    Replicas,
    checksum,
    underlying_module,
)
from torch_teleport.schedule import TeleportPlan

TELEPORT_STEPS = 8
"""Steps of the teleport phase at the fixed rate 0.05: no step moves a module by more than
``SITE_STEP_LIMIT`` of its norm (the head's steps are cut), so it takes this many to raise the
gradient norm by half."""


class EverySecondStep(tt.Schedule):
    """Every second step; it hears each step's loss (the ranks' mean, as a spike schedule would)."""

    hears_loss = True

    def __init__(self) -> None:
        self.heard: list[float] = []

    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        return TeleportPlan(1, 3) if step % 2 == 0 else None

    def observe_loss(self, loss: float) -> None:
        self.heard.append(loss)


def build_model(dtype: torch.dtype) -> nn.Module:
    """The same model on every rank: a 3-input MLP (its first layer's inputs span a plane)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 4))
    return model.to(dtype)


def global_batch(world: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """A global batch whose inputs lie in a plane of R^3, and the shard sizes ``4 + rank``.

    With a bias the first layer's representation has rank 3 of 4: with
    float32 and at least 8 samples its spectrum takes the Gram route, and
    there is still a one-dimensional null space to move in.
    """
    generator = torch.Generator().manual_seed(seed)
    sizes = [4 + rank for rank in range(world)]
    plane = torch.randn(sum(sizes), 2, generator=generator, dtype=torch.float64)
    inputs = (plane @ torch.randn(2, 3, generator=generator, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, 4, (sum(sizes),), generator=generator)
    return inputs, targets, sizes


def shard(tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _teleport_phase(rank: int, world: int, dtype: torch.dtype) -> dict:
    inputs, targets, sizes = global_batch(world, dtype)
    model = nn.parallel.DistributedDataParallel(build_model(dtype))
    teleporter = tt.Teleporter(
        model, F.cross_entropy, null_space="exact", lr=0.05, steps=TELEPORT_STEPS, replicas=Replicas(verify=True)
    )
    report = teleporter.teleport(shard(inputs, sizes, rank), shard(targets, sizes, rank))
    return {"report": report.to_dict(), "params": parameters(model.module)}


def _training_phase(rank: int, world: int) -> dict:
    """The teleporting trainer on a DDP model, then accumulation with a teleport between micro-batches."""
    inputs, targets, sizes = global_batch(world, torch.float32, seed=2)
    ddp = nn.parallel.DistributedDataParallel(build_model(torch.float32))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    # The defaults (the thresholded core space, the step-length search): every rank must take the
    # same accept/reject decisions for the replicas to stay identical.
    teleporter = tt.Teleporter(ddp, F.cross_entropy, steps=3, replicas=Replicas(verify=True))
    schedule = EverySecondStep()
    trainer = tt.TeleportTrainer(ddp, F.cross_entropy, optimizer, teleporter=teleporter, schedule=schedule)
    local_x, local_y = shard(inputs, sizes, rank), shard(targets, sizes, rank)
    teleported, losses = [], []
    for _ in range(4):
        result = trainer.step(local_x, local_y)
        teleported += result.teleports
        losses.append(result.loss)
    after_trainer = parameters(ddp.module)

    half = len(local_x) // 2
    optimizer.zero_grad()
    with ddp.no_sync():  # first micro-batch: gradients stay local
        F.cross_entropy(ddp(local_x[:half]), local_y[:half]).backward()
    pending = {name: p.grad.clone() for name, p in ddp.module.named_parameters()}
    teleported.append(teleporter.teleport(local_x, local_y))
    grads_untouched = all(torch.equal(p.grad, pending[name]) for name, p in ddp.module.named_parameters())
    F.cross_entropy(ddp(local_x[half:]), local_y[half:]).backward()  # synchronises the sum
    optimizer.step()
    return {
        "after_trainer": after_trainer,
        "after_accumulation": parameters(ddp.module),
        "grads_untouched": grads_untouched,
        "moved": [report.steps for report in teleported],
        "losses": losses,
        "heard": schedule.heard,
    }


def _fault_phase(rank: int, world: int) -> dict:
    """A NaN in one rank's shard stops every rank; a replica teleported alone is caught diverging."""
    inputs, targets, sizes = global_batch(world, torch.float64)
    model = build_model(torch.float64)
    before = parameters(model)
    local_x = shard(inputs, sizes, rank).clone()
    if rank == world - 1:
        local_x[0, 0] = float("nan")
    try:
        tt.Teleporter(model, F.cross_entropy).teleport(local_x, shard(targets, sizes, rank))
        rejected = "nothing"
    except ValueError as error:
        rejected = type(error).__name__
    unchanged = all(torch.equal(p, before[name]) for name, p in model.named_parameters())

    alone = tt.Teleporter(model, F.cross_entropy, replicas=Replicas.this_process())
    alone.teleport(shard(inputs, sizes, rank), shard(targets, sizes, rank))
    try:
        Replicas().assert_identical(model.named_parameters())
        divergence = "not detected"
    except ReplicaDivergenceError as error:
        divergence = str(error)
    return {"rejected": rejected, "unchanged": unchanged, "divergence": divergence}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world, port):
        results = {
            "float64": _teleport_phase(rank, world, torch.float64),
            "float32": _teleport_phase(rank, world, torch.float32),
            "training": _training_phase(rank, world),
            "faults": _fault_phase(rank, world),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")



def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view({4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_bit_identical(per_rank: list[dict[str, torch.Tensor]]) -> None:
    for rank, params in enumerate(per_rank[1:], start=1):
        for name, value in params.items():
            assert torch.equal(bits(value), bits(per_rank[0][name])), f"rank {rank} differs from rank 0 in {name}"


def global_figures(dtype: torch.dtype, world: int, params: dict[str, torch.Tensor] | None = None):
    """Loss and gradient norm of the model (initial, or with ``params``) on the whole global batch."""
    model = build_model(dtype)
    if params is not None:
        model.load_state_dict(params)
    inputs, targets, _ = global_batch(world, dtype)
    loss = F.cross_entropy(model(inputs), targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return float(loss), float(torch.sqrt(sum(g.square().sum() for g in grads)))


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("world", [2, 3])
def test_replicas_stay_identical_and_the_global_loss_is_invariant(world, tmp_path):
    ranks = spawn_ranks(_worker, world, tmp_path)

    for dtype, key, rtol in ((torch.float64, "float64", 1e-10), (torch.float32, "float32", 1e-5)):
        per_rank = [r[key] for r in ranks]
        assert_bit_identical([r["params"] for r in per_rank])
        report = per_rank[0]["report"]
        assert not report["rolled_back"] and report["steps"] == TELEPORT_STEPS
        timings = ("seconds", "basis_seconds")
        assert all({k: v for k, v in r["report"].items() if k not in timings} == {k: v for k, v in report.items() if k not in timings} for r in per_rank)
        loss_before, grad_norm_before = global_figures(dtype, world)
        loss_after, _ = global_figures(dtype, world, per_rank[0]["params"])
        # The reported figures are those of the global batch, and its loss did not move.
        assert report["loss_before"] == pytest.approx(loss_before, rel=rtol)
        assert report["grad_norm_before"] == pytest.approx(grad_norm_before, rel=rtol)
        assert abs(loss_after - loss_before) <= rtol * loss_before
        assert report["grad_norm_after"] > 1.5 * report["grad_norm_before"]
        moved = max(float((p - q).abs().max()) for p, q in zip(per_rank[0]["params"].values(), build_model(dtype).parameters(), strict=True))
        assert moved > 1e-3
        # One null space, that of the global batch: the same layers as one process teleporting it
        # (on the structured path the ranks take; the chain closed form is for one process).
        inputs, targets, _ = global_batch(world, dtype)
        single = tt.Teleporter(
            build_model(dtype),
            F.cross_entropy,
            null_space="exact",
            lr=0.05,
            steps=TELEPORT_STEPS,
            gradient="structured",
        ).teleport(inputs, targets)
        assert report["layers"] == [layer.__dict__ for layer in single.layers]
        first = report["layers"][0]
        assert (first["samples"], first["null_dim"]) == (sum(4 + r for r in range(world)), 1)

    training = [r["training"] for r in ranks]
    assert_bit_identical([r["after_trainer"] for r in training])
    assert_bit_identical([r["after_accumulation"] for r in training])
    assert all(r["grads_untouched"] for r in training)
    assert all(steps > 0 for steps in training[0]["moved"]) and len(training[0]["moved"]) == 3
    # A schedule that hears the loss hears the ranks' mean, the same on every rank.
    mean = [sum(step) / world for step in zip(*(r["losses"] for r in training), strict=True)]
    assert all(r["heard"] == pytest.approx(mean, rel=1e-12) for r in training)
    assert len({tuple(r["heard"]) for r in training}) == 1
    assert len({tuple(r["losses"]) for r in training}) > 1  # (the ranks' own losses differ)

    faults = [r["faults"] for r in ranks]
    assert [f["rejected"] for f in faults] == ["InvalidBatchElsewhereError"] * (world - 1) + ["ValueError"]
    assert all(f["unchanged"] for f in faults)
    assert all(f["divergence"].startswith("replicas differ after the teleport") for f in faults)


def test_checksum_sees_every_bit_and_its_position():
    x = torch.randn(100, generator=torch.Generator().manual_seed(0))
    flipped = x.clone()
    flipped.view(torch.int32)[37] ^= 1
    swapped = x.clone()
    swapped[[3, 4]] = swapped[[4, 3]]
    assert checksum(x) == checksum(x.clone())
    assert checksum(flipped) != checksum(x)
    assert checksum(swapped) != checksum(x)
    assert checksum(torch.tensor([0.0])) != checksum(torch.tensor([-0.0]))


def test_one_process_needs_no_process_group():
    model = build_model(torch.float64)
    assert Replicas().size == 1 and Replicas.this_process().size == 1
    assert underlying_module(nn.DataParallel(model)) is model
    assert InvalidBatchElsewhereError.__mro__[1] is ValueError
