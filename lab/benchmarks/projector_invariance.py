"""Worst relative change of the teleport-batch loss per architecture, in float64 and float32.

Teleports every problem the property-test strategies draw (derandomised, so the
run is reproducible) with the default settings and ``steps=8``, and reports per
architecture and dtype: the examples, the worst relative loss change, the share
of examples in which the architecture's own layers moved, and the median growth
of the gradient norm. Writes lab/benchmarks/results/projector_invariance.json.

    python -m torch_teleport.lab.benchmarks.projector_invariance [--examples 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings

from torch_teleport import Teleporter
from torch_teleport.lab.testing import mamba_problems
from torch_teleport.testing import (
    attention_problems,
    conv_problems,
    sequence_problems,
    transformer_problems,
)

ARCHITECTURES = {
    "convolution (1-d, 2-d, 3-d)": (conv_problems, lambda name: name.startswith("1.")),
    "nn.MultiheadAttention": (attention_problems, lambda name: name.startswith("body.")),
    "Transformer encoder/decoder layers": (
        transformer_problems,
        lambda name: name.startswith("body."),
    ),
    "Mamba-1 block": (mamba_problems, lambda name: name.startswith("body.block.")),
    "RNN / LSTM / GRU": (sequence_problems, lambda name: name.startswith("body.")),
}


def measure(strategy, own_layer, dtype: torch.dtype, examples: int) -> dict:
    changes, growths, moved = [], [], []

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy(dtypes=(dtype,)))
    def run(problem):
        model = copy.deepcopy(problem.model)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        report = Teleporter(model, problem.loss_fn, steps=8).teleport(
            problem.inputs, problem.targets
        )
        changes.append(report.loss_change)
        growths.append(report.gain)
        moved.append(
            any(own_layer(n) and not torch.equal(p, before[n]) for n, p in model.named_parameters())
        )

    run()
    return {
        "examples": len(changes),
        "worst_loss_change": max(changes),
        "moved_share": sum(moved) / len(moved),
        "median_grad_norm_growth": statistics.median(growths),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--examples", type=int, default=100, help="problems per architecture and dtype"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    results = {
        f"{name} / {str(dtype).removeprefix('torch.')}": measure(
            strategy, own, dtype, args.examples
        )
        for name, (strategy, own) in ARCHITECTURES.items()
        for dtype in (torch.float64, torch.float32)
    }
    print(
        "| architecture / dtype | problems | worst relative loss change | moved | median grad-norm growth |"
    )
    print("|---|---|---|---|---|")
    for key, row in results.items():
        print(
            f"| {key} | {row['examples']} | {row['worst_loss_change']:.2e} | "
            f"{row['moved_share']:.0%} | {row['median_grad_norm_growth']:.3f} |"
        )
    out = Path(__file__).resolve().parent / "results" / "projector_invariance.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
