"""Mixed precision: half-precision weights teleported in float32 and rounded once; autocast training.

A bfloat16 or float16 model is teleported in float32 (its weights and the
batch cast up) and the result rounded into its own storage once: the same
bits as teleporting a float32 copy of its weights and rounding that. A model
trained under bfloat16 autocast keeps float32 weights and teleports in float32.
(FSDP's ``MixedPrecisionPolicy`` is in ``tests/test_sharded.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.schedule import TeleportPlan

HALF = [torch.bfloat16, torch.float16]
DRIFT = {torch.bfloat16: 1e-3, torch.float16: 1e-4}
"""The bound on the relative change of the batch loss (in float32, from the rounded weights) after a
teleport with the default options, per precision: about ten times what the precision benchmark
measures on a similar MLP (docs/scale.md, "Mixed precision")."""


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 5))


def batch(seed: int, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, generator=generator), torch.randint(0, 5, (size,), generator=generator)


def float32_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(copy.deepcopy(model).float()(inputs.float()), targets))


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(HALF), gradient=st.sampled_from(["auto", "structured", "full"]))
def test_a_half_precision_teleport_is_the_float32_teleport_rounded_once(seed, dtype, gradient):
    inputs, targets = batch(seed)
    model = mlp(seed).to(dtype)
    reference = copy.deepcopy(model).float()
    objects, storage = [id(p) for p in model.parameters()], [p.data_ptr() for p in model.parameters()]
    before = float32_loss(model, inputs.to(dtype), targets)

    report = tt.Teleporter(model, F.cross_entropy, gradient=gradient).teleport(inputs.to(dtype), targets)
    expected = tt.Teleporter(reference, F.cross_entropy, gradient=gradient).teleport(inputs.to(dtype).float(), targets)

    assert report.steps == expected.steps > 0
    assert (report.loss_before, report.grad_norm_after) == (expected.loss_before, expected.grad_norm_after)
    for param, computed in zip(model.parameters(), reference.parameters(), strict=True):
        assert param.dtype == dtype and torch.equal(param, computed.detach().to(dtype))
    assert [id(p) for p in model.parameters()] == objects and [p.data_ptr() for p in model.parameters()] == storage
    after = float32_loss(model, inputs.to(dtype), targets)
    assert abs(after - before) <= DRIFT[dtype] * before


@pytest.mark.parametrize("dtype", HALF)
def test_a_rolled_back_half_precision_teleport_leaves_every_bit(dtype):
    inputs, targets = batch(0)
    model = mlp(0).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    report = tt.Teleporter(model, F.cross_entropy, lr=1e30, normalize=False).teleport(inputs.to(dtype), targets)
    assert report.rolled_back
    assert all(torch.equal(p.view(torch.int16), q.view(torch.int16)) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_guard_and_basis_batches_are_cast_too(dtype):
    inputs, targets = batch(0)
    guard, basis = batch(1), batch(2)[0]
    model = mlp(0).to(dtype)
    report = tt.Teleporter(model, F.cross_entropy).teleport(
        inputs.to(dtype), targets, guard=(guard[0].to(dtype), guard[1]), basis=basis.to(dtype)
    )
    assert report.steps > 0 and report.guard_loss_before is not None
    assert all(p.dtype == dtype for p in model.parameters())


class Once(tt.Schedule):
    def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
        return TeleportPlan(1, 4) if step == 0 else None


def test_a_teleport_in_a_bfloat16_autocast_training_loop_runs_in_float32():
    """The trainer's forward runs under autocast; its teleport is the float32 one."""
    inputs, targets = batch(0)
    model, plain = mlp(0), mlp(0)
    seen = []
    model[0].register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    trainer = tt.TeleportTrainer(
        model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.0), schedule=Once(),
        teleport_data=[(inputs, targets)], guard=False, autocast_dtype=torch.bfloat16,
    )  # fmt: skip
    (teleported,) = trainer.step(inputs, targets).teleports
    expected = tt.Teleporter(plain, F.cross_entropy).teleport(inputs, targets, steps=4)
    assert teleported.steps == expected.steps > 0 and teleported.loss_after == expected.loss_after
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))
    assert torch.bfloat16 in seen and torch.float32 in seen  # the training forward, the teleport's
