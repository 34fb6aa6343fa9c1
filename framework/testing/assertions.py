"""The checks every correct projector passes, measured with the engine's safety net off.

The :class:`~torch_teleport.Teleporter` protects a teleport from its
projectors: it undoes or shortens every step that moves the batch loss by
more than its drift tolerance, and may stop on a guard batch or a gain
cap. A wrong projector then takes only the steps that hide it. The checks
here teleport with none of that (a fixed rate, no limits), so what they
measure is the projector alone, in float32 as in float64.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import defaultdict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from torch_teleport.plugins.methods.null_space import NullSpaceMethod

from ..bases import build_bases
from ..coverage import Coverage, CoveredModule, capture_inputs
from ..distributed import Replicas
from ..inputs import Inputs, call_model, tensors
from ..limits import Limits
from ..model_state import double_backward_safe, preserved_state
from ..projector import Site, site_view
from ..report import TeleportReport
from ..teleporter import Teleporter

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""Relative loss change allowed after a full teleport at ``tau = 1``."""

DEFAULT_ANNIHILATION = {torch.float64: 1e-11, torch.float32: 1e-5}
"""Allowed ``||dW R|| / (max(||dW||, ||W||) ||R||)`` of a moved site."""

DEFAULT_OUTPUT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
"""Allowed relative change of every tensor a covered module returns (see :data:`OUTPUT_FLOOR`).
Correct projectors measure below ``1e-14`` and ``1e-5``; one that drops samples or the bias's
constant 1 above ``1e-3``."""

DEFAULT_LR = 0.01
"""The fixed rate of :func:`assert_teleport_invariant`'s steps: each moves the moved weights by
1% of their norm, enough for a wrong projector's first-order error to show."""

DEFAULT_STEPS = 4
"""Steps of :func:`assert_teleport_invariant`'s teleport: 4% of the moved weights' norm in all."""

OUTPUT_FLOOR = 0.01
"""An output's change is relative to its own RMS, or to this fraction of the largest RMS of any
covered module's output where that is larger: an output that is exactly zero (a layer after a
LayerNorm of width 1) has no size for rounding to be relative to."""

PROBE_STEP = 0.01
"""The size of the random projected update the kit also checks, relative to the moved weights' norm."""

UNLIMITED = Limits(drift=None, guard=None, max_gain=None, module_step=None, max_loss_change=None)
"""No drift tolerance, guard, gain cap, per-module step limit or roll-back: the projector alone."""

DEFAULT_EQUIVALENCE = 1e-10
"""Allowed relative difference between the structured and the full projected step (float64, tau = 1)."""


