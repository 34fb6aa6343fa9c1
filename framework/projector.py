"""The projector interface: how one module type moves within its input null space.

A module computes one or more affine maps ``y = W x + b``. Each map is a
:class:`Site`: a weight (viewed as ``rows x inputs`` per group, see
:func:`site_view`), an optional bias and the *stream* of input vectors it
reads. A projector says which sites a module has, how to capture their
inputs during a forward pass and how to turn the captured tensors into a
representation matrix. Projecting an update onto the null space of that
representation is inherited.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .null_space import CoreBasis

Record = Callable[[str, Tensor], None]

LAYOUTS = ("out_in", "in_out")
"""How a site's weight is stored: PyTorch's ``(out, in...)`` or transposed, ``(in, out)``."""


@dataclass(frozen=True)
class Site:
    """One affine map inside a module.

    ``weight``/``bias`` are parameter names relative to the module (dotted
    names reach into submodules). The weight is viewed as
    ``(out, in...)`` -> ``(groups, rows, inputs)`` and ``rows = (start, stop)``
    selects output rows (e.g. the query block of a packed attention projection). The bias
    is folded into the representation as a constant-1 input; ``bias_rows`` selects its
    rows when they differ from the weight's (separate query/key/value weights that share
    one packed bias).

    ``layout`` says how the weight is stored: ``"out_in"`` (PyTorch's
    ``(out, in...)``, the default) or ``"in_out"`` (``(in, out)``, for
    ``y = x @ W + b`` as in Hugging Face's ``Conv1D``); :func:`site_view`
    transposes the latter. A transposed weight has one group. The bias is
    1-d in both layouts.
    """

    name: str
    stream: str
    weight: str
    bias: str | None = None
    rows: tuple[int, int] | None = None
    groups: int = 1
    bias_rows: tuple[int, int] | None = None
    layout: Literal["out_in", "in_out"] = "out_in"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"site {self.name!r}: layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}"
            )
        if self.layout == "in_out" and self.groups != 1:
            raise ValueError(
                f"site {self.name!r}: a weight stored (in, out) (layout='in_out') has one group, "
                f"got groups={self.groups}"
            )


class Projector(ABC):
    """Base class for the projector of one module type.

    Subclasses implement :meth:`sites`, :meth:`capture` and
    :meth:`representation`; :meth:`frozen` and :meth:`project` have
    working defaults.
    """

    @abstractmethod
    def sites(self, module: nn.Module) -> Sequence[Site]:
        """The affine maps of ``module`` whose parameters this projector moves."""

    @abstractmethod
    def capture(self, module: nn.Module, record: Record) -> list[RemovableHandle]:
        """Install hooks that call ``record(stream, tensor)`` during a forward pass.

        Return every handle: the engine removes them, also on error.
        """

    @abstractmethod
    def representation(self, module: nn.Module, site: Site, captured: Sequence[Tensor]) -> Tensor:
        """The representation matrix of ``site``: shape ``(groups, inputs, samples)``.

        Columns are the input vectors seen on the teleport batch, with a
        constant 1 appended when the site has a bias. ``captured`` holds
        every tensor recorded for ``site.stream`` (one per call of the module).
        """

    def frozen(self, module: nn.Module) -> dict[str, str]:
        """Parameters of ``module`` this projector deliberately leaves fixed, with the reason."""
        return {}

    def capture_outputs(self, module: nn.Module, record: Record) -> list[RemovableHandle] | None:
        """Hooks that call ``record(site.name, output)`` with each site's output during a forward.

        Optional: it opens the structured path (first derivatives only, see
        :mod:`torch_teleport.structured`), which needs the loss gradient at each
        site's output. ``None`` (the default) sends the module's sites down the
        general path (the objective's own autograd gradient).
        """
        return None

    def output_representation(self, module: nn.Module, site: Site, outputs: Sequence[Tensor]) -> Tensor:
        """Gradients at ``site``'s outputs as ``(groups, rows, samples)``, columns in :meth:`representation`'s order.

        ``outputs`` holds one tensor per call of the module, shaped like the
        outputs :meth:`capture_outputs` recorded. Needed with :meth:`capture_outputs`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not provide output representations")

    def project(self, module: nn.Module, site: Site, updates: dict[str, Tensor], basis: CoreBasis) -> None:
        """Replace the site's slices of ``updates`` by their null-space projection, in place.

        ``updates`` maps the module's parameter names to update tensors shaped
        like the parameters.
        """
        weight = site_view(updates[site.weight], site)
        bias = site_view(updates[site.bias], site, bias=True) if site.bias is not None else None
        weight_out, bias_out = basis.project(weight, bias)
        weight.copy_(weight_out)
        if bias is not None:
            bias.copy_(bias_out)

    def structured_gradient(
        self, module: nn.Module, site: Site, output_grads: Sequence[Tensor], input_tangents: Sequence[Tensor]
    ) -> Tensor:
        """``delta^T lambda`` for ``site`` as ``(groups, rows, inputs)``, the folded bias last.

        ``output_grads`` are the loss gradients at the outputs
        :meth:`capture_outputs` recorded, ``input_tangents`` the forward-mode
        tangents of the site's input stream (see :mod:`torch_teleport.structured`).
        The default multiplies the two representations; a projector may
        override it with a cheaper kernel (a convolution's weight gradient).
        """
        delta = self.output_representation(module, site, output_grads)
        return delta @ tangent_representation(self, module, site, input_tangents).transpose(-1, -2)

    def output_tangent(self, module: nn.Module) -> Callable[[Tensor], Tensor] | None:
        """The tangent of ``module``'s output as a function of its dual input, for a forward-mode pass in
        which its parameters are dual tensors, computed without the output itself.

        Optional: the structured path then hands the module the output the
        evaluation at the same weights computed, instead of having forward mode
        compute it again beside the tangent (a third of a bilinear layer's work
        in the pass). ``None`` (the default) runs the module as it is; a
        projector returns ``None`` too where the module's forward is not the
        map it knows (a subclass that overrides it).
        """
        return None

    def input_dim(self, module: nn.Module, site: Site) -> int:
        """Inputs of one group of ``site``, the folded bias included."""
        weight = module.get_parameter(site.weight)
        return site_view(weight, site).shape[-1] + (site.bias is not None)


def tangent_representation(
    projector: Projector, module: nn.Module, site: Site, tangents: Sequence[Tensor]
) -> Tensor:
    """The representation of a site's input tangents; the folded 1 of the bias has none."""
    representation = projector.representation(module, site, tangents)
    if site.bias is not None:
        representation = representation.clone()
        representation[:, -1, :] = 0
    return representation


def bilinear_tangent(map_: Callable[[Tensor, Tensor, Tensor | None], Tensor], inputs: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The forward-mode tangent of ``map_(inputs, weight, bias)``, linear in ``inputs`` and in
    ``(weight, bias)`` (a Linear or convolution layer), from the duals' parts without the primal output:
    ``map_(x', W, None) + map_(x, W', b')``."""
    x, x_tangent = fwAD.unpack_dual(inputs)
    w, w_tangent = fwAD.unpack_dual(weight)
    b_tangent = fwAD.unpack_dual(bias).tangent if bias is not None else None
    if w_tangent is None:
        w_tangent = torch.zeros_like(w)
    tangent = map_(x, w_tangent, b_tangent)
    if x_tangent is not None:
        tangent = tangent + map_(x_tangent, w, None)
    return tangent


def site_view(tensor: Tensor, site: Site, *, bias: bool = False) -> Tensor:
    """``tensor`` (a weight or bias, or an update shaped like one) as ``(groups, rows, inputs)``.

    A weight stored ``(out, in...)`` (``layout="out_in"``) is flattened to
    ``out x inputs``; one stored ``(in, out)`` (``layout="in_out"``) is
    transposed. ``site.rows`` (``site.bias_rows`` for the bias) then selects
    output rows, which are split into ``site.groups``. A bias (1-d) has one
    input. For a contiguous tensor the result is a view of its storage, so
    in-place operations on it (``copy_``, ``baddbmm_``) change the tensor.
    """
    rows = site.bias_rows if bias and site.bias_rows else site.rows
    selected = slice(*rows) if rows else slice(None)
    if site.layout == "in_out" and not bias:
        if tensor.dim() != 2:
            raise ValueError(
                f"site {site.name!r}: a weight stored (in, out) must be 2-d, got shape {tuple(tensor.shape)}"
            )
        return tensor.T[selected].unsqueeze(0)
    matrix = tensor.reshape(tensor.shape[0], -1)[selected]
    return matrix.reshape(site.groups, matrix.shape[0] // site.groups, matrix.shape[1])



def first_input_hook(stream: str, record: Record) -> Callable:
    """A forward pre-hook that records the module's first positional input under ``stream``."""

    def hook(module: nn.Module, args: tuple) -> None:
        record(stream, args[0])

    return hook


def output_hook(site: str, record: Record) -> Callable:
    """A forward hook that records the module's output under ``site`` (for :meth:`Projector.capture_outputs`)."""

    def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
        record(site, output)

    return hook


def append_ones(samples: Tensor) -> Tensor:
    """``samples`` of shape ``(..., N, d)`` with a column of ones: the folded bias."""
    ones = torch.ones(*samples.shape[:-1], 1, dtype=samples.dtype, device=samples.device)
    return torch.cat([samples, ones], dim=-1)
