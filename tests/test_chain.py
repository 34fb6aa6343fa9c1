"""The closed form of a chain of Linear layers: which models it takes, that its step is the
structured step (float64, tau = 1), and that the end of a teleport is judged on a real forward."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.chain import ClosedFormPath, LinearChain
from torch_teleport.objective import Batch
from torch_teleport.testing import mlp_problems

F64 = (torch.float64,)


def layered(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)


@pytest.mark.parametrize(
    ("model", "front", "runs"),
    [
        (layered(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), [], [[nn.ReLU], []]),
        (
            layered(
                nn.Flatten(),
                nn.Dropout(),
                nn.Linear(4, 5),
                nn.GELU(),
                nn.Dropout(),
                nn.Linear(5, 2),
                nn.Tanh(),
            ),
            [nn.Flatten, nn.Dropout],
            [[nn.GELU, nn.Dropout], [nn.Tanh]],
        ),
        (layered(nn.Linear(4, 2, bias=False)), [], [[]]),
    ],
    ids=["mlp", "flatten-dropout", "one-layer"],
)
def test_a_chain_of_linear_layers_and_elementwise_modules_is_recognised(model, front, runs):
    chain = LinearChain.of(model)
    assert chain is not None
    assert chain.layers == [m for m in model if isinstance(m, nn.Linear)]
    assert [type(m) for m in chain.front] == front
    assert [[type(m) for m in run] for run in chain.runs] == runs


def with_parameter(model: nn.Sequential) -> nn.Sequential:
    model.register_parameter("scale", nn.Parameter(torch.ones(1)))
    return model


def with_frozen_layer(model: nn.Sequential) -> nn.Sequential:
    model[0].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize(
    "model",
    [
        nn.Linear(4, 2),
        nn.Sequential(),
        layered(nn.Flatten(), nn.Identity()),
        layered(nn.ReLU(), nn.Linear(4, 2)),
        layered(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)),
        layered(nn.Linear(4, 5), nn.PReLU(), nn.Linear(5, 2)),
        layered(nn.Linear(4, 5), nn.Flatten(), nn.Linear(5, 2)),
        layered(layered(nn.Linear(4, 5)), nn.Linear(5, 2)),
        with_parameter(layered(nn.Linear(4, 5), nn.Linear(5, 2))),
        with_frozen_layer(layered(nn.Linear(4, 5), nn.Linear(5, 2))),
    ],
    ids=[
        "not-sequential",
        "empty",
        "no-linear",
        "activation-first",
        "layer-norm",
        "prelu",
        "flatten-between",
        "nested",
        "parameter-outside",
        "frozen-bias",
    ],
)
def test_anything_else_is_not_a_chain(model):
    assert LinearChain.of(model) is None


def one_step(model: nn.Module, problem, gradient: str, **options) -> dict[str, torch.Tensor]:
    """How far each parameter of a copy of ``model`` moves in a teleport along ``gradient``."""
    subject = copy.deepcopy(model)
    before = {name: p.detach().clone() for name, p in subject.named_parameters()}
    report = tt.Teleporter(
        subject, problem.loss_fn, null_space="exact", gradient=gradient, **options
    ).teleport(problem.inputs, problem.targets)
    assert not report.rolled_back and all(layer.gradient == gradient for layer in report.layers)
    return {name: p.detach() - before[name] for name, p in subject.named_parameters()}


def unprojected_gradient_norm(problem) -> float:
    """The largest parameter's gradient of ``0.5 ||grad L||^2`` before projection (a double backward)."""
    model = copy.deepcopy(problem.model)
    grads = torch.autograd.grad(problem.loss_fn(model(problem.inputs), problem.targets), list(model.parameters()), create_graph=True)
    objective = 0.5 * sum(grad.square().sum() for grad in grads)
    return max(float(grad.norm()) for grad in torch.autograd.grad(objective, list(model.parameters())))


@settings(max_examples=30)
@given(problem=mlp_problems(dtypes=F64))
def test_the_closed_form_takes_the_structured_step_and_the_projected_full_one(problem):
    """One plain step (lr = 1), then four normalised ones: the same moves parameter by parameter, to
    1e-10 of the largest move, or of the objective's gradient before projection where the projection
    cut it to less (the projection subtracts from that gradient: each path's rounding scales with it)."""
    plain, normalised = {"steps": 1, "lr": 1.0, "normalize": False}, {"steps": 4, "lr": 0.05}
    for options, floor in ((plain, unprojected_gradient_norm(problem)), (normalised, 0.0)):
        closed = one_step(problem.model, problem, "closed_form", **options)
        for other in ("structured", "full"):
            reference = one_step(problem.model, problem, other, **options)
            scale = max(floor, *(float(change.norm()) for change in reference.values()))
            for name, change in reference.items():
                assert float((closed[name] - change).norm()) <= 1e-10 * scale, (other, name)