def assert_teleport_invariant(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Inputs,
    targets: Tensor,
    *,
    rtol: float | None = None,
    annihilation_tol: float | None = None,
    output_rtol: float | None = None,
    lr: float = DEFAULT_LR,
    steps: int = DEFAULT_STEPS,
    **teleporter_options,
) -> TeleportReport:
    """Teleport a deep copy of ``model`` on ``(inputs, targets)`` with the limits off, and check invariance.

    Checks, with tolerances chosen by the parameters' dtype unless given:

    * every tensor each covered module returns on the batch (every call) is unchanged to
      ``output_rtol``: a correct projection keeps its pre-activations, whatever the projector says;
    * the relative change of the batch loss is at most ``rtol``;
    * for every site that moved, ``||[dW | db] R|| <= tol * max(||[dW | db]||, ||[W | b]||) * ||R||``
      with ``R`` the site's representation on the batch (the projector's own);
    * modes, buffers and hook dictionaries of the copy are as they were;
    * a random update projected by the projectors keeps the outputs too: the
      structured paths' steps never move along a bias's constant 1, an
      arbitrary direction does.

    Steps are taken at the fixed rate ``lr`` with no limits: the Teleporter's
    drift tolerance, step-length search, guard and gain cap undo or shorten
    exactly the steps that would reveal a wrong projector. The null space is
    exact (``tau = 1``) unless ``teleporter_options`` choose ``null_space`` or
    ``tau``. Returns the :class:`TeleportReport`; ``model`` is never modified.
    """
    teleporter = _unlimited_teleporter(copy.deepcopy(model), loss_fn, lr, steps, teleporter_options)
    subject, coverage = teleporter.model, teleporter.mover.coverage
    dtype = next(subject.parameters()).dtype
    device_type = tensors(inputs)[0].device.type
    captured = _captured_inputs(coverage, subject, inputs, device_type)
    outputs = _module_outputs(coverage, subject, inputs, device_type)
    before = {name: p.detach().clone() for name, p in subject.named_parameters()}
    state = _module_state(subject)

    report = teleporter.teleport(inputs, targets)

    assert _module_state(subject) == state, "teleport left modes, hooks or buffers changed"
    assert not report.rolled_back, f"teleport rolled back: {report.summary()}"
    output_rtol = _tolerance(DEFAULT_OUTPUT_RTOL, dtype, output_rtol)
    after = _module_outputs(coverage, subject, inputs, device_type)
    _assert_outputs_kept(coverage, outputs, after, output_rtol, "after the teleport")
    rtol = _tolerance(DEFAULT_RTOL, dtype, rtol)
    assert report.loss_change <= rtol, (
        f"teleport-batch loss changed by {report.loss_change:.3e} (relative) > {rtol:.1e}: {report.summary()}"
    )
    moved = {name: p.detach() - before[name] for name, p in subject.named_parameters()}
    tolerance = _tolerance(DEFAULT_ANNIHILATION, dtype, annihilation_tol)
    _assert_updates_annihilate(coverage, captured, before, moved, tolerance)
    probed = _outputs_under_a_random_projected_update(teleporter, captured, inputs, device_type)
    _assert_outputs_kept(coverage, after, probed, output_rtol, "under a random update projected by its projector")
    return report


def assert_structured_matches_full(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Inputs,
    targets: Tensor,
    *,
    rtol: float = DEFAULT_EQUIVALENCE,
    path: str = "structured",
    **teleporter_options,
) -> TeleportReport:
    """Check that the structured step equals the projection of the full Hessian-vector product.

    Teleports two deep copies of ``model`` one plain step (``normalize=False``,
    ``lr=1``, no limits) on ``(inputs, targets)``, one with ``gradient=path``
    (``"structured"`` or the chain's ``"closed_form"``) and one with
    ``gradient="full"``, and compares every parameter's change:
    ``||d_structured - d_full|| <= rtol * max(||d_full||, tiny)`` parameter by
    parameter. Meant for float64 models at ``tau = 1``, where the two are equal
    in exact arithmetic: the exact null space is used unless ``teleporter_options``
    choose ``null_space`` or ``tau`` (the closed form needs it). Fails if no site
    took the structured path (the check would say nothing). Returns the report of
    the ``path`` run.
    """
    _refuse_limits(teleporter_options)
    options = {"steps": 1, "lr": 1.0, "normalize": False, **_exact_unless_given(teleporter_options)}
    reports, changes = [], []
    for gradient in (path, "full"):
        subject = copy.deepcopy(model)
        before = {name: p.detach().clone() for name, p in subject.named_parameters()}
        teleporter = Teleporter(subject, loss_fn, limits=UNLIMITED, **{**options, "gradient": gradient})
        report = teleporter.teleport(inputs, targets)
        assert not report.rolled_back, f"the {gradient} teleport rolled back: {report.summary()}"
        reports.append(report)
        changes.append({name: p.detach() - before[name] for name, p in subject.named_parameters()})
    structured_sites = [layer.name for layer in reports[0].layers if layer.gradient == path]
    assert structured_sites, f"no site took the {path} path: nothing to compare"
    structured, full = changes
    scale = max((float(change.norm()) for change in full.values()), default=0.0)
    for name, reference in full.items():
        difference = float((structured[name] - reference).norm())
        allowed = rtol * max(float(reference.norm()), scale * 1e-3, torch.finfo(reference.dtype).tiny)
        assert difference <= allowed, (
            f"structured step of {name} differs from the projected full Hessian-vector product: "
            f"||difference|| = {difference:.3e} > {allowed:.3e} (||full step|| = {float(reference.norm()):.3e})"
        )
    return reports[0]


# -- the teleport the checks measure ---------------------------------------------------------------


