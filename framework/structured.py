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

import contextlib
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import get_total_norm

from .bases import Bases, SiteKey, SiteRef
from .coverage import Coverage, CoveredModule
from .gradient_path import GradientPath, autograd_gradient
from .inputs import as_call
from .method import MethodContext
from .objective import Batch, Evaluation
from .output_reuse import ReusedOutputs, taking_back
from .projector import Projector, Site, site_view, tangent_representation
from .update import FactoredSite, MovedWeights, ProjectedUpdate


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
    outputs: ReusedOutputs | None = None  # the layer outputs its forward computed, for the tangent pass


class StructuredEvaluator:
    """Evaluations from one forward and one first-order backward (no graph kept).

    ``sites`` starts as every site whose projector can record outputs and,
    after the first call, keeps those whose outputs were recorded. Output
    gradients are kept for the sites in ``moving`` only (every site where ``None``), layer outputs
    for the tangent pass at the layers in ``reusing`` (none until a pass has said which it reaches;
    see :mod:`~torch_teleport.output_reuse`).
    """

    def __init__(self, context: MethodContext, batch: Batch, sites: list) -> None:
        self.context = context
        self.sites = sites
        self.moving: set[SiteKey] | None = None
        self.layers = taking_back({id(c): c for c, _ in sites}.values())
        self.reusing: set[int] | None = None
        self._probed = False
        names = {id(p): name for name, p in context.model.named_parameters()}
        self.param_names = [names[id(p)] for p in batch.parameters]

    def __call__(self, batch: Batch) -> StructuredEvaluation:
        context = self.context
        outputs = ReusedOutputs(self.layers, self.reusing)
        loss, grads, deltas, recorded = first_order_pass(batch, self.sites, self.moving, outputs)
        if not self._probed:
            self.sites = [(c, s) for c, s in self.sites if (c.name, s.name) in recorded]
            self._probed = True
        squared = get_total_norm(grads).square().to(loss.dtype)
        evaluation = StructuredEvaluation(
            value=context.objective.of_squared_norm(squared),
            loss=loss,
            grad_norm=squared.sqrt(),
            deltas=deltas,
            direction=dict(zip(self.param_names, grads, strict=True)),
            local_squared=squared,
            outputs=outputs,
        )
        if context.replicas.size > 1:
            evaluation = context.replicas.combine_structured(evaluation, batch, grads)
        return evaluation


