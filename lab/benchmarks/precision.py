"""The loss drift a teleport gets in each precision: float64, float32, bfloat16 autocast, bfloat16 and
float16 weights, and FSDP's bfloat16 ``MixedPrecisionPolicy`` (2 ranks).

One teleport with the default options of an MLP (6-64-64-5, tanh) on a batch of
32 random samples, per seed. The drift is the relative change of the batch
loss, computed in float64 from the weights before and after (the teleport's
own doing, rounding of half-precision weights included); the gain is the
gradient norm's growth as the teleport reports it. bfloat16 and float16
weights are teleported in float32 and rounded once; under autocast and
FSDP's mixed precision the weights are float32, the forward of the second in
bfloat16.

Usage: ``python -m torch_teleport.lab.benchmarks.precision [--seeds 5]``; writes
``lab/benchmarks/results/precision.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CASES = ("float64", "float32", "float32, bfloat16 autocast", "bfloat16", "float16", "float32, FSDP bfloat16 policy")
SAMPLES = 32


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(SAMPLES, 6, generator=generator), torch.randint(0, 5, (SAMPLES,), generator=generator)


def float64_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(copy.deepcopy(model).double()(inputs.double()), targets))


def one_process(case: str, seed: int) -> tuple[float, float]:
    """Drift and gain of one teleport in ``case`` (all but the sharded one)."""
    import torch_teleport as tt

    dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(case, torch.float32)
    inputs, targets = batch(seed)
    inputs = inputs.to(dtype)
    model = mlp(seed).to(dtype)
    before = float64_loss(model, inputs, targets)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if "autocast" in case else contextlib.nullcontext()
    with autocast:
        report = tt.Teleporter(model, F.cross_entropy).teleport(inputs, targets)
    return abs(float64_loss(model, inputs, targets) - before) / before, report.gain


def _sharded_worker(rank: int, world: int, port: int, seeds: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import torch_teleport as tt
    from torch_teleport.lab.launch import local_group
    from torch_teleport.sharding import gathered_parameters

    torch.set_num_threads(1)
    with local_group(rank, world, port):
        mesh, policy = init_device_mesh("cpu", (world,)), MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        rows = []
        for seed in range(seeds):
            inputs, targets = batch(seed)
            before = float64_loss(mlp(seed), inputs, targets)
            model = mlp(seed)
            for layer in model[::2]:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            report = tt.Teleporter(model, F.cross_entropy).teleport(inputs[rank::world], targets[rank::world])
            moved = mlp(seed)
            moved.load_state_dict(gathered_parameters(model))
            drift = abs(float64_loss(moved, inputs, targets) - before) / before
            rows.append((drift, report.gain))
        if rank == 0:
            Path(out).write_text(json.dumps(rows))


def sharded(seeds: int) -> list[tuple[float, float]]:
    import tempfile

    import torch.multiprocessing as mp

    from torch_teleport.lab.launch import free_port

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rows.json")
        mp.start_processes(_sharded_worker, args=(2, free_port(), seeds, out), nprocs=2, start_method="spawn")
        return [tuple(row) for row in json.loads(Path(out).read_text())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "precision.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        rows = sharded(args.seeds) if "FSDP" in case else [one_process(case, seed) for seed in range(args.seeds)]
        drifts, gains = [row[0] for row in rows], [row[1] for row in rows]
        results[case] = {"drift": drifts, "gain": gains}
    data = {"benchmark": "precision", "seeds": args.seeds, "samples": SAMPLES, "torch": torch.__version__, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print("| parameters (compute) | batch-loss drift: median / largest | gradient-norm gain: median |\n|---|---|---|")
    for case, result in results.items():
        print(
            f"| {case} | {statistics.median(result['drift']):.1e} / {max(result['drift']):.1e} "
            f"| {statistics.median(result['gain']):.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
