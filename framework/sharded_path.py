"""The structured path for sharded models (FSDP2): FSDP's own passes, updates landed on each rank's block.

Under ``fully_shard`` a parameter exists whole only inside its module's
forward and backward; autograd never sees the sharded parameters, so
``autograd.grad`` with respect to them, ``functional_call`` and a double
backward are out of reach. The structured step (see
:mod:`~torch_teleport.structured`) needs none of them:

* **g**, the global batch's loss gradient: one backward of this rank's loss
  weighted by its share of the global batch, through FSDP's hooks; FSDP
  reduce-scatters it into each rank's block of ``.grad`` (the gradients
  already there are set aside and put back);
* **delta**, each site's output gradient: tensor hooks during that backward;
* **lambda**, each site's input tangent in the direction g: one forward-mode
  pass in which every module, once FSDP has gathered its parameters, swaps
  them for duals whose tangents are the gathered blocks of g (one module's
  worth at a time);
* **the update** of each covered module: the sum over ranks of its sites'
  ``delta^T lambda`` (one all-reduce of the module's whole-size update),
  projected with the global batch's basis, the same on every rank; each rank
  keeps the block it holds.

So the teleport climbs the global batch's objective ``f(||g||^2)`` along its
projected gradient: the sharded teleport equals one process teleporting the
concatenated batch, and no rank holds more of the model whole than one
module's parameters and update. See docs/scale.md, "Sharded models".
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from .bases import Bases
from .coverage import Coverage
from .gradient_path import GradientPath
from .inputs import batch_size, call_model
from .method import MethodContext
from .objective import Batch, GradientNormObjective
from .sharding import fsdp_modules, gathered, held_part, is_sharded, squared_norms
from .structured import (
    StructuredEvaluation,
    capable_sites,
    forward_mode,
    gradient_listener,
    heard_gradients,
    tangent_recorder,
    write_site,
)
from .update import MovedWeights, ProjectedUpdate

FULL_PATH_REFUSED = (
    "a sharded model (FSDP2's fully_shard) teleports on the structured path only: the {what} needs "
    "autograd through every module's gathered parameters at once, which FSDP never holds. Use a "
    "gradient-norm objective (grad_norm, log_grad_norm) and gradient='auto' or 'structured'"
)


def check_sharded(model: nn.Module, gradient: str, objective: object) -> None:
    """Refuse, when ``model`` is sharded, the options that need the full or the closed-form path."""
    if not any(is_sharded(p) for p in model.parameters()):
        return
    if gradient in ("full", "closed_form"):
        raise NotImplementedError(FULL_PATH_REFUSED.format(what=f"gradient={gradient!r} path"))
    if not isinstance(objective, GradientNormObjective):
        raise NotImplementedError(FULL_PATH_REFUSED.format(what=f"{type(objective).__name__} objective"))


class ShardedPath(GradientPath):
    """The structured path on a sharded model: FSDP's forward and backward, a forward-mode pass with
    gathered tangents, one all-reduce per covered module's update."""

    name = "structured"
    probes_curvature = False  # (the weights are DTensor shards)

    def __init__(self, context: MethodContext, batch: Batch, coverage: Coverage) -> None:
        self.dtype = functools.reduce(torch.promote_types, [p.dtype for p in batch.parameters])
        super().__init__(context, batch, coverage)
        _check_mesh(batch.parameters, context.replicas.size)
        _check_gradient_reduction(context.model)
        self.names = _parameter_names(context.model)
        self.parameters = [self.names[id(p)] for p in batch.parameters]
        replicas = context.replicas
        total = replicas.sum({"samples": torch.tensor([float(batch_size(batch.inputs))])})["samples"]
        self.ranks = replicas.size  # FSDP averages the gradients over the data-parallel ranks
        self.loss_scale = self.ranks * batch_size(batch.inputs) / float(total)
        self.sites = capable_sites(coverage)
        self._tangents: tuple[StructuredEvaluation, dict] | None = None

    def _evaluate_first(self) -> StructuredEvaluation:
        first = self.evaluate()
        self.sites = [(c, s) for c, s in self.sites if (c.name, s.name) in first.deltas]
        _check_structured(self.coverage, self.sites)
        self._tangents = (first, self._tangent_streams(first))
        return first

    def _capture(self) -> dict[tuple[str, str], list[Tensor]]:
        """The captured inputs in the parameters' precision (FSDP's ``MixedPrecisionPolicy`` computes the
        forward in a lower one): bases and projections in the precision of the weights they move."""
        return {key: [t.to(self.dtype) for t in tensors] for key, tensors in super()._capture().items()}

    def evaluate(self) -> StructuredEvaluation:
        """Global loss, gradient norm and objective, with this rank's weighted output gradients and
        the global gradient's blocks (one forward and one backward through FSDP)."""
        loss, grads, deltas = self._backward()
        direction = dict(zip(self.parameters, grads, strict=True))
        squared = torch.tensor(sum(squared_norms(grads)), dtype=loss.dtype, device=loss.device)
        mean = self.context.replicas.mean(float(loss), batch_size(self.batch.inputs))
        return StructuredEvaluation(
            value=self.context.objective.of_squared_norm(squared),
            loss=torch.tensor(mean, dtype=loss.dtype, device=loss.device),
            grad_norm=squared.sqrt(),
            deltas=deltas,
            direction=direction,
            local_squared=squared,
        )

    def release(self, evaluation: StructuredEvaluation) -> None:
        evaluation.deltas, evaluation.direction = {}, {}
        if self._tangents is not None and self._tangents[0] is evaluation:
            self._tangents = None

    def update(self, evaluation: StructuredEvaluation, weights: MovedWeights, bases: Bases) -> ProjectedUpdate:
        """Per covered module: the ranks' ``delta^T lambda`` summed, scaled, projected, and this rank's block."""
        if self._tangents is None or self._tangents[0] is not evaluation:
            self._tangents = (evaluation, self._tangent_streams(evaluation))
        tangents = self._tangents[1]
        # the output gradients carry the loss scale: over the ranks it sums to their number
        coefficient = self.context.objective.slope(evaluation.local_squared) / self.ranks
        dense: dict[str, Tensor] = {}
        for covered in self.coverage.modules:
            moving = [s for c, s in self.sites if c is covered and (c.name, s.name) in bases.of]
            if not moving:
                continue
            names = [covered.qualified(p) for site in moving for p in (site.weight, site.bias) if p]
            whole = {name: _zeros_like_whole(weights.params[name]) for name in names}
            for site in moving:
                grads, streams = evaluation.deltas[(covered.name, site.name)], tangents[(covered.name, site.stream)]
                product = covered.projector.structured_gradient(covered.module, site, grads, streams)
                write_site(whole, whole, covered, site, product * coefficient)
            whole = self.context.replicas.sum(whole)
            bases.project(Coverage(modules=[covered]), whole, set())
            dense.update({name: held_part(update, weights.params[name]) for name, update in whole.items()})
        return ProjectedUpdate(dense, [])

    def _backward(self) -> tuple[Tensor, list[Tensor], dict]:
        """This rank's loss, the global gradient's blocks and this rank's weighted output gradients.

        The loss is weighted by ``ranks * samples / global samples``, so
        FSDP's mean over ranks is the global batch's gradient; unsharded
        parameters' gradients are averaged here. ``.grad`` is left as found.
        """
        params = self.batch.parameters
        kept = [p.grad for p in params]
        outputs: dict[tuple[str, str], list] = defaultdict(list)
        handles = []
        try:
            for p in params:
                p.grad = None
            for covered in {id(c): c for c, _ in self.sites}.values():
                handles += covered.projector.capture_outputs(covered.module, gradient_listener(outputs, set(), covered.name))
            loss = self.batch.loss()
            for handle in handles:
                handle.remove()
            (loss * self.loss_scale).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(params, kept, strict=True):
                p.grad = grad
        plain = {str(i): g for i, g in enumerate(grads) if not is_sharded(g)}
        for key, summed in self.context.replicas.sum(plain).items():
            grads[int(key)] = summed / self.ranks
        deltas = {key: [grad.to(self.dtype) for grad in heard_gradients(slots)] for key, slots in outputs.items()}
        return loss.detach(), [g.detach() for g in grads], deltas

    def _tangent_streams(self, evaluation: StructuredEvaluation) -> dict[tuple[str, str], list[Tensor]]:
        """The input tangents of every site's module in the direction of the global gradient."""
        tangents: dict[tuple[str, str], list[Tensor]] = defaultdict(list)
        handles = []
        try:
            for covered in {id(c): c for c, _ in self.sites}.values():
                handles += covered.projector.capture(covered.module, tangent_recorder(tangents, covered.name))
            handles += _dual_parameters(self.context.model, self.names, evaluation.direction)
            with forward_mode():
                call_model(self.batch.model, self.batch.inputs)
        finally:
            for handle in handles:
                handle.remove()
        return {key: [t.to(self.dtype) for t in streams] for key, streams in tangents.items()}