class StructuredPath(GradientPath):
    """First derivatives only: one forward and first-order backward, one forward-mode pass per step.

    Sites whose projector records outputs contribute ``2 f'(s) delta^T lambda``,
    whose projection is the projected gradient; where fewer samples than rows
    and inputs make it cheaper (and the site owns its parameters), the tangent
    factor is projected and the update stays factored. Every other parameter
    gets autograd's gradient of the objective. Taking :attr:`first` raises
    ``NotImplementedError`` when an op of the model has no forward-mode derivative.
    """

    name = "structured"

    def __init__(self, context: MethodContext, batch: Batch, coverage: Coverage, owners: Counter) -> None:
        super().__init__(context, batch, coverage)
        self.owners = owners  # how many sites each moved parameter belongs to
        self.evaluator = StructuredEvaluator(context, batch, capable_sites(coverage))
        self.first_parts: dict[SiteKey, SitePart] | None = None  # the first evaluation's, kept for every climb
        self._calls: dict[tuple[str, str], int] | None = None  # each stream's records in the capture
        self._needed: dict[tuple[str, str], int] | None = None  # the streams the steps read, and how many

    def restrict(self, moving: set[SiteKey]) -> None:
        """Keep output gradients and tangents only where a site moves: a fixed site's are never read
        (an early convolution's are as large as its activations). A first evaluation taken for
        other sites is taken again."""
        if moving != self.evaluator.moving:
            self.evaluator.moving = moving
            self._first, self.first_parts = None, None

    def forget_inputs(self) -> None:
        if self.captured is not None:
            self._calls = {key: len(tensors) for key, tensors in self.captured.items()}
        super().forget_inputs()

    def _evaluate_first(self) -> StructuredEvaluation:
        """The first evaluation, and its sites' unprojected updates: the forward-mode pass that raises
        ``NotImplementedError`` where an op of the model has no forward-mode derivative.

        Every tangent pass stops once the streams the moving sites read are recorded (what the
        model computes after them is not needed): as many records as the capture made, where that
        matches the outputs each site recorded (one record per call), else the first pass goes
        to the end and the later ones stop at its count."""
        first = self.evaluator(self.batch)
        self.sites = self.evaluator.sites  # those whose outputs were recorded
        moving = self.evaluator.moving
        kept = [(c, s) for c, s in self.sites if moving is None or (c.name, s.name) in moving]
        self.modules = list({id(c): c for c, _ in kept}.values())
        calls = {(c.name, s.stream): len(first.deltas.get((c.name, s.name), ())) for c, s in kept}
        until = calls if self._calls is not None and all(n and self._calls.get(k) == n for k, n in calls.items()) else None
        if self.modules:
            counts: dict[tuple[str, str], int] = {}
            outputs = first.outputs
            self.first_parts = self._site_parts(first, kept, until, counts)
            self._needed = {key: count for key, count in counts.items() if key in calls}
            self.evaluator.reusing = outputs.reached  # from now on, keep outputs where a pass takes them
        return first

    def evaluate(self) -> StructuredEvaluation:
        return self.evaluator(self.batch)

    def update(self, evaluation: StructuredEvaluation, weights: MovedWeights, bases: Bases) -> ProjectedUpdate:
        moving = [(c, s) for c, s in self.sites if (c.name, s.name) in bases.of]
        fast = {covered.qualified(p) for covered, site in moving for p in (site.weight, site.bias) if p}
        rest = [name for name in weights.params if name not in fast]
        dense = autograd_gradient(self.context.evaluate(self.batch), weights.params, rest) if rest else {}
        factored: list[FactoredSite] = []
        if moving:
            parts = self.first_parts if evaluation is self._first else self._site_parts(evaluation, moving, self._needed)
            for covered, site in moving:
                key = (covered.name, site.name)
                part = parts[key]
                if isinstance(part, Factors):
                    factored.append(FactoredSite.projected(covered, site, part.left, part.right, bases.of[key]))
                else:
                    write_site(dense, weights.params, covered, site, part)
        return self.finished(dense, factored, bases)

    def release(self, evaluation: StructuredEvaluation) -> None:
        evaluation.deltas, evaluation.direction, evaluation.outputs = {}, {}, None
        if evaluation is self._first:
            self.first_parts = None

    def _site_parts(
        self, evaluation: StructuredEvaluation, sites: list[SiteRef], until: dict[tuple[str, str], int] | None,
        counts: dict[tuple[str, str], int] | None = None,
    ) -> dict[SiteKey, SitePart]:
        """Each of ``sites``' ``2 f'(s) delta^T lambda``, unprojected, from one tangent pass of the moving
        modules along ``evaluation``'s direction (``counts``: each stream's records, filled in).

        A site's part is built as soon as its stream's records are in (with ``until``), and its
        output gradients and tangents are dropped then: a pass does not hold every site's at once.
        The evaluation's direction and layer outputs are dropped after the pass: the step needs nothing
        else of them."""
        coefficient = self.context.objective.slope(evaluation.local_squared) * evaluation.share
        readers: dict[tuple[str, str], list[SiteRef]] = defaultdict(list)
        for covered, site in sites:
            readers[(covered.name, site.stream)].append((covered, site))
        parts: dict[SiteKey, SitePart] = {}

        def build(stream: tuple[str, str], records: list[Tensor]) -> None:
            if counts is not None:
                counts[stream] = len(records)
            for covered, site in readers.get(stream, ()):
                grads = evaluation.deltas.pop((covered.name, site.name))
                parts[(covered.name, site.name)] = self._site_part(covered, site, grads, records, coefficient)

        left = tangent_streams(
            self.batch, evaluation.direction, self.modules, until, build if until else None, evaluation.outputs
        )
        evaluation.direction, evaluation.outputs = {}, None
        for stream, records in left.items():
            build(stream, records)
        return parts

    def _site_part(
        self, covered: CoveredModule, site: Site, grads: list[Tensor], streams: list[Tensor], coefficient: Tensor
    ) -> SitePart:
        """The site's ``2 f'(s) delta^T lambda``: as its two factors where projecting the tangent factor
        is cheaper, else as one ``(groups, rows, inputs)`` tensor (the folded bias last)."""
        names = [covered.qualified(p) for p in (site.weight, site.bias) if p]
        module, projector = covered.module, covered.projector
        if self.context.replicas.size == 1 and _factored_is_cheaper(covered, site, grads, names, self.owners):
            left = projector.output_representation(module, site, grads) * coefficient
            right = tangent_representation(projector, module, site, streams).transpose(-1, -2)
            return Factors(left, right)
        return projector.structured_gradient(module, site, grads, streams) * coefficient


class Factors(NamedTuple):
    """A site's unprojected structured update ``left @ right`` as its factors (see :class:`FactoredSite`)."""

    left: Tensor
    right: Tensor