def _unlimited_teleporter(
    subject: nn.Module, loss_fn: Callable, lr: float, steps: int, options: dict
) -> Teleporter:
    """A Teleporter of the null-space method at a fixed rate, with no limits."""
    _refuse_limits(options)
    if lr is None or isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(
            f"assert_teleport_invariant takes a fixed rate, lr=<number> (default {DEFAULT_LR}), got {lr!r}: "
            "a step-length search undoes the steps that move the loss, so a wrong projector would pass"
        )
    teleporter = Teleporter(subject, loss_fn, lr=lr, steps=steps, limits=UNLIMITED, **_exact_unless_given(options))
    if not isinstance(teleporter.method, NullSpaceMethod):
        raise TypeError(
            f"the testing kit checks projectors through the null-space method, got {type(teleporter.method).__name__}"
        )
    return teleporter


def _refuse_limits(options: dict) -> None:
    if "limits" in options:
        raise TypeError(
            "the testing kit teleports with the Teleporter's limits off and takes no limits=: a drift "
            "tolerance, guard or gain cap undoes or shortens the steps that move the loss, so a wrong "
            "projector would pass; rtol= and output_rtol= say how far the loss and the outputs may move"
        )


def _exact_unless_given(options: dict) -> dict:
    """``options`` with ``null_space="exact"`` unless they choose a null space or ``tau`` themselves:
    the checks hold at ``tau = 1``, not at the Teleporter's default thresholded core space."""
    if options.get("null_space") is not None or options.get("tau") is not None:
        return options
    return {**options, "null_space": "exact"}


def _tolerance(defaults: dict[torch.dtype, float], dtype: torch.dtype, given: float | None) -> float:
    return defaults.get(dtype, 1e-3) if given is None else given


# -- what the checks compare -----------------------------------------------------------------------


def _captured_inputs(coverage: Coverage, model: nn.Module, inputs: Inputs, device_type: str) -> dict:
    """Every covered module's input streams on the batch, in the modes the engine teleports in
    (BatchNorm keeps its mode), so they match its own."""
    with preserved_state(model), double_backward_safe(device_type):
        return capture_inputs(coverage, model, inputs)


def _outputs_under_a_random_projected_update(
    teleporter: Teleporter, captured: dict, inputs: Inputs, device_type: str
) -> dict[str, list[Tensor]]:
    """The covered modules' outputs with a random update, projected by the projectors onto the
    teleporter's core spaces, added to the weights (restored afterwards)."""
    mover, model = teleporter.mover, teleporter.model
    bases = build_bases(mover.coverage, captured, {}, mover.null_space, Replicas.this_process())
    params = {name: p for name, p in mover.coverage.movable().items() if name not in bases.frozen}
    generator = torch.Generator().manual_seed(0)
    update = {name: torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for name, p in params.items()}
    with torch.no_grad():
        bases.project(mover.coverage, update, set())
        norm = math.sqrt(sum(float(u.square().sum()) for u in update.values()))
        weights = math.sqrt(sum(float(p.square().sum()) for p in params.values()))
        saved = {name: p.detach().clone() for name, p in params.items()}
        try:
            for name, p in params.items():
                p.add_(update[name], alpha=PROBE_STEP * weights / norm if norm > 0 else 0.0)
            return _module_outputs(mover.coverage, model, inputs, device_type)
        finally:
            for name, p in params.items():
                p.copy_(saved[name])


def _module_outputs(coverage: Coverage, model: nn.Module, inputs: Inputs, device_type: str) -> dict[str, list[Tensor]]:
    """Every floating-point tensor each covered module returns on the batch, call after call (copies:
    an in-place activation after the module must not change them), in the modes the engine teleports in."""
    outputs: dict[str, list[Tensor]] = defaultdict(list)

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            outputs[name] += [tensor.detach().clone() for tensor in _floating_tensors(output)]

        return hook

    handles = [covered.module.register_forward_hook(recorder(covered.name)) for covered in coverage.modules]
    try:
        with preserved_state(model), double_backward_safe(device_type), torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return dict(outputs)


