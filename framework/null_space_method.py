"""The null-space projection method (Algorithm 1 of the paper): capture -> bases -> ascent -> report."""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .chain import LinearChain
from .coverage import Coverage, CoveredModule, capture_inputs, find_coverage
from .inputs import Inputs, call_model
from .method import Evaluate, MethodContext, TeleportMethod
from .null_space import CoreBasis, NullSpace
from .objective import Batch, Evaluation, GradientNormObjective, checked_loss
from .projector import Projector, Site, site_view, tangent_representation
from .report import LayerReport, TeleportReport
from .structured import StructuredEvaluation, StructuredEvaluator, tangent_streams

GRADIENT_PATHS = ("auto", "closed_form", "structured", "full")

DEFAULT_NULL_SPACE, DEFAULT_TAU = "svd", 0.999
"""The default core space: the leading directions holding 99.9% of the energy of the inputs of
the teleport batch, the basis sample and the guard batch (GPM's reading of tau). An exact null
space keeps only the batch's loss (a round of teleports on batches of 32 raised the whole
training set's loss by 6% on digits) and has no room at all on a sample larger than a layer's
width; this one keeps the data's loss to 0.01% on a sample of 1,024 while the drift tolerance
keeps the batch's (docs/architecture.md, "Which level set")."""

SITE_STEP_LIMIT = 0.3
"""No normalised step moves a module's parameters by more than this fraction of their own norm at
the teleport's start: the step is relative to the moved weights' joint norm, which would otherwise
move a small layer (a classifier head) by more than its own size. (A plain rate, ``normalize=False``,
is not limited.)"""

SATURATION = 0.75
"""A sample *saturates* a site's core space when the core rank is at most this fraction of its
samples: more samples would add few new directions, so the sample stands for the data there.
Only then may the step-length search grow the step beyond its first length: on a batch that
spans a new direction with every sample (32 samples in 1,025 dimensions), what the batch does not
see is most of what the data uses, and a round of 32 such teleports with growing steps raised
MNIST-1D's training loss 156-fold (0.005 throughout: 5.9-fold)."""

DEFAULT_DRIFT = 1e-5
"""Default relative batch-loss drift allowed per teleport, whatever the null space: the float32
invariance the property tests hold every projector to (exact teleports measure about 1e-7)."""

SiteRef = tuple[CoveredModule, Site]


@dataclass
class Bases:
    """The null-space side of one teleport batch: a core basis per site with room, and what stays fixed.

    A site without room whose parameter another site moves (the key block
    of a packed attention projection whose query block has room) is
    *pinned*: its rows of the update are zeroed.
    """

    of: dict[tuple[str, str], CoreBasis] = field(default_factory=dict)
    saturated: bool = True  # every moving site's sample saturates its core space (see SATURATION)
    pinned: list[SiteRef] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    frozen: dict[str, str] = field(default_factory=dict)


@dataclass
class FactoredSite:
    """A site's structured update ``left @ right`` kept as its two factors.

    ``left`` is ``(groups, rows, samples)`` (the output gradients, times the
    objective's slope) and ``right`` ``(groups, samples, inputs)`` (the
    projected tangent inputs, the folded bias last). Never formed as a
    dense matrix before it is added to the weights.
    """

    covered: CoveredModule
    site: Site
    left: Tensor
    right: Tensor

    @classmethod
    def projected(cls, covered: CoveredModule, site: Site, left: Tensor, tangents: Tensor, basis: CoreBasis) -> FactoredSite:
        """The factored update with the tangent factor ``tangents`` (``(groups, samples, inputs)``,
        folded bias last) projected: ``P(left @ tangents) = left @ P(tangents)``."""
        width = site_view(covered.module.get_parameter(site.weight), site).shape[-1]
        weight, bias = basis.project(tangents[..., :width], tangents[..., width:] if site.bias is not None else None)
        return cls(covered, site, left, weight if bias is None else torch.cat([weight, bias], -1))

    def squared_norm(self) -> Tensor:
        """``||left @ right||_F^2`` from the two ``samples x samples`` Gram matrices (in float64)."""
        left, right = self.left.double(), self.right.double()
        return ((left.transpose(-1, -2) @ left) * (right @ right.transpose(-1, -2))).sum()

    def add_to_weights(self, scale: float) -> None:
        module, site = self.covered.module, self.site
        weight = site_view(module.get_parameter(site.weight), site)
        width = weight.shape[-1]
        weight.baddbmm_(self.left, self.right[..., :width], alpha=scale)
        if site.bias is not None:
            bias = site_view(module.get_parameter(site.bias), site, bias=True)
            bias.baddbmm_(self.left, self.right[..., width:], alpha=scale)


