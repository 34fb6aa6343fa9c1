"""Sharpness phi: the mean loss under random weight perturbations of a few fixed sizes.

``phi(w) = mean over directions d and radii r of L(w + r d)``, with each ``d``
a Gaussian vector over *all* trainable parameters normalised to unit norm
(one global norm, not per layer) and ``r`` from a grid of radii. The same
directions are drawn from ``seed`` at every evaluation, so phi is a
deterministic, differentiable function of the weights: a teleport can
descend it (flatten, the default) or ascend it.

Perturbed losses run through :func:`torch.func.functional_call`, so the
model's own parameters are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torch_teleport import Batch, Evaluation, Objective, hookimpl
from torch_teleport.inputs import as_call
from torch_teleport.model_state import preserved_state
from torch_teleport.objective import LossFn

DEFAULT_RADII = (0.1, 0.2, 0.3, 0.4, 0.5)


def perturbed_loss(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Tensor,
    targets: Tensor,
    parameters: Sequence[nn.Parameter] | None = None,
    *,
    radii: Sequence[float] = DEFAULT_RADII,
    directions: int = 8,
    seed: int = 0,
) -> Tensor:
    """The mean of ``loss_fn(model(inputs), targets)`` over perturbed weights ``w + r d``.

    ``parameters`` (all trainable ones by default) are the ones perturbed;
    the result carries a graph to them. Directions are drawn in float64 on
    the CPU from ``seed`` and then moved to each parameter's device and
    dtype, so the value does not depend on the device.
    """
    radii = _check_radii(radii)
    if directions < 1:
        raise ValueError(f"directions must be at least 1, got {directions!r}")
    named = _named(model, parameters)
    generator = torch.Generator().manual_seed(int(seed))
    total = None
    for _ in range(directions):
        draws = {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in named.items()}
        norm = torch.sqrt(sum(d.square().sum() for d in draws.values()))
        unit = {name: (d / norm).to(device=named[name].device, dtype=named[name].dtype) for name, d in draws.items()}
        for radius in radii:
            perturbed = {name: p + radius * unit[name] for name, p in named.items()}
            args, kwargs = as_call(inputs)
            loss = loss_fn(functional_call(model, perturbed, args, kwargs), targets)
            total = loss if total is None else total + loss
    return total / (directions * len(radii))


def measure_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    radii: Sequence[float] = DEFAULT_RADII,
    directions: int = 8,
    seed: int = 0,
) -> float:
    """Sharpness phi of ``model`` averaged over ``batches`` (each gets directions from its own seed).

    Runs in eval mode without gradients and leaves the model as found.
    """
    if not batches:
        raise ValueError("measure_sharpness needs at least one batch")
    values = []
    with preserved_state(model), torch.no_grad():
        for index, (inputs, targets) in enumerate(batches):
            value = perturbed_loss(
                model, loss_fn, inputs, targets, radii=radii, directions=directions, seed=seed + index
            )
            values.append(float(value))
    return sum(values) / len(values)


class Sharpness(Objective):
    """Sharpness phi on the teleport batch as a teleport objective (descend by default).

    Args:
        direction: ``"descend"`` (flatter, the default) or ``"ascend"``.
        radii: perturbation sizes, in the norm of the whole parameter vector.
        directions: random unit directions per radius (the same for every radius).
        seed: seed of the directions; fixed, so every step sees the same perturbations.
    """

    default_direction = "descend"

    def __init__(
        self,
        direction: str | None = None,
        *,
        radii: Sequence[float] = DEFAULT_RADII,
        directions: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(direction)
        self.radii = _check_radii(radii)
        if int(directions) < 1:
            raise ValueError(f"directions must be at least 1, got {directions!r}")
        self.directions = int(directions)
        self.seed = int(seed)

    def evaluate(self, batch: Batch) -> Evaluation:
        value = perturbed_loss(
            batch.model,
            batch.loss_fn,
            batch.inputs,
            batch.targets,
            batch.parameters,
            radii=self.radii,
            directions=self.directions,
            seed=self.seed,
        )
        return Evaluation(value=value, loss=batch.loss())


def _check_radii(radii: Sequence[float]) -> tuple[float, ...]:
    radii = tuple(float(r) for r in radii)
    if not radii or not all(r > 0 and r != float("inf") for r in radii):
        raise ValueError(f"radii must be a non-empty list of positive finite numbers, got {radii!r}")
    return radii


def _named(model: nn.Module, parameters: Sequence[nn.Parameter] | None) -> dict[str, nn.Parameter]:
    """``parameters`` by their names in ``model`` (all trainable ones when ``None``)."""
    if parameters is None:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    wanted = {id(p) for p in parameters}
    named = {name: p for name, p in model.named_parameters() if id(p) in wanted}
    if len(named) != len(wanted):
        raise ValueError("every perturbed parameter must be a parameter of the model")
    return named


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("sharpness", Sharpness)
