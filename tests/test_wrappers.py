"""Wrappers whose shadow weights go stale after a teleport: found, and warned about or refused.

Lookahead and SAM below have the structure of the common implementations
(torch-optimizer's Lookahead, davda54's SAM), which are not dependencies.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import torch_teleport as tt
from torch_teleport.schedule import TeleportPlan
from torch_teleport.wrappers import (
    StaleShadowError,
    StaleShadowWarning,
    check_shadows,
    find_shadows,
)


class Lookahead(torch.optim.Optimizer):
    """torch-optimizer's Lookahead: slow weights, pulled toward every ``k`` steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.param_groups = optimizer.param_groups
        self.state: dict = defaultdict(dict)
        self.steps = 0

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                slow = self.state[p].setdefault("slow_param", p.detach().clone())
                if self.steps % self.k == 0:
                    slow.add_(p.detach() - slow, alpha=self.alpha)
                    p.data.copy_(slow)
        return loss


class SAM(torch.optim.Optimizer):
    """davda54's SAM: ascend to ``w + e(w)``, then step the base optimizer from the saved ``w``."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self) -> None:
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]]))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * group["rho"] / (norm + 1e-12))

    @torch.no_grad()
    def second_step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    def step(self, closure=None):
        raise RuntimeError("SAM needs first_step and second_step")


class ModelEmaV2(nn.Module):
    """timm's ModelEmaV2: a copy of the model updated as an exponential moving average."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        self.module = type(model)(*model.children())
        self.decay = decay


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def test_each_kind_of_shadow_is_found():
    model = mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    found = find_shadows(
        Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)),
        SAM(model.parameters(), torch.optim.SGD, lr=0.1),
        AveragedModel(model),
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99)),
        ModelEmaV2(model),
    )
    assert [(s.kind, s.refused) for s in found] == [
        ("lookahead", True),
        ("sam", True),
        ("average", False),
        ("average", False),
        ("average", False),
    ]
    # Plain optimizers and models are no shadows, however they are named.
    class SemanticSegmenter(nn.Sequential):
        pass

    assert find_shadows(sgd, torch.optim.Adam(model.parameters()), model, SemanticSegmenter(), [None]) == []


def test_a_wrapped_lookahead_is_found_through_its_wrapper():
    model = mlp()
    inner = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))

    class Scheduled:  # e.g. a gradient-scaling or logging wrapper around the optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

        def step(self):
            self.optimizer.step()

    (shadow,) = find_shadows(Scheduled(inner))
    assert shadow.kind == "lookahead" and shadow.where == "Scheduled -> Lookahead"


def test_policies():
    model = mlp()
    lookahead = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    average = AveragedModel(model)
    with pytest.raises(StaleShadowError, match="Lookahead keeps a lookahead copy"):
        check_shadows(lookahead, average)
    with pytest.warns(StaleShadowWarning) as caught:
        check_shadows(lookahead, average, policy="warn")
    assert len(caught) == 2
    with pytest.raises(StaleShadowError, match="AveragedModel keeps an? average copy"):
        check_shadows(average, policy="error")
    with pytest.raises(ValueError, match="shadow policy"):
        check_shadows(average, policy="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_shadows(torch.optim.SGD(model.parameters(), lr=0.1)) == []


def test_lookahead_really_undoes_a_teleport():
    """Why it is refused: its next sync pulls the teleported weights halfway back."""
    model = mlp()
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(4, 6, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.0), k=1)
    optimizer.step()  # records the slow weights; lr 0: training itself moves nothing
    before = [p.detach().clone() for p in model.parameters()]
    tt.Teleporter(model, F.cross_entropy, lr=0.2).teleport(inputs, targets)
    teleported = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    for b, t, p in zip(before, teleported, model.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), (b + t) / 2, rtol=1e-12, atol=1e-12)


def test_trainer_refuses_lookahead_unless_told_otherwise():
    model = mlp()

    class Never(tt.Schedule):
        def plan(self, *, epoch: int, step: int) -> TeleportPlan | None:
            return None

    optimizer = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1))
    options = {"teleporter": tt.Teleporter(model, F.cross_entropy), "schedule": Never()}
    with pytest.raises(StaleShadowError):
        tt.TeleportTrainer(model, F.cross_entropy, optimizer, **options)
    with pytest.warns(StaleShadowWarning):
        tt.TeleportTrainer(model, F.cross_entropy, optimizer, shadow_policy="warn", **options)
    tt.TeleportTrainer(model, F.cross_entropy, optimizer)  # without teleports nothing goes stale
