"""Symmetry teleport (Zhao et al. 2022; 2024): the GL action on pairs of layers of a LeakyReLU MLP.

For consecutive layers ``V = W_m`` (input ``h``, pre-activation ``z = V h``)
and ``U = W_{m+1}``, and ``T`` in the Lie algebra of ``GL_k`` (``k`` the
hidden width), the action is

    U <- U (I + T)^{-1},    V <- V + (sigma^{-1}((I + T) sigma(z)) - z) h^+.

It leaves the network's output on the batch unchanged exactly when
``h^+ h = I``, i.e. when the batch is no larger than the layer's input
width (bias included); otherwise it only approximates the level set. The
``V`` update is the references' ``sigma^{-1}((I + T) sigma(V h)) h^+`` written
as a correction of ``V``: the two agree on the batch, and this form keeps the
part of ``V`` outside the span of the batch inputs (the references' form
discards it even for ``T = 0``). ``U`` uses the exact inverse, not the
first-order ``I - T``.

Gradient ascent runs on ``T``, one per pair, not on the weights: each step
takes the objective's gradient with respect to the weights (one double
backward, as the null-space method does), pulls it back to every ``T`` at
``T = 0`` and applies the actions pair by pair, recomputing the next layer's
inputs and their pseudo-inverse (one per layer per step: the cost the
null-space method avoids).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from torch_teleport.climb import Applied, AscentStopped, Climb, Step
from torch_teleport.hookspecs import hookimpl
from torch_teleport.method import MethodContext, Mover, TeleportMethod
from torch_teleport.objective import Batch, Evaluation

PASSIVE = (nn.Flatten, nn.Identity, nn.Dropout)
"""Parameter-free modules allowed before the first layer (dropout is off during a teleport)."""


@dataclass
class _Pair:
    """Consecutive layers ``V`` (``lower``) and ``U`` (``upper``) joined by a LeakyReLU of ``slope``."""

    lower: nn.Linear
    upper: nn.Linear
    slope: float


@dataclass
class _Inputs:
    """The lower layer's inputs on the batch (``h``, bias row appended), their pseudo-inverse, ``z``."""

    h: Tensor  # (d_in [+1], n)
    pinv: Tensor  # (n, d_in [+1])
    z: Tensor  # (k, n) pre-activations of the lower layer


class SymmetryMethod(TeleportMethod):
    """Symmetry teleport on an ``nn.Sequential`` of ``Linear`` layers joined by ``LeakyReLU``.

    ``lr`` sets the group step: with ``normalize=True`` the ``T`` of all
    pairs together has Frobenius norm ``lr`` (so each weight moves by at
    most about ``lr`` of its norm, comparable to the null-space method's
    normalisation); with ``normalize=False``, ``T = lr * dObjective/dT`` as
    in the references. The report's ``basis_seconds`` is the time spent in
    pseudo-inverses. It takes no options.
    """

    def bind(self, context: MethodContext) -> SymmetryMover:
        return SymmetryMover(context)


class SymmetryMover(Mover):
    """The layer pairs of one MLP (a clear error for any other model)."""

    def __init__(self, context: MethodContext) -> None:
        super().__init__(context)
        self.prefix, self.pairs = _parse_mlp(context.model)

    def climb(self, batch: Batch) -> SymmetryClimb:
        return SymmetryClimb(self, batch)

    def fixed(self) -> dict[str, str]:
        """Trainable parameters the action never moves: the last layer's bias."""
        names = {id(p): name for name, p in self.context.model.named_parameters()}
        bias = self.pairs[-1].upper.bias
        return {names[id(bias)]: "the group action leaves the last layer's bias fixed"} if bias is not None else {}


