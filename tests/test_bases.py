"""The bases of one teleport batch: a core basis per site with room, what stays fixed and why, the
pinned blocks of a packed projection, saturation and the layer reports."""

from __future__ import annotations

import torch
from conftest import exact, integer_matrix
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import torch_teleport as tt
from torch_teleport.bases import NO_ROOM, SATURATION, build_bases
from torch_teleport.coverage import capture_inputs, find_coverage
from torch_teleport.distributed import Replicas

DID_NOT_RUN = "its module did not run on the teleport batch"


def bases_of(model: nn.Module, inputs):
    """The coverage of ``model`` and the exact bases of the batch ``inputs``."""
    coverage = find_coverage(model, tt.default_registry())
    captured = capture_inputs(coverage, model, inputs)
    return coverage, build_bases(coverage, captured, {}, exact(), Replicas())


class Detour(nn.Module):
    """A layer that runs, a layer that never does, and a head with fewer inputs than samples."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.unused, self.head = nn.Linear(8, 3), nn.Linear(8, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_a_site_whose_module_did_not_run_or_without_room_stays_fixed_and_says_why():
    torch.manual_seed(0)
    _, bases = bases_of(Detour().double(), torch.randn(6, 8, dtype=torch.float64))
    assert bases.frozen == {
        "unused.weight": DID_NOT_RUN,
        "unused.bias": DID_NOT_RUN,
        "head.weight": NO_ROOM,
        "head.bias": NO_ROOM,  # 6 samples fill 3 inputs and the bias
    }
    assert set(bases.of) == {("body", "weight")} and bases.pinned == []
    assert [(layer.name, layer.null_dim) for layer in bases.layers] == [
        ("body.weight", 9 - 6),
        ("head.weight", 0),
    ]


class CrossAttention(nn.Module):
    """Two query tokens attend to twelve memory tokens: the packed projection's query block has
    room, its key and value blocks none."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2)

    def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.attention(query, memory, memory, need_weights=False)[0]


def test_the_blocks_of_a_packed_projection_without_room_are_pinned_and_their_rows_zeroed():
    torch.manual_seed(0)
    model = CrossAttention().double()
    query, memory = (
        torch.randn(2, 1, 4, dtype=torch.float64),
        torch.randn(12, 1, 4, dtype=torch.float64),
    )
    coverage, bases = bases_of(model, (query, memory))
    assert sorted(site.name for _, site in bases.pinned) == ["k", "v"]
    assert set(bases.of) == {("attention", "q"), ("attention", "out_proj")}
    assert bases.frozen == {}  # the query block moves the packed weight
    generator = torch.Generator().manual_seed(1)
    dense = {
        name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
        for name, p in coverage.movable().items()
    }
    bases.project(coverage, dense, done=set())
    weight, bias = dense["attention.in_proj_weight"], dense["attention.in_proj_bias"]
    assert torch.count_nonzero(weight[4:]) == 0 and torch.count_nonzero(bias[4:]) == 0
    # The query block moves, in the null space of the query tokens (bias folded in).
    tokens = torch.cat([query.reshape(2, 4), torch.ones(2, 1, dtype=torch.float64)], 1)
    block = torch.cat([weight[:4], bias[:4, None]], 1)
    assert float(block.norm()) > 0.1
    assert float((block @ tokens.T).norm()) <= 1e-12 * float(block.norm() * tokens.norm())


def test_a_site_projected_already_is_left_alone():
    torch.manual_seed(0)
    model = CrossAttention().double()
    coverage, bases = bases_of(
        model, (torch.randn(2, 1, 4).double(), torch.randn(12, 1, 4).double())
    )
    dense = {name: torch.ones_like(p) for name, p in coverage.movable().items()}
    bases.project(coverage, dense, done={("attention", "q"), ("attention", "out_proj")})
    assert torch.all(dense["attention.in_proj_weight"][:4] == 1)
    assert torch.all(dense["attention.out_proj.weight"] == 1)


@example(seed=0, samples=8, rank=6)  # the edge: a core rank of exactly SATURATION * samples
@example(seed=0, samples=8, rank=7)
@given(seed=st.integers(0, 2**31 - 1), samples=st.integers(2, 12), rank=st.integers(1, 12))
def test_a_sample_saturates_a_site_when_its_core_rank_is_at_most_the_saturation_share(
    seed, samples, rank
):
    generator = torch.Generator().manual_seed(seed)
    inputs = integer_matrix(generator, samples, 16, min(rank, samples))
    model = nn.Linear(16, 2, bias=False).double()
    _, bases = bases_of(model, inputs)
    core = int(torch.linalg.matrix_rank(inputs))
    assert bases.layers[0].null_dim == 16 - core and bases.layers[0].samples == samples
    assert bases.saturated == (core <= SATURATION * samples)


def test_the_saturation_edge_is_reached_by_its_examples():
    ranks = [
        torch.linalg.matrix_rank(integer_matrix(torch.Generator().manual_seed(0), 8, 16, r))
        for r in (6, 7)
    ]
    assert [int(rank) for rank in ranks] == [6, 7]
    assert SATURATION * 8 == 6


def test_a_site_without_room_does_not_decide_saturation():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        2, 32, dtype=torch.float64
    )
    # The first layer's core rank is 2 of 64 samples; the head's 3 inputs and bias have no room.
    model = nn.Sequential(nn.Linear(32, 3, bias=False), nn.Tanh(), nn.Linear(3, 2)).double()
    _, bases = bases_of(model, inputs)
    assert bases.frozen == {"2.weight": NO_ROOM, "2.bias": NO_ROOM} and bases.saturated


def test_layer_reports_name_each_sites_path_and_count_grouped_dimensions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(24, 3)).double()
    inputs = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    _, bases = bases_of(model, inputs)
    conv, linear = bases.reports({("0", "weight"): "structured"})
    assert (conv.name, conv.gradient, conv.groups) == ("0.weight", "structured", 2)
    assert (conv.input_dim, conv.samples, conv.null_dim) == (2 * (2 * 9 + 1), 8, 2 * (19 - 8))
    assert (linear.name, linear.gradient, linear.input_dim, linear.samples) == (
        "2.weight",
        "full",
        25,
        2,
    )
    assert bases.seconds > 0


def test_the_layer_reports_of_a_packed_projection_name_each_block():
    torch.manual_seed(0)
    model = CrossAttention().double()
    paths = {("attention", "q"): "structured", ("attention", "out_proj"): "full"}
    _, bases = bases_of(model, (torch.randn(2, 1, 4).double(), torch.randn(12, 1, 4).double()))
    assert [(layer.name, layer.gradient) for layer in bases.reports(paths)] == [
        ("attention.q", "structured"),
        ("attention.k", "full"),
        ("attention.v", "full"),
        ("attention.out_proj", "full"),
    ]
    assert [layer.samples for layer in bases.layers] == [2, 12, 12, 2]
