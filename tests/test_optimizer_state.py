"""What an optimizer keeps across a teleport event: nothing changes after an event that moved
nothing, ``"rescale"`` scales each parameter's moments to its gradient's growth over the event,
and ``"auto"`` takes the policy of the optimizer's family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from torch_teleport import Teleporter, TeleportEvents
from torch_teleport.optimizer_state import AUTO, POLICIES, resolved
from torch_teleport.plugins.schedules import OnceSchedule

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adam_amsgrad": lambda params: torch.optim.Adam(params, lr=1e-3, amsgrad=True),
    "rmsprop_centered": lambda params: torch.optim.RMSprop(params, lr=1e-3, centered=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.01),
}

GROWS_AS = {
    "momentum_buffer": 1,
    "exp_avg": 1,
    "grad_avg": 1,
    "exp_avg_sq": 2,
    "max_exp_avg_sq": 2,
    "square_avg": 2,
    "sum": 2,
}
"""The power of a parameter's gradient growth each state entry is scaled by under ``"rescale"``:
averages of the gradient once, averages of its square twice; other entries (``step``) stay."""


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batches(count: int, size: int = 4, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
        for _ in range(count)
    ]


def trained(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and its optimizer after three steps: every parameter has state."""
    model = small_mlp()
    optimizer = OPTIMIZERS[name](model.parameters())
    for inputs, targets in batches(3, size=8, seed=7):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer


def state_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    """The optimizer's state by parameter name, copied."""
    names = {param: name for name, param in model.named_parameters()}
    return {names[param]: copy.deepcopy(state) for param, state in optimizer.state.items()}


def assert_same_state(before: dict[str, dict], after: dict[str, dict]) -> None:
    assert before.keys() == after.keys()
    for name, state in before.items():
        assert state.keys() == after[name].keys(), name
        for key, value in state.items():
            now = after[name][key]
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, (name, key)


def gradient_norms(model: nn.Module, sample: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    model.zero_grad()
    F.cross_entropy(model(sample[0]), sample[1]).backward()
    norms = {name: float(param.grad.norm()) for name, param in model.named_parameters()}
    model.zero_grad()
    return norms


def once(steps: int, cap: float | None = None) -> OnceSchedule:
    """One event of one teleport batch, before step 0 (the test's only step)."""
    return OnceSchedule(steps=steps, cap=cap)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy", POLICIES)
def test_an_event_that_moved_nothing_leaves_the_optimizer_state_alone(policy, name):
    """A cap below the starting gradient norm: the event takes no step, whatever the policy."""
    model, optimizer = trained(name)
    before = state_of(optimizer, model)
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy), once(4, cap=1e-6), optimizer_state=policy
    )
    inputs, targets = batches(1)[0]
    (report,), _ = events.before_step(optimizer, epoch=0, step=0, inputs=inputs, targets=targets)
    assert report.steps == 0
    assert_same_state(before, state_of(optimizer, model))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rescale_scales_the_moments_by_each_parameters_gradient_growth_on_the_guard_sample(name):
    """The growth of each parameter's gradient norm on the event's guard sample (the second sample
    it draws: batches 2 and 3 of the data), from before the event to after it; first moments are
    scaled by it, second moments by its square, the step count not at all."""
    model, optimizer = trained(name)
    start, before = copy.deepcopy(model), state_of(optimizer, model)
    data = batches(5)
    guard = (torch.cat([data[2][0], data[3][0]]), torch.cat([data[2][1], data[3][1]]))
    events = TeleportEvents(
        Teleporter(model, F.cross_entropy, lr=0.05),
        once(8),
        teleport_data=data,
        guard_samples=8,
        optimizer_state="rescale",
    )
    (report,), _ = events.before_step(optimizer, epoch=0, step=0)
    assert report.steps > 0 and not report.rolled_back
    old, new = gradient_norms(start, guard), gradient_norms(model, guard)
    growth = {param: new[param] / old[param] for param in old}
    assert max(abs(g - 1) for g in growth.values()) > 0.05  # the event changed the gradients
    after = state_of(optimizer, model)
    assert after.keys() == before.keys()
    for param, state in before.items():
        assert state.keys() == after[param].keys()
        for key, value in state.items():
            expected = value * growth[param] ** GROWS_AS.get(key, 0)
            assert torch.allclose(after[param][key], expected, rtol=1e-4, atol=0), (param, key)


@pytest.mark.parametrize("name", sorted(AUTO))
def test_auto_takes_the_policy_of_the_optimizers_family(name):
    family = getattr(torch.optim, name)

    class Tuned(family):
        """A subclass keeps its family's policy."""

    params = small_mlp().parameters()
    assert resolved("auto", family(params, lr=0.1)) == AUTO[name]
    assert resolved("auto", Tuned(small_mlp().parameters(), lr=0.1)) == AUTO[name]
    for policy in ("keep", "reset", "rescale"):
        assert resolved(policy, family(small_mlp().parameters(), lr=0.1)) == policy


def test_auto_keeps_the_state_of_an_optimizer_of_no_listed_family():
    assert "Rprop" not in AUTO
    assert resolved("auto", torch.optim.Rprop(small_mlp().parameters())) == "keep"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_event_under_auto_carries_the_state_as_its_familys_policy_does(name):
    """The same event on two copies, one under ``"auto"`` and one under the policy ``"auto"``
    stands for with that optimizer: the same state afterwards."""
    outcomes = []
    for policy in ("auto", None):
        model, optimizer = trained(name)
        policy = policy or resolved("auto", optimizer)
        events = TeleportEvents(
            Teleporter(model, F.cross_entropy, lr=0.05), once(4), optimizer_state=policy
        )
        inputs, targets = batches(1)[0]
        (report,), _ = events.before_step(optimizer, epoch=0, step=0, inputs=inputs, targets=targets)
        assert report.steps > 0
        outcomes.append(state_of(optimizer, model))
    assert_same_state(*outcomes)
