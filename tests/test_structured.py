"""The structured path: the projected ascent step from first derivatives equals the projected full HVP.

At tau = 1 the two are equal in exact arithmetic (docs/architecture.md, "The
structured gradient"); in float64 they agree to 1e-10 relative, for every
built-in projector (hypothesis draws shapes and options as the projector
tests do) and every zoo model. A site the structured path cannot serve takes
the full path, and the report says so.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.lab.testing import mamba_problems
from torch_teleport.testing import (
    assert_structured_matches_full,
    attention_problems,
    conv_problems,
    mlp_problems,
    transformer_problems,
)

F64 = (torch.float64,)


@settings(max_examples=40)
@given(problem=mlp_problems(dtypes=F64))
def test_linear_chains(problem):
    """(The closed form of the same chains: tests/test_chain.py.)"""
    report = assert_structured_matches_full(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    assert all(layer.gradient == "structured" for layer in report.layers)


@settings(max_examples=25)
@given(problem=conv_problems(dtypes=F64))
def test_convolutions(problem):
    assert_structured_matches_full(problem.model, problem.loss_fn, problem.inputs, problem.targets)


@settings(max_examples=15)
@given(problem=attention_problems(dtypes=F64))
def test_attention(problem):
    """Attention's four maps run inside one functional call, recomputed with explicit maps for
    the structured path; ``bias_k`` (the key of an extra token) takes the full path beside them."""
    report = assert_structured_matches_full(problem.model, problem.loss_fn, problem.inputs, problem.targets)
    for layer in report.layers:
        assert layer.gradient == ("full" if layer.name.endswith("bias_k") else "structured"), layer


@settings(max_examples=10)
@given(problem=transformer_problems(dtypes=F64))
def test_transformer_layers(problem):
    assert_structured_matches_full(problem.model, problem.loss_fn, problem.inputs, problem.targets)


@settings(max_examples=10)
@given(problem=mamba_problems(dtypes=F64))
def test_mamba_blocks(problem):
    assert_structured_matches_full(problem.model, problem.loss_fn, problem.inputs, problem.targets)


@pytest.mark.parametrize("objective", ["grad_norm", "log_grad_norm"])
def test_both_gradient_norm_objectives_and_several_steps(objective):
    """Over 4 normalised steps the two paths stay together (each step from the moved point)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    inputs, targets = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    moved = []
    start = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    for gradient in ("structured", "full"):
        subject = copy.deepcopy(model)
        tt.Teleporter(subject, F.cross_entropy, objective=objective, steps=4, lr=0.05, null_space="exact",
                      gradient=gradient).teleport(inputs, targets)
        moved.append(torch.nn.utils.parameters_to_vector(subject.parameters()).detach())
    assert float((moved[0] - moved[1]).norm()) <= 1e-10 * float((moved[1] - start).detach().norm())


@pytest.mark.parametrize("layers", ["linear", "conv"])
def test_an_in_place_activation_after_a_site_leaves_its_output_gradient_as_computed(layers):
    """``ReLU(inplace=True)`` rewrites the layer's output after the site recorded it: the output
    gradient must be the one at the layer's output (before the mask), as the full path takes it."""
    torch.manual_seed(0)
    if layers == "linear":
        model = nn.Sequential(nn.Linear(5, 24), nn.ReLU(inplace=True), nn.Linear(24, 24), nn.ReLU(inplace=True), nn.Linear(24, 3))
        inputs = torch.randn(12, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 2 * 2, 3))
        inputs = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    targets = torch.randint(0, 3, (len(inputs),))
    report = assert_structured_matches_full(model.double(), F.cross_entropy, inputs, targets)
    assert all(layer.gradient == "structured" for layer in report.layers)


