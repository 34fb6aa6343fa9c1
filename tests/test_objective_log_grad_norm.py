"""The log-gradient-norm objective: its gradient against finite differences, and its value."""

from __future__ import annotations

import torch
from conftest import assert_gradient_matches_finite_differences
from hypothesis import given, settings

import torch_teleport as tt
from torch_teleport.objectives.grad_norm import GradNorm
from torch_teleport.objectives.log_grad_norm import LogGradNorm
from torch_teleport.testing import mlp_problems


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_log_grad_norm_gradient_matches_finite_differences(problem):
    assert_gradient_matches_finite_differences(LogGradNorm(), problem, problem.seed)


@settings(max_examples=8)
@given(problem=mlp_problems(dtypes=(torch.float64,), max_depth=3, max_width=12, max_batch=12))
def test_log_grad_norm_is_the_log_of_the_gradient_norm(problem):
    batch = tt.Batch(problem.model, problem.loss_fn, problem.inputs, problem.targets, list(problem.model.parameters()))
    half_squared = GradNorm().evaluate(batch).value
    log_value = LogGradNorm().evaluate(batch).value
    torch.testing.assert_close(log_value, 0.5 * torch.log(2 * half_squared), rtol=1e-12, atol=1e-12)
