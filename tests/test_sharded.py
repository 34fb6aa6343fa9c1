"""Teleporting sharded models (FSDP2's ``fully_shard``), for real: gloo, 2 and 4 processes on localhost.

Every rank holds a block of each parameter (uneven blocks: a 5-class head on
2 and 4 ranks, where the fourth rank holds none of it) and its own shard of
one global teleport batch (shards of unequal size, in rank order). After a
sharded teleport the gathered parameters must equal one process teleporting
the concatenated batch with the same options, for an MLP, a Transformer
encoder, a convolutional network and a Hugging Face GPT-2, each sharded per
block and at the root; the global batch's loss must not move; every rank must
report the same; a bad batch on one rank must fail every rank with its
message and change nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import gloo_group, spawn_ranks
from torch import nn
from torch.nn import functional as F

import torch_teleport as tt
from torch_teleport.distributed import InvalidBatchElsewhereError, ReplicaDivergenceError, Replicas
from torch_teleport.inputs import call_model
from torch_teleport.sharding import fsdp_modules, gathered_parameters, local, sharded_parameters

SAME = {"lr": 0.05, "steps": 3, "gradient": "structured", "uncovered": "freeze"}
"""The options both sides of an equivalence take: a fixed rate (a searched step length would turn on
rounding-level differences of the objective), the structured path (one process would otherwise
take the closed form on the MLP)."""

CLASSES = 5


class Encoder(nn.Module):
    """Tokens of 3 features -> width 8 -> two encoder layers -> mean over tokens -> 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(8, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden.mean(1))


def lm_loss(output, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1), targets.flatten())


def build(kind: str, dtype: torch.dtype) -> tuple[nn.Module, list[type]]:
    """The same model on every rank, and the module types that are sharded as units of their own."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "mlp":
            model, blocks = nn.Sequential(
                nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, CLASSES)
            ), [nn.Linear]
        elif kind == "encoder":
            model, blocks = Encoder(), [nn.TransformerEncoderLayer]
        elif kind == "cnn":
            model, blocks = nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3), nn.Tanh(), nn.Flatten(),
                nn.Linear(6 * 2 * 2, CLASSES),
            ), [nn.Conv2d]
        else:
            from transformers import GPT2Config, GPT2LMHeadModel
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block

            config = GPT2Config(
                vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
            )  # fmt: skip
            model, blocks = GPT2LMHeadModel(config), [GPT2Block]
    return model.to(dtype), blocks


def global_batch(kind: str, world: int, dtype: torch.dtype, seed: int = 1):
    """A global batch of ``3 + rank`` samples per rank, and the loss the model takes with it."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [3 + rank for rank in range(world)]
    total = sum(sizes)
    if kind == "gpt2":
        ids = torch.randint(0, 11, (total, 4), generator=generator)
        return ids, ids, sizes, lm_loss
    shape = {"mlp": (6,), "encoder": (3, 3), "cnn": (1, 4, 4)}[kind]
    inputs = torch.randn(total, *shape, generator=generator, dtype=torch.float64).to(dtype)
    return inputs, torch.randint(0, CLASSES, (total,), generator=generator), sizes, F.cross_entropy


