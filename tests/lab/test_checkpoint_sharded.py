"""Checkpoints of sharded models (FSDP2) through torch.distributed.checkpoint: 2 gloo processes.

A teleporting trainer on a ``fully_shard``ed model, stopped after two steps,
checkpointed (each rank its blocks of the model and optimizer, its trainer's
state and random state) and resumed into freshly built objects with other
weights, must end bit for bit where the uninterrupted run ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import gloo_group, spawn_ranks
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.lab.checkpoint import (
    CheckpointError,
    load_sharded_checkpoint,
    rng_state,
    save_sharded_checkpoint,
    set_rng_state,
)
from torch_teleport.schedule import TeleportPlan
from torch_teleport.sharding import local

STEPS = 4


class EverySecondStep(tt.Schedule):
    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        return TeleportPlan(1, 2) if step % 2 == 0 else None


def batches(rank: int, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return [
        (torch.randn(4 + rank, 6, generator=generator, dtype=torch.float64), torch.randint(0, 5, (4 + rank,), generator=generator))
        for _ in range(count)
    ]


def trainer(rank: int, mesh, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, tt.TeleportTrainer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    for layer in model[::2]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = tt.TeleportTrainer(
        model, F.cross_entropy, optimizer, teleporter=tt.Teleporter(model, F.cross_entropy, steps=2),
        schedule=EverySecondStep(), teleport_data=batches(rank, 3, seed=2),
    )  # fmt: skip
    return model, optimizer, run


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        data = batches(rank, STEPS, seed=1)
        model, _, whole = trainer(rank, mesh, seed=0)
        torch.manual_seed(7)
        teleports = [len(whole.step(*batch).teleports) for batch in data]
        uninterrupted = {name: local(p).clone() for name, p in model.named_parameters()}

        folder = Path(out_dir) / "checkpoints"
        try:
            load_sharded_checkpoint(folder, model=model)
            missing = "loaded"
        except CheckpointError as error:
            missing = str(error)
        model, optimizer, first = trainer(rank, mesh, seed=0)
        torch.manual_seed(7)
        for batch in data[:2]:
            first.step(*batch)
        state = {"trainer": first.state_dict(), "rng": rng_state()}
        save_sharded_checkpoint(folder, 2, model=model, optimizer=optimizer, state=state)
        model, optimizer, resumed = trainer(rank, mesh, seed=3)  # other weights, a fresh optimizer
        own = load_sharded_checkpoint(folder, model=model, optimizer=optimizer)
        resumed.load_state_dict(own["trainer"])
        set_rng_state(own["rng"])
        for batch in data[2:]:
            resumed.step(*batch)
        same = all(torch.equal(local(p), uninterrupted[name]) for name, p in model.named_parameters())
        torch.save({"same": same, "teleports": teleports, "missing": missing}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow  # spawns processes
def test_a_resumed_sharded_run_ends_where_the_uninterrupted_one_does(tmp_path):
    world = 2
    results = spawn_ranks(_worker, world, tmp_path)
    assert all(r["same"] for r in results)
    assert results[0]["teleports"] == [1, 0, 1, 0]  # teleports before and after the checkpoint
    assert all("latest.json is missing" in r["missing"] for r in results)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-00000002", "latest.json"]
