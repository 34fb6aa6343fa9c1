"""Study: learn to teleport (the paper's Fig. 6) on its two-layer regression task.

Task: ``L(W1, W2) = 0.5 ||Y - W2 sigma(W1 X)||^2`` with ``sigma`` =
LeakyReLU(0.1), ``X`` (``width x samples``), ``Y``, ``W1``, ``W2`` drawn
uniformly from ``[0, 1)`` by a task seed. Methods, each run for ``steps``
gradient-descent steps on held-out task seeds:

* **GD**: plain gradient descent with learning rate ``lr``;
* **GD + teleport**: the same, with a null-space gradient-norm teleport
  (:class:`~torch_teleport.Teleporter`) before each step in ``teleport_at``;
* **learned teleport**: a meta-learned LSTM (two ``LSTMCell`` layers, hidden
  20) reads both layers' gradients and outputs a teleport direction for each
  layer and the learning rate of the next step. The direction is projected
  onto the null space of that layer's inputs by the linear projector and an
  exact :class:`~torch_teleport.CoreBasis`, like any teleport update, then
  scaled to ``magnitude`` times the layer's weight norm;
* **learned lr only**: the same LSTM meta-trained with its teleport switched
  off, to separate what the learned step size does from what the teleport does.

Meta-training: Adam on the sum of losses over ``unroll`` unrolled steps,
``meta_runs`` trajectories of ``meta_steps`` steps on their own task seeds.
The task differs from the paper in one way: ``samples`` (10) is below the
width (20), because with 20 samples in 20 dimensions the inputs of each layer
span its whole input space and an exact null-space teleport cannot move.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from torch_teleport import Teleporter, hookimpl
from torch_teleport.lab.config import Option, Table, at_least, non_empty, one_of, positive, resolve
from torch_teleport.lab.experiment import format_mean_std, markdown_table, progress_bar, save_figure
from torch_teleport.plugins.null_spaces.exact import ExactNullSpace
from torch_teleport.projectors.linear import LinearProjector

from .common import THREADS, pyplot, threads, write_outputs

KIND = "study_learn_to_teleport"
METHODS = ("GD", "GD + teleport", "learned teleport", "learned lr only")

SCHEMA = Table(
    {
        "kind": Option(KIND, str, check=one_of(KIND)),
        "threads": THREADS,
        "task": Table(
            {
                "width": Option(20, int, check=at_least(2)),
                "samples": Option(10, int, check=at_least(1)),
                "negative_slope": Option(0.1, float, check=positive),
            }
        ),
        "gd": Table(
            {
                "lr": Option(1e-4, float, check=positive),
                "steps": Option(100, int, check=at_least(2)),
                "test_seeds": Option([0, 1, 2, 3, 4], list, items=int, check=non_empty),
            }
        ),
        "teleport": Table(
            {
                "teleport_at": Option([0, 10, 20], list, items=int),
                "steps": Option(8, int, check=at_least(1)),
                "lr": Option(0.02, float, check=positive),
            }
        ),
        "meta": Table(
            {
                "hidden": Option(20, int, check=at_least(1)),
                "magnitude": Option(0.01, float, check=positive),
                "lr_min": Option(1e-7, float, check=positive),
                "lr_max": Option(5e-3, float, check=positive),
                "meta_lr": Option(1e-3, float, check=positive),
                "meta_runs": Option(30, int, check=at_least(1)),
                "meta_steps": Option(100, int, check=at_least(2)),
                "unroll": Option(10, int, check=at_least(1)),
                "first_meta_seed": Option(1000, int),
                "seed": Option(0, int),
            }
        ),
    }
)


@dataclass
class Task:
    """One regression problem: the model (weights from the task seed), its data and its loss."""

    model: nn.Sequential
    inputs: Tensor  # samples x width
    targets: Tensor  # samples x width

    @staticmethod
    def draw(seed: int, width: int, samples: int, negative_slope: float) -> Task:
        generator = torch.Generator().manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.LeakyReLU(negative_slope), nn.Linear(width, width, bias=False)
        )
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.weight.copy_(torch.rand(width, width, generator=generator))
        inputs = torch.rand(samples, width, generator=generator)
        targets = torch.rand(samples, width, generator=generator)
        return Task(model, inputs, targets)

    def loss(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        outputs = self.model(self.inputs) if weights is None else functional_call(self.model, weights, (self.inputs,))
        return squared_error(outputs, self.targets)

    def layer_inputs(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """What each Linear layer reads on the batch, for its null space."""
        hidden = self.model[1](self.inputs @ weights["0.weight"].T)
        return {"0.weight": self.inputs, "2.weight": hidden}


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * (outputs - targets).square().sum()


class TeleportLSTM(nn.Module):
    """Two LSTM cells reading the normalised gradients; outputs a direction per layer and a step size.

    The gradient is fed as ``g / ||g||`` (raw gradients of this task are
    ~1e4 and saturate the cells). The step size is
    ``exp(log lr_min + sigmoid(a) (log lr_max - log lr_min))``: inside the
    paper's range, with a gradient everywhere (a clamp has none outside).
    """

    def __init__(self, shapes: dict[str, torch.Size], hidden: int, lr_min: float, lr_max: float) -> None:
        super().__init__()
        self.shapes = dict(shapes)
        size = sum(math.prod(shape) for shape in self.shapes.values())
        self.cell1 = nn.LSTMCell(size, hidden)
        self.cell2 = nn.LSTMCell(hidden, hidden)
        self.direction = nn.Linear(hidden, size)
        self.step = nn.Linear(hidden, 1)
        self.log_lr = (math.log(lr_min), math.log(lr_max))

    def initial_state(self) -> list[tuple[Tensor, Tensor]]:
        zeros = torch.zeros(1, self.cell1.hidden_size)
        return [(zeros, zeros), (zeros, zeros)]

    def forward(self, grads: dict[str, Tensor], state):
        flat = torch.cat([grads[name].flatten() for name in self.shapes])
        flat = flat / flat.norm().clamp_min(1e-30)
        first = self.cell1(flat[None], state[0])
        second = self.cell2(first[0], state[1])
        out = self.direction(second[0])[0]
        directions, start = {}, 0
        for name, shape in self.shapes.items():
            directions[name] = out[start : start + math.prod(shape)].reshape(shape)
            start += math.prod(shape)
        low, high = self.log_lr
        lr = torch.exp(low + torch.sigmoid(self.step(second[0])[0, 0]) * (high - low))
        return directions, lr, [first, second]


class NullSpaceTeleport:
    """Projects a direction onto each layer's input null space and scales it: the learned teleport step."""

    def __init__(self, task: Task, magnitude: float) -> None:
        self.task = task
        self.magnitude = magnitude
        self.projector = LinearProjector()
        self.null_space = ExactNullSpace()

    def __call__(self, weights: dict[str, Tensor], directions: dict[str, Tensor]) -> dict[str, Tensor]:
        inputs = self.task.layer_inputs({k: v.detach() for k, v in weights.items()})
        moved = {}
        for name, weight in weights.items():
            layer = self.task.model.get_submodule(name.rsplit(".", 1)[0])
            (site,) = self.projector.sites(layer)
            basis = self.null_space.basis(self.projector.representation(layer, site, [inputs[name]]))
            update = {"weight": directions[name].clone()}
            self.projector.project(layer, site, update, basis)
            scale = self.magnitude * weight.detach().norm() / update["weight"].norm().clamp_min(1e-30)
            moved[name] = weight + scale * update["weight"]
        return moved