def _floating_tensors(output: object) -> list[Tensor]:
    """The floating-point tensors in a module's output: a tensor, or nested tuples, lists and mappings
    of them (a packed sequence is a tuple)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, tuple | list):
        return [tensor for item in output for tensor in _floating_tensors(item)]
    return []


def _module_state(model: nn.Module) -> list:
    """What a teleport must leave as found: every module's mode, hook counts and buffers."""
    return [
        (
            name,
            module.training,
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._backward_hooks),
            tuple((b.detach().cpu().clone().tolist() if b.numel() < 4096 else float(b.double().sum())) for b in module.buffers(recurse=False)),
        )
        for name, module in model.named_modules()
    ]


# -- the checks ------------------------------------------------------------------------------------


def _assert_outputs_kept(
    coverage: Coverage, before: dict[str, list[Tensor]], after: dict[str, list[Tensor]], tolerance: float, when: str
) -> None:
    """Every covered module returns what it returned before, tensor by tensor, to ``tolerance``."""
    changes = _output_changes(before, after)
    for covered in coverage.modules:
        where = f"module {covered.name!r} ({type(covered.module).__name__})" if covered.name else "the model"
        found, expected = len(after.get(covered.name, [])), len(before.get(covered.name, []))
        assert found == expected, f"{where} returned {found} tensors {when}, {expected} before"
        for index, change in enumerate(changes.get(covered.name, [])):
            assert change <= tolerance, (
                f"the outputs of {where} on the teleport batch changed {when}: relative change {change:.3e} "
                f"> {tolerance:.1e} (tensor {index + 1} of {expected}). A correct projection keeps every covered "
                f"module's pre-activations on the batch; check that {type(covered.projector).__name__}"
                ".representation holds every sample of every call, and the constant 1 of a bias"
            )


def _output_changes(before: dict[str, list[Tensor]], after: dict[str, list[Tensor]]) -> dict[str, list[float]]:
    """``rms(after - before)`` of every output tensor, over the larger of the two tensors' RMS and
    :data:`OUTPUT_FLOOR` times the largest RMS of any output before."""

    def rms(tensor: Tensor) -> float:
        return float(tensor.double().square().mean().sqrt()) if tensor.numel() else 0.0

    floor = OUTPUT_FLOOR * max((rms(t) for tensors in before.values() for t in tensors), default=0.0)
    changes: dict[str, list[float]] = {}
    for name, old in before.items():
        for was, now in zip(old, after.get(name, []), strict=False):
            scale = max(rms(was), rms(now), floor)
            change = rms(now - was)
            changes.setdefault(name, []).append(change / scale if scale > 0 else change)
    return changes


def _assert_updates_annihilate(
    coverage: Coverage, captured: dict, before: dict[str, Tensor], moved: dict[str, Tensor], tolerance: float
) -> None:
    """Every moved site's update annihilates its representation on the batch (the projector's own)."""
    for covered in coverage.modules:
        for site in covered.sites:
            tensors = captured.get((covered.name, site.stream))
            if tensors:
                representation = covered.projector.representation(covered.module, site, tensors)
                _assert_annihilates(covered, site, representation, before, moved, tolerance)


def _assert_annihilates(
    covered: CoveredModule, site: Site, representation: Tensor, before: dict[str, Tensor],
    moved: dict[str, Tensor], tolerance: float,
) -> None:
    """``||[dW | db] R|| <= tolerance * max(||[dW | db]||, ||[W | b]||) * ||R||`` for one site."""
    step = site_view(moved[covered.qualified(site.weight)], site)
    if site.bias is not None:
        step = torch.cat([step, site_view(moved[covered.qualified(site.bias)], site, bias=True)], dim=-1)
    weight = site_view(before[covered.qualified(site.weight)], site)
    residual = torch.linalg.matrix_norm(step @ representation).max()
    # Relative to the larger of the step and the weight: a step of pure rounding noise
    # (a gradient that lies wholly in the core space) is no failure.
    size = torch.maximum(torch.linalg.matrix_norm(step).max(), torch.linalg.matrix_norm(weight).max())
    scale = size * torch.linalg.matrix_norm(representation).max()
    if scale > 0:
        ratio = float(residual / scale)
        assert ratio <= tolerance, (
            f"update of {covered.qualified(site.name)} does not annihilate its inputs: "
            f"||dW R|| / (max(||dW||, ||W||) ||R||) = {ratio:.3e} > {tolerance:.1e}"
        )