class SymmetryClimb(Climb):
    """One batch: the first layer's inputs (fixed) and every pair's inputs at the current point.

    A step moves the pairs one after the other, so the inputs of the next
    pair change with it: they are read off the moved network (a
    pseudo-inverse per layer per step). Its steps are not retried: an undo
    restores the weights but not the inputs read after them.
    """

    retries = False

    def __init__(self, mover: SymmetryMover, batch: Batch) -> None:
        self.mover, self.batch = mover, batch
        self.params = list(batch.parameters)
        self.first = mover.context.evaluate(batch)
        self.frozen = mover.fixed()
        with torch.no_grad():
            self.first_input = mover.prefix(batch.inputs).reshape(batch.inputs.shape[0], -1)
        self.inputs: list[_Inputs] | None = None

    def evaluate(self) -> Evaluation:
        return self.mover.context.evaluate(self.batch)

    def step(self, evaluation: Evaluation) -> SymmetryStep:
        grads = dict(zip(self.params, torch.autograd.grad(evaluation.value, self.params, allow_unused=True), strict=True))
        with torch.no_grad():
            if self.inputs is None:
                self.inputs = self.act(None)
            directions = [_group_gradient(pair, self.inputs[i], grads) for i, pair in enumerate(self.mover.pairs)]
        return SymmetryStep(self, directions)

    def act(self, group: list[Tensor] | None) -> list[_Inputs]:
        """Apply ``I + T`` to every pair in order and return every pair's inputs afterwards.

        With ``group=None`` it only reads the inputs. A pair's inputs depend
        only on the layers below it, which earlier pairs have already moved,
        so they are read off the moved network; the first layer's inputs
        never change, so their pseudo-inverse is taken from the last reading.
        """
        found = []
        h = self.first_input
        for i, pair in enumerate(self.mover.pairs):
            if i == 0 and self.inputs is not None:
                columns, pinv = self.inputs[0].h, self.inputs[0].pinv
            else:
                columns = _with_bias_row(h.T, pair.lower.bias is not None)
                started = time.perf_counter()
                pinv = torch.linalg.pinv(columns)
                self.basis_seconds += time.perf_counter() - started
            z = _affine(pair.lower, columns)
            if group is not None:
                z = _act_on_pair(pair, group[i], z, columns, pinv)
            found.append(_Inputs(columns, pinv, z))
            h = F.leaky_relu(z, pair.slope).T
        return found


class SymmetryStep(Step):
    """The group directions ``dObjective/dT`` of every pair; taken by acting with ``I + scale T``."""

    def __init__(self, climb: SymmetryClimb, directions: list[Tensor]) -> None:
        self.climb, self.directions = climb, directions
        self.norm = float(get_total_norm(directions))

    def apply(self, scale: float, module_limit: float | None) -> Applied:
        layers = {id(layer): layer for pair in self.climb.mover.pairs for layer in (pair.lower, pair.upper)}
        saved = [(layer, [p.detach().clone() for p in layer.parameters()]) for layer in layers.values()]
        with torch.no_grad():
            try:
                self.climb.inputs = self.climb.act([t * scale for t in self.directions])
            except torch.linalg.LinAlgError:
                raise AscentStopped("non_finite") from None  # I + T singular: the step was far too large
        return Applied(undo=lambda: _restore(saved))


def _act_on_pair(pair: _Pair, direction: Tensor, z: Tensor, columns: Tensor, pinv: Tensor) -> Tensor:
    """Move one pair by ``I + T`` (``T = direction``) in place; the lower layer's new pre-activations."""
    identity_plus_t = torch.eye(direction.shape[0], dtype=z.dtype, device=z.device) + direction
    target = _leaky_relu_inverse(identity_plus_t @ F.leaky_relu(z, pair.slope), pair.slope)
    _set_affine(pair.lower, _affine_matrix(pair.lower) + (target - z) @ pinv)
    pair.upper.weight.copy_(torch.linalg.solve(identity_plus_t, pair.upper.weight, left=False))
    return _affine(pair.lower, columns)


