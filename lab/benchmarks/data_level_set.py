"""Whose level set does a teleport keep: the batch's or the training data's?

On every offline dataset that suits the paper MLP (scikit-learn's digits:
1,437 train / 360 test images of 64 pixels; MNIST-1D: 4,000 train / 1,000
test signals of 40 points), the MLP d-1024-1024-10 after one SGD epoch (lr
0.01, batch 32), one teleport or round per setting from the same point,
measuring the whole training set's and the test set's loss and the whole
training set's gradient norm before and after:

* ``defaults``: one default teleport (``Teleporter(model, loss)``: the batch kept
  exactly and a basis sample by energy, all data by energy where the batch leaves
  no room, the step search) on 1,024 training samples, on one batch of 32, and on
  one batch of 32 judged by a guard of 256 other training samples;
* ``exact``: the same with the exact null space (tau = 1) and the paper's fixed lr 0.005;
* ``round``: the paper's round, 32 random batches of 32, 8 steps each, with the
  defaults and with the exact null space, with and without one guard batch
  (32, 256 or 1,024 other training samples, whose loss when the round began judges
  every step: ``guard_baseline``) and a basis sample of 256 more (whose inputs join
  the core space), as a teleport event of the trainer draws them.

Usage: ``python -m torch_teleport.lab.benchmarks.data_level_set``; writes
``lab/benchmarks/results/data_level_set.json`` and prints a Markdown table per dataset.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt

EXACT = {"null_space": "exact", "lr": 0.005}
"""The paper's teleport: the exact null space of the batch, fixed lr."""


def splits(name: str, seed: int = 0):
    """(train, test) tensors of an offline dataset, through the registry's loaders."""
    data = tt.default_registry().get("dataset", name)()
    train, test = (tuple(part.tensors) if hasattr(part, "tensors") else _stack(part) for part in (data.train, data.test))
    order = torch.randperm(len(train[1]), generator=torch.Generator().manual_seed(seed))
    return (train[0][order].flatten(1), train[1][order]), (test[0].flatten(1), test[1])


def _stack(dataset):
    inputs, targets = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(inputs), torch.as_tensor(targets)


def figures(model: nn.Module, train, test) -> dict[str, float]:
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
    model = tt.default_registry().get("model", "mlp")(input_dim=train[0].shape[1])
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
    guard_256 = (train[0][order[-256:]], train[1][order[-256:]])
    guard_1024 = (train[0][order[-1024:]], train[1][order[-1024:]])
    basis_256 = train[0][order[-512:-256]]

    def round_(model, guard=None, basis=None, **options):
        """32 teleports; with ``guard``, all judged against its loss when the round began."""
        teleporter = tt.Teleporter(model, F.cross_entropy, **options)
        reports, baseline = [], None
        for i in range(32):
            report = teleporter.teleport(*batches[i + 1], guard=guard, guard_baseline=baseline, basis=basis)
            baseline = report.guard_loss_before if baseline is None else baseline
            reports.append(report)
        return {"stopped": sorted({r.stopped for r in reports}), "steps": sum(r.steps for r in reports)}

    def one(model, data, guard=None, basis=None, **options):
        report = tt.Teleporter(model, F.cross_entropy, **options).teleport(*data, guard=guard, basis=basis)
        return {
            "stopped": report.stopped,
            "steps": report.steps,
            "batch_loss_change": report.loss_change,
            "batch_grad_norm_ratio": report.gain,
            "step_sizes": report.step_sizes,
        }

    return {
        "1,024 samples, defaults": lambda m: one(m, sample),
        "1,024 samples, exact, lr 0.005": lambda m: one(m, sample, **EXACT),
        "batch of 32, defaults": lambda m: one(m, batches[0]),
        "batch of 32, exact, lr 0.005": lambda m: one(m, batches[0], **EXACT),
        "batch of 32 + guard 256, defaults": lambda m: one(m, batches[0], guard=guard_256),
        "batch of 32 + guard 256, exact, lr 0.005": lambda m: one(m, batches[0], guard=guard_256, **EXACT),
        "batch of 32 + guard 256 + basis 256, defaults": lambda m: one(m, batches[0], guard=guard_256, basis=basis_256),
        "round 32 x 32, defaults": lambda m: round_(m),
        "round 32 x 32, exact, lr 0.005": lambda m: round_(m, **EXACT),
        "round 32 x 32 + guard 32, defaults": lambda m: round_(m, guard=batches[0]),
        "round 32 x 32 + guard 256, defaults": lambda m: round_(m, guard=guard_256),
        "round 32 x 32 + guard 256 + basis 256, defaults": lambda m: round_(m, guard=guard_256, basis=basis_256),
        "round 32 x 32 + guard 256, exact, lr 0.005": lambda m: round_(m, guard=guard_256, **EXACT),
        "round 32 x 32 + guard 1024, defaults": lambda m: round_(m, guard=guard_1024),
    }


def measure(dataset: str) -> dict:
    train, test = splits(dataset)
    start = trained(train)
    before = figures(start, train, test)
    rows = []
    for name, run in settings(train).items():
        model = copy.deepcopy(start)
        started = time.process_time()
        outcome = run(model)
        seconds = time.process_time() - started
        after = figures(model, train, test)
        rows.append(
            {
                "setting": name,
                **outcome,
                "cpu_seconds": seconds,
                "train_loss_ratio": after["train_loss"] / before["train_loss"],
                "test_loss_ratio": after["test_loss"] / before["test_loss"],
                "train_grad_norm_ratio": after["train_grad_norm"] / before["train_grad_norm"],
            }
        )
    return {"before": before, "rows": rows}


def main() -> None:
    torch.set_num_threads(1)
    results = {name: measure(name) for name in ("digits", "mnist1d")}
    out = Path(__file__).resolve().parent / "results" / "data_level_set.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name, result in results.items():
        print(f"\n{name}\n")
        print("| setting | whole-train loss | test loss | whole-train grad norm | batch grad norm | steps | stopped | CPU s |")
        print("|---|---|---|---|---|---|---|---|")
        for row in result["rows"]:
            batch = f"x{row['batch_grad_norm_ratio']:.2f}" if "batch_grad_norm_ratio" in row else "-"
            print(
                f"| {row['setting']} | x{row['train_loss_ratio']:.4f} | x{row['test_loss_ratio']:.4f} "
                f"| x{row['train_grad_norm_ratio']:.3f} | {batch} | {row['steps']} | {row['stopped']} | {row['cpu_seconds']:.1f} |"
            )


if __name__ == "__main__":
    main()
