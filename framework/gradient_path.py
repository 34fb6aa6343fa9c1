"""The ways to the projected objective gradient, and the climb that follows one.

A :class:`GradientPath` evaluates the objective on one teleport batch and
computes its projected gradient at any point, by one route: autograd
through the objective (:class:`FullPath`, here), first derivatives only
(:class:`~torch_teleport.structured.StructuredPath`) or the closed form of
a chain of Linear layers (:class:`~torch_teleport.chain.ClosedFormPath`).
:class:`ProjectedClimb` turns a path and the batch's bases into the climb
the ascent loop follows.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn

from .bases import Bases, SiteKey, SiteRef
from .climb import Climb
from .coverage import Coverage, capture_inputs
from .method import MethodContext
from .objective import Batch, Evaluation
from .update import FactoredSite, MovedWeights, ProjectedStep, ProjectedUpdate


class GradientPath(ABC):
    """One route to the projected objective gradient on one teleport batch.

    Built with the batch, it captures every covered module's input streams
    on it (a no-grad forward, before anything else runs: a model that caches
    values in eval mode, such as LeViT's attention biases, then caches them
    without a graph). The first evaluation (:attr:`first`) is taken when
    first asked for, once the bases are built: what it holds (the gradient,
    output gradients, tangents) then never sits beside a basis's
    decomposition. ``sites`` are the sites whose gradient it computes its own
    way (the others get autograd's; known once :attr:`first` is taken);
    ``measures_loss`` is false when :meth:`evaluate` keeps the captured loss
    instead of measuring it (then :meth:`final` measures the end point);
    ``probes_curvature`` is false for a path whose weights a random direction
    cannot be drawn for the same way on every process.
    """

    name: ClassVar[str]
    measures_loss: ClassVar[bool] = True
    probes_curvature: ClassVar[bool] = True  # may probe a random direction at a stationary start
    sites: list[SiteRef]

    def __init__(self, context: MethodContext, batch: Batch, coverage: Coverage) -> None:
        self.context, self.batch, self.coverage = context, batch, coverage
        self.captured: dict[tuple[str, str], list[Tensor]] | None = self._capture()
        self._first: Evaluation | None = None

    @property
    def first(self) -> Evaluation:
        """The evaluation at the start (taken on the first call)."""
        if self._first is None:
            self._first = self._evaluate_first()
        return self._first

    def _evaluate_first(self) -> Evaluation:
        return self.evaluate()

    def _capture(self) -> dict[tuple[str, str], list[Tensor]]:
        return capture_inputs(self.coverage, self.context.model, self.batch.inputs)

    def captured_inputs(self) -> dict[tuple[str, str], list[Tensor]]:
        """Every covered module's input streams on the batch (captured again where forgotten: a
        fallback's bases, before any step)."""
        if self.captured is None:
            self.captured = self._capture()
        return self.captured

    def forget_inputs(self) -> None:
        """Drop the captured input streams once the bases are built (the steps do not read them, and
        the first evaluation need not sit beside them)."""
        self.captured = None

    def restrict(self, moving: set[SiteKey]) -> None:  # noqa: B027 (a path that computes every site alike ignores it)
        """Only the sites ``moving`` move (the bases say so before the first evaluation): a path may
        leave out what the others would need."""

    def site_paths(self) -> dict[SiteKey, str]:
        """The path of each of :attr:`sites`, for the layer reports (after :attr:`first`)."""
        return {(covered.name, site.name): self.name for covered, site in self.sites}

    @abstractmethod
    def evaluate(self) -> Evaluation:
        """The objective at the current weights."""

    def final(self) -> Evaluation:
        return self.evaluate()

    @abstractmethod
    def update(self, evaluation: Evaluation, weights: MovedWeights, bases: Bases) -> ProjectedUpdate:
        """The projected objective gradient at the point of ``evaluation`` (global under data
        parallelism), unscaled."""

    def release(self, evaluation: Evaluation) -> None:  # noqa: B027 (a path that holds nothing keeps it)
        """Drop what ``evaluation`` holds for its step (the climb has moved on; its figures stay)."""

    def finished(self, dense: dict[str, Tensor], factored: list[FactoredSite], bases: Bases) -> ProjectedUpdate:
        """The update with its dense parts summed over replicas (the global objective's gradient, the
        same on every rank) and projected, the factored parts as they are (projected already)."""
        dense = self.context.replicas.sum(dense)
        bases.project(self.coverage, dense, {(part.covered.name, part.site.name) for part in factored})
        return ProjectedUpdate(dense, factored)


def autograd_gradient(evaluation: Evaluation, params: dict[str, nn.Parameter], names: list[str]) -> dict[str, Tensor]:
    """Autograd's gradient of the objective's value for the parameters ``names`` (zeros where unused)."""
    grads = torch.autograd.grad(evaluation.value, [params[n] for n in names], allow_unused=True)
    return {
        name: (g if g is not None else torch.zeros_like(params[name])).detach().contiguous()
        for name, g in zip(names, grads, strict=True)
    }


class FullPath(GradientPath):
    """Autograd through the objective's graph (a double backward for gradient-norm objectives): any
    objective, any projector. A custom autograd Function whose backward is ``@once_differentiable``
    cuts that graph: every term through it is missing from the direction, and a warning names it."""

    name = "full"

    def __init__(self, context: MethodContext, batch: Batch, coverage: Coverage) -> None:
        super().__init__(context, batch, coverage)
        self.sites = []
        self._first_gradient: dict[str, Tensor] | None = None

    def _evaluate_first(self) -> Evaluation:
        first = self.evaluate()
        once = sorted({f.__qualname__ for f in custom_functions(first.value) if once_differentiable(f)})
        if once:
            warnings.warn(_ONCE_DIFFERENTIABLE.format(names=", ".join(once)), RuntimeWarning, stacklevel=2)
        return first

    def evaluate(self) -> Evaluation:
        return self.context.evaluate(self.batch)

    def release(self, evaluation: Evaluation) -> None:
        if evaluation is self._first:
            self._first_gradient = None

    def update(self, evaluation: Evaluation, weights: MovedWeights, bases: Bases) -> ProjectedUpdate:
        if evaluation is not self.first:
            return self.finished(autograd_gradient(evaluation, weights.params, list(weights.params)), [], bases)
        if self._first_gradient is None:  # backward runs once per graph: a fallback climb reuses it
            movable = self.coverage.movable()
            self._first_gradient = autograd_gradient(evaluation, movable, list(movable))
        return self.finished({name: self._first_gradient[name].clone() for name in weights.params}, [], bases)


CURVATURE_PROBE = 1e-3
"""Length of the probe step at a stationary start, relative to the moved weights' norm: far above
rounding, short enough that the gradient there is the curvature's."""


class ProjectedClimb(Climb):
    """The null-space method's climb: a gradient path's projected gradient as steps, one basis per site.

    The step at a point is computed once (a retried step reuses it). Where
    the first projected gradient is exactly zero the start may be a
    stationary point of the objective on the level set rather than a model
    that cannot move (a classifier head initialised at zero: every
    null-space move of the head raises the gradient norm, but only to second
    order): the first step is then the projected gradient at a small probe
    step along a seeded random null-space direction, i.e. the projected
    Hessian of the objective along that direction (the ascent judges the step
    like any other). Where that is zero too, the climb warns: nothing the
    teleport may move can change the objective. Steps may grow where the
    sample saturates its core space, or where a guard batch of other data
    (``judged``) judges every step.
    """

    def __init__(
        self, path: GradientPath, bases: Bases, weights: MovedWeights, frozen: dict[str, str], judged: bool = False
    ) -> None:
        self.path, self.bases, self.weights = path, bases, weights
        self.first = path.first
        self.blocked = None if bases.of else "no_room"
        self.measures_loss, self.keeps_batch = path.measures_loss, bases.keeps_batch
        self.may_grow = bases.saturated or judged
        self.layers, self.frozen, self.basis_seconds = bases.reports(path.site_paths()), {**frozen, **bases.frozen}, bases.seconds
        self._at: tuple[Evaluation, ProjectedStep] | None = None
        self._warned = False

    def evaluate(self) -> Evaluation:
        return self.path.evaluate()

    def final(self) -> Evaluation:
        return self.path.final()

    def step(self, evaluation: Evaluation) -> ProjectedStep:
        step = self._step_at(evaluation)
        self.path.release(evaluation)  # (a retry from this point takes the step kept; the next point's
        # evaluation need not sit beside what this one held)
        if evaluation is self.first and step.norm == 0 and not self._warned:
            self._warned = True
            warnings.warn(_NO_DIRECTION.format(sites=", ".join(sorted(layer.name for layer in self.layers if layer.null_dim))), RuntimeWarning, stacklevel=2)
        return step

    def moves(self) -> bool:
        """Whether the bases leave room (:data:`~torch_teleport.bases.MIN_ROOM`) and the first step
        has a direction at all."""
        return self.bases.has_room() and self.has_direction()

    def has_direction(self) -> bool:
        """Whether some site has room and the first step a direction at all."""
        return self.blocked is None and self._step_at(self.first).norm != 0  # NaN: the ascent's to report

    def _step_at(self, evaluation: Evaluation) -> ProjectedStep:
        if self._at is None or self._at[0] is not evaluation:  # (step() released the earlier point)
            self._at = None  # a step from a new point: the last point's step is no longer needed
            step = ProjectedStep(self.path.update(evaluation, self.weights, self.bases), self.weights)
            if evaluation is self.first and step.norm == 0 and self.path.probes_curvature:
                step = self._curvature_step() or step
            self._at = (evaluation, step)
        return self._at[1]

    def _curvature_step(self) -> ProjectedStep | None:
        """The projected gradient a probe step of :data:`CURVATURE_PROBE` (relative to the weights)
        along a seeded random null-space direction away (``None`` where that is zero too): at a
        stationary start, ``P H d`` times the probe's length, the direction the objective rises in
        fastest from there."""
        generator = torch.Generator().manual_seed(0)  # the same direction on every process and device
        random = {
            name: torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
            for name, p in self.weights.params.items()
        }
        probe = ProjectedStep(self.path.finished(random, [], self.bases), self.weights)
        if not probe.norm > 0:
            return None
        restore = self.snapshot()
        probe.apply(CURVATURE_PROBE * probe.reference / probe.norm, None)
        try:
            evaluation = self.path.evaluate()
            step = ProjectedStep(self.path.update(evaluation, self.weights, self.bases), self.weights)
            self.path.release(evaluation)
        finally:
            restore()  # exactly as found, not to rounding
        return step if step.norm > 0 and math.isfinite(step.norm) else None

    def snapshot(self) -> Callable[[], None]:
        """A copy of the moved weights, and the way back to it."""
        saved = {name: p.detach().clone() for name, p in self.weights.params.items()}

        def restore() -> None:
            with torch.no_grad():
                for name, p in self.weights.params.items():
                    p.copy_(saved[name])

        return restore


def custom_functions(output: Tensor) -> list[type]:
    """The custom ``torch.autograd.Function`` classes in ``output``'s graph."""
    found, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        function = getattr(node, "_forward_cls", None)
        if function is not None and function not in found:
            found.append(function)
        stack += [following for following, _ in node.next_functions]
    return found


def once_differentiable(function: type) -> bool:
    """Whether a custom Function's backward is wrapped by ``torch.autograd.function.once_differentiable``."""
    code = getattr(function.backward, "__code__", None)
    return code is not None and code.co_name == "wrapper" and code.co_filename == torch.autograd.function.__file__


_ONCE_DIFFERENTIABLE = (
    "{names}: backward marked @once_differentiable, so the full path's double backward cannot "
    "differentiate through it and the projected gradient misses every term that passes through it "
    "(all of it, when every layer's does). Give the Function a jvp (the structured path needs first "
    "derivatives only) or a backward that autograd can differentiate"
)

_NO_DIRECTION = (
    "teleport cannot move: the projected objective gradient is exactly zero on every site with room "
    "({sites}), at the start and a probe step away along a random null-space direction. A site whose "
    "inputs depend on no parameter the teleport moves (a network's first layer) has its whole "
    "gradient in the span of its inputs; check_coverage shows which layers can move"
)
