"""Level-set teleport (Mishkin, Bietti, Gower 2024): sequential linear programming on all parameters.

It maximises ``m(x) = log phi(x)`` (``phi`` the teleport objective; for
``grad_norm`` this is ``log ||grad f||`` up to a constant) subject to
``f(x) = f(x0)`` by solving, at every step, the problem with the constraint
linearised:

    d = rho grad m - v grad f,   v = (rho <grad m, grad f> + f - f0) / ||grad f||^2,

so ``<grad f, d> = f0 - f`` (the step also undoes the drift so far). An
Armijo line search on the l1 merit function ``m - gamma |f - f0|`` (``gamma``
at least twice the multiplier estimate ``<grad m, grad f> / ||grad f||^2``)
picks ``rho``; the run stops once the KKT residual (the part of ``grad m``
not parallel to ``grad f``) and the constraint gap are both small. Each step
costs one double backward (``grad m`` needs ``H grad f``) plus one forward and
backward per line-search trial. The linearisation leaves an error of second
order in the step on the loss, which the null-space method does not have.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torch_teleport.climb import Applied, AscentStopped, Climb, Step
from torch_teleport.hookspecs import hookimpl
from torch_teleport.method import MethodContext, Mover, TeleportMethod
from torch_teleport.model_state import check_dtype
from torch_teleport.objective import Batch, Evaluation, Objective


class LevelSetMethod(TeleportMethod):
    """Sequential linear programming with a line search, selected by ``method="level_set"``.

    It keeps the loss by its own constraint and line search, not through the
    shared limits (drift, guard batch, gain cap).

    Options:
        kkt_tol: stop when ``||grad m - lambda grad f||^2`` is at most this
            and ``|f - f0|`` at most ``constraint_tol`` (``stopped="kkt"``).
        constraint_tol: see ``kkt_tol``.
        armijo: sufficient-increase fraction of the Armijo test.
        backtrack: factor by which a rejected trial shrinks ``rho``.
        max_backtracks: trials per step before the run stops with
            ``stopped="line_search"`` (the step is undone).
        line_search: ``False`` accepts every first trial (plain SLP).

    The step size is the teleporter's ``lr``: with ``normalize=True`` the
    first trial moves the parameters by about ``lr`` times their norm; a
    step accepted at once lets the next start larger again (up to that).
    """

    honours_limits = False

    def __init__(
        self,
        *,
        kkt_tol: float = 1e-6,
        constraint_tol: float = 1e-6,
        armijo: float = 0.5,
        backtrack: float = 0.8,
        max_backtracks: int = 30,
        line_search: bool = True,
    ) -> None:
        if not 0 < armijo < 1:
            raise ValueError(f"armijo must lie in (0, 1), got {armijo!r}")
        if not 0 < backtrack < 1:
            raise ValueError(f"backtrack must lie in (0, 1), got {backtrack!r}")
        if max_backtracks < 1:
            raise ValueError(f"max_backtracks must be at least 1, got {max_backtracks!r}")
        self.kkt_tol = float(kkt_tol)
        self.constraint_tol = float(constraint_tol)
        self.armijo = float(armijo)
        self.backtrack = float(backtrack)
        self.max_backtracks = int(max_backtracks)
        self.line_search = bool(line_search)

    def bind(self, context: MethodContext) -> LevelSetMover:
        return LevelSetMover(context, self)


class LevelSetMover(Mover):
    """Level-set teleport on one model: every trainable parameter moves."""

    def __init__(self, context: MethodContext, method: LevelSetMethod) -> None:
        super().__init__(context)
        self.method = method
        for name, param in context.model.named_parameters():
            if param.requires_grad:
                check_dtype(name, param)  # half precision is computed in float32, rounded once

    def climb(self, batch: Batch) -> LevelSetClimb:
        return LevelSetClimb(self, batch)


class LevelSetClimb(Climb):
    """One batch: the level ``f(x0)``, the merit penalty and the step's shrink factor, carried over steps.

    A step solves the linearised subproblem at the current point and runs
    the Armijo search itself; the loop takes no second trial.
    """

    retries = False

    def __init__(self, mover: LevelSetMover, batch: Batch) -> None:
        self.method, self.batch = mover.method, batch
        self.objective = mover.context.objective
        self.params = list(batch.parameters)
        self.sign = 1.0 if self.objective.ascend else -1.0
        self.point = self.first = _Point(self.objective, batch, self.params, self.sign)
        if not self.point.finite:
            raise ValueError(f"the loss or objective on the teleport batch is not finite (loss {self.point.loss_value})")
        if self.point.objective <= 0:
            raise ValueError(
                "level-set teleport climbs log(objective), so the objective must be positive; "
                f"it is {self.point.objective}"
            )
        self.level, self.penalty, self.shrink = self.point.loss_value, 0.0, 1.0

    def evaluate(self) -> _Point:
        return self.point

    def step(self, evaluation: Evaluation) -> LevelSetStep:
        subproblem = _Linearisation(self.point, self.level)
        if not subproblem.squared > 0:
            raise AscentStopped("no_room")  # a critical point of the loss: the constraint is degenerate
        if subproblem.residual_norm**2 <= self.method.kkt_tol and abs(subproblem.gap) <= self.method.constraint_tol:
            raise AscentStopped("kkt")
        self.penalty = max(self.penalty, 2 * abs(subproblem.multiplier))
        return LevelSetStep(self, subproblem, math.sqrt(_dot(self.params, self.params)))


class LevelSetStep(Step):
    """The step ``rho grad m - v grad f`` of one subproblem, ``rho`` found by the Armijo search."""

    def __init__(self, climb: LevelSetClimb, subproblem: _Linearisation, weights: float) -> None:
        self.climb, self.subproblem = climb, subproblem
        self.norm, self.reference = max(subproblem.residual_norm, 1e-30), weights

    def apply(self, scale: float, module_limit: float | None) -> Applied:
        climb, method = self.climb, self.climb.method
        start = [p.detach().clone() for p in climb.params]
        rho = climb.shrink * abs(scale)
        accepted, backtracks, rho = _line_search(climb, start, self.subproblem, rho)
        if accepted is None:
            raise AscentStopped("line_search")
        climb.shrink = min(1.0, climb.shrink / method.backtrack) if backtracks == 0 else climb.shrink * method.backtrack**backtracks
        climb.point = accepted
        return Applied(undo=lambda: _set(climb.params, start), size=rho)


def _line_search(
    climb: LevelSetClimb, start: list[Tensor], subproblem: _Linearisation, rho: float
) -> tuple[_Point | None, int, float]:
    """The first step, shrinking ``rho``, that passes the Armijo test on the merit function.

    Returns the accepted point (the parameters are left there), the number of
    rejected trials and the accepted ``rho``, or ``None`` with the parameters restored.
    """
    method, point, penalty = climb.method, climb.point, climb.penalty
    merit = climb.sign * math.log(point.objective) - penalty * abs(subproblem.gap)
    for backtracks in range(method.max_backtracks):
        step = subproblem.step(rho)
        slope = _dot(subproblem.grad_m, step) + penalty * abs(subproblem.gap)  # merit derivative along the step
        _set(climb.params, [origin + delta for origin, delta in zip(start, step, strict=True)])
        candidate = _Point(climb.objective, climb.batch, climb.params, climb.sign)
        if candidate.finite and not method.line_search:
            return candidate, backtracks, rho
        if candidate.finite and candidate.objective > 0:
            gained = climb.sign * math.log(candidate.objective) - penalty * abs(candidate.loss_value - subproblem.level)
            if gained >= merit + method.armijo * slope:
                return candidate, backtracks, rho
        rho *= method.backtrack
    _set(climb.params, start)
    return None, method.max_backtracks, rho


def _set(params: list[Tensor], values: list[Tensor]) -> None:
    with torch.no_grad():
        for param, value in zip(params, values, strict=True):
            param.copy_(value)


class _Point(Evaluation):
    """The objective, the loss and its gradient at the current parameters, as an evaluation.

    The objective's graph is kept, so its gradient (a double backward) is
    only taken for points the line search accepts.
    """

    def __init__(self, objective: Objective, batch: Batch, params: list[Tensor], sign: float) -> None:
        evaluation = objective.evaluate(batch)
        grads = torch.autograd.grad(evaluation.loss, params, retain_graph=True, allow_unused=True)
        self.grad_f = [_zero_if_none(g, p) for g, p in zip(grads, params, strict=True)]
        self.params = params
        self.sign = sign
        self.loss_value = float(evaluation.loss.detach())
        self.objective = float(evaluation.value.detach())
        norm = math.sqrt(_dot(self.grad_f, self.grad_f))
        super().__init__(value=evaluation.value, loss=evaluation.loss.detach(), grad_norm=torch.tensor(norm, dtype=torch.float64))
        self.finite = math.isfinite(self.loss_value) and math.isfinite(self.objective) and math.isfinite(norm)

    def grad_m(self) -> list[Tensor]:
        """``grad m = sign * grad phi / phi``, shaped like the parameters."""
        grad_phi = torch.autograd.grad(self.value, self.params, allow_unused=True)
        scale = self.sign / self.objective
        return [_zero_if_none(g, p) * scale for g, p in zip(grad_phi, self.params, strict=True)]


class _Linearisation:
    """The subproblem at one point: ``grad m``, ``grad f``, the multiplier and the constraint gap."""

    def __init__(self, point: _Point, level: float) -> None:
        self.grad_m = point.grad_m()
        self.grad_f = point.grad_f
        self.level = level
        self.gap = point.loss_value - level
        self.squared = _dot(self.grad_f, self.grad_f)
        self.multiplier = _dot(self.grad_m, self.grad_f) / self.squared if self.squared > 0 else 0.0
        residual = [
            gm - self.multiplier * gf for gm, gf in zip(self.grad_m, self.grad_f, strict=True)
        ]
        self.residual_norm = math.sqrt(_dot(residual, residual))  # the KKT residual

    def step(self, rho: float) -> list[Tensor]:
        """``rho grad m - v grad f`` with ``v`` chosen so that ``<grad f, step> = -gap``."""
        correction = (rho * self.multiplier * self.squared + self.gap) / self.squared
        return [rho * gm - correction * gf for gm, gf in zip(self.grad_m, self.grad_f, strict=True)]


def _dot(left: list[Tensor], right: list[Tensor]) -> float:
    return float(sum((a.detach() * b.detach()).sum() for a, b in zip(left, right, strict=True)))


def _zero_if_none(grad: Tensor | None, param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad.detach()


@hookimpl
def teleport_register_methods(registry) -> None:
    registry.add_method("level_set", LevelSetMethod)
