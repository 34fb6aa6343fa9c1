"""The projected teleport gradient from first derivatives only: the *structured* path.

A site computes ``z = W x`` (bias folded into ``x`` as a constant 1; rows of
``x`` and ``z`` are samples, tokens or positions). The loss gradient of its
weight is ``g_W = delta^T x`` with ``delta = dL/dz``. Differentiating that
along ``g``, the loss gradient of all trainable parameters, gives the site's
share of the Hessian-vector product:

    (H g)_W = (d delta)^T x + delta^T lambda

where ``lambda`` is the tangent of ``x`` in a forward-mode pass of the
network in the direction ``g``. The first term is ``(something)^T x``: it lies
in the span of the site's inputs, the core space, and the exact projection
removes it. So for an objective ``f(||g||^2)`` the projected ascent direction is

    P(dJ/dW) = 2 f'(||g||^2) P(delta^T lambda)

and it costs one forward and backward pass (``g`` and every ``delta``) plus
one forward-mode pass (every ``lambda``): no second derivatives, so ops
without a double backward (Hardsigmoid, fused attention kernels, compiled
graphs) are no obstacle. At ``tau = 1`` it equals the projection of the full
Hessian-vector product; with ``tau < 1`` it leaves out exactly the part that
would move the pre-activations.

A projector opts in with :meth:`~torch_teleport.Projector.capture_outputs`
and :meth:`~torch_teleport.Projector.output_representation`; the tangent
streams go through its own :meth:`~torch_teleport.Projector.capture` and
:meth:`~torch_teleport.Projector.representation`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import functional_call
from torch.nn.utils import get_total_norm

from .coverage import CoveredModule
from .inputs import as_call
from .objective import Batch, Evaluation
from .projector import Site

if TYPE_CHECKING:
    from .method import MethodContext

SiteKey = tuple[str, str]
"""``(module name, site name)``."""


@dataclass
class StructuredEvaluation(Evaluation):
    """An evaluation with what the structured step needs: every site's output gradients and ``g``.

    ``value`` carries no graph. ``direction`` maps parameter names to the
    loss gradient (this rank's, under data parallelism).
    """

    deltas: dict[SiteKey, list[Tensor]] = field(default_factory=dict)
    direction: dict[str, Tensor] = field(default_factory=dict)
    local_squared: Tensor | None = None  # this rank's ||g||^2, where its objective's slope is taken
    share: float = 1.0  # this rank's weight in the mean of the ranks' objectives


class StructuredEvaluator:
    """Evaluations from one forward and one first-order backward (no graph kept).

    ``sites`` starts as every site whose projector can record outputs and,
    after the first call, keeps those whose outputs were recorded.
    """

    def __init__(self, context: MethodContext, batch: Batch, sites: list) -> None:
        self.context = context
        self.sites = sites
        self._probed = False
        names = {id(p): name for name, p in context.model.named_parameters()}
        self.param_names = [names[id(p)] for p in batch.parameters]

    def __call__(self, batch: Batch) -> StructuredEvaluation:
        context = self.context
        loss, grads, deltas = first_order_pass(batch, self.sites)
        if not self._probed:
            self.sites = [(c, s) for c, s in self.sites if (c.name, s.name) in deltas]
            self._probed = True
        squared = get_total_norm(grads).square().to(loss.dtype)
        evaluation = StructuredEvaluation(
            value=context.objective.of_squared_norm(squared),
            loss=loss,
            grad_norm=squared.sqrt(),
            deltas=deltas,
            direction=dict(zip(self.param_names, grads, strict=True)),
            local_squared=squared,
        )
        if context.replicas.size > 1:
            evaluation = context.replicas.combine_structured(evaluation, batch, grads)
        return evaluation


def first_order_pass(
    batch: Batch, sites: Sequence[tuple[CoveredModule, Site]]
) -> tuple[Tensor, list[Tensor], dict[SiteKey, list[Tensor]]]:
    """The loss, its gradient for ``batch.parameters`` and the output gradients of ``sites``.

    One forward with the projectors' output hooks and one first-order backward.
    Returns the detached loss, the gradients (zeros where unused) and each
    site's output gradients, one tensor per call; a site whose module
    computed its map without calling the hooked submodule (it multiplies
    the weight itself) records nothing and is left out.
    """
    outputs: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    handles = []
    try:
        for covered in {id(c): c for c, _ in sites}.values():
            handles += covered.projector.capture_outputs(covered.module, _recorder(outputs, covered.name)) or []
        loss = batch.loss()
    finally:
        for handle in handles:
            handle.remove()
    recorded = [(key, tensor) for key, tensors in outputs.items() for tensor in tensors]
    wanted = [t for _, t in recorded if t.requires_grad]
    grads = torch.autograd.grad(loss, [*batch.parameters, *wanted], allow_unused=True)
    param_grads = [
        (g if g is not None else torch.zeros_like(p)).detach()
        for g, p in zip(grads[: len(batch.parameters)], batch.parameters, strict=True)
    ]
    output_grads = iter(grads[len(batch.parameters) :])
    by_site: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    for key, tensor in recorded:
        grad = next(output_grads) if tensor.requires_grad else None
        by_site[key].append(torch.zeros_like(tensor) if grad is None else grad.detach())
    deltas = {
        (covered.name, site.name): by_site[(covered.name, site.name)]
        for covered, site in sites
        if by_site[(covered.name, site.name)]
    }
    return loss.detach(), param_grads, deltas


def tangent_streams(
    batch: Batch, direction: dict[str, Tensor], modules: Sequence[CoveredModule]
) -> dict[tuple[str, str], list[Tensor]]:
    """The forward-mode tangents of every input stream of ``modules`` in the parameter direction.

    ``direction`` maps parameter names (as ``batch.model.named_parameters``
    gives them) to tangents. One forward-mode pass through
    :func:`torch.func.functional_call`, with the projectors' own capture hooks
    recording tangents instead of values (a zero tangent where none flowed).
    """
    tangents: dict[tuple[str, str], list[Tensor]] = defaultdict(list)

    def recorder(module_name: str):
        def record(stream: str, tensor: Tensor) -> None:
            primal, tangent = fwAD.unpack_dual(tensor)
            tangents[(module_name, stream)].append(torch.zeros_like(primal) if tangent is None else tangent)

        return record

    handles = []
    fast_path = torch.backends.mha.get_fastpath_enabled()
    # functional_call leaves plain tensors behind in a module the model calls from two places;
    # every module's own parameters are put back afterwards.
    owned = [(module, dict(module._parameters)) for module in batch.model.modules()]
    try:
        # The fused attention and encoder-layer fast paths have no forward-mode derivatives.
        torch.backends.mha.set_fastpath_enabled(False)
        for covered in modules:
            handles += covered.projector.capture(covered.module, recorder(covered.name))
        with fwAD.dual_level(), torch.no_grad():
            duals = {name: fwAD.make_dual(p.detach(), direction[name]) for name, p in _named(batch, direction)}
            args, kwargs = as_call(batch.inputs)
            functional_call(batch.model, duals, args, kwargs, strict=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for handle in handles:
            handle.remove()
        for module, parameters in owned:
            module._parameters.update(parameters)
    return tangents


def _named(batch: Batch, direction: dict[str, Tensor]):
    return [(name, p) for name, p in batch.model.named_parameters() if name in direction]


def _recorder(store: dict, module_name: str):
    def record(site: str, tensor: Tensor) -> None:
        store[(module_name, site)].append(tensor)

    return record
