"""The teleport engine: projected ascent of an objective on the loss level set of a batch."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn

from .coverage import Coverage, find_coverage
from .model_state import double_backward_safe, preserved_state
from .null_space import CoreBasis, NullSpace
from .objective import Batch, Evaluation, LossFn, Objective
from .registry import Registry, default_registry
from .report import LayerReport, TeleportReport


class Teleporter:
    """Teleports ``model`` along the level set of ``loss_fn`` on a teleport batch.

    Each step moves every covered layer by the objective's gradient projected
    onto the null space of that layer's inputs on the batch (one basis per
    batch), so with ``tau = 1`` the batch loss is invariant to floating point.

    Args:
        model: the network; its parameters are updated in place.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
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
        objective_options: keyword arguments for a named objective.
        registry: where names are looked up; the installed plugins by default.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        objective: str | Objective = "grad_norm",
        null_space: str | NullSpace = "exact",
        tau: float = 1.0,
        lr: float = 0.02,
        steps: int = 8,
        cap: float | None = None,
        normalize: bool = True,
        uncovered: str = "warn",
        objective_options: dict[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        registry = registry or default_registry()
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model(inputs), targets)")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.objective = (
            objective
            if isinstance(objective, Objective)
            else registry.get("objective", objective)(**(objective_options or {}))
        )
        if isinstance(null_space, NullSpace):
            self.null_space = null_space
        else:
            self.null_space = registry.get("null_space", null_space)(tau=tau)
        self.lr = float(lr)
        self.steps = int(steps)
        self.cap = cap
        self.normalize = normalize
        self.coverage: Coverage = find_coverage(model, registry, uncovered)
        self._check_dtypes()

    def _check_dtypes(self) -> None:
        for name, param in self.coverage.movable().items():
            if param.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"teleport needs float32 or float64 parameters, {name} is {param.dtype}; "
                    "teleport a float32 copy (e.g. the optimizer's master weights) instead"
                )

    def teleport(
        self, inputs: Tensor, targets: Tensor, *, steps: int | None = None, cap: float | None = None
    ) -> TeleportReport:
        """Run one teleport on the batch ``(inputs, targets)`` and report what happened.

        The model is left as found (modes, buffers, hooks), apart from the
        parameter update; on an exception, or when a non-finite value appears,
        the parameters are restored too.
        """
        _check_batch(inputs, targets)
        steps = self.steps if steps is None else steps
        cap = self.cap if cap is None else cap
        movable = self.coverage.movable()
        saved = {name: p.detach().clone() for name, p in movable.items()}
        started = time.perf_counter()
        try:
            with preserved_state(self.model), double_backward_safe(inputs.device.type):
                report = self._ascend(inputs, targets, steps, cap, saved)
        except BaseException:
            _restore(movable, saved)
            raise
        report.seconds = time.perf_counter() - started
        return report

    # -- the ascent -----------------------------------------------------------
    def _ascend(self, inputs: Tensor, targets: Tensor, steps: int, cap: float | None, saved: dict) -> TeleportReport:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        batch = Batch(self.model, self.loss_fn, inputs, targets, trainable)
        captured: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
        handles = []
        try:
            for covered in self.coverage.modules:
                record = _recorder(captured, covered.name)
                handles += covered.projector.capture(covered.module, record)
            first = self._evaluate(batch)
        finally:
            for handle in handles:
                handle.remove()
        if not (torch.isfinite(first.loss) and torch.isfinite(first.value)):
            raise ValueError(f"the loss or objective on the teleport batch is not finite (loss {float(first.loss)})")
        basis_started = time.perf_counter()
        bases, layers, frozen = self._bases(captured)
        basis_seconds = time.perf_counter() - basis_started

        report = TeleportReport(
            loss_before=float(first.loss),
            loss_after=float(first.loss),
            grad_norm_before=float(first.grad_norm),
            grad_norm_after=float(first.grad_norm),
            objective_before=float(first.value.detach()),
            objective_after=float(first.value.detach()),
            steps=0,
            stopped="steps",
            layers=layers,
            frozen={**self.coverage.frozen, **frozen},
            basis_seconds=basis_seconds,
        )
        if not bases:
            report.stopped = "no_room"
            return report
        params = {name: p for name, p in self.coverage.movable().items() if name not in frozen}
        evaluation = first
        for step in range(steps):
            if step:
                evaluation = self._evaluate(batch)
            report.losses.append(float(evaluation.loss))
            report.grad_norms.append(float(evaluation.grad_norm))
            if not torch.isfinite(evaluation.value):
                return self._roll_back(report, saved)
            if cap is not None and float(evaluation.grad_norm) >= cap:
                report.stopped = "cap"
                break
            update = self._projected_gradient(evaluation, params, bases)
            if update is None:
                return self._roll_back(report, saved)
            with torch.no_grad():
                for name, param in params.items():
                    param.add_(update[name])
            report.steps += 1
        final = self._evaluate(batch)
        if not (torch.isfinite(final.loss) and torch.isfinite(final.value)):
            return self._roll_back(report, saved)
        report.loss_after = float(final.loss)
        report.grad_norm_after = float(final.grad_norm)
        report.objective_after = float(final.value.detach())
        return report

    def _evaluate(self, batch: Batch) -> Evaluation:
        evaluation = self.objective.evaluate(batch)
        if evaluation.grad_norm is None:
            grads = torch.autograd.grad(evaluation.loss, batch.parameters, retain_graph=True, allow_unused=True)
            evaluation.grad_norm = torch.sqrt(sum(g.detach().square().sum() for g in grads if g is not None))
        evaluation.loss = evaluation.loss.detach()
        return evaluation

    def _bases(self, captured: dict) -> tuple[dict, list[LayerReport], dict[str, str]]:
        """One core basis per site; sites whose module never ran, or with no room, stay fixed."""
        bases: dict[tuple[str, str], CoreBasis] = {}
        layers: list[LayerReport] = []
        frozen: dict[str, str] = {}
        for covered in self.coverage.modules:
            for site in covered.sites:
                names = [covered.qualified(p) for p in (site.weight, site.bias) if p]
                tensors = captured.get((covered.name, site.stream))
                if not tensors:
                    frozen.update(dict.fromkeys(names, "its module did not run on the teleport batch"))
                    continue
                representation = covered.projector.representation(covered.module, site, tensors)
                basis = self.null_space.basis(representation.detach())
                layers.append(
                    LayerReport(
                        name=covered.qualified(site.name),
                        input_dim=basis.input_dim * site.groups,
                        null_dim=basis.null_dim,
                        samples=representation.shape[-1],
                        groups=site.groups,
                    )
                )
                if basis.null_dim == 0:
                    frozen.update(dict.fromkeys(names, "no null space on the teleport batch"))
                else:
                    bases[(covered.name, site.name)] = basis
        return bases, layers, frozen

    def _projected_gradient(
        self, evaluation: Evaluation, params: dict[str, nn.Parameter], bases: dict
    ) -> dict[str, Tensor] | None:
        """The projected, signed and scaled step per parameter; ``None`` if it is not finite."""
        grads = torch.autograd.grad(evaluation.value, list(params.values()), allow_unused=True)
        update = {
            name: (g if g is not None else torch.zeros_like(p)).detach().contiguous()
            for (name, p), g in zip(params.items(), grads, strict=True)
        }
        for covered in self.coverage.modules:
            local = {p: update[covered.qualified(p)] for site in covered.sites for p in (site.weight, site.bias) if p}
            for site in covered.sites:
                basis = bases.get((covered.name, site.name))
                if basis is not None:
                    covered.projector.project(covered.module, site, local, basis)
        norm = torch.sqrt(sum(u.square().sum() for u in update.values()))
        if not torch.isfinite(norm):
            return None
        scale = self.lr if self.objective.ascend else -self.lr
        if self.normalize:
            if norm == 0:
                return {name: torch.zeros_like(u) for name, u in update.items()}
            weight_norm = torch.sqrt(sum(p.detach().square().sum() for p in params.values()))
            scale = scale * weight_norm / norm
        return {name: u * scale for name, u in update.items()}

    def _roll_back(self, report: TeleportReport, saved: dict) -> TeleportReport:
        _restore(self.coverage.movable(), saved)
        report.stopped = "non_finite"
        report.rolled_back = True
        report.loss_after = report.loss_before
        report.grad_norm_after = report.grad_norm_before
        report.objective_after = report.objective_before
        return report


def _recorder(captured: dict, module_name: str):
    def record(stream: str, tensor: Tensor) -> None:
        captured[(module_name, stream)].append(tensor.detach())

    return record


def _restore(params: dict[str, nn.Parameter], saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])


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
