"""What an optimizer keeps across a teleport: its state as it was, none of it, or rescaled to the new point.

Momentum and Adam's moments are per-coordinate statistics of the gradients
at the point the teleport left. The teleport changed those gradients (that is
its purpose: a gradient norm several times larger), so the statistics are
stale in size, not only in direction:

* ``"keep"`` leaves them: an adaptive optimizer then divides the new, larger
  gradients by the old second moments for as long as those take to decay;
* ``"reset"`` clears them: the optimizer restarts from its first step (Adam's
  bias correction makes that step a full ``lr`` in every coordinate);
* ``"rescale"`` multiplies each parameter's first-moment buffers by how much
  its gradient norm grew over the teleport event, and its second-moment
  buffers by the square of it, so their size matches the new point while
  their direction (what the run learned about the landscape) is kept.

``"auto"`` (the default) chooses per optimizer family, by measurement
(:data:`AUTO` and docs/results.md, "Optimizer state"). A teleport event that
moved nothing changes nothing, the optimizer included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .report import TeleportReport

StatePolicy = str | Callable[[torch.optim.Optimizer, list[TeleportReport]], None]
POLICIES = ("auto", "keep", "reset", "rescale")

FIRST_MOMENTS = ("momentum_buffer", "exp_avg", "grad_avg")
"""State entries proportional to the gradient (SGD's momentum, Adam's and RMSprop's averages)."""

SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum")
"""State entries proportional to the squared gradient (Adam, AMSGrad, RMSprop, Adagrad)."""

AUTO: Mapping[str, str] = {
    "SGD": "keep",
    "Adam": "keep",
    "AdamW": "keep",
    "Adagrad": "reset",
}
"""The policy ``"auto"`` picks per optimizer class (by name, its MRO walked); others keep.
Measured (``lab/benchmarks/optimizer_state.py``: digits and MNIST-1D, 3 seeds, under the trainer's
default schedule and under the paper's; docs/results.md, "Optimizer state"): keeping the state was
best or within seed noise of the best for SGD (with and without momentum), Adam and AdamW; "rescale"
blew SGD with momentum up on digits under the paper's schedule; Adagrad, whose sum of squared
gradients never forgets the smaller gradients of the old point, trained best reset (MNIST-1D final
train loss 0.54 against 0.68 kept under the default schedule, 0.70 against 0.90 under the paper's)."""


def check_policy(policy: object) -> None:
    if not callable(policy) and policy not in POLICIES:
        raise ValueError(f"optimizer_state must be one of {POLICIES} or a callable, got {policy!r}")


def resolved(policy: StatePolicy, optimizer: torch.optim.Optimizer) -> StatePolicy:
    """The policy ``"auto"`` stands for with ``optimizer`` (any other as it is)."""
    if policy != "auto":
        return policy
    for cls in type(optimizer).__mro__:
        if cls.__name__ in AUTO:
            return AUTO[cls.__name__]
    return "keep"


def apply(
    policy: StatePolicy,
    optimizer: torch.optim.Optimizer,
    reports: list[TeleportReport],
    growth: Mapping[Tensor, float] | None = None,
) -> None:
    """Carry ``optimizer``'s state over a teleport event under ``policy``.

    ``growth`` maps parameters to how much their gradient norm grew over the
    event (what ``"rescale"`` needs; see :func:`gradient_growth`).
    """
    policy = resolved(policy, optimizer)
    if callable(policy):
        policy(optimizer, reports)
    elif policy == "reset":
        optimizer.state.clear()
    elif policy == "rescale":
        _rescale(optimizer, growth or {})


def _rescale(optimizer: torch.optim.Optimizer, growth: Mapping[Tensor, float]) -> None:
    with torch.no_grad():
        for param, state in optimizer.state.items():
            ratio = growth.get(param)
            if ratio is None:
                continue
            for key, value in state.items():
                if isinstance(value, Tensor) and value.is_floating_point() and value.shape == param.shape:
                    if key in FIRST_MOMENTS:
                        value.mul_(ratio)
                    elif key in SECOND_MOMENTS:
                        value.mul_(ratio**2)


def gradient_norms(parameters: list[Tensor], loss: Callable[[], Tensor]) -> dict[Tensor, float]:
    """Each parameter's gradient norm of ``loss()`` (one forward and backward, no state touched)."""
    grads = torch.autograd.grad(loss(), parameters, allow_unused=True)
    return {p: float(g.norm()) for p, g in zip(parameters, grads, strict=True) if g is not None}


def gradient_growth(before: Mapping[Tensor, float], after: Mapping[Tensor, float]) -> dict[Tensor, float]:
    """``after / before`` per parameter, where both are positive and finite."""
    growth = {}
    for param, old in before.items():
        new = after.get(param)
        if new is not None and old > 0 and torch.isfinite(torch.tensor(new / old)):
            growth[param] = new / old
    return growth
