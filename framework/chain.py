"""The closed form of the structured step for a chain of Linear layers and elementwise activations.

Under exact projected steps (tau = 1) every forward quantity on the teleport
batch stays constant through all steps: each layer's inputs ``x_k``, the
activations' derivatives ``D_k = sigma'(z_k)`` and the loss's output
gradient. So they are computed once per teleport, and a step needs only
(rows of ``x``, ``z`` and ``delta`` are samples; ``K_k = x_k x_k^T``):

* the deltas at the moved weights, ``delta_{k-1} = (delta_k W_k) * D_{k-1}``;
* the forward tangents, ``lambda_1 = 0`` (the data do not move) and
  ``lambda_{k+1} = D_k * (K_k delta_k + lambda_k W_k^T)``;
* the factored updates ``delta_k^T [lambda_k, 0]`` with the tangent factor
  projected, and norms from ``samples x samples`` Gram matrices:
  ``||g_k||^2 = sum((delta_k delta_k^T) * K_k)``.

No forward pass, no autograd and no dense update before it is added to
the weights: about the work of one SGD step. It applies to an
``nn.Sequential`` whose trainable parameters all belong to its Linear
layers, with only :data:`ELEMENTWISE` modules between them (and a
``Flatten`` in front), and to exact null spaces only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bases import Bases
from .coverage import Coverage
from .gradient_path import GradientPath
from .inputs import call_model
from .method import MethodContext
from .objective import Batch, Evaluation, checked_loss
from .update import FactoredSite, MovedWeights, ProjectedUpdate

ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.LogSigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Identity, nn.Dropout,
)  # fmt: skip
"""Parameter-free modules that act on each entry alone (Dropout: teleports run in eval mode)."""


@dataclass
class ChainEvaluation(Evaluation):
    """The objective at the current weights, with the deltas of every layer (rows = samples)."""

    deltas: list[Tensor] | None = None
    squared: Tensor | None = None


class LinearChain:
    """A recognised chain: its Linear layers in order and the elementwise runs after each."""

    def __init__(self, front: list[nn.Module], layers: list[nn.Linear], runs: list[list[nn.Module]]) -> None:
        self.front, self.layers, self.runs = front, layers, runs

    @classmethod
    def of(cls, model: nn.Module) -> LinearChain | None:
        """The chain ``model`` is, or ``None`` when it is anything else."""
        if not isinstance(model, nn.Sequential) or len(model) == 0:
            return None
        front: list[nn.Module] = []
        layers: list[nn.Linear] = []
        runs: list[list[nn.Module]] = []
        for module in model:
            if isinstance(module, nn.Linear):
                layers.append(module)
                runs.append([])
            elif isinstance(module, ELEMENTWISE) and layers:
                runs[-1].append(module)
            elif isinstance(module, nn.Flatten | nn.Identity | nn.Dropout) and not layers:
                front.append(module)
            else:
                return None
        owned = {id(p) for layer in layers for p in layer.parameters()}
        if not layers or any(p.requires_grad and id(p) not in owned for p in model.parameters()):
            return None
        if any(not p.requires_grad for layer in layers for p in layer.parameters()):
            return None
        return cls(front, layers, runs)

    def prepare(self, batch: Batch) -> ChainState:
        """The constant forward quantities of the teleport batch (one forward, first derivatives)."""
        with torch.no_grad():
            h = batch.inputs
            for module in self.front:
                h = module(h)
        inputs, gains, grams = [], [], []
        for layer, run in zip(self.layers, self.runs, strict=True):
            x = h.reshape(-1, layer.in_features)
            with torch.no_grad():
                z = layer(h)
            inputs.append(x)
            folded = torch.cat([x, torch.ones_like(x[:, :1])], 1) if layer.bias is not None else x
            grams.append(folded @ folded.T)
            z = z.detach().requires_grad_(True)
            with torch.enable_grad():
                h = z
                for module in run:
                    h = module(h)
                (gain,) = torch.autograd.grad(h, z, torch.ones_like(h)) if run else (torch.ones_like(z),)
            gains.append(gain.reshape(-1, layer.out_features))
            h = h.detach()
        output = h.requires_grad_(True)
        with torch.enable_grad():
            loss = checked_loss(batch.loss_fn(output, batch.targets))
            (last,) = torch.autograd.grad(loss, output)
        last = last.reshape(-1, self.layers[-1].out_features) * gains[-1]
        return ChainState(self, loss.detach(), last, gains, grams, inputs)


@dataclass
class ChainState:
    """A chain's constant quantities on one teleport batch, and the step computed from them."""

    chain: LinearChain
    loss: Tensor
    last_delta: Tensor  # (samples, out) at the last layer's output
    gains: list[Tensor]  # D_k, (samples, out_k)
    grams: list[Tensor]  # K_k, (samples, samples), folded bias included
    inputs: list[Tensor]  # x_k, (samples, in_k), as the layers' projectors capture them

    @torch.no_grad()
    def evaluate(self, objective) -> ChainEvaluation:
        """Deltas at the current weights, ``||g||^2`` and the objective; the loss is the captured one."""
        layers = self.chain.layers
        deltas = [self.last_delta]
        for k in range(len(layers) - 1, 0, -1):
            deltas.insert(0, (deltas[0] @ layers[k].weight) * self.gains[k - 1])
        squared = sum(((d @ d.T) * gram).sum() for d, gram in zip(deltas, self.grams, strict=True))
        value = objective.of_squared_norm(squared)
        return ChainEvaluation(value=value, loss=self.loss, grad_norm=squared.sqrt(), deltas=deltas, squared=squared)

    @torch.no_grad()
    def tangents(self, deltas: list[Tensor]) -> list[Tensor | None]:
        """``lambda_k`` for every layer's input (``None`` for the first: the data do not move)."""
        layers = self.chain.layers
        tangents: list[Tensor | None] = [None]
        for k, layer in enumerate(layers[:-1]):
            dz = self.grams[k] @ deltas[k]
            if tangents[k] is not None:
                dz = dz + tangents[k] @ layer.weight.T
            tangents.append(self.gains[k] * dz)
        return tangents