def shard_of(tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def as_model_input(kind: str, inputs: torch.Tensor):
    return {"input_ids": inputs} if kind == "gpt2" else inputs


def sharded(kind: str, dtype: torch.dtype, mesh, compute: torch.dtype | None = None) -> nn.Module:
    """The model with ``fully_shard`` on each block and at the root (forward and backward in ``compute``,
    FSDP's mixed precision, when given)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=dtype)
    model, blocks = build(kind, dtype)
    for module in list(model.modules())[1:]:
        if isinstance(module, tuple(blocks)):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _teleport(
    kind: str, rank: int, world: int, dtype: torch.dtype, mesh, *, judged: bool = False, compute=None, **options
) -> dict:
    """A teleport of the sharded model on this rank's shard, after a training backward left gradients
    pending (``judged``: with a guard batch and a basis sample, shards of other global batches); its
    report, the gathered parameters and whether the model was left as found."""
    inputs, targets, sizes, loss_fn = global_batch(kind, world, dtype)
    local_inputs, local_targets = as_model_input(kind, shard_of(inputs, sizes, rank)), shard_of(targets, sizes, rank)
    model = sharded(kind, dtype, mesh, compute)
    extra = {}
    if judged:
        guard_inputs, guard_targets, _, _ = global_batch(kind, world, dtype, seed=2)
        basis, _, _, _ = global_batch(kind, world, dtype, seed=3)
        guard = as_model_input(kind, shard_of(guard_inputs, sizes, rank)), shard_of(guard_targets, sizes, rank)
        extra = {"guard": guard, "basis": as_model_input(kind, shard_of(basis, sizes, rank))}
    teleporter = tt.Teleporter(model, loss_fn, **options)
    loss_fn(call_model(model, local_inputs), local_targets).backward()
    pending = {name: local(p.grad).clone() for name, p in model.named_parameters()}
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    report = teleporter.teleport(local_inputs, local_targets, **extra)
    as_found = (
        all(torch.equal(local(p.grad), pending[name]) for name, p in model.named_parameters())
        and hooks == [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
        and sharded_parameters(model) == list(pending)
    )
    return {"report": report.to_dict(), "params": gathered_parameters(model), "model": model, "as_found": as_found}


def _faults(rank: int, world: int, mesh) -> dict:
    """A NaN in the last rank's shard fails every rank with its message; the refused options and
    states say why; nothing moves."""
    inputs, targets, sizes, loss_fn = global_batch("mlp", world, torch.float64)
    model = sharded("mlp", torch.float64, mesh)
    before = {name: local(p).clone() for name, p in model.named_parameters()}
    local_x = shard_of(inputs, sizes, rank).clone()
    if rank == world - 1:
        local_x[0, 0] = float("nan")
    try:
        tt.Teleporter(model, loss_fn).teleport(local_x, shard_of(targets, sizes, rank))
        rejected = ("nothing", "")
    except ValueError as error:
        rejected = (type(error).__name__, str(error))
    unchanged = all(torch.equal(local(p), before[name]) for name, p in model.named_parameters())
    refused = {}
    for options in ({"gradient": "full"}, {"objective": "sharpness"}):
        try:
            tt.Teleporter(model, loss_fn, **options)
            refused[str(options)] = "accepted"
        except NotImplementedError as error:
            refused[str(options)] = str(error)
    batch = shard_of(inputs, sizes, rank), shard_of(targets, sizes, rank)
    for case, teleporter in (
        ("alone", tt.Teleporter(model, loss_fn, replicas=Replicas.this_process())),
        ("no sync", tt.Teleporter(model, loss_fn)),
        ("divide", tt.Teleporter(model, loss_fn)),
    ):
        model.set_requires_gradient_sync(case != "no sync")
        for unit in fsdp_modules(model) if case == "divide" else ():
            unit.set_gradient_divide_factor(3.0)
        try:
            teleporter.teleport(*batch)
            refused[case] = "accepted"
        except (NotImplementedError, RuntimeError) as error:
            refused[case] = str(error)
    unchanged &= all(torch.equal(local(p), before[name]) for name, p in model.named_parameters())
    try:
        tt.TeleportEvents(tt.Teleporter(model, loss_fn), optimizer_state="rescale")
        refused["rescale"] = "accepted"
    except ValueError as error:
        refused["rescale"] = str(error)
    try:
        tt.Teleporter(sharded("mlp", torch.bfloat16, mesh), loss_fn)
        refused["bfloat16"] = "accepted"
    except TypeError as error:
        refused["bfloat16"] = str(error)
    return {"rejected": rejected, "unchanged": unchanged, "refused": refused}


def _diverge(model: nn.Module, rank: int) -> str:
    """What the replica check says once rank 0 changes its block of the head's weight."""
    if rank == 0:
        with torch.no_grad():
            local(model[4].weight).add_(1.0)
    try:
        Replicas().assert_identical(model.named_parameters())
        return "not detected"
    except ReplicaDivergenceError as error:
        return str(error)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with gloo_group(rank, world, port):
        mesh = init_device_mesh("cpu", (world,))
        results = {
            kind: _teleport(kind, rank, world, torch.float64, mesh, **SAME)
            for kind in ("mlp", "encoder", "cnn", "gpt2")
        }
        results["float32"] = _teleport("mlp", rank, world, torch.float32, mesh)
        results["default"] = _teleport("mlp", rank, world, torch.float64, mesh)
        results["judged"] = _teleport("mlp", rank, world, torch.float64, mesh, judged=True, **SAME)
        results["bfloat16"] = _teleport("mlp", rank, world, torch.float32, mesh, compute=torch.bfloat16)
        hybrid = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        results["hsdp"] = _teleport("mlp", rank, world, torch.float64, hybrid, replicas=Replicas(verify=True), **SAME)
        results["hsdp"]["divergence"] = _diverge(results["hsdp"]["model"], rank)
        for result in results.values():
            del result["model"]
        results["faults"] = _faults(rank, world, mesh)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")



def one_process(
    kind: str, world: int, dtype: torch.dtype, *, judged: bool = False, **options
) -> tuple[nn.Module, tt.TeleportReport]:
    """One process teleporting the concatenated global batch with ``options`` (``judged``: with the
    global guard batch and basis sample)."""
    inputs, targets, _, loss_fn = global_batch(kind, world, dtype)
    extra = {}
    if judged:
        guard_inputs, guard_targets, _, _ = global_batch(kind, world, dtype, seed=2)
        extra = {"guard": (guard_inputs, guard_targets), "basis": global_batch(kind, world, dtype, seed=3)[0]}
    model, _ = build(kind, dtype)
    teleporter = tt.Teleporter(model, loss_fn, replicas=Replicas.this_process(), **options)
    return model, teleporter.teleport(as_model_input(kind, inputs), targets, **extra)


def global_loss(kind: str, world: int, dtype: torch.dtype, params: dict | None = None) -> float:
    inputs, targets, _, loss_fn = global_batch(kind, world, dtype)
    model, _ = build(kind, dtype)
    if params is not None:
        model.load_state_dict(params, strict=False)
    with torch.no_grad():
        return float(loss_fn(model.eval()(as_model_input(kind, inputs)), targets))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to 1e-10 of the tensor's scale (float64)."""
    expected = expected.detach()
    error = float((actual - expected).abs().max())
    assert error <= 1e-10 * (1 + float(expected.abs().max())), f"{name} differs by {error:.3g}"


def without_timings(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in ("seconds", "basis_seconds")}


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ranks(request, tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = request.param
    return world, spawn_ranks(_worker, world, tmp_path_factory.mktemp(f"ranks{world}"))


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("kind", ["mlp", "encoder", "cnn", "gpt2"])
def test_a_sharded_teleport_equals_one_process_on_the_global_batch(ranks, kind):
    world, results = ranks
    per_rank = [r[kind] for r in results]
    report = per_rank[0]["report"]
    assert all(without_timings(r["report"]) == without_timings(report) for r in per_rank)
    single_model, single = one_process(kind, world, torch.float64, **SAME)
    assert report["steps"] == single.steps > 0 and report["stopped"] == single.stopped
    assert report["layers"] == [layer.__dict__ for layer in single.layers]
    initial = dict(build(kind, torch.float64)[0].named_parameters())
    moved = []
    for name, expected in single_model.named_parameters():
        for r in per_rank:
            assert_close(r["params"][name], expected, name)
        if float((expected - initial[name]).detach().abs().max()) > 1e-4:
            moved.append(name)
    assert len(moved) >= 2, moved  # more than the head moves
    assert report["grad_norm_after"] == pytest.approx(single.grad_norm_after, rel=1e-10)
    assert all(r["as_found"] for r in per_rank)  # pending gradients, hooks, sharded parameters


@pytest.mark.slow
@pytest.mark.parametrize(("key", "dtype", "rtol"), [("default", torch.float64, 1e-10), ("float32", torch.float32, 1e-5)])
def test_the_global_batch_loss_is_invariant_under_the_default_options(ranks, key, dtype, rtol):
    world, results = ranks
    report = results[0][key]["report"]
    assert all(without_timings(r[key]["report"]) == without_timings(report) for r in results)
    before, after = global_loss("mlp", world, dtype), global_loss("mlp", world, dtype, results[0][key]["params"])
    assert report["loss_before"] == pytest.approx(before, rel=rtol)
    assert abs(after - before) <= rtol * before
    assert report["steps"] > 0 and report["grad_norm_after"] > report["grad_norm_before"]


@pytest.mark.slow
def test_a_mixed_precision_policy_computes_in_bfloat16_and_moves_the_float32_shards(ranks):
    """FSDP gathers bfloat16 copies for the forward and backward: the teleport's float32 loss keeps to
    about that precision, and the float32 shards move."""
    world, results = ranks
    report = results[0]["bfloat16"]["report"]
    assert all(without_timings(r["bfloat16"]["report"]) == without_timings(report) for r in results)
    assert report["steps"] > 0 and report["grad_norm_after"] > report["grad_norm_before"]
    params = results[0]["bfloat16"]["params"]
    assert all(p.dtype == torch.float32 for p in params.values())
    before, after = global_loss("mlp", world, torch.float32), global_loss("mlp", world, torch.float32, params)
    assert abs(after - before) <= 1e-3 * before


@pytest.mark.slow
def test_a_guard_batch_and_a_basis_sample_are_the_global_ones(ranks):
    world, results = ranks
    report = results[0]["judged"]["report"]
    assert all(without_timings(r["judged"]["report"]) == without_timings(report) for r in results)
    single_model, single = one_process("mlp", world, torch.float64, judged=True, **SAME)
    assert report["guard_loss_before"] == pytest.approx(single.guard_loss_before, rel=1e-10)
    assert report["guard_loss_after"] == pytest.approx(single.guard_loss_after, rel=1e-10)
    assert report["layers"] == [layer.__dict__ for layer in single.layers]
    assert report["steps"] == single.steps > 0
    for name, expected in single_model.named_parameters():
        assert_close(results[0]["judged"]["params"][name], expected, name)


@pytest.mark.slow
def test_a_hybrid_mesh_of_replicas_and_shards_equals_one_process(ranks):
    world, results = ranks
    single_model, _ = one_process("mlp", world, torch.float64, **SAME)
    for name, expected in single_model.named_parameters():
        for r in results:
            assert_close(r["hsdp"]["params"][name], expected, name)
    # ranks 0 and world / 2 hold the same block of 4.weight (replicas along the mesh's first dimension)
    assert all(r["hsdp"]["divergence"].endswith("parameter tensor(s): 4.weight") for r in results)


@pytest.mark.slow
def test_a_bad_batch_on_one_rank_fails_every_rank_with_its_message_and_moves_nothing(ranks):
    world, results = ranks
    faults = [r["faults"] for r in results]
    kinds = [f["rejected"][0] for f in faults]
    assert kinds == [InvalidBatchElsewhereError.__name__] * (world - 1) + ["ValueError"]
    assert all("non-finite" in f["rejected"][1] and f"rank {world - 1}" in f["rejected"][1] for f in faults[:-1])
    assert all(f["unchanged"] for f in faults)


@pytest.mark.slow
def test_what_cannot_teleport_a_sharded_model_is_refused_with_the_reason(ranks):
    world, results = ranks
    for f in (r["faults"] for r in results):
        assert "structured path only" in f["refused"][str({"gradient": "full"})]
        assert "GradientNormObjective" not in f["refused"][str({"objective": "sharpness"})]
        assert "Sharpness" in f["refused"][str({"objective": "sharpness"})]
        assert f"device meshes of [{world}] ranks and the teleport's replicas are 1" in f["refused"]["alone"]
        assert "set_requires_gradient_sync(False) left unreduced gradients" in f["refused"]["no sync"]
        assert "set_gradient_divide_factor(3.0): reset it" in f["refused"]["divide"]
        assert "sharded torch.bfloat16 parameter: shard float32 parameters" in f["refused"]["bfloat16"]
        assert "optimizer_state='rescale'" in f["refused"]["rescale"]


def test_an_unsharded_model_has_no_sharded_parameters():
    model, _ = build("mlp", torch.float64)
    assert sharded_parameters(model) == []