def test_batch_norm_in_training_mode_keeps_its_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
    model = model.double().train()
    inputs, targets = torch.randn(2, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 2])
    buffers = [b.clone() for b in model.buffers()]
    report = assert_structured_matches_full(model, F.cross_entropy, inputs, targets)
    tt.Teleporter(model, F.cross_entropy).teleport(inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert report.layers[0].gradient == "structured"


def test_ops_without_a_double_backward_teleport_on_the_structured_path():
    """Hardsigmoid has no double backward: the full path raises, the default teleports invariantly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Hardsigmoid(), nn.Linear(24, 24), nn.Hardswish(), nn.Linear(24, 3))
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        tt.Teleporter(copy.deepcopy(model), F.cross_entropy, gradient="full").teleport(inputs, targets)
    report = tt.testing.assert_teleport_invariant(model, F.cross_entropy, inputs, targets, steps=8)
    assert report.grad_norm_after > report.grad_norm_before


def test_a_model_without_forward_mode_derivatives_falls_back_with_a_warning():
    """Packed sequences have no forward-mode derivative: the teleport warns, names the op and
    takes the full path; the report says every site went that way."""
    torch.manual_seed(0)

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 4)
            self.rnn = nn.RNN(4, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(x), torch.tensor([3, 2]), batch_first=True)
            _, hidden = self.rnn(packed)
            return self.head(hidden[-1])

    model = Packed().double()
    inputs, targets = torch.randn(2, 3, 3, dtype=torch.float64), torch.tensor([0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tt.Teleporter(model, F.cross_entropy, null_space="exact").teleport(inputs, targets)
    assert any("_pack_padded_sequence" in str(w.message) for w in caught)
    assert {layer.gradient for layer in report.layers} == {"full"}
    assert report.loss_change <= 1e-10


def test_full_path_is_there_for_objectives_without_structure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    with pytest.raises(ValueError, match="gradient='structured' needs an objective of the gradient norm"):
        tt.Teleporter(model, F.cross_entropy, objective="sharpness", gradient="structured")
    report = tt.Teleporter(model, F.cross_entropy, objective="sharpness").teleport(
        torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 0])
    )
    assert {layer.gradient for layer in report.layers} == {"full"}


def test_compiled_models_teleport_through_the_original_module():
    """``torch.compile`` wraps the model; the teleport runs the original (shared parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Hardswish(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    compiled = torch.compile(model, backend="aot_eager")
    inputs, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    before = float(F.cross_entropy(compiled(inputs), targets))
    report = tt.Teleporter(compiled, F.cross_entropy).teleport(inputs, targets)
    assert report.steps == 8 and not report.rolled_back
    assert report.grad_norm_after > report.grad_norm_before
    assert abs(float(F.cross_entropy(compiled(inputs), targets)) - before) <= 1e-5 * before
    assert all(p is q for p, q in zip(compiled.parameters(), model.parameters(), strict=True))


def test_the_first_structured_teleport_of_a_process_warns_of_nothing_of_torchs_own():
    """torch's forward-mode decompositions load on the first dual tensor of a process, through the
    deprecated torch.jit.script: the teleport keeps that FutureWarning from its caller."""
    script = (
        "import torch, torch_teleport as tt\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "tt.Teleporter(model, torch.nn.functional.cross_entropy).teleport(torch.randn(5, 4), torch.randint(0, 3, (5,)))\n"
    )
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_tangent_pass_hands_each_stream_over_as_soon_as_its_records_are_in():
    """With the records each stream takes, a tangent pass hands a stream to ``complete`` before the
    model goes on (a site's update is built then, and its tangents need not wait for the rest of
    the pass), and stops once every stream is in: the layers after the last moving one never run."""
    from torch_teleport.coverage import find_coverage
    from torch_teleport.objective import Batch
    from torch_teleport.structured import tangent_streams

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    coverage = find_coverage(model, tt.default_registry())
    moving = [covered for covered in coverage.modules if covered.name in ("2", "4")]
    streams = {(covered.name, site.stream): 1 for covered in moving for site in covered.sites}
    batch = Batch(model, F.cross_entropy, torch.randn(7, 4), torch.randint(0, 3, (7,)), list(model.parameters()))
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    handed, entered = [], []
    for index, layer in enumerate(model):
        layer.register_forward_pre_hook(lambda module, args, index=index: entered.append((index, len(handed))))
    left = tangent_streams(batch, direction, moving, until=streams, complete=lambda key, records: handed.append((key, len(records))))
    assert left == {} and handed == [(key, 1) for key in streams]
    assert (3, 1) in entered  # layer 2's stream handed over before the model went on past layer 2
    assert max(index for index, _ in entered) == 4  # the pass ended at the last moving layer's input ...
    full = tangent_streams(batch, direction, moving)  # ... and a pass without counts records the same
    assert set(full) == set(streams)
