"""A sharded teleport of a GPT-2-small-sized model (FSDP2) on 1, 2 and 4 ranks: per-rank memory and time.

The model is GPT-2 small (124 M parameters, random init; ``transformers``'
``GPT2LMHeadModel``), ``fully_shard``ed per block and at the root, on ``R``
ranks of one machine (gloo on CPU, NCCL on CUDA). The global batch is fixed
(``sequences x tokens``), split evenly over the ranks. Each rank measures, in
this order: one training step (SGD: forward, backward, step) twice, then one
teleport (``steps`` ascent steps, the default method on the structured path,
the embeddings and LayerNorms frozen) twice. For each: the peak memory beyond
what the rank held just before (first run and repeat), and the wall-clock
time. Also the bytes of the parameter blocks the rank holds, which fall as
``1 / R``.

Memory on CPU is the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``; Linux) minus the resident set before, with a fixed
glibc mmap threshold (every large tensor mapped when allocated and unmapped
when freed); on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
allocated before. Times are wall-clock (after ``torch.cuda.synchronize`` on
CUDA): on a CPU with fewer cores than ranks they include the ranks' waits for
each other, and on a machine shared with other work, that work.

Usage: ``python -m torch_teleport.lab.benchmarks.sharded [--ranks 1 2 4] [--device cuda] [--size tiny]``;
writes ``lab/benchmarks/results/sharded.json`` (``--size tiny``: ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

SIZES = {
    "full": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "sequences": 8, "tokens": 32, "steps": 2},
    "tiny": {"n_embd": 16, "n_layer": 2, "n_head": 2, "vocab_size": 64, "sequences": 4, "tokens": 8, "steps": 2},
}
"""GPT-2 small (the ``GPT2Config`` defaults) and a tiny one for the tests."""

WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def _worker(rank: int, world: int, port: int, size: str, device_type: str, out: str) -> None:
    import torch

    from torch_teleport.lab.launch import local_group

    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with local_group(rank, world, port, "nccl" if device.type == "cuda" else "gloo", timedelta(minutes=30)):
        Path(out, f"rank{rank}.json").write_text(json.dumps(_measure(rank, world, SIZES[size], device)))


def _measure(rank: int, world: int, size: dict, device) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    import torch_teleport as tt
    from torch_teleport.sharding import local

    torch.manual_seed(0)
    shape = {key: size[key] for key in ("n_embd", "n_layer", "n_head", "vocab_size")}
    ends = size["vocab_size"] - 1
    config = GPT2Config(**shape, n_positions=size["tokens"], bos_token_id=ends, eos_token_id=ends)
    model = GPT2LMHeadModel(config).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, size["vocab_size"], (size["sequences"], size["tokens"]), generator=generator)
    ids = ids.chunk(world)[rank].to(device)

    def loss_fn(output, targets):
        return F.cross_entropy(output.logits.flatten(0, 1), targets.flatten())

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    teleporter = tt.Teleporter(model, loss_fn, steps=size["steps"], uncovered="freeze")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(input_ids=ids), ids).backward()
        optimizer.step()

    reports = []
    row = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": sum(local(p).numel() * local(p).element_size() for p in model.parameters()),
        "resident_at_rest": _resident() if device.type == "cpu" else torch.cuda.memory_allocated(device),
    }
    for name, run in (("step", step), ("teleport", lambda: reports.append(teleporter.teleport({"input_ids": ids}, ids)))):
        for key in (name, f"{name}_repeat"):
            row[key], row[f"{key}_seconds"] = _peak(run, device)
    row["teleport_steps"] = [r.steps for r in reports]
    row["grad_norm_gain"] = [r.gain for r in reports]
    row["loss_change"] = [abs(r.loss_after - r.loss_before) / r.loss_before for r in reports]
    return row


def _peak(run, device) -> tuple[int, float]:
    """Bytes ``run()`` needs at its peak beyond what the process holds before it, and its seconds."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, started = torch.cuda.memory_allocated(device), time.perf_counter()
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - started
    before = _resident()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return _peak_resident() - before, seconds


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident() -> int:
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def run(ranks: list[int], size: str, device: str) -> dict:
    """Every rank count's rows (one per rank), measured in fresh processes."""
    import torch

    results, environment = {}, dict(os.environ)
    os.environ.update(WORKER_ENV)  # inherited by the spawned ranks
    try:
        for world in ranks:
            results[str(world)] = _run_ranks(world, size, device)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return {
        "benchmark": "sharded",
        "size": size,
        "model": SIZES[size],
        "machine": {
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "device": device,
        },  # fmt: skip
        "results": results,
    }


def _run_ranks(world: int, size: str, device: str) -> dict:
    """One rank count: its ranks' rows and the seconds the whole run took."""
    import torch.multiprocessing as mp

    from torch_teleport.lab.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        mp.start_processes(_worker, args=(world, free_port(), size, device, out), nprocs=world, start_method="spawn")
        rows = [json.loads(Path(out, f"rank{rank}.json").read_text()) for rank in range(world)]
    return {"ranks": rows, "seconds": time.perf_counter() - started}


def table(data: dict) -> str:
    """The Markdown table of docs/scale.md: the largest figure over each run's ranks."""
    mib = 2**20
    lines = [
        "| ranks | parameters per rank (MiB) | training step: first / repeat (MiB) | teleport: first / repeat (MiB) "
        "| training step (s) | teleport (s) | first teleport: steps, gain, loss change |",
        "|---|---|---|---|---|---|---|",
    ]
    for world, result in data["results"].items():
        rows = result["ranks"]

        def most(key: str, rows=rows) -> float:
            return max(row[key] for row in rows)

        lines.append(
            f"| {world} | {most('parameter_bytes') / mib:.0f} | {most('step') / mib:.0f} / {most('step_repeat') / mib:.0f} "
            f"| {most('teleport') / mib:.0f} / {most('teleport_repeat') / mib:.0f} | {most('step_repeat_seconds'):.1f} "
            f"| {most('teleport_repeat_seconds'):.1f} | {rows[0]['teleport_steps'][0]}, {rows[0]['grad_norm_gain'][0]:.2f}, "
            f"{rows[0]['loss_change'][0]:.0e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--size", default="full", choices=tuple(SIZES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sharded.json")
    args = parser.parse_args(argv)
    data = run(args.ranks, args.size, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(table(data))


if __name__ == "__main__":
    main(sys.argv[1:])