def _dual_parameters(model: nn.Module, names: dict[int, str], direction: dict[str, Tensor]) -> list:
    """Hooks that, once FSDP has gathered a unit's parameters for its forward, swap them for duals whose
    tangents are the gathered blocks of ``direction``, and put them back before FSDP reshards.

    The swap is per unit, not per module: a module may use another's parameters without calling it
    (``MultiheadAttention`` reads ``out_proj.weight``), and a tied parameter is one dual in every slot.
    """
    handles = []
    for unit, slots in _units(model, names).items():
        stack: list[list[tuple[nn.Module, str, Tensor]]] = []

        def swap(module: nn.Module, args: tuple, slots=slots, stack=stack) -> None:
            duals: dict[str, Tensor] = {}
            stack.append([(owner, local, owner._parameters[local]) for owner, local, _ in slots])
            for owner, local, name in slots:
                if name in direction:
                    if name not in duals:
                        primal = owner._parameters[local].detach()
                        duals[name] = fwAD.make_dual(primal, gathered(direction[name]).to(primal.dtype))
                    owner._parameters[local] = duals[name]

        def put_back(module: nn.Module, args: tuple, output: object, stack=stack) -> None:
            for owner, local, param in stack.pop():
                owner._parameters[local] = param

        handles.append(unit.register_forward_pre_hook(swap))  # after FSDP's own (prepended) gather
        handles.append(unit.register_forward_hook(put_back, prepend=True))  # before FSDP reshards
    return handles


