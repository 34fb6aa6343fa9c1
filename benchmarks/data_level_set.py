"""Whose level set does a teleport keep: the batch's or the training data's?

On scikit-learn's digits (1,437 train / 360 test images, offline), the paper MLP
64-1024-1024-10 after one SGD epoch (lr 0.01, batch 32), one teleport per
setting from the same point, measuring the whole training set's and the test
set's loss and the whole training set's gradient norm before and after:

* ``round``: the paper's round, 32 random batches of 32, default teleports;
* ``round + guard``: the same, every teleport of the round judged against one guard batch's
  loss when the round began (as the trainer does: ``guard_baseline``);
* ``batch 1024``: one default teleport on 1,024 training samples;
* ``svd tau``: one teleport on 1,024 samples with the thresholded null space;
* ``batch 32 + basis 1024``: the ascent on 32 samples, the core space spanning 1,024 (``basis=``),
  once or for a whole round.

Usage: ``python benchmarks/data_level_set.py``; writes
``benchmarks/results/data_level_set.json`` and prints a Markdown table.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt


def digits(seed: int = 0):
    data = load_digits()
    inputs = torch.tensor(data.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(data.target)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed))
    inputs, targets = inputs[order], targets[order]
    return (inputs[:1437], targets[:1437]), (inputs[1437:], targets[1437:])


def figures(model: nn.Module, train, test) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(train[0]), train[1])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    with torch.no_grad():
        test_loss = F.cross_entropy(model(test[0]), test[1])
    return {
        "train_loss": float(loss.detach()),
        "test_loss": float(test_loss),
        "train_grad_norm": float(torch.sqrt(sum(g.square().sum() for g in grads))),
    }


def trained(train, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = tt.default_registry().get("model", "mlp")(input_dim=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order), 32):
        index = order[start : start + 32]
        optimizer.zero_grad()
        F.cross_entropy(model(train[0][index]), train[1][index]).backward()
        optimizer.step()
    return model


def settings(train):
    generator = torch.Generator().manual_seed(1)
    order = torch.randperm(len(train[1]), generator=generator)
    batches = [(train[0][order[i * 32 : (i + 1) * 32]], train[1][order[i * 32 : (i + 1) * 32]]) for i in range(33)]
    sample = (train[0][order[:1024]], train[1][order[:1024]])
    big_guard = (train[0][order[-256:]], train[1][order[-256:]])

    def round_(model, guard=None, **options):
        """32 teleports; with ``guard``, all judged against its loss when the round began."""
        basis = options.pop("basis", None)
        teleporter = tt.Teleporter(model, F.cross_entropy, **options)
        reports, baseline = [], None
        for i in range(32):
            report = teleporter.teleport(*batches[i + 1], guard=guard, guard_baseline=baseline, basis=basis)
            baseline = report.guard_loss_before if baseline is None else baseline
            reports.append(report)
        return {"stopped": sorted({r.stopped for r in reports}), "steps": sum(r.steps for r in reports)}

    def one(model, **options):
        basis = options.pop("basis", None)
        data = options.pop("data", sample)
        report = tt.Teleporter(model, F.cross_entropy, **options).teleport(*data, basis=basis)
        return {"stopped": report.stopped, "steps": report.steps, "batch_loss_change": report.loss_change}

    return {
        "round (32 x 32, defaults)": lambda m: round_(m),
        "round (32 x 32) + one guard batch of 32 for the round": lambda m: round_(m, guard=batches[0]),
        "round (32 x 32) + one guard batch of 256 for the round": lambda m: round_(m, guard=big_guard),
        "round (32 x 32) + basis 1024, svd tau 0.99": lambda m: round_(
            m, null_space="svd", tau=0.99, basis=sample[0]
        ),
        "batch 1024, defaults": lambda m: one(m),
        "batch 1024, svd tau 0.99": lambda m: one(m, null_space="svd", tau=0.99),
        "batch 1024, svd tau 0.999, lr 0.02": lambda m: one(m, null_space="svd", tau=0.999, lr=0.02),
        "batch 32 + basis 1024, svd tau 0.99": lambda m: one(
            m, null_space="svd", tau=0.99, data=batches[0], basis=sample[0]
        ),
        "batch 32 + basis 1024, svd tau 0.999, lr 0.02": lambda m: one(
            m, null_space="svd", tau=0.999, lr=0.02, data=batches[0], basis=sample[0]
        ),
    }


def main() -> None:
    torch.set_num_threads(1)
    train, test = digits()
    start = trained(train)
    before = figures(start, train, test)
    rows = []
    for name, run in settings(train).items():
        model = copy.deepcopy(start)
        outcome = run(model)
        after = figures(model, train, test)
        rows.append(
            {
                "setting": name,
                **outcome,
                "train_loss_ratio": after["train_loss"] / before["train_loss"],
                "test_loss_ratio": after["test_loss"] / before["test_loss"],
                "train_grad_norm_ratio": after["train_grad_norm"] / before["train_grad_norm"],
            }
        )
    out = Path(__file__).resolve().parent / "results" / "data_level_set.json"
    out.write_text(json.dumps({"before": before, "rows": rows}, indent=2) + "\n")
    print("| setting | whole-train loss | test loss | whole-train grad norm | steps | stopped |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['setting']} | x{row['train_loss_ratio']:.4f} | x{row['test_loss_ratio']:.4f} "
            f"| x{row['train_grad_norm_ratio']:.3f} | {row['steps']} | {row['stopped']} |"
        )


if __name__ == "__main__":
    main()