@dataclass
class ProjectedStep:
    """One projected objective gradient: dense per-parameter tensors plus factored sites."""

    dense: dict[str, Tensor]
    factored: list[FactoredSite]

    @functools.cached_property
    def squares(self) -> list[float]:
        """Each part's squared Frobenius norm (dense parameters in order, then factored sites),
        accumulated in float64 (squares overflow float32); computed once per step and its retries."""
        squares = [float(update.double().square().sum()) for update in self.dense.values()]
        return squares + [float(part.squared_norm()) for part in self.factored]

    def norm(self) -> float:
        """The Frobenius norm over every parameter."""
        return math.sqrt(sum(self.squares))

    def scales(self, scale: float, modules: dict[str, str], limits: dict[str, float] | None) -> list[float]:
        """``scale`` per part (dense parameters in order, then factored sites), cut per module
        where the step would move the module's parameters by more than its entry in ``limits``
        (``modules``: each parameter's module; ``None``: nothing is cut; a limit of 0, a module
        of zero norm, is not applied).

        Every site of a module gets the same factor, so each site's update stays in its null
        space and a shorter step keeps the batch's loss exactly as the whole step does."""
        owners = [modules[name] for name in self.dense] + [part.covered.name for part in self.factored]
        if limits is None:
            return [scale] * len(owners)
        squares: dict[str, float] = defaultdict(float)
        for owner, square in zip(owners, self.squares, strict=True):
            squares[owner] += square
        factor = {}
        for owner, square in squares.items():
            moved, limit = abs(scale) * math.sqrt(square), limits[owner]
            factor[owner] = limit / moved if limit > 0 and moved > limit else 1.0
        return [scale * factor[owner] for owner in owners]

    def add_to_weights(self, params: dict[str, nn.Parameter], scales: list[float], sign: float = 1.0) -> None:
        """Add each part times its scale (from :meth:`scales`), or subtract it with ``sign=-1``."""
        dense = len(self.dense)
        with torch.no_grad():
            for (name, update), scale in zip(self.dense.items(), scales[:dense], strict=True):
                params[name].add_(update, alpha=sign * scale)
            for part, scale in zip(self.factored, scales[dense:], strict=True):
                part.add_to_weights(sign * scale)