SitePart = Factors | Tensor
"""A site's unprojected structured update: its factors, or the ``(groups, rows, inputs)`` tensor."""


def write_site(dense: dict[str, Tensor], params: dict, covered: CoveredModule, site: Site, product: Tensor) -> None:
    """Write a site's ``(groups, rows, inputs)`` update into the dense per-parameter updates."""
    for local in (site.weight, site.bias):
        if local:
            dense.setdefault(covered.qualified(local), torch.zeros_like(params[covered.qualified(local)]))
    weight = site_view(dense[covered.qualified(site.weight)], site)
    weight.copy_(product[..., : weight.shape[-1]])
    if site.bias is not None:
        site_view(dense[covered.qualified(site.bias)], site, bias=True).copy_(product[..., weight.shape[-1] :])


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


def capable_sites(coverage: Coverage) -> list[SiteRef]:
    """Sites whose projector can record their outputs (a probe install, removed at once)."""
    sites = []
    for covered in coverage.modules:
        handles = covered.projector.capture_outputs(covered.module, lambda site, tensor: None)
        if handles is not None:
            for handle in handles:
                handle.remove()
            sites += [(covered, site) for site in covered.sites]
    return sites


def first_order_pass(
    batch: Batch, sites: Sequence[tuple[CoveredModule, Site]], keep: set[SiteKey] | None = None,
    outputs: ReusedOutputs | None = None,
) -> tuple[Tensor, list[Tensor], dict[SiteKey, list[Tensor]], set[SiteKey]]:
    """The loss, its gradient for ``batch.parameters`` and the output gradients of ``sites`` (of those
    in ``keep`` where given); with ``outputs``, the layer outputs it keeps for a tangent pass.

    One forward with the projectors' output hooks and one first-order backward.
    Each output is heard by a gradient hook registered as it is recorded, so
    no output is held beyond what autograd itself saves, and the gradient is
    the one at the site's output as computed, before any in-place operation
    changes it (a ``ReLU(inplace=True)`` after the layer). Returns the detached
    loss, the gradients (zeros where unused), each kept site's output
    gradients, one tensor per call, and the sites that recorded outputs: a
    site whose module computed its map without calling the hooked submodule
    (it multiplies the weight itself) records nothing and is left out.
    """
    heard: dict[SiteKey, list[Tensor | tuple]] = defaultdict(list)  # a gradient, or (shape, dtype, device)
    seen: set[SiteKey] = set()
    handles = []
    try:
        for covered in {id(c): c for c, _ in sites}.values():
            handles += covered.projector.capture_outputs(covered.module, gradient_listener(heard, seen, covered.name, keep)) or []
        if outputs is not None:
            handles += outputs.listen()
        loss = batch.loss()
    finally:
        for handle in handles:
            handle.remove()
    grads = torch.autograd.grad(loss, list(batch.parameters), allow_unused=True)
    param_grads = [
        (g if g is not None else torch.zeros_like(p)).detach()
        for g, p in zip(grads, batch.parameters, strict=True)
    ]
    deltas = {
        (covered.name, site.name): heard_gradients(heard[(covered.name, site.name)])
        for covered, site in sites
        if heard.get((covered.name, site.name))
    }
    return loss.detach(), param_grads, deltas, seen


def gradient_listener(heard: dict, seen: set[SiteKey], module_name: str, keep: set[SiteKey] | None = None):
    """A ``capture_outputs`` record that notes the site as seen and, for a kept site (every site where
    ``keep`` is ``None``), has the gradient its output gets in the backward written into ``heard``, one
    slot per call: a tensor hook, registered as the output is recorded, hears the gradient of the
    output as computed, also when an in-place activation changes the tensor afterwards, and holds
    nothing of the output (its shape, dtype and device stand in the slot until then:
    :func:`heard_gradients` gives zeros where no gradient reached it)."""

    def record(site: str, tensor: Tensor) -> None:
        key = (module_name, site)
        seen.add(key)
        if keep is not None and key not in keep:
            return
        slots = heard[key]
        index = len(slots)
        slots.append((tuple(tensor.shape), {"dtype": tensor.dtype, "device": tensor.device}))
        if tensor.requires_grad:

            def hear(grad: Tensor) -> None:
                slots[index] = grad.detach()

            tensor.register_hook(hear)

    return record


class _AllRecorded(Exception):
    """Every stream a tangent pass was asked for is recorded: the rest of the forward is not needed."""


