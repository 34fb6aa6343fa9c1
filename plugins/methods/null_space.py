"""The default teleport method, null-space gradient projection (Algorithm 1 of the paper).

Capture every covered site's inputs on the teleport batch, build one core
basis per site (reused for all steps: exact steps leave every site's
inputs on the batch unchanged), and climb along the objective's gradient
projected onto each site's null space, by the cheapest gradient path that
applies. This module is the orchestration; the pieces are the core's
(:mod:`~torch_teleport.bases`, :mod:`~torch_teleport.gradient_path`,
:mod:`~torch_teleport.structured`, :mod:`~torch_teleport.chain`).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from torch_teleport.ascent import check_start
from torch_teleport.bases import Bases, Captured, build_bases
from torch_teleport.chain import ClosedFormPath, LinearChain
from torch_teleport.core_space import DEFAULT_NULL_SPACE, resolve_null_space
from torch_teleport.coverage import Coverage, capture_inputs, find_coverage
from torch_teleport.gradient_path import FullPath, GradientPath, ProjectedClimb, custom_functions
from torch_teleport.hookspecs import hookimpl
from torch_teleport.method import MethodContext, Mover, TeleportMethod
from torch_teleport.model_state import check_dtype
from torch_teleport.null_space import NullSpace
from torch_teleport.objective import Batch, GradientNormObjective
from torch_teleport.sharded_path import ShardedPath, check_sharded
from torch_teleport.sharding import sharded_parameters
from torch_teleport.structured import StructuredPath
from torch_teleport.update import MovedWeights

GRADIENT_PATHS = ("auto", "closed_form", "structured", "full")
BATCH_NORM_MODES = ("train", "both")

DEFAULT_DRIFT = 1e-5
"""Default relative batch-loss drift allowed per teleport, whatever the null space: the float32
invariance the property tests hold every projector to (exact teleports measure about 1e-7)."""


class NullSpaceMethod(TeleportMethod):
    """Null-space gradient projection, with its options.

    ``null_space`` (a registered name or a :class:`~torch_teleport.NullSpace`)
    and ``tau`` choose the core space (default: ``"svd"`` with ``tau = 0.999``,
    see :mod:`~torch_teleport.core_space`); ``uncovered`` is the policy for
    trainable parameters no projector covers (``"warn"``, ``"freeze"``,
    ``"error"``). ``gradient`` chooses how the projected objective gradient is
    computed: ``"structured"`` from first derivatives only (needs a
    :class:`~torch_teleport.objective.GradientNormObjective`), ``"closed_form"``
    the structured step's closed form for chains of Linear layers (exact null
    spaces, one process), ``"full"`` by autograd through the objective,
    ``"auto"`` (default) the closed form where it applies, else structured
    wherever the objective and the site's projector allow it. Sites whose
    projector provides no output gradients take the full path; the report
    names each site's path. A model with an op that has no forward-mode
    derivative takes the full path with a warning naming the op.

    ``batch_norm`` says which loss of the batch a model with BatchNorm layers in
    training mode keeps: ``"train"`` (default: the loss training sees, with the
    batch's own statistics) or ``"both"`` (the batch's inputs with the running
    statistics join the core space by energy too, so its eval-mode loss moves
    far less). BatchNorm layers in eval mode keep the eval-mode loss.
    """

    default_drift: ClassVar[float | None] = DEFAULT_DRIFT
    keeps_replicas_in_sync = True
    takes_basis_sample = True

    def __init__(
        self,
        *,
        null_space: str | NullSpace = DEFAULT_NULL_SPACE,
        tau: float | None = None,
        uncovered: str = "warn",
        gradient: str = "auto",
        batch_norm: str = "train",
    ) -> None:
        if gradient not in GRADIENT_PATHS:
            raise ValueError(f"gradient must be one of {GRADIENT_PATHS}, got {gradient!r}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}")
        self.null_space, self.tau, self.uncovered, self.gradient = null_space, tau, uncovered, gradient
        self.batch_norm = batch_norm

    def bind(self, context: MethodContext) -> NullSpaceMover:
        return NullSpaceMover(context, self)


class NullSpaceMover(Mover):
    """The null-space method on one model: which projector moves which parameter, and the climbs."""

    def __init__(self, context: MethodContext, method: NullSpaceMethod) -> None:
        super().__init__(context)
        objective = context.objective
        check_sharded(context.model, method.gradient, objective)
        if method.gradient == "structured" and not isinstance(objective, GradientNormObjective):
            raise ValueError(
                f"gradient='structured' needs an objective of the gradient norm (f(||grad L||^2)); "
                f"{type(objective).__name__} takes gradient='full' or 'auto'"
            )
        self.structured = method.gradient != "full" and isinstance(objective, GradientNormObjective)
        self.null_space = resolve_null_space(method.null_space, method.tau, context.registry)
        self.coverage: Coverage = find_coverage(context.model, context.registry, method.uncovered)
        moved = [
            (covered.qualified(p), covered.name)
            for covered in self.coverage.modules
            for site in covered.sites
            for p in (site.weight, site.bias)
            if p
        ]
        self.owners = Counter(name for name, _ in moved)  # how many sites each moved parameter belongs to
        self.module_of = dict(moved)  # each moved parameter's module: the unit of the module step limit
        self.chain = self._chain(method.gradient)
        self.batch_norm = method.batch_norm
        _check_parameters(self.coverage.movable())

    def _chain(self, gradient: str) -> LinearChain | None:
        """The model as a chain of Linear layers, where the closed form may take it."""
        chain = LinearChain.of(self.context.model) if gradient in ("auto", "closed_form") and self.structured else None
        if chain is not None and not self._covers(chain):
            chain = None
        if gradient == "closed_form" and (chain is None or not self.null_space.exact):
            raise ValueError(
                "gradient='closed_form' needs an nn.Sequential of Linear layers and elementwise "
                "activations whose trainable parameters are all the Linear layers', an exact null "
                "space (tau = 1) and a gradient-norm objective; use gradient='structured'"
            )
        return chain

    def _covers(self, chain: LinearChain) -> bool:
        """Whether every layer of ``chain`` is one covered module moving its own weight and bias."""
        covered = {id(c.module): c for c in self.coverage.modules}
        return all(
            id(layer) in covered and len(covered[id(layer)].sites) == 1 for layer in chain.layers
        ) and len({id(layer) for layer in chain.layers}) == len(chain.layers)

    def moved_parameters(self) -> list[nn.Parameter]:
        """The parameters some covered site moves."""
        return list(self.coverage.movable().values())

    def climb(self, batch: Batch) -> ProjectedClimb:
        """Capture -> bases (the fallback's where the null space's leave no room) -> the first
        evaluation -> the climb along the projected gradient of the chosen path."""
        path = self._path(batch)
        samples = self._samples(batch)
        path, bases = self._bases(path, samples, self.null_space, batch)
        fallback = self.null_space.fallback
        if fallback is not None and not bases.has_room():
            path, bases = self._bases(path, samples, fallback, batch)
            fallback = None  # (taken)
        climb = self._climb(path, bases, batch)
        check_start(climb.first)
        if fallback is not None and not climb.has_direction():
            climb = self._climb(*self._bases(climb.path, samples, fallback, batch), batch)
        climb.batch_norm = self._kept_mode()
        return climb

    def continuation(self, batch: Batch, climb: ProjectedClimb) -> ProjectedClimb | None:
        """After a climb on the fallback's core space (the data's by energy, because the batch left too
        little room to be worth a climb alone) stopped on the drift limit: the climb from here in the
        room the batch does leave, which keeps its loss to rounding, so the drift used so far stays
        what it is (``None`` where the batch leaves none or the gradient has no component in it)."""
        if climb.keeps_batch or not self.null_space.exact:
            return None
        path, bases = self._bases(self._path(batch), self._samples(batch), self.null_space, batch)
        if not (bases.keeps_batch and bases.of):
            return None
        more = self._climb(path, bases, batch)
        more.batch_norm = climb.batch_norm
        return more if more.has_direction() else None

    def _bases(self, path: GradientPath, samples: Captured, null_space: NullSpace, batch: Batch) -> tuple[GradientPath, Bases]:
        """The bases of ``null_space`` on the inputs ``path`` captured, and the path to climb with them
        (off the closed form where they do not keep the batch exactly: the closed form needs exact
        steps)."""
        replicas = self.context.replicas
        bases = build_bases(self.coverage, path.captured_inputs(), samples, null_space, replicas)
        if isinstance(path, ClosedFormPath) and not bases.keeps_batch:
            path = self._path(batch, closed_form=False)
            bases = build_bases(self.coverage, path.captured_inputs(), samples, null_space, replicas)
        return path, bases

    def _climb(self, path: GradientPath, bases: Bases, batch: Batch) -> ProjectedClimb:
        """The climb along ``path`` with ``bases``: the captured inputs dropped, then the path's first
        evaluation taken for the sites that move."""
        params = {name: p for name, p in self.coverage.movable().items() if name not in bases.frozen}
        weights = MovedWeights(params, self.module_of)
        path.forget_inputs()
        path.restrict(set(bases.of))
        path = self._started(path, batch)
        return ProjectedClimb(path, bases, weights, dict(self.coverage.frozen), judged=batch.guard is not None)

    def _started(self, path: GradientPath, batch: Batch) -> GradientPath:
        """``path`` with its first evaluation taken, or the full path where the structured path meets an
        op without forward-mode derivatives (the bases, built from the same inputs, hold for either)."""
        try:
            path.first  # noqa: B018 (taking it runs the evaluation)
        except NotImplementedError as error:
            if not isinstance(path, StructuredPath):
                raise
            full = FullPath(self.context, batch, self.coverage)
            warnings.warn(
                "teleport takes the full (double-backward) path: the structured path needs "
                f"forward-mode derivatives, and {_without_forward_mode(error, full.first.value)}",
                RuntimeWarning,
                stacklevel=6,
            )
            return full
        return path

    def _kept_mode(self) -> str | None:
        """Which loss of the batch the core space keeps, where the model has BatchNorm layers."""
        norms = [m for m in self.context.model.modules() if isinstance(m, _BatchNorm)]
        if not norms:
            return None
        if not any(m.training for m in norms):
            return "eval"
        return self.batch_norm

    def _path(self, batch: Batch, closed_form: bool = True) -> GradientPath:
        """The gradient path for ``batch``, its inputs captured: the closed form where it applies (a null
        space that keeps the batch exactly, one process, a tensor batch), else structured where the
        objective allows, else full."""
        context = self.context
        if sharded_parameters(context.model):
            return ShardedPath(context, batch, self.coverage)
        chain = self.chain is not None and closed_form and self.null_space.exact
        if chain and context.replicas.size == 1 and isinstance(batch.inputs, Tensor):
            return ClosedFormPath(context, batch, self.coverage, self.chain)
        if not self.structured:
            return FullPath(context, batch, self.coverage)
        return StructuredPath(context, batch, self.coverage, self.owners)

    def _samples(self, batch: Batch) -> Captured:
        """The input streams of ``batch.basis`` (and, keeping both BatchNorm modes, of the batch with
        the running statistics): the core space spans the inputs of the data the teleport promises to
        keep too. (The guard batch's do not join it: a guard whose inputs the core space holds keeps
        its own loss by construction and could not judge the steps.)"""
        merged: Captured = {}
        if batch.basis is not None:
            merged = capture_inputs(self.coverage, self.context.model, batch.basis)
        if self._kept_mode() == "both":
            with _running_statistics(self.context.model):
                for key, tensors in capture_inputs(self.coverage, self.context.model, batch.inputs).items():
                    merged[key] = [*merged.get(key, []), *tensors]
        return merged


@contextlib.contextmanager
def _running_statistics(model: nn.Module):
    """BatchNorm layers normalising with their running statistics (eval mode) for a while."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training]
    try:
        for module in norms:
            module.training = False
        yield
    finally:
        for module in norms:
            module.training = True


def _check_parameters(movable: dict[str, nn.Parameter]) -> None:
    """Parameters a teleport can move: materialised, of a dtype it computes in (half precision is
    computed in float32 and rounded once, see ``model_state.full_precision``)."""
    for name, param in movable.items():
        if param.is_meta:
            raise ValueError(
                f"{name} is on the meta device and holds no values; materialise the model "
                "(model.to_empty(device=...) and load its weights) before teleporting it"
            )
        check_dtype(name, param)


def _without_forward_mode(error: Exception, value: Tensor) -> str:
    """What has no forward-mode derivative, in a phrase: the operator autograd's error names, or the
    custom autograd Functions in ``value``'s graph that define no ``jvp``."""
    match = re.search(r"with ([\w:.]+) that does not support it", str(error))
    if match:
        return f"{match[1]} has none"
    missing = sorted({f.__qualname__ for f in custom_functions(value) if f.jvp is torch.autograd.Function.jvp})
    if missing:
        return f"the custom autograd Function {', '.join(missing)} defines no jvp"
    return f"an op has none ({error})"


@hookimpl
def teleport_register_methods(registry) -> None:
    registry.add_method("null_space", NullSpaceMethod)
