"""A Mamba-1 selective state-space block in plain PyTorch.

The block (Gu and Dao, 2023) mixes a sequence ``(batch, length, d_model)``:

1. ``in_proj`` splits each token into a stream ``x`` and a gate ``z``;
2. a depthwise causal ``conv1d`` mixes ``x`` over the last ``d_conv`` steps, then SiLU;
3. ``x_proj`` reads from ``x`` the input-dependent step size (rank ``dt_rank``)
   and the state maps ``B`` and ``C``; ``dt_proj`` lifts the step to one per
   channel and softplus makes it positive;
4. the selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``,
   ``y_t = C_t h_t + D x_t`` with ``A = -exp(A_log)``;
5. ``y`` is gated by ``SiLU(z)`` and ``out_proj`` maps it back to ``d_model``.

Attribute names, shapes and initialisation follow ``mamba_ssm``'s ``Mamba``
(its ``mamba_simple`` module), so :func:`mamba_mixer` also replays that block.
The scan is sequential: readable and exact, not fast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

AFFINE_MAPS = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
"""The block's submodules that are affine maps of an input, in the order the data meets them."""


class MambaBlock(nn.Module):
    """Mamba-1 mixer: ``(batch, length, d_model) -> (batch, length, d_model)``.

    Args:
        d_model: token width.
        d_state: state size ``N`` per channel.
        d_conv: causal convolution width.
        expand: inner width is ``expand * d_model``.
        dt_rank: rank of the step-size projection; ``"auto"`` is ``ceil(d_model / 16)``.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        conv_bias: bias of the convolution.
        bias: biases of ``in_proj`` and ``out_proj``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.A_log = nn.Parameter(
            torch.log(repeat(torch.arange(1, d_state + 1.0), "n -> d n", d=self.d_inner))
        )
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self._init_step_sizes(dt_min, dt_max, dt_init_floor)

    def _init_step_sizes(self, dt_min: float, dt_max: float, floor: float) -> None:
        """Initial steps log-uniform in ``[dt_min, dt_max]``: ``dt_proj.bias`` is softplus^-1 of them."""
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden_states: Tensor) -> Tensor:
        return mamba_mixer(self, hidden_states)


def mamba_mixer(
    block: nn.Module, hidden_states: Tensor, affine_inputs: dict[str, Tensor] | None = None
) -> Tensor:
    """The Mamba-1 mixer of ``block`` (this module's :class:`MambaBlock` or ``mamba_ssm``'s ``Mamba``).

    When ``affine_inputs`` is given, the input of each of :data:`AFFINE_MAPS`
    is stored in it under the submodule's name, as that submodule receives it.
    """
    seen = affine_inputs if affine_inputs is not None else {}
    length = hidden_states.shape[1]
    seen["in_proj"] = hidden_states
    x, z = block.in_proj(hidden_states).chunk(2, dim=-1)
    seen["conv1d"] = x = rearrange(x, "b l d -> b d l")
    x = F.silu(block.conv1d(x)[..., :length])
    seen["x_proj"] = x = rearrange(x, "b d l -> b l d")
    dt, B, C = block.x_proj(x).split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    seen["dt_proj"] = dt
    delta = F.softplus(block.dt_proj(dt))
    y = selective_scan(x, delta, -torch.exp(block.A_log), B, C, block.D)
    seen["out_proj"] = y = y * F.silu(z)
    return block.out_proj(y)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor:
    """The selective scan, one step at a time.

    Shapes: ``u, delta`` ``(b, l, d)``; ``A`` ``(d, n)``; ``B, C`` ``(b, l, n)``;
    ``D`` ``(d,)``. Returns ``y`` ``(b, l, d)`` with ``h_t = exp(delta_t A) h_{t-1}
    + delta_t B_t u_t`` (``h_0 = 0``) and ``y_t = C_t h_t + D u_t``.
    """
    decay = torch.exp(torch.einsum("bld,dn->bldn", delta, A))
    drive = torch.einsum("bld,bln,bld->bldn", delta, B, u)
    state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    outputs = []
    for step in range(u.shape[1]):
        state = decay[:, step] * state + drive[:, step]
        outputs.append(torch.einsum("bdn,bn->bd", state, C[:, step]))
    return torch.stack(outputs, dim=1) + u * D
