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

from torch_teleport import Batch, Objective, TeleportMethod, TeleportReport, hookimpl
from torch_teleport.method import MethodContext


class LevelSetMethod(TeleportMethod):
    """Sequential linear programming with a line search, selected by ``method="level_set"``.

    It keeps the loss by its own constraint and line search, not through the
    shared limits (drift, guard batch, gain cap).

    Options (``method_options``):
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
        context: MethodContext,
        *,
        kkt_tol: float = 1e-6,
        constraint_tol: float = 1e-6,
        armijo: float = 0.5,
        backtrack: float = 0.8,
        max_backtracks: int = 30,
        line_search: bool = True,
    ) -> None:
        super().__init__(context)
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
        for name, param in context.model.named_parameters():
            if param.requires_grad and param.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"teleport needs float32 or float64 parameters, {name} is {param.dtype}"
                )

    def run(self, batch: Batch, steps: int, cap: float | None) -> TeleportReport:
        params = list(batch.parameters)
        rule = self.context.step
        sign = 1.0 if rule.ascend else -1.0
        point = _Point(self.context.objective, batch, params, sign)
        if not point.finite:
            raise ValueError(
                f"the loss or objective on the teleport batch is not finite (loss {point.loss})"
            )
        if point.value <= 0:
            raise ValueError(
                "level-set teleport climbs log(objective), so the objective must be positive; "
                f"it is {point.value}"
            )
        report = TeleportReport(
            loss_before=point.loss,
            loss_after=point.loss,
            grad_norm_before=point.grad_norm,
            grad_norm_after=point.grad_norm,
            objective_before=point.value,
            objective_after=point.value,
            steps=0,
            stopped="steps",
        )
        level = point.loss
        penalty = 0.0
        shrink = 1.0
        for _ in range(steps):
            report.losses.append(point.loss)
            report.grad_norms.append(point.grad_norm)
            if cap is not None and point.grad_norm >= cap:
                report.stopped = "cap"
                break
            subproblem = _Linearisation(point, level)
            if not subproblem.squared > 0:
                report.stopped = (
                    "no_room"  # a critical point of the loss: the constraint is degenerate
                )
                break
            if (
                subproblem.residual_norm**2 <= self.kkt_tol
                and abs(subproblem.gap) <= self.constraint_tol
            ):
                report.stopped = "kkt"
                break
            penalty = max(penalty, 2 * abs(subproblem.multiplier))
            weights = math.sqrt(_dot(params, params))
            rho = shrink * abs(rule.scale(max(subproblem.residual_norm, 1e-30), weights))
            accepted, backtracks = self._line_search(
                batch, params, sign, point, subproblem, penalty, rho
            )
            if accepted is None:
                report.stopped = "line_search"
                break
            shrink = (
                min(1.0, shrink / self.backtrack)
                if backtracks == 0
                else shrink * self.backtrack**backtracks
            )
            point = accepted
            report.steps += 1
        report.loss_after = point.loss
        report.grad_norm_after = point.grad_norm
        report.objective_after = point.value
        return report

    def _line_search(
        self,
        batch: Batch,
        params: list[Tensor],
        sign: float,
        point: _Point,
        subproblem: _Linearisation,
        penalty: float,
        rho: float,
    ) -> tuple[_Point | None, int]:
        """The first step, shrinking ``rho``, that passes the Armijo test on the merit function.

        Returns the accepted point (the parameters are left there) and the
        number of rejected trials, or ``None`` with the parameters restored.
        """
        start = [p.detach().clone() for p in params]
        merit = sign * math.log(point.value) - penalty * abs(subproblem.gap)
        for backtracks in range(self.max_backtracks):
            step = subproblem.step(rho)
            slope = _dot(subproblem.grad_m, step) + penalty * abs(
                subproblem.gap
            )  # merit derivative along the step
            with torch.no_grad():
                for param, origin, delta in zip(params, start, step, strict=True):
                    param.copy_(origin + delta)
            candidate = _Point(self.context.objective, batch, params, sign)
            if candidate.finite and not self.line_search:
                return candidate, backtracks
            if candidate.finite and candidate.value > 0:
                gained = sign * math.log(candidate.value) - penalty * abs(
                    candidate.loss - subproblem.level
                )
                if gained >= merit + self.armijo * slope:
                    return candidate, backtracks
            rho *= self.backtrack
        with torch.no_grad():
            for param, origin in zip(params, start, strict=True):
                param.copy_(origin)
        return None, self.max_backtracks


class _Point:
    """The objective, the loss and its gradient at the current parameters.

    The objective's graph is kept, so its gradient (a double backward) is
    only taken for points the line search accepts.
    """

    def __init__(self, objective: Objective, batch: Batch, params: list[Tensor], sign: float) -> None:
        evaluation = objective.evaluate(batch)
        grads = torch.autograd.grad(evaluation.loss, params, retain_graph=True, allow_unused=True)
        self.grad_f = [_zero_if_none(g, p) for g, p in zip(grads, params, strict=True)]
        self.value_graph = evaluation.value
        self.params = params
        self.sign = sign
        self.loss = float(evaluation.loss.detach())
        self.value = float(evaluation.value.detach())
        self.grad_norm = math.sqrt(_dot(self.grad_f, self.grad_f))
        self.finite = (
            math.isfinite(self.loss) and math.isfinite(self.value) and math.isfinite(self.grad_norm)
        )

    def grad_m(self) -> list[Tensor]:
        """``grad m = sign * grad phi / phi``, shaped like the parameters."""
        grad_phi = torch.autograd.grad(self.value_graph, self.params, allow_unused=True)
        scale = self.sign / self.value
        return [_zero_if_none(g, p) * scale for g, p in zip(grad_phi, self.params, strict=True)]


class _Linearisation:
    """The subproblem at one point: ``grad m``, ``grad f``, the multiplier and the constraint gap."""

    def __init__(self, point: _Point, level: float) -> None:
        self.grad_m = point.grad_m()
        self.grad_f = point.grad_f
        self.level = level
        self.gap = point.loss - level
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