def _group_gradient(pair: _Pair, inputs: _Inputs, grads: dict) -> Tensor:
    """``dObjective/dT`` at ``T = 0`` for one pair, from the objective's weight gradients.

    ``dU = -U dT`` and ``dV = (dT sigma(z) / sigma'(z)) h^+``, so the
    pull-back is ``-U^T G_U + (G_V (h^+)^T / sigma'(z)) sigma(z)^T``.
    """
    grad_upper = _zero_if_none(grads[pair.upper.weight], pair.upper.weight)
    grad_lower = _zero_if_none(grads[pair.lower.weight], pair.lower.weight)
    if pair.lower.bias is not None:
        grad_lower = torch.cat([grad_lower, _zero_if_none(grads[pair.lower.bias], pair.lower.bias)[:, None]], 1)
    through_lower = grad_lower @ inputs.pinv.T
    through_lower = torch.where(inputs.z >= 0, through_lower, through_lower / pair.slope)
    return -pair.upper.weight.T @ grad_upper + through_lower @ F.leaky_relu(inputs.z, pair.slope).T


def _restore(saved: list[tuple[nn.Module, list[Tensor]]]) -> None:
    with torch.no_grad():
        for layer, values in saved:
            for param, value in zip(layer.parameters(), values, strict=True):
                param.copy_(value)


def _parse_mlp(model: nn.Module) -> tuple[nn.Sequential, list[_Pair]]:
    """The passive prefix and the layer pairs of ``model``; a clear error for anything else."""
    what = (
        "symmetry teleport needs an nn.Sequential of Linear layers joined by LeakyReLU "
        "(an MLP with an invertible activation)"
    )
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{what}; got {type(model).__name__}")
    children = list(model)
    start = 0
    while start < len(children) and isinstance(children[start], PASSIVE):
        start += 1
    linears: list[nn.Linear] = []
    slopes: list[float] = []
    expect_linear = True
    for index, layer in enumerate(children[start:], start):
        if isinstance(layer, nn.Dropout):
            continue
        if expect_linear and isinstance(layer, nn.Linear):
            linears.append(layer)
        elif not expect_linear and isinstance(layer, nn.LeakyReLU):
            if not layer.negative_slope > 0:
                raise ValueError(
                    f"{what}; layer {index} is LeakyReLU({layer.negative_slope}), which is not invertible"
                )
            slopes.append(float(layer.negative_slope))
        else:
            wanted = "Linear" if expect_linear else "LeakyReLU"
            raise TypeError(
                f"{what}; layer {index} is {type(layer).__name__} where {wanted} was expected"
            )
        expect_linear = not expect_linear
    if len(linears) < 2:
        raise ValueError(
            f"{what}; {type(model).__name__} has {len(linears)} Linear layer(s), the action needs two"
        )
    for name, param in model.named_parameters():
        if not param.requires_grad:
            raise ValueError(
                f"symmetry teleport moves every layer of the MLP, but {name} has requires_grad=False"
            )
        if param.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"teleport needs float32 or float64 parameters, {name} is {param.dtype}"
            )
    pairs = [
        _Pair(lower, upper, slope)
        for lower, upper, slope in zip(linears, linears[1:], slopes, strict=False)
    ]
    return nn.Sequential(*children[:start]), pairs


def _with_bias_row(columns: Tensor, bias: bool) -> Tensor:
    if not bias:
        return columns
    return torch.cat([columns, torch.ones_like(columns[:1])])


def _affine_matrix(layer: nn.Linear) -> Tensor:
    """``[W | b]``: the layer as one matrix acting on inputs with a bias row."""
    if layer.bias is None:
        return layer.weight
    return torch.cat([layer.weight, layer.bias[:, None]], 1)


def _set_affine(layer: nn.Linear, matrix: Tensor) -> None:
    """Write ``[W | b]`` back in place, so optimizers keep their parameter references."""
    layer.weight.copy_(matrix[:, : layer.in_features])
    if layer.bias is not None:
        layer.bias.copy_(matrix[:, layer.in_features])


def _affine(layer: nn.Linear, columns: Tensor) -> Tensor:
    return _affine_matrix(layer) @ columns


def _leaky_relu_inverse(values: Tensor, slope: float) -> Tensor:
    return F.leaky_relu(values, 1.0 / slope)


def _zero_if_none(grad: Tensor | None, param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


@hookimpl
def teleport_register_methods(registry) -> None:
    registry.add_method("symmetry", SymmetryMethod)
