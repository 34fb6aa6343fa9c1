"""The Mamba-1 block and its projector: the affine maps move, A_log and D stay, the batch loss
is invariant, and ``mamba_ssm``'s block is matched by name without importing it."""

import sys
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from torch_teleport import Teleporter, build_registry
from torch_teleport.lab.models.mamba_block import MambaBlock
from torch_teleport.lab.testing import mamba_problems
from torch_teleport.projectors.mamba import AFFINE_MAPS, FROZEN, MambaProjector, selective_scan
from torch_teleport.testing import PreNormResidual, TokenClassifier, assert_teleport_invariant


@given(mamba_problems())
def test_teleport_keeps_the_batch_loss(problem):
    report = assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets
    )
    assert {layer.name for layer in report.layers} >= {f"body.block.{name}" for name in AFFINE_MAPS}
    assert report.frozen["body.block.A_log"] == FROZEN["A_log"]
    assert report.frozen["body.block.D"] == FROZEN["D"]


@given(mamba_problems(dtypes=(torch.float64,)))
def test_replayed_inputs_are_what_the_submodules_receive(problem):
    block = problem.model.body.block
    received, replayed = defaultdict(list), defaultdict(list)
    handles = [
        block.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: received[name].append(args[0])
        )
        for name in AFFINE_MAPS
    ]
    handles += MambaProjector().capture(
        block, lambda stream, tensor: replayed[stream].append(tensor)
    )
    try:
        with torch.no_grad():
            problem.model(problem.inputs)
    finally:
        for handle in handles:
            handle.remove()
    for name in AFFINE_MAPS:
        torch.testing.assert_close(replayed[name][0], received[name][0], rtol=0, atol=0)


@given(st.integers(0, 2**31 - 1), st.integers(1, 5))
def test_selective_scan_matches_its_closed_form(seed, length):
    generator = torch.Generator().manual_seed(seed)
    batch, channels, state = 2, 3, 4

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    u, B, C, D = (
        draw(batch, length, channels),
        draw(batch, length, state),
        draw(batch, length, state),
        draw(channels),
    )
    delta = F.softplus(draw(batch, length, channels))
    A = -torch.exp(draw(channels, state))
    # h_t = sum_{s <= t} exp(A * sum_{s < r <= t} delta_r) delta_s B_s u_s
    cumulative = torch.einsum("bld,dn->bldn", delta.cumsum(1), A)
    decay = torch.exp(cumulative[:, :, None] - cumulative[:, None, :])  # (b, t, s, d, n)
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, :, :, None, None]
    drive = torch.einsum("bsd,bsn,bsd->bsdn", delta, B, u)
    states = (decay * causal * drive[:, None]).sum(2)
    expected = torch.einsum("bldn,bln->bld", states, C) + u * D
    torch.testing.assert_close(
        selective_scan(u, delta, A, B, C, D), expected, rtol=1e-12, atol=1e-12
    )


def _mamba_ssm_stand_in() -> type:
    """A class called ``Mamba`` defined under ``mamba_ssm``, following that package's reference path.

    Its forward multiplies ``in_proj.weight`` and ``dt_proj.weight`` directly, as
    ``mamba_ssm`` does, so hooks on those submodules never fire.
    """

    def __init__(self, d_model: int, **options) -> None:
        nn.Module.__init__(self)
        donor = MambaBlock(d_model, **options)
        self.d_state, self.dt_rank = donor.d_state, donor.dt_rank
        self.in_proj, self.conv1d, self.x_proj = donor.in_proj, donor.conv1d, donor.x_proj
        self.dt_proj, self.out_proj, self.A_log, self.D = (
            donor.dt_proj,
            donor.out_proj,
            donor.A_log,
            donor.D,
        )

    def forward(self, hidden_states: Tensor, inference_params=None) -> Tensor:
        length = hidden_states.shape[1]
        xz = self.in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)")
        xz = rearrange(xz, "d (b l) -> b d l", l=length)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])
        dt, B, C = self.x_proj(rearrange(x, "b d l -> (b l) d")).split(
            [self.dt_rank, self.d_state, self.d_state], -1
        )
        delta = F.softplus(
            rearrange(self.dt_proj.weight @ dt.t(), "d (b l) -> b l d", l=length)
            + self.dt_proj.bias
        )
        to_sequence = lambda t: rearrange(t, "(b l) n -> b l n", l=length)  # noqa: E731
        x, z = rearrange(x, "b d l -> b l d"), rearrange(z, "b d l -> b l d")
        y = selective_scan(x, delta, -torch.exp(self.A_log), to_sequence(B), to_sequence(C), self.D)
        return self.out_proj(y * F.silu(z))

    namespace = {
        "__init__": __init__,
        "forward": forward,
        "__module__": "mamba_ssm.modules.mamba_simple",
    }
    return type("Mamba", (nn.Module,), namespace)


def test_mamba_ssm_block_is_matched_by_name_and_teleports_without_importing_the_package():
    assert "mamba_ssm" not in sys.modules
    torch.manual_seed(0)
    stand_in = _mamba_ssm_stand_in()(6, d_state=2, d_conv=3, bias=True)
    assert build_registry().projector_for(stand_in) is MambaProjector
    model = TokenClassifier(PreNormResidual(stand_in, 6), 6, 6, 3).double()
    inputs, targets = torch.randn(1, 2, 6, dtype=torch.float64), torch.tensor([1])
    fired = []
    hook = stand_in.in_proj.register_forward_pre_hook(lambda *args: fired.append(True))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), model(inputs))
    hook.remove()
    assert not fired  # the reason the projector replays the block instead of hooking its submodules
    before = stand_in.in_proj.weight.detach().clone()
    report = assert_teleport_invariant(model, F.cross_entropy, inputs, targets)
    Teleporter(model, F.cross_entropy).teleport(inputs, targets)
    assert not torch.equal(stand_in.in_proj.weight, before)
    assert report.frozen["body.block.A_log"] == FROZEN["A_log"]
    assert "mamba_ssm" not in sys.modules


def test_gradient_norm_grows_and_frozen_parameters_stay_bit_identical():
    torch.manual_seed(0)
    model = TokenClassifier(
        PreNormResidual(MambaBlock(8, d_state=4, d_conv=4), 8), 8, 8, 3
    ).double()
    inputs, targets = torch.randn(1, 3, 8, dtype=torch.float64), torch.tensor([2])
    block = model.body.block
    frozen_before = {name: block.get_parameter(name).detach().clone() for name in FROZEN}
    affine_before = {
        name: block.get_parameter(f"{name}.weight").detach().clone() for name in AFFINE_MAPS
    }
    report = Teleporter(model, F.cross_entropy, steps=8, null_space="exact").teleport(inputs, targets)
    assert report.loss_change <= 1e-10
    assert report.grad_norm_after > 1.05 * report.grad_norm_before, report.summary()
    for name, value in frozen_before.items():
        assert torch.equal(block.get_parameter(name), value)
    moved = [
        n
        for n, value in affine_before.items()
        if not torch.equal(block.get_parameter(f"{n}.weight"), value)
    ]
    assert len(moved) >= 3, moved


def test_a_decoding_call_is_refused_and_leaves_the_model_as_found():
    class Decoding(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _mamba_ssm_stand_in()(4, d_state=2)

        def forward(self, x):
            return self.block(x, inference_params=object()).mean(1)

    model = Decoding().double()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="inference_params"):
        Teleporter(model, F.cross_entropy).teleport(
            torch.randn(1, 2, 4, dtype=torch.float64), torch.tensor([0])
        )
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert not model.block._forward_pre_hooks