def run_learned(task: Task, lstm: TeleportLSTM, steps: int, lr: float, magnitude: float, teleport: bool,
                unroll: int | None = None, optimizer: torch.optim.Optimizer | None = None) -> tuple[list[float], list[float]]:
    """``steps`` GD steps whose learning rates (and teleports) come from ``lstm``.

    With ``optimizer`` the LSTM is meta-trained on the way: every ``unroll``
    steps, one Adam step on the sum of the unrolled losses.
    """
    weights = {name: p.detach().clone().requires_grad_() for name, p in task.model.named_parameters()}
    teleporter = NullSpaceTeleport(task, magnitude)
    state = lstm.initial_state()
    step_lr: Tensor | float = lr
    losses, times, unrolled = [], [], []
    started = time.perf_counter()
    for step in range(steps):
        loss = task.loss(weights)
        losses.append(float(loss.detach()))
        unrolled.append(loss)
        grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()), retain_graph=True), strict=True))
        weights = {name: w - step_lr * grads[name] for name, w in weights.items()}
        directions, step_lr, state = lstm(grads, state)
        if teleport:
            weights = teleporter(weights, directions)
        if optimizer is not None and (step + 1) % unroll == 0:
            optimizer.zero_grad()
            torch.stack(unrolled).sum().backward()
            optimizer.step()
            unrolled = []
            weights = {name: w.detach().requires_grad_() for name, w in weights.items()}
            state = [(h.detach(), c.detach()) for h, c in state]
            step_lr = step_lr.detach()
        elif optimizer is None:
            weights = {name: w.detach().requires_grad_() for name, w in weights.items()}
            state = [(h.detach(), c.detach()) for h, c in state]
            step_lr = step_lr.detach()
        times.append(time.perf_counter() - started)
    return losses, times


def run_gd(
    task: Task, steps: int, lr: float, teleport_at: list[int], teleport: dict[str, Any]
) -> tuple[list[float], list[float]]:
    """Plain GD on the task's model, teleporting before each step in ``teleport_at``; losses and times."""
    teleporter = Teleporter(task.model, squared_error, steps=teleport["steps"], lr=teleport["lr"]) if teleport_at else None
    losses, times = [], []
    started = time.perf_counter()
    for step in range(steps):
        if teleporter is not None and step in teleport_at:
            teleporter.teleport(task.inputs, task.targets)
        loss = task.loss()
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, list(task.model.parameters()))
        with torch.no_grad():
            for p, g in zip(task.model.parameters(), grads, strict=True):
                p.sub_(lr * g)
        times.append(time.perf_counter() - started)
    return losses, times


