"""Peak memory of one teleport against one training step, per model.

Each operation is measured in a fresh process (so neither inherits pages
the other freed), twice in a row:

* **first run**: the peak over the process's memory with the model, data
  and optimizer built (includes one-time allocations: gradient buffers,
  kernel work spaces);
* **repeat**: the peak of an identical second run over the memory left
  after the first, i.e. what the operation needs beyond what a training
  loop already holds.

On CPU the peak is the resident set size high-water mark (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs``; Linux),
minus the RSS just before: it counts every page the process touched
(tensors, autograd buffers, LAPACK work space, allocator slack). On CUDA
it is ``torch.cuda.max_memory_allocated`` minus the memory allocated
before (tensor bytes only). The optimizer is plain SGD (no state).

Usage: ``python -m torch_teleport.lab.benchmarks.memory [--device cuda]``; writes
``lab/benchmarks/results/memory.json`` and ``docs/figures/bench_memory.png`` and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from torch_teleport.lab.benchmarks.common import FIGURES

CASES = ("mlp", "cnn", "resnet", "transformer_classifier", "transformer_regressor", "transformer_lm",
         "mamba_classifier", "mamba_lm")  # fmt: skip
"""Every zoo model, fed as the step-cost benchmark feeds it (the MLP at the paper's 784-1024-1024-10)."""
BATCH = 32
STEPS = 8
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
"""A fixed glibc mmap threshold: every large tensor is mapped when allocated and unmapped when
freed, so each run touches its pages afresh and the two operations are measured alike."""


def measure(case: str, operation: str, device: str) -> list[int]:
    """Peak bytes of ``operation`` (``"step"`` or ``"teleport"``): first run, then a repeat."""
    import torch

    import torch_teleport as tt
    from torch_teleport.lab.benchmarks.step_cost import PROBES

    torch.manual_seed(0)
    probe = PROBES[case]
    model = tt.default_registry().get("model", case)(**probe.options).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    inputs, targets = probe.batch(generator, BATCH, device)
    teleporter = tt.Teleporter(model, probe.loss, steps=STEPS, lr=1e-3, uncovered="freeze")
    if teleporter.teleport(inputs, targets, steps=1).stopped == "no_room":  # as the step-cost benchmark
        teleporter = tt.Teleporter(
            model, probe.loss, steps=STEPS, lr=1e-3, uncovered="freeze", null_space="svd", tau=0.99
        )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        probe.loss(model(inputs), targets).backward()
        optimizer.step()

    run = step if operation == "step" else lambda: teleporter.teleport(inputs, targets)
    return [_peak(run, device) for _ in range(2)]


def _peak(run, device: str) -> int:
    """Bytes ``run()`` needs at its peak beyond what the process holds before it."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _resident()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    run()
    return _peak_resident() - before


def _resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident() -> int:
    return (
        int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "OPERATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(*measure(args.worker[0], args.worker[1], args.device))
        return
    rows = []
    for case in CASES:
        row = {"model": case, "batch": BATCH, "teleport_steps": STEPS, "device": args.device}
        for operation in ("step", "teleport"):
            command = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--worker",
                case,
                operation,
            ]
            output = subprocess.run(
                command, capture_output=True, text=True, check=True, env=WORKER_ENV
            ).stdout
            row[operation], row[f"{operation}_repeat"] = (int(v) for v in output.split()[-2:])
        rows.append(row)
    out = Path(__file__).resolve().parent / "results" / "memory.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    _plot(rows, FIGURES / "bench_memory.png")
    print(
        "| model | training step: first / repeat (MiB) | teleport: first / repeat (MiB) "
        "| teleport / step (first) |\n|---|---|---|---|"
    )
    for row in rows:
        mib = {
            key: row[key] / 2**20 for key in ("step", "step_repeat", "teleport", "teleport_repeat")
        }
        print(
            f"| {row['model']} (batch {BATCH}, {STEPS} teleport steps) | {mib['step']:.1f} / {mib['step_repeat']:.1f} "
            f"| {mib['teleport']:.1f} / {mib['teleport_repeat']:.1f} | {row['teleport'] / row['step']:.2f} |"
        )


def _plot(rows: list[dict], figure: Path) -> None:
    """Peak MiB of a training step and of a teleport per model (first run), the ratio above each pair."""
    from torch_teleport.lab.benchmarks.common import pyplot
    from torch_teleport.lab.experiment import save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    positions = range(len(rows))
    step = [row["step"] / 2**20 for row in rows]
    teleport = [row["teleport"] / 2**20 for row in rows]
    ax.bar([p - 0.2 for p in positions], step, 0.4, label="training step")
    ax.bar([p + 0.2 for p in positions], teleport, 0.4, label=f"teleport ({STEPS} steps)")
    for p, s, t in zip(positions, step, teleport, strict=True):
        ax.annotate(f"{t / s:.1f}x", (p, max(s, t)), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(positions), [row["model"] for row in rows], rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(f"peak MiB beyond the model (batch {BATCH})")
    ax.legend(fontsize=7)
    figure.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, figure)


if __name__ == "__main__":
    main()