class NullSpaceMethod(TeleportMethod):
    """Null-space gradient projection (Algorithm 1 of the paper).

    Inputs of every covered layer are captured during the first forward
    pass; one core basis per site is built from them and reused for all
    steps (exact steps leave every layer's inputs on the batch unchanged).

    ``gradient`` chooses how the projected objective gradient is computed:
    ``"structured"`` from first derivatives only (:mod:`~torch_teleport.structured`;
    needs a :class:`~torch_teleport.objective.GradientNormObjective`),
    ``"closed_form"`` the structured step's closed form for chains of Linear
    layers (:mod:`~torch_teleport.chain`; exact null spaces, one process),
    ``"full"`` by autograd through the objective (a double backward for
    gradient-norm objectives), ``"auto"`` (default) the closed form where it
    applies, else structured wherever the objective and the site's
    projector allow it. Sites whose projector provides no output gradients
    take the full path; the report names each site's path. A model with an
    op that has no forward-mode derivative takes the full path with a
    warning naming the op.
    """

    keeps_replicas_in_sync = True
    takes_basis_sample = True
    undoes_steps = True
    retries_steps = True

    def __init__(
        self,
        context: MethodContext,
        *,
        null_space: str | NullSpace = DEFAULT_NULL_SPACE,
        tau: float | None = None,
        uncovered: str = "warn",
        gradient: str = "auto",
    ) -> None:
        super().__init__(context)
        if gradient not in GRADIENT_PATHS:
            raise ValueError(f"gradient must be one of {GRADIENT_PATHS}, got {gradient!r}")
        structured_objective = isinstance(context.objective, GradientNormObjective)
        if gradient == "structured" and not structured_objective:
            raise ValueError(
                f"gradient='structured' needs an objective of the gradient norm (f(||grad L||^2)); "
                f"{type(context.objective).__name__} takes gradient='full' or 'auto'"
            )
        self.structured = gradient != "full" and structured_objective
        if not isinstance(null_space, NullSpace):
            if tau is None:
                tau = DEFAULT_TAU if null_space == DEFAULT_NULL_SPACE else 1.0
            null_space = context.registry.get("null_space", null_space)(tau=tau)
        elif tau is not None:
            raise ValueError("give tau to the null space object itself, not beside it")
        self.null_space = null_space
        self.coverage: Coverage = find_coverage(context.model, context.registry, uncovered)
        moved = [(covered.qualified(p), covered.name) for covered in self.coverage.modules for s in covered.sites for p in (s.weight, s.bias) if p]
        self._owners = Counter(name for name, _ in moved)  # how many sites each moved parameter belongs to
        self._module_of = dict(moved)  # each moved parameter's module: the unit of SITE_STEP_LIMIT
        self.chain = LinearChain.of(context.model) if gradient in ("auto", "closed_form") and self.structured else None
        if self.chain is not None and not self._covers(self.chain):
            self.chain = None
        if gradient == "closed_form" and (self.chain is None or not null_space.exact):
            raise ValueError(
                "gradient='closed_form' needs an nn.Sequential of Linear layers and elementwise "
                "activations whose trainable parameters are all the Linear layers', an exact null "
                "space (tau = 1) and a gradient-norm objective; use gradient='structured'"
            )
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

    def moved_parameters(self, batch: Batch) -> list[nn.Parameter]:
        """The parameters some covered site moves."""
        return list(self.coverage.movable().values())

    def default_drift(self) -> float | None:
        """:data:`DEFAULT_DRIFT`: the batch's loss is kept to float32 precision whatever the null space."""
        return DEFAULT_DRIFT

    # -- capture ---------------------------------------------------------------------------
    def capture_inputs(self, inputs: Inputs) -> dict[tuple[str, str], list[Tensor]]:
        """Every covered module's input streams on ``inputs`` (see :func:`~torch_teleport.coverage.capture_inputs`)."""
        return capture_inputs(self.coverage, self.context.model, inputs)

    # -- the pipeline ------------------------------------------------------------------------
    def run(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        if (
            self.chain is not None
            and self.null_space.exact
            and self.context.replicas.size == 1
            and isinstance(batch.inputs, Tensor)
        ):
            return self._run_closed_form(batch, steps, cap)
        captured = self._with_basis_sample(self.capture_inputs(batch.inputs), batch)
        evaluate: Evaluate = self.context.evaluate
        if self.structured:
            evaluate = StructuredEvaluator(self.context, batch, self._capable_sites())
        first, report = self.start(batch, evaluate=evaluate, frozen=dict(self.coverage.frozen))
        structured: list[SiteRef] = evaluate.sites if self.structured else []  # outputs recorded
        modules = list({id(c): c for c, _ in structured}.values())
        first_tangents = None
        if structured:
            try:
                first_tangents = tangent_streams(batch, first.direction, modules)
            except NotImplementedError as error:  # an op without forward-mode derivatives
                warnings.warn(
                    "teleport takes the full (double-backward) path: the structured path needs "
                    f"forward-mode derivatives, and {_op_of(error)}",
                    RuntimeWarning,
                    stacklevel=4,
                )
                structured, modules, evaluate = [], [], self.context.evaluate
                first = evaluate(batch)
        bases = self._bases_into(report, captured, structured, "structured")
        if not bases.of:
            return report
        params, sizes = self._moved(bases)
        moving = [(c, s) for c, s in structured if (c.name, s.name) in bases.of]

        def direction(evaluation: Evaluation) -> ProjectedStep:
            tangents = None
            if moving:
                tangents = first_tangents if evaluation is first else tangent_streams(batch, evaluation.direction, modules)
            return self._projected_gradient(batch, evaluation, params, bases, moving, tangents)

        step = self._stepper(direction, params, sizes)
        return self.ascend(batch, first, report, steps, cap, step, evaluate=evaluate, grow=bases.saturated)

    def _covers(self, chain: LinearChain) -> bool:
        """Whether every layer of ``chain`` is one covered module moving its own weight and bias."""
        covered = {id(c.module): c for c in self.coverage.modules}
        return all(
            id(layer) in covered and len(covered[id(layer)].sites) == 1 for layer in chain.layers
        ) and len({id(layer) for layer in chain.layers}) == len(chain.layers)

    def _run_closed_form(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        """The pipeline with :mod:`~torch_teleport.chain`'s closed form: one capture, the steps by the
        closed form (no forward pass), then one no-grad forward for the real final loss; the limits
        are checked there, undoing steps from the last while they are broken (``ascend(deferred=True)``).
        The per-step losses in the report are the captured one: exact steps keep it."""
        state = self.chain.prepare(batch)
        sites = {id(c.module): (c, s) for c in self.coverage.modules for s in c.sites}
        layers = [sites[id(layer)] for layer in self.chain.layers]

        def evaluate(_: Batch) -> Evaluation:
            return state.evaluate(self.context.objective)

        def measured(_: Batch) -> Evaluation:
            evaluation = state.evaluate(self.context.objective)
            with torch.no_grad():
                evaluation.loss = checked_loss(batch.loss_fn(call_model(batch.model, batch.inputs), batch.targets))
            return evaluation

        first, report = self.start(batch, evaluate=evaluate, frozen=dict(self.coverage.frozen))
        captured = {
            (covered.name, site.stream): [x] for (covered, site), x in zip(layers, state.inputs, strict=True)
        }
        captured = self._with_basis_sample(captured, batch)
        bases = self._bases_into(report, captured, layers, "closed_form")
        if not bases.of:
            return report
        params, sizes = self._moved(bases)

        def direction(evaluation: Evaluation) -> ProjectedStep:
            coefficient = self.context.objective.slope(evaluation.squared)
            factored = []
            for (covered, site), delta, tangent in zip(layers, evaluation.deltas, state.tangents(evaluation.deltas), strict=True):
                basis = bases.of.get((covered.name, site.name))
                if basis is None or tangent is None:
                    continue
                folded = torch.cat([tangent, torch.zeros_like(tangent[:, :1])], 1) if site.bias is not None else tangent
                left = (delta.T * coefficient).unsqueeze(0)
                factored.append(FactoredSite.projected(covered, site, left, folded.unsqueeze(0), basis))
            return ProjectedStep({}, factored)

        step = self._stepper(direction, params, sizes)
        return self.ascend(
            batch, first, report, steps, cap, step, evaluate=evaluate, final=measured, deferred=True, grow=bases.saturated
        )

    def _moved(self, bases: Bases) -> tuple[dict[str, nn.Parameter], dict[str, float]]:
        """The parameters the steps move, and each one's norm at the start (the normalised step's
        scale is their joint norm; each module's limit its own)."""
        params = {name: p for name, p in self.coverage.movable().items() if name not in bases.frozen}
        return params, {name: float(p.detach().double().norm()) for name, p in params.items()}

    def _stepper(
        self, direction: Callable[[Evaluation], ProjectedStep], params: dict[str, nn.Parameter], sizes: dict[str, float]
    ) -> Callable[[Evaluation, float], Callable[[], None] | bool]:
        """The step :meth:`ascend` takes: the step rule applied to ``direction(evaluation)``, the
        projected gradient (computed once per point: a retried step reuses it).

        The projected gradient is scaled (relative to the moved parameters' joint norm at
        the start of the teleport, when normalising; no site by more than
        :data:`SITE_STEP_LIMIT` of its own) and added to the weights. A step returns
        ``False`` when it is not finite (nothing moves), else its undo: subtracting it
        again, which restores the weights to rounding (no copy of them is kept; a factored
        step holds only its factors)."""
        weights = math.sqrt(sum(size**2 for size in sizes.values()))
        limits = None  # the limit bounds the normalised step; a plain rate (eq. 5) is the caller's to choose
        if self.context.step.normalize:
            squares: dict[str, float] = defaultdict(float)
            for name, size in sizes.items():
                squares[self._module_of[name]] += size**2
            limits = {module: SITE_STEP_LIMIT * math.sqrt(square) for module, square in squares.items()}
        last: list = [None, None]  # the evaluation whose projected gradient is held, and that gradient

        def step(evaluation: Evaluation, length: float) -> Callable[[], None] | bool:
            if last[0] is not evaluation:
                last[:] = evaluation, direction(evaluation)
            projected = last[1]
            norm = projected.norm()
            if not math.isfinite(norm):
                return False
            if norm == 0:  # every site was wholly in its core space (see CoreBasis.project)
                return True
            scales = projected.scales(self.context.step.scale(norm, weights, length), self._module_of, limits)
            projected.add_to_weights(params, scales)
            return lambda: projected.add_to_weights(params, scales, sign=-1.0)

        return step

    def _with_basis_sample(self, captured: dict, batch: Batch) -> dict:
        """``captured`` with the input streams of ``batch.basis`` and of the guard batch added: the
        core space then spans the inputs of the data the teleport promises to keep too (see
        :meth:`Teleporter.teleport`)."""
        samples = [s for s in (batch.basis, batch.guard[0] if batch.guard is not None else None) if s is not None]
        if not samples:
            return captured
        merged = defaultdict(list, {key: list(tensors) for key, tensors in captured.items()})
        for sample in samples:
            for key, tensors in self.capture_inputs(sample).items():
                merged[key] += tensors
        return merged

    def _capable_sites(self) -> list[SiteRef]:
        """Sites whose projector can record their outputs (a probe install, removed at once)."""
        sites = []
        for covered in self.coverage.modules:
            handles = covered.projector.capture_outputs(covered.module, lambda site, tensor: None)
            if handles is not None:
                for handle in handles:
                    handle.remove()
                sites += [(covered, site) for site in covered.sites]
        return sites

    def _bases_into(self, report: TeleportReport, captured: dict, sites: list[SiteRef], path: str) -> Bases:
        """The bases, timed and entered in the report (``stopped="no_room"`` when nothing can move)."""
        started = time.perf_counter()
        bases = self._bases(captured, {(c.name, s.name) for c, s in sites}, path)
        report.basis_seconds = time.perf_counter() - started
        report.layers = bases.layers
        report.frozen.update(bases.frozen)
        if not bases.of:
            report.stopped = "no_room"
        return bases

    def _bases(self, captured: dict, structured: set, path: str) -> Bases:
        """One core basis per site; sites whose module never ran, or with no room, stay fixed."""
        bases = Bases()
        no_room: list = []
        for covered in self.coverage.modules:
            for site in covered.sites:
                names = [covered.qualified(p) for p in (site.weight, site.bias) if p]
                tensors = captured.get((covered.name, site.stream))
                representation = (
                    covered.projector.representation(covered.module, site, tensors).detach() if tensors else None
                )
                spectrum = self.context.replicas.spectrum(representation)  # of the global batch
                if spectrum is None:
                    bases.frozen.update(dict.fromkeys(names, "its module did not run on the teleport batch"))
                    continue
                basis = self.null_space.basis_of(spectrum)
                bases.layers.append(
                    LayerReport(
                        name=covered.qualified(site.name),
                        input_dim=basis.input_dim * site.groups,
                        null_dim=basis.null_dim,
                        samples=spectrum.samples,
                        groups=site.groups,
                        gradient=path if (covered.name, site.name) in structured else "full",
                    )
                )
                if basis.null_dim == 0:
                    no_room.append((covered, site, names))
                else:
                    bases.of[(covered.name, site.name)] = basis
                    bases.saturated &= max(basis.ranks) <= SATURATION * spectrum.samples
        moving = {
            covered.qualified(p)
            for covered in self.coverage.modules
            for site in covered.sites
            if (covered.name, site.name) in bases.of
            for p in (site.weight, site.bias)
            if p
        }
        bases.pinned = [(covered, site) for covered, site, names in no_room if moving.intersection(names)]
        for _, _, names in no_room:
            bases.frozen.update({name: "no null space on the teleport batch" for name in names if name not in moving})
        return bases

    # -- one step ----------------------------------------------------------------------------
    def _projected_gradient(
        self,
        batch: Batch,
        evaluation: Evaluation,
        params: dict[str, nn.Parameter],
        bases: Bases,
        structured: list[SiteRef],
        tangents: dict | None,
    ) -> ProjectedStep:
        """The projected objective gradient (global under data parallelism), unscaled.

        Structured sites contribute ``2 f'(s) delta^T lambda``, whose
        projection is the projected gradient; where fewer samples than rows
        and inputs make it cheaper (and the site owns its parameters), the
        tangent factor is projected and the update stays factored. Every
        other parameter gets autograd's gradient of the objective.
        """
        context = self.context
        dense: dict[str, Tensor] = {}
        factored: list[FactoredSite] = []
        fast = {covered.qualified(p) for covered, site in structured for p in (site.weight, site.bias) if p}
        rest = [name for name in params if name not in fast]
        if rest:
            full = context.evaluate(batch) if isinstance(evaluation, StructuredEvaluation) else evaluation
            grads = torch.autograd.grad(full.value, [params[n] for n in rest], allow_unused=True)
            for name, g in zip(rest, grads, strict=True):
                dense[name] = (g if g is not None else torch.zeros_like(params[name])).detach().contiguous()
        if structured:
            assert isinstance(evaluation, StructuredEvaluation) and tangents is not None
            coefficient = context.objective.slope(evaluation.local_squared) * evaluation.share
            for covered, site in structured:
                grads, streams = evaluation.deltas[(covered.name, site.name)], tangents[(covered.name, site.stream)]
                names = [covered.qualified(p) for p in (site.weight, site.bias) if p]
                if context.replicas.size == 1 and _factored_is_cheaper(covered, site, grads, names, self._owners):
                    left = covered.projector.output_representation(covered.module, site, grads) * coefficient
                    right = tangent_representation(covered.projector, covered.module, site, streams).transpose(-1, -2)
                    factored.append(FactoredSite.projected(covered, site, left, right, bases.of[(covered.name, site.name)]))
                    continue
                product = covered.projector.structured_gradient(covered.module, site, grads, streams) * coefficient
                for name in names:
                    dense.setdefault(name, torch.zeros_like(params[name]))
                weight = site_view(dense[covered.qualified(site.weight)], site)
                weight.copy_(product[..., : weight.shape[-1]])
                if site.bias is not None:
                    site_view(dense[covered.qualified(site.bias)], site, bias=True).copy_(product[..., weight.shape[-1] :])
        dense = context.replicas.sum(dense)  # the global objective's gradient, the same on every rank
        done = {(part.covered.name, part.site.name) for part in factored}
        for covered in self.coverage.modules:
            for site in covered.sites:
                basis = bases.of.get((covered.name, site.name))
                if basis is not None and (covered.name, site.name) not in done:
                    local = {p: dense[covered.qualified(p)] for p in (site.weight, site.bias) if p}
                    covered.projector.project(covered.module, site, local, basis)
        for covered, site in bases.pinned:
            for local, is_bias in ((site.weight, False), (site.bias, True)):
                if local and covered.qualified(local) in dense:
                    site_view(dense[covered.qualified(local)], site, bias=is_bias).zero_()
        return ProjectedStep(dense, factored)


def _factored_is_cheaper(
    covered: CoveredModule, site: Site, output_grads: list[Tensor], names: list[str], owners: Counter
) -> bool:
    """Whether to keep the site's update factored: few samples, the base projection, sole owner.

    Projecting the ``samples x inputs`` factor instead of the ``rows x
    inputs`` update, and taking norms from ``samples x samples`` Gram
    matrices, pays when there are fewer samples than rows and inputs.
    """
    weight = site_view(covered.module.get_parameter(site.weight), site)
    rows, inputs = weight.shape[-2:]
    samples = sum(grad.numel() for grad in output_grads) // (rows * site.groups)
    params = [covered.module.get_parameter(p) for p in (site.weight, site.bias) if p]
    return (
        samples <= min(rows, inputs)
        and type(covered.projector).project is Projector.project
        and all(owners[name] == 1 for name in names)
        and all(p.is_contiguous() for p in params)
    )


def _op_of(error: Exception) -> str:
    """The operator an autograd ``NotImplementedError`` names, in a phrase."""
    match = re.search(r"with ([\w:.]+) that does not support it", str(error))
    return f"{match[1]} has none" if match else f"an op has none ({error})"

