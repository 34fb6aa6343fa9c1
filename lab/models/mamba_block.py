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
(its ``mamba_simple`` module). The forward pass is the Mamba projector's
:func:`~torch_teleport.projectors.mamba.mamba_mixer`, which also replays
``mamba_ssm``'s block; its scan is sequential: readable and exact, not fast.
"""

from __future__ import annotations

import math

import torch
from einops import repeat
from torch import Tensor, nn

from torch_teleport.projectors.mamba import mamba_mixer


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
