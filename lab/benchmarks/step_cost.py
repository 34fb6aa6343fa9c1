"""``bench.step_cost``: one teleport ascent step, and the basis, against one optimizer step.

For every registered model with a known input shape (the paper's MLP
784-1024-1024-10 first), on one random batch:

* SGD step: ``zero_grad``, forward, backward, ``optimizer.step()``;
* ascent step: ``(T(k) - T(1)) / (k - 1)`` with ``T(s)`` the median time of a
  whole :meth:`Teleporter.teleport` with ``s`` steps, so capture, basis and
  the final evaluation cancel and one step's objective gradient,
  projection and update remain; once with the default gradient path (the
  chain closed form or the structured path, first derivatives only) and
  once with ``gradient="full"`` (the double backward: the engine before the
  structured path), so the JSON holds the ratio before and after; the same
  difference in floating-point operations (``torch.utils.flop_counter``:
  matrix products and convolutions) against an SGD step's, a ratio free of
  the machine's timing noise;
* teleport: a whole default teleport of ``steps`` steps (capture, basis,
  steps, final check) against ``steps`` SGD steps;
* basis: the null space's bases of every site's representation (built
  once beforehand by the projectors), timed alone;
* defaults (the paper's MLP only): one teleport with the library's defaults,
  ``Teleporter(model, loss).teleport(batch, guard=...)`` with a guard batch of
  ``guard`` other samples, from the same starting point every time, against
  ``steps`` SGD steps.

All are timed in turns in one process. A ``torch.profiler`` table of
one teleport of the paper's MLP is written next to the JSON.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from torch_teleport import Teleporter, hookimpl
from torch_teleport.lab.benchmarks.common import (
    interleaved_medians,
    prepare,
    pyplot,
    representations,
    restores_threads,
    script_main,
    settings,
    write_outputs,
)
from torch_teleport.lab.experiment import save_figure
from torch_teleport.registry import default_registry

NAME = "step_cost"
TARGET = 1.0
"""Ascent step / SGD step the paper's MLP should stay under (1.3 required)."""

ZOO_TARGET = 2.0
"""Ascent step / SGD step every zoo model should stay under."""

FULL = {
    "fallback_tau": 0.99,
    "models": [],
    "batch": 32,
    "steps": 8,
    "repeats": 5,
    "warmup": 1,
    "lr": 1e-4,
    "mlp_hidden": [1024, 1024],
    "guard": 256,
}
TINY = {
    "models": ["mlp"],
    "batch": 8,
    "steps": 2,
    "repeats": 1,
    "warmup": 0,
    "mlp_hidden": [32, 32],
    "guard": 16,
}

Make = Callable[[torch.Generator, int], Tensor]