class ClosedFormPath(GradientPath):
    """The closed form: one capture, then steps with no forward pass and no autograd.

    Its evaluations keep the captured loss (exact steps keep it), so the
    limits are checked once, on :meth:`final`, a real forward pass.
    """

    name = "closed_form"
    measures_loss = False

    def __init__(self, context: MethodContext, batch: Batch, coverage: Coverage, chain: LinearChain) -> None:
        self.chain = chain
        super().__init__(context, batch, coverage)

    def _capture(self) -> dict[tuple[str, str], list[Tensor]]:
        """The layers' inputs as the chain captures them (no second forward)."""
        self.state = self.chain.prepare(self.batch)
        sites = {id(covered.module): (covered, site) for covered in self.coverage.modules for site in covered.sites}
        self.sites = [sites[id(layer)] for layer in self.chain.layers]
        return {
            (covered.name, site.stream): [x] for (covered, site), x in zip(self.sites, self.state.inputs, strict=True)
        }

    def forget_inputs(self) -> None:
        """Nothing to drop: the chain's forward quantities hold the inputs, and every step reads them."""

    def evaluate(self) -> ChainEvaluation:
        return self.state.evaluate(self.context.objective)

    def final(self) -> ChainEvaluation:
        evaluation = self.evaluate()
        with torch.no_grad():
            output = call_model(self.batch.model, self.batch.inputs)
            evaluation.loss = checked_loss(self.batch.loss_fn(output, self.batch.targets))
        return evaluation

    def release(self, evaluation: ChainEvaluation) -> None:
        evaluation.deltas = None

    def update(self, evaluation: ChainEvaluation, weights: MovedWeights, bases: Bases) -> ProjectedUpdate:
        coefficient = self.context.objective.slope(evaluation.squared)
        factored = []
        tangents = self.state.tangents(evaluation.deltas)
        for (covered, site), delta, tangent in zip(self.sites, evaluation.deltas, tangents, strict=True):
            basis = bases.of.get((covered.name, site.name))
            if basis is None or tangent is None:
                continue
            folded = torch.cat([tangent, torch.zeros_like(tangent[:, :1])], 1) if site.bias is not None else tangent
            left = (delta.T * coefficient).unsqueeze(0)
            factored.append(FactoredSite.projected(covered, site, left, folded.unsqueeze(0), basis))
        return ProjectedUpdate({}, factored)