def tangent_streams(
    batch: Batch, direction: dict[str, Tensor], modules: Sequence[CoveredModule],
    until: dict[tuple[str, str], int] | None = None,
    complete: Callable[[tuple[str, str], list[Tensor]], None] | None = None,
    outputs: ReusedOutputs | None = None,
) -> dict[tuple[str, str], list[Tensor]]:
    """The forward-mode tangents of every input stream of ``modules`` in the parameter direction.

    ``direction`` maps parameter names (as ``batch.model.named_parameters``
    gives them) to tangents. One forward-mode pass through
    :func:`torch.func.functional_call`, with the projectors' own capture hooks
    recording tangents instead of values (a zero tangent where none flowed).
    With ``until`` (stream -> records, as a full pass of the same batch
    recorded them) the pass ends once those are recorded: what the model
    computes after its last moving layer's inputs (a language model's head
    and its logits) is not needed. With ``complete`` too, a stream is handed
    to ``complete(stream, records)`` as soon as its records are in, and not
    returned. With ``outputs`` (an evaluation's at the same weights), the layers
    that can take them back do not compute their outputs again.
    """
    tangents: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
    counts: Counter = Counter()
    handles = []
    # functional_call leaves plain tensors behind in a module the model calls from two places;
    # every module's own parameters are put back afterwards.
    owned = {id(module): (module, dict(module._parameters)) for module in batch.model.modules()}
    try:
        for covered in modules:
            record = tangent_recorder(tangents, covered.name)
            if until:
                own = [owned[id(module)] for module in covered.module.modules()]
                handed = _with_own_parameters(complete, own) if complete is not None else None
                record = _until(record, covered.name, counts, until, tangents, handed)
            handles += covered.projector.capture(covered.module, record)
        with outputs.reused() if outputs is not None else contextlib.nullcontext(), forward_mode():
            duals = {name: fwAD.make_dual(p.detach(), direction[name]) for name, p in _named(batch, direction)}
            args, kwargs = as_call(batch.inputs)
            functional_call(batch.model, duals, args, kwargs, strict=False)
    except _AllRecorded:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for module, parameters in owned.values():
            module._parameters.update(parameters)
    return tangents


def _with_own_parameters(complete: Callable, own: list[tuple[nn.Module, dict]]) -> Callable:
    """``complete``, called with the modules ``own`` names holding their own parameters, not the pass's
    duals (a projector reads its module's parameters), the duals put back after."""

    def handing(stream: tuple[str, str], records: list[Tensor]) -> None:
        duals = [(module, dict(module._parameters)) for module, _ in own]
        try:
            for module, parameters in own:
                module._parameters.update(parameters)
            complete(stream, records)
        finally:
            for module, parameters in duals:
                module._parameters.update(parameters)

    return handing


def _until(
    record, module_name: str, counts: Counter, until: dict[tuple[str, str], int],
    tangents: dict[tuple[str, str], list[Tensor]], complete: Callable | None,
):
    """``record``, counting each stream's records (``counts``), handing a stream whose records are in
    to ``complete`` and ending the pass (:class:`_AllRecorded`) once every stream in ``until`` holds
    its records; nothing is recorded after that (should the model swallow the signal and go on)."""

    def all_in() -> bool:
        return all(counts[key] >= count for key, count in until.items())

    def recording(stream: str, tensor: Tensor) -> None:
        key = (module_name, stream)
        if all_in() or (complete is not None and counts[key] == until.get(key)):  # (handed over already)
            return
        record(stream, tensor)
        counts[key] += 1
        if complete is not None and counts[key] == until.get(key):
            complete(key, tangents.pop(key))
        if all_in():
            raise _AllRecorded

    return recording


def tangent_recorder(tangents: dict[tuple[str, str], list[Tensor]], module_name: str):
    """A capture ``record`` that keeps the tangent of each recorded stream (zeros where none flowed)."""

    def record(stream: str, tensor: Tensor) -> None:
        primal, tangent = fwAD.unpack_dual(tensor)
        tangents[(module_name, stream)].append(torch.zeros_like(primal) if tangent is None else tangent)

    return record


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """A forward-mode pass: dual tensors on, no graph, and the fused attention and encoder-layer
    fast paths off (they have no forward-mode derivatives)."""
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with fwAD.dual_level(), torch.no_grad(), warnings.catch_warnings():
            # The first dual loads torch's forward-mode decompositions, which script functions
            # through the deprecated torch.jit.script: torch's own business, not the caller's.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def _named(batch: Batch, direction: dict[str, Tensor]):
    return [(name, p) for name, p in batch.model.named_parameters() if name in direction]


def heard_gradients(slots: list) -> list[Tensor]:
    """The gradients a :func:`gradient_listener` heard, zeros for an output no gradient reached."""
    return [slot if isinstance(slot, Tensor) else torch.zeros(slot[0], **slot[1]) for slot in slots]