@settings(max_examples=40)
@given(problem=mlp_problems(dtypes=(torch.float32,)))
def test_the_closed_form_keeps_the_batch_loss_in_float32(problem):
    """The closed form never re-runs the forward pass between steps: the final, real one
    checks it."""
    report = tt.testing.assert_teleport_invariant(
        problem.model, problem.loss_fn, problem.inputs, problem.targets, steps=8
    )
    assert {layer.gradient for layer in report.layers} == {"closed_form"}


def test_the_default_takes_the_closed_form_only_where_it_keeps_the_batch_exactly():
    """The closed form needs steps that keep the batch's pre-activations exactly: the default core
    space (batch_exact) takes it, with or without a basis sample; where no layer has room and the
    thresholded null space builds the bases instead (a batch larger than every width), and with a
    thresholded null space, the structured path; asking for the closed form with a thresholded
    null space is an error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    inputs, targets = torch.randn(4, 3, 4), torch.tensor([0, 1, 2, 0])
    paths = lambda report: {layer.gradient for layer in report.layers}  # noqa: E731
    default = tt.Teleporter(model, F.cross_entropy)
    assert paths(default.teleport(inputs, targets)) == {"closed_form"}
    assert paths(default.teleport(inputs, targets, basis=torch.randn(6, 3, 4))) == {"closed_form"}
    filled = torch.randn(40, 3, 4), torch.randint(0, 3, (40,))  # 40 samples, 13 and 17 inputs
    assert paths(default.teleport(*filled)) == {"structured"}
    exact = tt.Teleporter(model, F.cross_entropy, null_space="exact")
    assert paths(exact.teleport(inputs, targets)) == {"closed_form"}
    thresholded = tt.Teleporter(model, F.cross_entropy, null_space="svd", tau=0.99)
    assert paths(thresholded.teleport(inputs, targets)) == {"structured"}
    with pytest.raises(ValueError, match="closed_form.*exact null space"):
        tt.Teleporter(model, F.cross_entropy, null_space="svd", gradient="closed_form")
    with pytest.raises(ValueError, match="closed_form"):
        tt.Teleporter(
            nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Linear(3, 2)),
            F.cross_entropy,
            gradient="closed_form",
        )


def closed_form_path(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> ClosedFormPath:
    mover = tt.Teleporter(model, F.cross_entropy, null_space="exact", gradient="closed_form").mover
    batch = Batch(model, F.cross_entropy, inputs, targets, list(model.parameters()))
    return ClosedFormPath(mover.context, batch, mover.coverage, mover.chain)


def small_chain(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    generator = torch.Generator().manual_seed(seed)
    return (
        model,
        torch.randn(4, 6, generator=generator, dtype=torch.float64),
        torch.tensor([0, 1, 2, 0]),
    )


def test_the_closed_form_starts_from_autograds_figures_and_the_layers_inputs():
    model, inputs, targets = small_chain()
    path = closed_form_path(model, inputs, targets)
    loss = F.cross_entropy(model(inputs), targets)
    gradient = torch.autograd.grad(loss, list(model.parameters()))
    assert float(path.first.loss) == pytest.approx(float(loss.detach()), rel=1e-14)
    assert float(path.first.grad_norm) == pytest.approx(
        float(torch.cat([g.flatten() for g in gradient]).norm()), rel=1e-12
    )
    captured = path.captured_inputs()
    assert torch.equal(captured[("0", "input")][0], inputs)
    torch.testing.assert_close(captured[("2", "input")][0], torch.tanh(model[0](inputs)).detach())


def test_the_end_of_a_closed_form_teleport_is_measured_on_a_real_forward():
    model, inputs, targets = small_chain()
    path = closed_form_path(model, inputs, targets)
    with torch.no_grad():
        model[2].weight.mul_(2.0)  # a move no exact step would make: the real loss changes
        real = float(F.cross_entropy(model(inputs), targets))
    captured = float(path.first.loss)
    assert abs(real - captured) > 1e-3
    assert float(path.evaluate().loss) == captured  # what the closed form keeps between steps
    assert float(path.final().loss) == real


def test_a_closed_form_teleport_reports_the_real_loss_and_undoes_the_steps_that_drifted():
    """Long float32 steps move the loss by rounding, which only the real forward at the end sees."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    inputs, targets = torch.randn(8, 16), torch.randint(0, 4, (8,))
    options = {"null_space": "exact", "lr": 0.5}
    free = tt.Teleporter(
        copy.deepcopy(model),
        F.cross_entropy,
        limits=tt.Limits(drift=None, max_gain=None),
        **options,
    )
    report = free.teleport(inputs, targets)
    with torch.no_grad():
        real = float(F.cross_entropy(free.model(inputs), targets))
    assert report.layers[0].gradient == "closed_form" and report.steps == 8
    assert report.loss_after == real != report.loss_before
    strict = tt.Teleporter(
        model, F.cross_entropy, limits=tt.Limits(drift=1e-9, max_gain=None), **options
    )
    limited = strict.teleport(inputs, targets)
    assert limited.stopped == "drift" and limited.steps < 8 and limited.loss_change <= 1e-9
