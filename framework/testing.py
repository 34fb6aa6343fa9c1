"""Tools to property-test teleport invariance, for this project and for plugin authors.

``assert_teleport_invariant`` teleports a copy of a model and checks what
must hold for any correct projector: the teleport-batch loss is unchanged
(at ``tau = 1``), every moved site's update annihilates that site's inputs,
and the model is left as found (modes, buffers, hooks). The hypothesis
strategies draw small models and batches from seeds, so every failure
replays.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .engine import NullSpaceMethod, Teleporter
from .projector import _site_view
from .report import TeleportReport

DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
"""Relative loss change allowed after a full teleport at ``tau = 1``."""

DEFAULT_ANNIHILATION = {torch.float64: 1e-11, torch.float32: 1e-5}
"""Allowed ``||dW R|| / (max(||dW||, ||W||) ||R||)`` of a moved site."""


def assert_teleport_invariant(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    rtol: float | None = None,
    annihilation_tol: float | None = None,
    steps: int = 4,
    **teleporter_options,
) -> TeleportReport:
    """Teleport a deep copy of ``model`` on ``(inputs, targets)`` and check invariance.

    Checks, with tolerances chosen by the parameters' dtype unless given:

    * the relative change of the batch loss is at most ``rtol``;
    * for every site that moved, ``||[dW | db] R|| <= tol * max(||[dW | db]||, ||[W | b]||) * ||R||``
      with ``R`` the site's representation on the batch (the projector's own);
    * modes, buffers and hook dictionaries of the copy are as they were.

    Returns the :class:`TeleportReport` so callers can check more (e.g. that
    the gradient norm grew). ``model`` itself is never modified.
    """
    subject = copy.deepcopy(model)
    dtype = next(subject.parameters()).dtype
    rtol = DEFAULT_RTOL.get(dtype, 1e-3) if rtol is None else rtol
    annihilation_tol = DEFAULT_ANNIHILATION.get(dtype, 1e-3) if annihilation_tol is None else annihilation_tol
    teleporter = Teleporter(subject, loss_fn, steps=steps, **teleporter_options)
    method = teleporter.method
    assert isinstance(method, NullSpaceMethod), "assert_teleport_invariant checks the null-space method"
    representations = _representations(method, inputs, targets, teleporter)
    before_params = {name: p.detach().clone() for name, p in subject.named_parameters()}
    before_state = _module_state(subject)

    report = teleporter.teleport(inputs, targets)

    assert _module_state(subject) == before_state, "teleport left modes, hooks or buffers changed"
    assert not report.rolled_back, f"teleport rolled back: {report.summary()}"
    assert report.loss_change <= rtol, (
        f"teleport-batch loss changed by {report.loss_change:.3e} (relative) > {rtol:.1e}: {report.summary()}"
    )
    after_params = dict(subject.named_parameters())
    for covered in method.coverage.modules:
        for site in covered.sites:
            if (covered.name, site.name) not in representations:
                continue
            delta = {
                local: after_params[covered.qualified(local)].detach() - before_params[covered.qualified(local)]
                for local in filter(None, (site.weight, site.bias))
            }
            step = _site_view(delta[site.weight], site)
            if site.bias is not None:
                step = torch.cat([step, _site_view(delta[site.bias], site)], dim=-1)
            weight = _site_view(before_params[covered.qualified(site.weight)], site)
            representation = representations[(covered.name, site.name)]
            residual = torch.linalg.matrix_norm(step @ representation).max()
            # Relative to the larger of the step and the weight: a step of pure rounding noise
            # (a gradient that lies wholly in the core space) is no failure.
            size = torch.maximum(torch.linalg.matrix_norm(step).max(), torch.linalg.matrix_norm(weight).max())
            scale = size * torch.linalg.matrix_norm(representation).max()
            if scale > 0:
                ratio = float(residual / scale)
                assert ratio <= annihilation_tol, (
                    f"update of {covered.qualified(site.name)} does not annihilate its inputs: "
                    f"||dW R|| / (max(||dW||, ||W||) ||R||) = {ratio:.3e} > {annihilation_tol:.1e}"
                )
    return report


def _representations(method: NullSpaceMethod, inputs: Tensor, targets: Tensor, teleporter: Teleporter) -> dict:
    """Every site's representation on the batch, captured through the projectors themselves."""
    from collections import defaultdict

    captured: dict = defaultdict(list)
    handles = []
    model = teleporter.model
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for covered in method.coverage.modules:
            for handle_owner in covered.projector.capture(
                covered.module, lambda stream, t, name=covered.name: captured[(name, stream)].append(t.detach())
            ):
                handles.append(handle_owner)
        model.eval()
        with torch.no_grad():
            model(inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return {
        (covered.name, site.name): covered.projector.representation(covered.module, site, captured[(covered.name, site.stream)])
        for covered in method.coverage.modules
        for site in covered.sites
        if captured.get((covered.name, site.stream))
    }


def _module_state(model: nn.Module) -> list:
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


# -- hypothesis strategies ----------------------------------------------------------------

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
}


@dataclass
class Problem:
    """A model, a batch and a loss, drawn from a seed."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    seed: int

    def __repr__(self) -> str:  # hypothesis prints this on failure
        return f"Problem(seed={self.seed}, model={self.model}, batch={tuple(self.inputs.shape)})"


@st.composite
def mlp_problems(
    draw,
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
    max_depth: int = 4,
    max_width: int = 48,
    max_batch: int = 64,
) -> Problem:
    """Random MLP classification problems: depth, widths, activation, bias, batch and dtype.

    Batches are drawn both smaller and larger than the widths, so some layers
    have a large null space and some none.
    """
    seed = draw(st.integers(0, 2**31 - 1))
    depth = draw(st.integers(1, max_depth))
    widths = draw(st.lists(st.integers(2, max_width), min_size=depth + 1, max_size=depth + 1))
    classes = draw(st.integers(2, 6))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from(dtypes))
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        dims = [*widths, classes]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        model = nn.Sequential(*layers).to(dtype)
    inputs = torch.randn(batch, widths[0], generator=generator, dtype=dtype)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return Problem(model, inputs, targets, nn.functional.cross_entropy, seed)
