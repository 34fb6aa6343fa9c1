"""Curvature psi of a minimum: how fast the layer-pair symmetry curves through the weights bend.

For consecutive layers ``V`` (inner) and ``U`` (outer) of an MLP with an
invertible activation ``sigma``, a generator ``M`` (``k x k``, ``k`` the
hidden width) gives the curve

    gamma(t) = (U exp(-tM),  sigma^{-1}(exp(tM) sigma(V h)) h^+)

which keeps the network's output on the batch fixed whenever ``h^+ h = I``.
Its derivatives at ``t = 0`` are analytic (``z = V h``, ``s = sigma(z)``):

    gamma'_U  = -U M                       gamma''_U = U M^2
    gamma'_V  = z' h^+,  z'  = M s / sigma'(z)
    gamma''_V = z'' h^+, z'' = (M^2 s - sigma''(z) z'^2) / sigma'(z)

(``sigma'' = 0`` for LeakyReLU, which gives the paper's formulas). The
curvature of the curve is ``kappa = |g''_perp| / |g'|^2`` on the flattened
concatenation, with ``g''_perp`` the part of ``g''`` orthogonal to ``g'``;
this equals ``sqrt(|g'|^2 |g''|^2 - <g', g''>^2) / |g'|^3`` without its
cancellation. psi is the mean of kappa over random unit-Frobenius Gaussian
generators (drawn from a fixed seed), over layer pairs and over batches.

A bias of ``V`` is folded in (``V`` acts on ``[h; 1]``); a bias of ``U`` is
left alone by the action. Defined on ``nn.Sequential`` MLPs only: optional
leading ``nn.Flatten``, then ``Linear`` layers separated by one invertible
activation each (``LeakyReLU`` with a positive slope, ``Tanh``, ``Sigmoid``).
Anything else raises :class:`CurvatureUndefinedError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_teleport import Batch, Evaluation, Objective, hookimpl
from torch_teleport.model_state import preserved_state

PAIRS = ("all", "last")

# value, first and second derivative of each supported invertible activation
Derivatives = Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]


def _leaky_relu(module: nn.LeakyReLU, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    slope = torch.where(z > 0, torch.ones_like(z), torch.full_like(z, module.negative_slope))
    return F.leaky_relu(z, module.negative_slope), slope, torch.zeros_like(z)


def _tanh(module: nn.Tanh, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.tanh(z)
    first = 1 - s.square()
    return s, first, -2 * s * first


def _sigmoid(module: nn.Sigmoid, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    s = torch.sigmoid(z)
    first = s * (1 - s)
    return s, first, first * (1 - 2 * s)


ACTIVATIONS: dict[type[nn.Module], Derivatives] = {
    nn.LeakyReLU: _leaky_relu,
    nn.Tanh: _tanh,
    nn.Sigmoid: _sigmoid,
}


class CurvatureUndefinedError(TypeError):
    """The model is not an MLP of Linear layers joined by invertible activations."""


@dataclass(frozen=True)
class MLPChain:
    """An MLP read as ``[Flatten] Linear act Linear act ... Linear``."""

    flatten: nn.Flatten | None
    linears: tuple[nn.Linear, ...]
    activations: tuple[nn.Module, ...]


def mlp_chain(model: nn.Module) -> MLPChain:
    """Read ``model`` as an MLP on which the layer-pair action is defined, or say why not."""
    if not isinstance(model, nn.Sequential):
        raise CurvatureUndefinedError(
            f"curvature is defined for nn.Sequential MLPs (Linear layers joined by LeakyReLU, "
            f"Tanh or Sigmoid); got {type(model).__name__}"
        )
    modules = list(_leaves(model))
    flatten = modules.pop(0) if modules and isinstance(modules[0], nn.Flatten) else None
    linears, activations = [], []
    for position, module in enumerate(modules):
        if position % 2 == 0:
            if not isinstance(module, nn.Linear):
                raise CurvatureUndefinedError(
                    f"curvature needs a Linear layer at position {position} of the MLP, found "
                    f"{type(module).__name__}; it is defined for Linear layers joined by one "
                    f"invertible activation each (LeakyReLU, Tanh, Sigmoid)"
                )
            linears.append(module)
        else:
            if _activation_key(module) is None:
                raise CurvatureUndefinedError(
                    f"curvature needs an invertible activation between Linear layers, found "
                    f"{module!r}; supported: LeakyReLU with a positive slope, Tanh, Sigmoid "
                    f"(ReLU is not invertible)"
                )
            activations.append(module)
    if len(linears) < 2 or len(linears) != len(activations) + 1:
        raise CurvatureUndefinedError(
            "curvature needs at least two Linear layers joined by activations, ending with a "
            f"Linear layer; got {[type(m).__name__ for m in modules]}"
        )
    return MLPChain(flatten, tuple(linears), tuple(activations))


def curvature(
    model: nn.Module,
    inputs: Tensor,
    *,
    generators: int = 8,
    seed: int = 0,
    pairs: str = "all",
) -> Tensor:
    """psi on one batch: kappa averaged over ``generators`` draws of M and over layer pairs.

    ``pairs="all"`` averages every consecutive pair (each pair's own curve);
    ``pairs="last"`` uses only the last pair. The result carries a graph to
    the weights. Generators are drawn in float64 on the CPU from ``seed``
    (pair by pair), so the value does not depend on the device.
    """
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    if generators < 1:
        raise ValueError(f"generators must be at least 1, got {generators!r}")
    chain = mlp_chain(model)
    h = chain.flatten(inputs) if chain.flatten is not None else inputs
    if h.dim() != 2:
        raise CurvatureUndefinedError(
            f"curvature needs inputs of shape (samples, features) after flattening, got {tuple(h.shape)}"
        )
    columns = []  # (h, z) per Linear layer, samples as columns
    h = h.T
    for index, linear in enumerate(chain.linears):
        z = linear.weight @ h
        if linear.bias is not None:
            z = z + linear.bias[:, None]
        columns.append((h, z))
        if index < len(chain.activations):
            h = _activate(chain.activations[index], z)[0]
    generator = torch.Generator().manual_seed(int(seed))
    kappas = []
    for index, activation in enumerate(chain.activations):
        width = chain.linears[index].out_features
        draws = torch.randn(generators, width, width, generator=generator, dtype=torch.float64)
        if pairs == "last" and index != len(chain.activations) - 1:
            continue
        inner, outer = chain.linears[index], chain.linears[index + 1]
        h, z = columns[index]
        m = (draws / torch.linalg.matrix_norm(draws)[:, None, None]).to(device=z.device, dtype=z.dtype)
        kappas.append(_pair_curvature(inner, outer, activation, h, z, m))
    return torch.cat(kappas).mean()


def _pair_curvature(
    inner: nn.Linear, outer: nn.Linear, activation: nn.Module, h: Tensor, z: Tensor, m: Tensor
) -> Tensor:
    """kappa of the curves of one layer pair, one per generator in ``m`` (``G x k x k``)."""
    s, first, second = _activate(activation, z)
    if inner.bias is not None:
        h = torch.cat([h, torch.ones_like(h[:1])])
    h_pinv = torch.linalg.pinv(h)
    ms = m @ s
    z1 = ms / first
    z2 = (m @ ms - second * z1.square()) / first
    u = outer.weight
    g1 = torch.cat([(-u @ m).flatten(1), (z1 @ h_pinv).flatten(1)], dim=1)
    g2 = torch.cat([(u @ m @ m).flatten(1), (z2 @ h_pinv).flatten(1)], dim=1)
    speed = g1.square().sum(1)
    normal = g2 - ((g1 * g2).sum(1) / speed)[:, None] * g1
    return torch.linalg.vector_norm(normal, dim=1) / speed


def measure_curvature(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    generators: int = 8,
    seed: int = 0,
    pairs: str = "all",
) -> float:
    """psi of ``model`` averaged over ``batches`` of inputs (each gets generators from its own seed).

    Runs without gradients and leaves the model as found.
    """
    if not batches:
        raise ValueError("measure_curvature needs at least one batch")
    with preserved_state(model), torch.no_grad():
        values = [
            float(curvature(model, inputs, generators=generators, seed=seed + index, pairs=pairs))
            for index, inputs in enumerate(batches)
        ]
    return sum(values) / len(values)


class Curvature(Objective):
    """Curvature psi on the teleport batch as a teleport objective (ascend by default).

    Higher curvature went with lower validation loss in the paper, hence the
    default. The model must be an MLP of the kind :func:`mlp_chain` accepts;
    otherwise the first evaluation raises :class:`CurvatureUndefinedError`
    (and a teleport leaves the model untouched).

    Args:
        direction: ``"ascend"`` (default) or ``"descend"``.
        generators: random generators M per evaluation.
        seed: seed of the generators; fixed, so every step sees the same curves.
        pairs: ``"all"`` layer pairs averaged (default) or only the ``"last"``.
    """

    def __init__(
        self, direction: str | None = None, *, generators: int = 8, seed: int = 0, pairs: str = "all"
    ) -> None:
        super().__init__(direction)
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
        if int(generators) < 1:
            raise ValueError(f"generators must be at least 1, got {generators!r}")
        self.generators = int(generators)
        self.seed = int(seed)
        self.pairs = pairs

    def evaluate(self, batch: Batch) -> Evaluation:
        value = curvature(batch.model, batch.inputs, generators=self.generators, seed=self.seed, pairs=self.pairs)
        return Evaluation(value=value, loss=batch.loss())


def _activation_key(module: nn.Module) -> type[nn.Module] | None:
    """The key of ``module``'s activation in :data:`ACTIVATIONS` (MRO walk), if invertible."""
    for cls in type(module).__mro__:
        if cls in ACTIVATIONS:
            if cls is nn.LeakyReLU and not module.negative_slope > 0:
                return None
            return cls
    return None


def _activate(module: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``sigma(z)``, ``sigma'(z)`` and ``sigma''(z)`` for a supported activation."""
    return ACTIVATIONS[_activation_key(module)](module, z)


def _leaves(model: nn.Sequential):
    for module in model:
        if isinstance(module, nn.Sequential):
            yield from _leaves(module)
        else:
            yield module


@hookimpl
def teleport_register_objectives(registry) -> None:
    registry.add_objective("curvature", Curvature)
