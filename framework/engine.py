"""The teleport engine: the :class:`Teleporter` facade and the null-space projection method."""

from __future__ import annotations

import math
import re
import time
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import get_total_norm

from .coverage import Coverage, find_coverage
from .distributed import Replicas, underlying_module
from .method import Evaluate, TeleportMethod
from .model_state import double_backward_safe, preserved_state
from .null_space import CoreBasis, NullSpace
from .objective import Batch, Evaluation, GradientNormObjective, LossFn, Objective
from .projector import _site_view
from .registry import Registry, default_registry
from .report import LayerReport, TeleportReport
from .structured import (
    StructuredEvaluation,
    first_order_pass,
    tangent_representation,
    tangent_streams,
)


class Teleporter:
    """Teleports ``model`` along the level set of ``loss_fn`` on a teleport batch.

    With the default method, each step moves every covered layer by the
    objective's gradient projected onto the null space of that layer's
    inputs on the batch (one basis per batch), so with ``tau = 1`` the batch
    loss is invariant to floating point.

    Args:
        model: the network; its parameters are updated in place.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
        method: a registered teleport method (``"null_space"``, or a baseline).
        objective: a registered objective name or an :class:`Objective`.
        null_space: a registered null-space name (``"exact"``, ``"svd"``) or a
            :class:`NullSpace`.
        tau: energy threshold of the ``"svd"`` null space (eq. 3); must be 1 for ``"exact"``.
        lr: step size. With ``normalize=True`` (default) each step moves the
            movable parameters by ``lr`` times their norm, which makes one
            default work across models and training stages; with
            ``normalize=False`` it is the plain ascent rate of eq. 5.
        steps: ascent steps per teleport (the paper's t).
        cap: stop once the gradient norm reaches this value (the paper's CAP).
        uncovered: what to do with trainable parameters no projector covers:
            ``"error"``, ``"warn"`` (default) or ``"freeze"``.
        replicas: the data-parallel replicas to keep identical; by default
            every rank of an initialised ``torch.distributed`` default group
            (see :class:`~torch_teleport.distributed.Replicas`). A
            ``DistributedDataParallel`` model is teleported through its
            underlying module.
        max_loss_change: roll the teleport back (``stopped="loss_changed"``)
            when the relative change of the teleport-batch loss exceeds
            this; ``None`` (default) never does.
        objective_options: keyword arguments for a named objective.
        method_options: keyword arguments for the method.
        registry: where names are looked up; the installed plugins by default.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: str = "null_space",
        objective: str | Objective = "grad_norm",
        null_space: str | NullSpace = "exact",
        tau: float = 1.0,
        lr: float = 0.005,
        steps: int = 8,
        cap: float | None = None,
        normalize: bool = True,
        uncovered: str = "warn",
        replicas: Replicas | None = None,
        max_loss_change: float | None = None,
        objective_options: dict[str, Any] | None = None,
        method_options: dict[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self.registry = registry or default_registry()
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps!r}")
        if max_loss_change is not None and not max_loss_change >= 0:
            raise ValueError(f"max_loss_change must be None or a non-negative number, got {max_loss_change!r}")
        self.model = underlying_module(model)
        self.loss_fn = loss_fn
        if isinstance(objective, Objective):
            self.objective = objective
        else:
            self.objective = self.registry.get("objective", objective)(**(objective_options or {}))
        self.null_space = null_space
        self.tau = tau
        self.lr = float(lr)
        self.steps = int(steps)
        self.cap = cap
        self.normalize = normalize
        self.uncovered = uncovered
        self.replicas = replicas or Replicas()
        self.max_loss_change = max_loss_change
        self.method: TeleportMethod = self.registry.get("method", method)(self, **(method_options or {}))

    def teleport(
        self, inputs: Tensor, targets: Tensor, *, steps: int | None = None, cap: float | None = None
    ) -> TeleportReport:
        """Run one teleport on the batch ``(inputs, targets)`` and report what happened.

        The model is left as found (modes, buffers, hooks), apart from the
        parameter update; on an exception, or when a non-finite value appears,
        the parameters are restored too and the report says so.
        """
        if self.replicas.size > 1 and not self.method.keeps_replicas_in_sync:
            raise NotImplementedError(f"{type(self.method).__name__} cannot keep data-parallel replicas identical")
        self.replicas.check_together(_check_batch, inputs, targets)
        steps = self.steps if steps is None else steps
        cap = self.cap if cap is None else cap
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.detach().clone() for p in trainable]
        batch = Batch(self.model, self.loss_fn, inputs, targets, trainable)
        started = time.perf_counter()
        try:
            with preserved_state(self.model), double_backward_safe(inputs.device.type):
                report = self.method.run(batch, steps, cap)
        except BaseException:
            _restore(trainable, saved)
            raise
        if not math.isfinite(report.loss_after):
            report.stopped = "non_finite"
        elif self.max_loss_change is not None and report.loss_change > self.max_loss_change:
            report.stopped = "loss_changed"
        if report.stopped in ("non_finite", "loss_changed"):
            _restore(trainable, saved)
            report.rolled_back = True
            report.loss_after = report.loss_before
            report.grad_norm_after = report.grad_norm_before
            report.objective_after = report.objective_before
        report.seconds = time.perf_counter() - started
        self.replicas.verify(self.model)
        return report

    def evaluate(self, batch: Batch) -> Evaluation:
        """The objective on ``batch``, with the loss detached and the gradient norm filled in."""
        evaluation = self.objective.evaluate(batch)
        if self.replicas.size > 1:
            return self.replicas.combine(evaluation, batch)
        if evaluation.grad_norm is None:
            grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
            evaluation.grad_norm = get_total_norm([g.detach() for g in grads if g is not None])
        evaluation.loss = evaluation.loss.detach()
        return evaluation


GRADIENT_PATHS = ("auto", "structured", "full")


class NullSpaceMethod(TeleportMethod):
    """Null-space gradient projection (Algorithm 1 of the paper).

    Inputs of every covered layer are captured during the first forward
    pass; one core basis per site is built from them and reused for all
    steps (exact steps leave every layer's inputs on the batch unchanged).

    ``gradient`` chooses how the projected objective gradient is computed:
    ``"structured"`` from first derivatives only (:mod:`~torch_teleport.structured`;
    needs a :class:`~torch_teleport.objective.GradientNormObjective`),
    ``"full"`` by autograd through the objective (a double backward for
    gradient-norm objectives), ``"auto"`` (default) structured wherever the
    objective and the site's projector allow it. Sites whose projector
    provides no output gradients take the full path; the report names each
    site's path.
    """

    keeps_replicas_in_sync = True

    def __init__(self, teleporter: Teleporter, gradient: str = "auto") -> None:
        super().__init__(teleporter)
        if gradient not in GRADIENT_PATHS:
            raise ValueError(f"gradient must be one of {GRADIENT_PATHS}, got {gradient!r}")
        structured_objective = isinstance(teleporter.objective, GradientNormObjective)
        if gradient == "structured" and not structured_objective:
            raise ValueError(
                f"gradient='structured' needs an objective of the gradient norm (f(||grad L||^2)); "
                f"{type(teleporter.objective).__name__} takes gradient='full' or 'auto'"
            )
        self.structured = gradient != "full" and structured_objective
        null_space = teleporter.null_space
        if not isinstance(null_space, NullSpace):
            null_space = teleporter.registry.get("null_space", null_space)(tau=teleporter.tau)
        self.null_space = null_space
        self.coverage: Coverage = find_coverage(teleporter.model, teleporter.registry, teleporter.uncovered)
        for name, param in self.coverage.movable().items():
            if param.is_meta:
                raise ValueError(
                    f"{name} is on the meta device and holds no values; materialise the model "
                    "(model.to_empty(device=...) and load its weights) before teleporting it"
                )
            if param.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"teleport needs float32 or float64 parameters, {name} is {param.dtype}; "
                    "teleport a float32 copy (e.g. the optimizer's master weights) instead"
                )

    def capture_inputs(self, inputs: Tensor) -> dict[tuple[str, str], list[Tensor]]:
        """Every covered module's input streams on ``inputs``, keyed by (module, stream).

        A no-grad forward of its own, with the projectors' hooks removed
        afterwards even on error: objectives may run extra (e.g. perturbed)
        forwards whose inputs must not enter the representations.
        """
        captured: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
        handles = []
        try:
            for covered in self.coverage.modules:
                handles += covered.projector.capture(covered.module, _recorder(captured, covered.name))
            with torch.no_grad():
                self.teleporter.model(inputs)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def run(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        captured = self.capture_inputs(batch.inputs)
        evaluate: Evaluate = self.teleporter.evaluate
        structured: list = []
        if self.structured:
            evaluator = StructuredEvaluator(self.teleporter, batch, self._capable_sites())
            evaluate, structured = evaluator, evaluator.sites
        first, report = self.start(batch, evaluate=evaluate, frozen=dict(self.coverage.frozen))
        structured = evaluate.sites if structured else []  # those whose outputs the first pass recorded
        modules = list({id(c): c for c, _ in structured}.values())
        first_tangents = None
        if structured:
            try:
                first_tangents = tangent_streams(batch, first.direction, modules)
            except NotImplementedError as error:  # an op without forward-mode derivatives
                warnings.warn(
                    f"teleport takes the full (double-backward) path: the structured path needs "
                    f"forward-mode derivatives, and {_op_of(error)}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                structured, modules, evaluate = [], [], self.teleporter.evaluate
                first = evaluate(batch)
        basis_started = time.perf_counter()
        bases, pinned, report.layers, frozen = self._bases(captured, {(c.name, s.name) for c, s in structured})
        report.basis_seconds = time.perf_counter() - basis_started
        report.frozen.update(frozen)
        if not bases:
            report.stopped = "no_room"
            return report
        params = {name: p for name, p in self.coverage.movable().items() if name not in frozen}
        moving = [(c, s) for c, s in structured if (c.name, s.name) in bases]

        def step(evaluation: Evaluation) -> bool:
            tangents = None
            if moving:
                tangents = first_tangents if evaluation is first else tangent_streams(batch, evaluation.direction, modules)
            update = self._projected_step(batch, evaluation, params, bases, pinned, moving, tangents)
            if update is None:
                return False
            with torch.no_grad():
                for name, param in params.items():
                    param.add_(update[name])
            return True

        return self.ascend(batch, first, report, steps, cap, step, evaluate=evaluate)

    def _capable_sites(self) -> list:
        """Sites whose projector can record their outputs (a probe install, removed at once)."""
        sites = []
        for covered in self.coverage.modules:
            handles = covered.projector.capture_outputs(covered.module, lambda site, tensor: None)
            if handles is not None:
                for handle in handles:
                    handle.remove()
                sites += [(covered, site) for site in covered.sites]
        return sites

    def _bases(self, captured: dict, structured: set) -> tuple[dict, list, list[LayerReport], dict[str, str]]:
        """One core basis per site; sites whose module never ran, or with no room, stay fixed.

        A site without room whose parameter another site moves (the key block
        of a packed attention projection whose query block has room) is
        *pinned*: its rows of the update are zeroed.
        """
        bases: dict[tuple[str, str], CoreBasis] = {}
        layers: list[LayerReport] = []
        frozen: dict[str, str] = {}
        no_room: list = []
        for covered in self.coverage.modules:
            for site in covered.sites:
                names = [covered.qualified(p) for p in (site.weight, site.bias) if p]
                tensors = captured.get((covered.name, site.stream))
                representation = (
                    covered.projector.representation(covered.module, site, tensors).detach() if tensors else None
                )
                spectrum = self.teleporter.replicas.spectrum(representation)  # of the global batch
                if spectrum is None:
                    frozen.update(dict.fromkeys(names, "its module did not run on the teleport batch"))
                    continue
                basis = self.null_space.basis_of(spectrum)
                layers.append(
                    LayerReport(
                        name=covered.qualified(site.name),
                        input_dim=basis.input_dim * site.groups,
                        null_dim=basis.null_dim,
                        samples=spectrum.samples,
                        groups=site.groups,
                        gradient="structured" if (covered.name, site.name) in structured else "full",
                    )
                )
                if basis.null_dim == 0:
                    no_room.append((covered, site, names))
                else:
                    bases[(covered.name, site.name)] = basis
        moving = {
            covered.qualified(p)
            for covered in self.coverage.modules
            for site in covered.sites
            if (covered.name, site.name) in bases
            for p in (site.weight, site.bias)
            if p
        }
        pinned = [(covered, site) for covered, site, names in no_room if moving.intersection(names)]
        for _, _, names in no_room:
            frozen.update({name: "no null space on the teleport batch" for name in names if name not in moving})
        return bases, pinned, layers, frozen

    def _projected_step(
        self,
        batch: Batch,
        evaluation: Evaluation,
        params: dict[str, nn.Parameter],
        bases: dict,
        pinned: list,
        structured: list,
        tangents: dict | None,
    ) -> dict[str, Tensor] | None:
        """The projected, signed and scaled step per parameter; ``None`` if it is not finite."""
        tele = self.teleporter
        update = self._raw_gradient(batch, evaluation, params, structured, tangents)
        update = tele.replicas.sum(update)  # the global objective's gradient, the same on every rank
        for covered in self.coverage.modules:
            for site in covered.sites:
                basis = bases.get((covered.name, site.name))
                if basis is not None:
                    local = {p: update[covered.qualified(p)] for p in (site.weight, site.bias) if p}
                    covered.projector.project(covered.module, site, local, basis)
        for covered, site in pinned:
            for local, is_bias in ((site.weight, False), (site.bias, True)):
                if local and covered.qualified(local) in update:
                    _site_view(update[covered.qualified(local)], site, bias=is_bias).zero_()
        norm = get_total_norm(list(update.values()))
        if not torch.isfinite(norm):
            return None
        scale = tele.lr if tele.objective.ascend else -tele.lr
        if tele.normalize:
            if norm == 0:  # every site was wholly in its core space (see CoreBasis.project)
                return {name: torch.zeros_like(u) for name, u in update.items()}
            weight_norm = get_total_norm([p.detach() for p in params.values()])
            scale = scale * weight_norm / norm
        return {name: u * scale for name, u in update.items()}

    def _raw_gradient(
        self,
        batch: Batch,
        evaluation: Evaluation,
        params: dict[str, nn.Parameter],
        structured: list,
        tangents: dict | None,
    ) -> dict[str, Tensor]:
        """This rank's share of the objective's gradient for ``params``, before projection.

        Structured sites get ``2 f'(s) delta^T lambda`` (its projection equals
        the projected gradient; ``tangents`` are the forward-mode input streams);
        every other parameter gets autograd's gradient of the objective.
        """
        update: dict[str, Tensor] = {}
        fast = {covered.qualified(p) for covered, site in structured for p in (site.weight, site.bias) if p}
        rest = [name for name in params if name not in fast]
        if rest:
            full = evaluation if not isinstance(evaluation, StructuredEvaluation) else self.teleporter.evaluate(batch)
            grads = torch.autograd.grad(full.value, [params[n] for n in rest], allow_unused=True)
            for name, g in zip(rest, grads, strict=True):
                update[name] = (g if g is not None else torch.zeros_like(params[name])).detach().contiguous()
        if fast:
            assert isinstance(evaluation, StructuredEvaluation)
            for name in fast:
                update[name] = torch.zeros_like(params[name])
            coefficient = self.teleporter.objective.slope(evaluation.local_squared) * evaluation.share
            for covered, site in structured:
                lam = tangent_representation(covered, site, tangents[(covered.name, site.stream)])
                product = (evaluation.deltas[(covered.name, site.name)] @ lam.transpose(-1, -2)) * coefficient
                weight = _site_view(update[covered.qualified(site.weight)], site)
                weight.copy_(product[..., : weight.shape[-1]])
                if site.bias is not None:
                    _site_view(update[covered.qualified(site.bias)], site, bias=True).copy_(product[..., weight.shape[-1] :])
        return {name: update[name] for name in params}


class StructuredEvaluator:
    """Evaluations from one forward and one first-order backward (no graph kept).

    ``sites`` starts as every site whose projector can record outputs and,
    after the first call, keeps those whose outputs were recorded.
    """

    def __init__(self, teleporter: Teleporter, batch: Batch, sites: list) -> None:
        self.teleporter = teleporter
        self.sites = sites
        self._probed = False
        names = {id(p): name for name, p in teleporter.model.named_parameters()}
        self.param_names = [names[id(p)] for p in batch.parameters]

    def __call__(self, batch: Batch) -> StructuredEvaluation:
        tele = self.teleporter
        loss, grads, deltas = first_order_pass(batch, self.param_names, self.sites)
        if not self._probed:
            self.sites = [(c, s) for c, s in self.sites if (c.name, s.name) in deltas]
            self._probed = True
        squared = get_total_norm(grads).square().to(loss.dtype)
        evaluation = StructuredEvaluation(
            value=tele.objective.of_squared_norm(squared),
            loss=loss,
            grad_norm=squared.sqrt(),
            deltas=deltas,
            direction=dict(zip(self.param_names, grads, strict=True)),
            local_squared=squared,
        )
        if tele.replicas.size > 1:
            evaluation = tele.replicas.combine_structured(evaluation, batch, grads)
        return evaluation


def _op_of(error: Exception) -> str:
    """The operator an autograd ``NotImplementedError`` names, in a phrase."""
    match = re.search(r"with ([\w:.]+) that does not support it", str(error))
    return f"{match[1]} has none" if match else f"an op has none ({error})"


def _recorder(captured: dict, module_name: str):
    def record(stream: str, tensor: Tensor) -> None:
        captured[(module_name, stream)].append(tensor.detach())

    return record




def _restore(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, saved, strict=True):
            param.copy_(value)


def _check_batch(inputs: Tensor, targets: Tensor) -> None:
    for label, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise ValueError(f"{label} must hold at least one sample, got shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{label} contain non-finite values")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets disagree on the batch size: {inputs.shape[0]} vs {targets.shape[0]}")