def run_learn_to_teleport(config: dict[str, Any], out_dir: Path) -> None:
    """Meta-train both LSTMs, test every method on the test seeds; table and figures."""
    config = resolve(config, SCHEMA)
    with threads(config["threads"]):
        _run(config, Path(out_dir))


def _run(config: dict[str, Any], out_dir: Path) -> None:
    task_options, gd, meta = config["task"], config["gd"], config["meta"]
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def task(seed: int) -> Task:
        return Task.draw(seed, task_options["width"], task_options["samples"], task_options["negative_slope"])

    shapes = {name: p.shape for name, p in task(0).model.named_parameters()}
    lstms = {}
    meta_losses = {}
    with progress_bar(2 * meta["meta_runs"], "meta-train", unit="run") as bar:
        for method, teleport in (("learned teleport", True), ("learned lr only", False)):
            torch.manual_seed(meta["seed"])
            lstm = TeleportLSTM(shapes, meta["hidden"], meta["lr_min"], meta["lr_max"])
            optimizer = torch.optim.Adam(lstm.parameters(), lr=meta["meta_lr"])
            meta_losses[method] = []
            for run in range(meta["meta_runs"]):
                losses, _ = run_learned(
                    task(meta["first_meta_seed"] + run), lstm, meta["meta_steps"], gd["lr"], meta["magnitude"],
                    teleport, meta["unroll"], optimizer,
                )
                meta_losses[method].append(float(np.mean(np.log10(losses))))
                bar.update(1)
            lstms[method] = (lstm, teleport)
    meta_seconds = time.perf_counter() - started
    curves: dict[str, list[list[float]]] = {method: [] for method in METHODS}
    seconds: dict[str, list[list[float]]] = {method: [] for method in METHODS}
    for seed in gd["test_seeds"]:
        for method in METHODS:
            if method in lstms:
                lstm, teleport = lstms[method]
                losses, times = run_learned(task(seed), lstm, gd["steps"], gd["lr"], meta["magnitude"], teleport)
            else:
                at = config["teleport"]["teleport_at"] if method == "GD + teleport" else []
                losses, times = run_gd(task(seed), gd["steps"], gd["lr"], at, config["teleport"])
            seconds[method].append(times)
            curves[method].append(losses)
    rows = []
    for method in METHODS:
        runs = np.asarray(curves[method])
        halfway = [r[len(r) // 2] for r in curves[method]]
        rows.append(
            [
                method,
                format_mean_std(runs[:, 0].tolist(), 4),
                format_mean_std(halfway, 4),
                format_mean_std(runs[:, -1].tolist(), 4),
                format_mean_std([times[-1] for times in seconds[method]], 3),
            ]
        )
    header = ["method", "loss at step 0", f"loss at step {gd['steps'] // 2}", f"loss at step {gd['steps'] - 1}", "seconds"]
    notes = [
        f"Regression task of the paper with {task_options['samples']} samples instead of "
        f"{task_options['width']} (an exact null-space teleport needs fewer samples than inputs); width "
        f"{task_options['width']}, LeakyReLU({task_options['negative_slope']}); no dataset involved.",
        f"GD lr {gd['lr']}; fixed teleports before steps {config['teleport']['teleport_at']} "
        f"({config['teleport']['steps']} steps, lr {config['teleport']['lr']}, gradient-norm objective); "
        f"LSTM hidden {meta['hidden']}, teleport magnitude {meta['magnitude']}, lr in "
        f"[{meta['lr_min']:g}, {meta['lr_max']:g}], meta-trained with Adam (lr {meta['meta_lr']}) on "
        f"{meta['meta_runs']} runs of {meta['meta_steps']} steps unrolled {meta['unroll']} at a time "
        f"({meta_seconds:.0f} s); tested on seeds {gd['test_seeds']} (mean ± std).",
    ]
    markdown = write_outputs(
        out_dir,
        title="Learning to teleport",
        notes=notes,
        tables=[markdown_table(header, rows)],
        data={"config": config, "meta_log10_loss": meta_losses, "losses": curves, "seconds": seconds},
    )
    _plot(curves, seconds, out_dir / "learn_to_teleport.png")
    print(markdown, end="")


def _plot(curves: dict[str, list[list[float]]], seconds: dict[str, list[list[float]]], path: Path) -> None:
    plt = pyplot()
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method, runs in curves.items():
        values = np.log10(np.asarray(runs))
        mean, std = values.mean(axis=0), values.std(axis=0)
        steps = np.arange(len(mean))
        by_step.plot(steps, mean, label=method)
        by_step.fill_between(steps, mean - std, mean + std, alpha=0.2)
        by_time.plot(np.mean(seconds[method], axis=0), mean, label=method)
    by_step.set_xlabel("GD step")
    by_time.set_xlabel("wall-clock seconds (mean over test tasks)")
    for ax in (by_step, by_time):
        ax.set_ylabel("log10 loss (mean over test tasks)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(KIND, run_learn_to_teleport)
