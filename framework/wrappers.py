"""Wrappers that keep a shadow copy of the weights, which a teleport leaves stale.

A teleport moves the weights in place. Anything that holds its own copy
of them, from before the teleport, goes on mixing that copy in:

* **Lookahead** keeps *slow* weights and every ``k`` steps pulls the
  model toward them: part of the teleport is undone, and the model lands
  off the level set it was moved along. Refused.
* **SAM** keeps the weights from before its ascent step (``old_p``) and
  writes them back in its second step: a teleport between the two steps
  is overwritten. Teleport between full SAM steps only. Refused, because
  nothing can check from outside where in a step the optimizer is; wrap
  the teleport call yourself if you keep to full steps.
* **Weight averages** (``torch.optim.swa_utils.AveragedModel``, EMA
  models, Lightning's weight-averaging callbacks) average weights from
  before and after a teleport: the average of two points on a level set
  is in general not on it, so the averaged model is briefly worse. It
  recovers as the old weights decay out; warned about.

:func:`check_shadows` finds these among optimizers, modules and callbacks
and warns (:class:`StaleShadowWarning`) or raises
(:class:`StaleShadowError`) as listed; ``policy="warn"`` downgrades every
finding to a warning, ``policy="error"`` upgrades every one to an error.
Detection reads types and attribute names (the wrappers of
``torch-optimizer``, ``timm``, ``torch_ema``, Lightning and davda54's
SAM), since none of them is a dependency.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

POLICIES = ("default", "warn", "error")

OPTIMIZER_WRAPPING_ATTRIBUTES = ("base_optimizer", "_base_optimizer", "optimizer", "_optimizer")
"""Where optimizer wrappers keep the optimizer they wrap (searched recursively)."""


class StaleShadowError(ValueError):
    """A wrapper whose shadow weights would undo or corrupt a teleport."""


class StaleShadowWarning(UserWarning):
    """A wrapper whose shadow weights go stale after a teleport, without harming training."""


@dataclass(frozen=True)
class Shadow:
    """One wrapper holding a copy of the weights: what it is and what a teleport does to it."""

    where: str
    kind: str  # "lookahead" | "sam" | "average"
    refused: bool
    consequence: str

    def message(self) -> str:
        return f"{self.where} keeps a {self.kind} copy of the weights: {self.consequence}"


CONSEQUENCES = {
    "lookahead": (
        True,
        "every k steps it pulls the model back toward weights from before the teleport, undoing part "
        "of it and leaving the level set; use the base optimizer, or re-sync its slow weights after each teleport",
    ),
    "sam": (
        True,
        "its second step writes back the weights saved before its first step, so a teleport in between "
        "is lost; teleport only between full SAM steps (pass policy='warn' once you do)",
    ),
    "average": (
        False,
        "it averages weights from before and after each teleport, which is in general not a point of "
        "the level set; the averaged model recovers as the pre-teleport weights decay out",
    ),
}


def find_shadows(*objects: Any) -> list[Shadow]:
    """Every shadow-keeping wrapper among ``objects`` (optimizers, modules, callbacks, or lists of them)."""
    found: list[Shadow] = []
    for obj in _flatten(objects):
        kind = _kind(obj)
        if kind is not None:
            refused, consequence = CONSEQUENCES[kind]
            found.append(Shadow(type(obj).__name__, kind, refused, consequence))
        if isinstance(obj, torch.optim.Optimizer) or _wraps_optimizer(obj):
            for attribute in OPTIMIZER_WRAPPING_ATTRIBUTES:
                inner = getattr(obj, attribute, None)
                if inner is not None and inner is not obj and _is_optimizer_like(inner):
                    found += [
                        Shadow(f"{type(obj).__name__} -> {shadow.where}", shadow.kind, shadow.refused, shadow.consequence)
                        for shadow in find_shadows(inner)
                    ]
    return found


def check_shadows(*objects: Any, policy: str = "default") -> list[Shadow]:
    """Warn about or refuse the shadow-keeping wrappers among ``objects``; return what was found.

    ``policy="default"`` refuses Lookahead and SAM and warns about weight
    averages; ``"warn"`` only warns; ``"error"`` refuses them all.
    """
    if policy not in POLICIES:
        raise ValueError(f"shadow policy must be one of {POLICIES}, got {policy!r}")
    shadows = find_shadows(*objects)
    refused = [s for s in shadows if policy == "error" or (policy == "default" and s.refused)]
    if refused:
        raise StaleShadowError("; ".join(s.message() for s in refused))
    for shadow in shadows:
        warnings.warn(shadow.message(), StaleShadowWarning, stacklevel=2)
    return shadows


def _kind(obj: Any) -> str | None:
    words = _words(type(obj).__name__)
    averaging = "ema" in words or "averaging" in words or {"moving", "average"} <= words
    if isinstance(obj, torch.optim.swa_utils.AveragedModel) or hasattr(obj, "shadow_params"):
        return "average"  # SWA and EMA AveragedModel, torch_ema.ExponentialMovingAverage
    if averaging and not _is_optimizer_like(obj):
        return "average"  # timm's ModelEma*, Lightning's StochasticWeightAveraging, WeightAveraging
    if not _is_optimizer_like(obj):
        return None
    keys = {str(key) for state in _states(obj) for key in state}
    if "lookahead" in words or any("slow" in key for key in keys):
        return "lookahead"  # timm: lookahead_slow_buff; torch-optimizer: slow_param
    sharpness_aware = {"sam", "asam", "gsam"} & words or {"old_p", "e_w"} & keys
    if sharpness_aware or (_wraps_optimizer(obj) and any("rho" in group for group in obj.param_groups)):
        return "sam"
    return None


def _words(name: str) -> set[str]:
    """``"EMAWeightAveraging"`` -> ``{"ema", "weight", "averaging"}``."""
    return {word.lower() for word in re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+", name)}


def _states(optimizer: Any) -> Iterable[dict]:
    state = getattr(optimizer, "state", None)
    return [s for s in state.values() if isinstance(s, dict)] if isinstance(state, dict) else []


def _is_optimizer_like(obj: Any) -> bool:
    return isinstance(obj, torch.optim.Optimizer) or (hasattr(obj, "param_groups") and hasattr(obj, "step"))


def _wraps_optimizer(obj: Any) -> bool:
    return any(_is_optimizer_like(getattr(obj, a, None)) for a in OPTIMIZER_WRAPPING_ATTRIBUTES)


def _flatten(objects: Iterable[Any]) -> Iterable[Any]:
    for obj in objects:
        if isinstance(obj, list | tuple | set):
            yield from _flatten(obj)
        elif obj is not None:
            yield obj