def _units(model: nn.Module, names: dict[int, str]) -> dict[nn.Module, list[tuple[nn.Module, str, str]]]:
    """Each FSDP unit (and the model itself, for parameters no unit manages) with the parameter slots
    it gathers: ``(module, local name, parameter name)`` of the modules inside it and no inner unit."""
    units = {id(module) for module in fsdp_modules(model)}
    slots: dict[nn.Module, list[tuple[nn.Module, str, str]]] = {}
    seen: set[tuple[int, str]] = set()

    def visit(module: nn.Module, unit: nn.Module) -> None:
        unit = module if id(module) in units else unit
        for local, param in module._parameters.items():
            if param is not None and (id(module), local) not in seen:
                seen.add((id(module), local))
                slots.setdefault(unit, []).append((module, local, names[id(param)]))
        for child in module.children():
            visit(child, unit)

    visit(model, model)
    return slots


def _parameter_names(model: nn.Module) -> dict[int, str]:
    """Each parameter's name by identity (a tied parameter has the first name it is listed under)."""
    return {id(p): name for name, p in model.named_parameters()}


def _zeros_like_whole(param: Tensor) -> Tensor:
    """Zeros shaped like ``param`` whole, as a plain tensor."""
    return torch.zeros(param.shape, dtype=param.dtype, device=param.device)


def _check_structured(coverage: Coverage, sites: list) -> None:
    """Every moved parameter must take the structured path: the full path needs the whole model."""
    fast = {(c.name, s.name) for c, s in sites}
    missing = sorted({c.name or type(c.module).__name__ for c in coverage.modules for s in c.sites if (c.name, s.name) not in fast})
    if missing:
        raise NotImplementedError(
            f"{FULL_PATH_REFUSED.format(what='full path, which these modules take,')}: {', '.join(missing)} "
            "(their projector records no outputs, or the module computes its map without calling "
            "the hooked layer); freeze their parameters (requires_grad=False) to teleport the rest"
        )


def _check_mesh(parameters: list[Tensor], ranks: int) -> None:
    """The parameters must be sharded over the teleport's data-parallel ranks and nothing else."""
    sizes = sorted({p.device_mesh.size() for p in parameters if is_sharded(p)})
    if sizes != [ranks]:
        raise NotImplementedError(
            f"the parameters are sharded over device meshes of {sizes} ranks and the teleport's replicas "
            f"are {ranks}: a sharded model teleports with Replicas() over all the ranks of its mesh "
            "(FSDP or HSDP; not one process alone, nor tensor parallelism)"
        )


def _check_gradient_reduction(model: nn.Module) -> None:
    """FSDP must average the gradients over the ranks and synchronise them: the teleport's backward
    reads the global batch's gradient from that reduction."""
    for module in fsdp_modules(model):
        for group in module._get_fsdp_state()._fsdp_param_groups:  # FSDP's own state, read only
            if not getattr(group, "reduce_grads", True):
                raise RuntimeError(
                    "teleport a sharded model between optimizer steps, with gradient synchronisation "
                    "on: set_requires_gradient_sync(False) left unreduced gradients in the middle of "
                    "an accumulation window"
                )
            factor = getattr(group, "gradient_divide_factor", None)
            if factor is not None:
                raise NotImplementedError(
                    "teleport reads the global gradient from FSDP's default mean over the ranks; "
                    f"this model has set_gradient_divide_factor({factor}): reset it before teleporting"
                )