@dataclass(frozen=True)
class Probe:
    """How to feed one zoo model: factory options, random inputs and targets, the loss."""

    options: dict[str, Any] = field(default_factory=dict)
    inputs: Make = lambda g, n: torch.randn(n, 784, generator=g)
    targets: Make = lambda g, n: torch.randint(0, 10, (n,), generator=g)
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy

    def batch(self, generator: torch.Generator, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``n`` inputs and their targets drawn from ``generator`` (inputs first), on ``device``."""
        return self.inputs(generator, n).to(device), self.targets(generator, n).to(device)


def _images(channels: int, size: int) -> Make:
    return lambda g, n: torch.randn(n, channels, size, size, generator=g)


def _sequences(length: int, features: int) -> Make:
    return lambda g, n: torch.randn(n, length, features, generator=g)


def _tokens(vocab: int, length: int) -> Make:
    return lambda g, n: torch.randint(0, vocab, (n, length), generator=g)


PROBES: dict[str, Probe] = {
    "mlp": Probe(),
    "cnn": Probe({"in_channels": 3, "image_size": 32}, _images(3, 32)),
    "resnet": Probe({"in_channels": 3, "num_classes": 10}, _images(3, 16)),
    "transformer_classifier": Probe({"input_dim": 8, "seq_len": 8}, _sequences(8, 8)),
    "transformer_regressor": Probe(
        {"n_series": 16, "window": 48, "layers": 2},
        _sequences(48, 16),
        lambda g, n: torch.randn(n, 16, generator=g),
        F.mse_loss,
    ),
    "transformer_lm": Probe(
        {"vocab_size": 1000, "seq_len": 32, "layers": 2}, _tokens(1000, 32), _tokens(1000, 32)
    ),
    "mamba_classifier": Probe({"input_dim": 8}, _sequences(8, 8)),
    "mamba_lm": Probe(
        {"vocab_size": 1000, "d_model": 64, "layers": 2}, _tokens(1000, 32), _tokens(1000, 32)
    ),
}
"""Small input shapes per model (digits-sized sequences, CIFAR-sized images for the CNN, 16 x 16
for the residual network, 32-token text, 48-step series); the language models and the regressor
with 2 layers (the Mamba one 64 wide) to keep the run to minutes on a CPU."""


SKIPPED = "the benchmark knows no input shape for this model"


def probe_for(name: str, mlp_hidden: list[int]) -> Probe | None:
    """How to feed zoo model ``name`` (the MLP at hidden widths ``mlp_hidden``); ``None`` if unknown."""
    if name == "mlp":
        return Probe({"hidden": mlp_hidden})
    return PROBES.get(name)


@restores_threads
def run_step_cost(config: dict[str, Any], out_dir: Path) -> None:
    options = settings(config, FULL, TINY)
    device = prepare(options)
    registry = default_registry()
    names = options["models"] or ["mlp", *(n for n in registry.names("model") if n != "mlp")]
    rows = []
    for name in names:
        factory = registry.get("model", name)
        probe = probe_for(name, options["mlp_hidden"])
        if probe is None:
            rows.append({"model": name, "skipped": SKIPPED})
            continue
        print(f"step cost: {name}", flush=True)
        rows.append(_measure(name, factory, probe, options, device, registry))
    paper = rows[0] if rows and rows[0]["model"] == "mlp" and "ascent_over_sgd" in rows[0] else None
    profile = _profile(Probe({"hidden": options["mlp_hidden"]}), options, device)
    figure = write_outputs(
        NAME,
        out_dir,
        options,
        device,
        {
            "method": "ascent = (T(steps) - T(1)) / (steps - 1), medians of interleaved repeats",
            "target_ascent_over_sgd": TARGET,
            "zoo_target_ascent_over_sgd": ZOO_TARGET,
            "paper_mlp": paper,
            "target_met": None if paper is None else paper["ascent_over_sgd"] <= TARGET,
            "models": rows,
            "profile": profile,
        },
    )
    _plot([row for row in rows if "ascent_over_sgd" in row], figure)
    for row in rows:
        if "ascent_over_sgd" in row:
            print(
                f"{row['model']:>24}: ascent step {row['ascent_over_sgd']:.2f}x SGD step "
                f"({row['ascent_seconds'] * 1e3:.1f} ms vs {row['sgd_seconds'] * 1e3:.1f} ms; "
                f"{row['ascent_flops_over_sgd']:.2f}x its FLOPs; "
                f"{row['paths']}), full path {row['full_ascent_over_sgd']:.2f}x, whole teleport "
                f"{row['teleport_over_sgd_steps']:.2f}x its steps' SGD steps, "
                f"basis {row['basis_over_sgd']:.2f}x ({row['null_space']}, tau = {row['tau']:g})"
                + (f"; the defaults with a guard of {options['guard']}: {row['defaults_over_sgd_steps']:.2f}x "
                   f"{options['steps']} SGD steps ({row['defaults_report']})" if "defaults_seconds" in row else "")
            )
        else:
            print(f"{row['model']:>24}: {row.get('skipped') or row.get('error')}")


def _measure(
    name: str, factory, probe: Probe, options: dict, device: torch.device, registry
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    try:
        torch.manual_seed(0)
        model = factory(**probe.options).to(device)
        inputs, targets = probe.batch(generator, options["batch"], device)
        teleporter, first, null_space, tau = _teleporter_with_room(
            model, probe, inputs, targets, options, registry
        )
    except Exception as error:  # a zoo model whose factory changed: say so, measure the others
        return {"model": name, "error": f"{type(error).__name__}: {error}"}
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(trained.parameters(), lr=options["lr"])

    def sgd_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        probe.loss(trained(inputs), targets).backward()
        optimizer.step()

    full = _teleporter(model, probe, null_space, tau, options, registry, gradient="full")
    sites = representations(teleporter, inputs)
    builder = teleporter.mover.null_space

    def basis() -> None:
        for representation in sites.values():
            builder.basis(representation)

    tasks = {
        "sgd": sgd_step,
        "basis": basis,
        "one": lambda: teleporter.teleport(inputs, targets, steps=1),
        "many": lambda: teleporter.teleport(inputs, targets),
        "full_one": lambda: full.teleport(inputs, targets, steps=1),
        "full_many": lambda: full.teleport(inputs, targets),
    }
    defaults = _defaults(model, probe, generator, options, device) if name == "mlp" else None
    if defaults is not None:
        tasks["defaults"] = defaults
    medians = interleaved_medians(tasks, repeats=options["repeats"], warmup=options["warmup"], device=device)
    ascent = (medians["many"] - medians["one"]) / (options["steps"] - 1)
    flops = {task: _flops(tasks[task]) for task in ("sgd", "one", "many")}
    full_ascent = (medians["full_many"] - medians["full_one"]) / (options["steps"] - 1)
    paths = sorted({layer.gradient for layer in first.layers})
    extra = {}
    if defaults is not None:
        report = defaults()
        extra = {
            "defaults_seconds": medians["defaults"],
            "defaults_over_sgd_steps": medians["defaults"] / (options["steps"] * medians["sgd"]),
            "defaults_report": {"steps": report.steps, "stopped": report.stopped,
                                "gain": report.gain, "guard": options["guard"]},
        }
    return {
        **extra,
        "model": name,
        "options": probe.options,
        "input_shape": list(inputs.shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "null_space": null_space,
        "tau": tau,
        "moved_sites": sum(layer.null_dim > 0 for layer in first.layers),
        "sites": len(first.layers),
        "paths": "+".join(paths),
        "sgd_seconds": medians["sgd"],
        "teleport_seconds": medians["many"],
        "ascent_seconds": ascent,
        "full_ascent_seconds": full_ascent,
        "basis_seconds": medians["basis"],
        "ascent_over_sgd": ascent / medians["sgd"],
        "ascent_flops_over_sgd": (flops["many"] - flops["one"]) / (options["steps"] - 1) / flops["sgd"],
        "full_ascent_over_sgd": full_ascent / medians["sgd"],
        "teleport_over_sgd_steps": medians["many"] / (options["steps"] * medians["sgd"]),
        "basis_over_sgd": medians["basis"] / medians["sgd"],
    }


def _flops(task: Callable[[], Any]) -> int:
    """The floating-point operations of one run of ``task`` by ``torch.utils.flop_counter``'s formulas
    (matrix products and convolutions): the work, whatever the machine's timing noise."""
    with _FlopCount() as counter:
        task()
    return counter.total


class _FlopCount(TorchDispatchMode):
    """``FlopCounterMode``'s count without its module tracker, whose backward hooks fail inside the
    ``torch.autograd.grad`` calls of a teleport."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def _defaults(model, probe: Probe, generator: torch.Generator, options: dict, device: torch.device):
    """A default teleport with a guard batch, from ``model``'s current point every time it runs
    (restoring the weights is part of what is timed: a copy of the parameters, small beside a
    teleport); it returns the report."""
    guarded = copy.deepcopy(model)
    start = copy.deepcopy(guarded.state_dict())
    teleporter = Teleporter(guarded, probe.loss, steps=options["steps"], uncovered="freeze")
    inputs, targets = probe.batch(generator, options["batch"], device)
    guard = probe.batch(generator, options["guard"], device)

    def run():
        guarded.load_state_dict(start)
        return teleporter.teleport(inputs, targets, guard=guard)

    return run


def _teleporter_with_room(model, probe: Probe, inputs, targets, options: dict, registry):
    """A teleporter that can take a step on the batch, and the report of that step.

    At ``tau = 1`` a batch with more samples (tokens, patches) than a
    layer's inputs leaves that layer no room; where no layer has any, the
    step is timed at ``tau = fallback_tau`` instead (the JSON says which).
    """
    for null_space, tau in (("exact", 1.0), ("svd", options["fallback_tau"])):
        teleporter = _teleporter(model, probe, null_space, tau, options, registry)
        first = teleporter.teleport(inputs, targets, steps=1)
        if first.steps:
            return teleporter, first, null_space, tau
    raise ValueError(f"no room to teleport on this batch even at tau = {options['fallback_tau']}")


def _teleporter(model, probe: Probe, null_space: str, tau: float, options: dict, registry, gradient: str = "auto"):
    return Teleporter(
        model,
        probe.loss,
        null_space=null_space,
        tau=tau,
        gradient=gradient,
        lr=options["lr"],
        steps=options["steps"],
        uncovered="freeze",
        registry=registry,
    )


def _profile(
    probe: Probe, options: dict, device: torch.device, top: int = 12
) -> list[dict[str, Any]]:
    """The operators one teleport of the MLP spends its time in (self time, from ``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = default_registry().get("model", "mlp")(**probe.options).to(device)
    inputs, targets = probe.batch(generator, options["batch"], device)
    teleporter = Teleporter(model, probe.loss, lr=options["lr"], steps=options["steps"])
    teleporter.teleport(inputs, targets)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        teleporter.teleport(inputs, targets)
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[
        :top
    ]
    return [
        {"op": event.key, "self_cpu_seconds": event.self_cpu_time_total / 1e6, "calls": event.count}
        for event in events
    ]


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.0))
    bars = (
        ("ascent_over_sgd", "ascent step (default path)"),
        ("full_ascent_over_sgd", "ascent step (full path: double backward)"),
        ("teleport_over_sgd_steps", "whole teleport / its steps' SGD steps"),
        ("basis_over_sgd", "basis (once per teleport batch)"),
    )
    width = 0.8 / len(bars)
    for i, (key, label) in enumerate(bars):
        offset = (i - (len(bars) - 1) / 2) * width
        ax.bar([p + offset for p in range(len(rows))], [r[key] for r in rows], width, label=label)
    for level, label in ((TARGET, "paper MLP"), (ZOO_TARGET, "every zoo model")):
        ax.axhline(level, color="black", linestyle="--" if level == TARGET else ":", linewidth=1,
                   label=f"ascent-step target, {label}: {level:g}x")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("time / SGD step")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(figure, path)


@hookimpl
def teleport_register_experiments(registry) -> None:
    registry.add_experiment(f"bench.{NAME}", run_step_cost)


if __name__ == "__main__":
    raise SystemExit(script_main(NAME, run_step_cost))
