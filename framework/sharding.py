"""Sharded parameters (FSDP2's ``fully_shard``): which block of a tensor a rank holds, whole figures from blocks.

Under ``torch.distributed.fsdp.fully_shard`` every parameter is a ``DTensor``:
each rank holds one block of its rows (``Shard(0)``; uneven where the rows do
not divide, as ``torch.chunk`` splits them), and on a 2-D mesh (HSDP) the
blocks are replicated along the first mesh dimension. The whole parameter
exists only inside its module's forward and backward, gathered by FSDP and
freed after. A teleport reads and writes the blocks only:

* :func:`held_part` -- the block of a whole-size tensor (an update every rank
  computed alike) that this rank holds of a parameter: no communication;
* :func:`squared_norms` / :func:`norms` -- figures of whole tensors from their
  blocks (one all-reduce of the local squares per device mesh);
* :func:`gathered` -- a whole parameter, for checks (an all-gather);
* :func:`reshard` / :func:`resharded_after_forward` -- FSDP keeps a root
  module's gathered parameters after a forward until the backward that
  training puts after it; a teleport changes the blocks between forwards
  with no backward, so it makes every module give its gathered copy back.

Nothing here imports ``torch.distributed.tensor`` or ``torch.distributed.fsdp``:
a model holds sharded parameters only once those are loaded (einops' trick).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def _fsdp_module_type() -> type | None:
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a block of a tensor spread over ranks)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def sharded_parameters(model: nn.Module) -> list[str]:
    """The names of ``model``'s parameters that are sharded (empty for an unsharded model)."""
    return [name for name, p in model.named_parameters() if is_sharded(p)]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (FSDP units)."""
    unit = _fsdp_module_type()
    return [] if unit is None else [m for m in model.modules() if isinstance(m, unit)]


def local(tensor: Tensor) -> Tensor:
    """The block of ``tensor`` this rank holds (``tensor`` itself when it is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def held_part(whole: Tensor, like: Tensor) -> Tensor:
    """The block of ``whole`` (shaped like ``like`` whole) that this rank holds of ``like``, laid out as
    ``like`` is (a ``DTensor``); ``whole`` itself when ``like`` is not sharded.

    Every rank must hold the same ``whole``: each keeps its block, nothing is sent.
    """
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def gathered(tensor: Tensor) -> Tensor:
    """The whole of ``tensor`` on every rank (an all-gather for a sharded one), detached; it may share
    memory with ``tensor`` where there was nothing to gather."""
    return tensor.detach().full_tensor() if is_sharded(tensor) else tensor.detach()


def gathered_parameters(model: nn.Module) -> dict[str, Tensor]:
    """A copy of every parameter of ``model`` whole, by name (for checks: it gathers the whole model)."""
    return {name: gathered(p).clone() for name, p in model.named_parameters()}


def squared_norms(tensors: Sequence[Tensor]) -> list[float]:
    """The squared norm of each tensor whole, in float64, however it is sharded.

    A plain tensor's is its own; a sharded tensor's local squares are summed
    over the mesh dimensions it is sharded along (one all-reduce per mesh).
    """
    squares = [_float64_square_sum(local(t).detach()) for t in tensors]
    result = [float(s) for s in squares]
    for (mesh, dims), indices in _by_mesh(tensors).items():
        from torch.distributed.tensor import DTensor, Partial, Replicate

        placements = [Partial() if dim in dims else Replicate() for dim in range(mesh.ndim)]
        packed = DTensor.from_local(torch.stack([squares[i] for i in indices]), mesh, placements)
        for i, value in zip(indices, packed.full_tensor().tolist(), strict=True):
            result[i] = value
    return result


def norms(tensors: Sequence[Tensor]) -> list[float]:
    """The norm of each tensor whole, in float64, however it is sharded."""
    if not any(is_sharded(t) for t in tensors):
        return [math.sqrt(float(_float64_square_sum(t.detach()))) for t in tensors]
    return [math.sqrt(square) for square in squared_norms(tensors)]


CHUNK = 2**16
"""Elements per float64 slice of a sum of squares: a 512 KiB copy at most, not one the size of a
weight (and small enough for the allocator to reuse: larger slices cost page faults every time)."""


def _float64_square_sum(tensor: Tensor) -> Tensor:
    """``sum(tensor ** 2)`` accumulated in float64 (float32's squares overflow above 1.8e19), a slice at
    a time, each by one fused norm."""
    flat = tensor.reshape(-1)
    parts = (torch.linalg.vector_norm(part, dtype=torch.float64).square() for part in flat.split(CHUNK))
    return sum(parts, flat.new_zeros((), dtype=torch.float64))


def _by_mesh(tensors: Iterable[Tensor]) -> dict[tuple, list[int]]:
    """The indices of the sharded tensors, by device mesh and the mesh dimensions they are sharded along."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        if is_sharded(tensor):
            dims = tuple(dim for dim, placement in enumerate(tensor.placements) if placement.is_shard())
            groups[(tensor.device_mesh, dims)].append(index)
    return groups


def shard_key(tensor: Tensor) -> int:
    """Which block of ``tensor`` this rank holds, as one number: equal on the ranks that hold the same
    block (replicas of it, along an HSDP mesh's first dimension), 0 for a plain tensor."""
    if not is_sharded(tensor):
        return 0
    mesh, key = tensor.device_mesh, 0
    coordinate = mesh.get_coordinate() or []
    for dim, placement in enumerate(tensor.placements):
        if placement.is_shard():
            key = key * mesh.size(dim) + coordinate[dim]
    return key


def reshard(model: nn.Module) -> None:
    """Free every gathered copy FSDP holds of ``model``'s parameters: the module attributes are the
    sharded parameters again, and the next forward gathers the current blocks."""
    for module in fsdp_modules(model):
        module.reshard()


@contextlib.contextmanager
def resharded_after_forward(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit of ``model`` resharded after each of its forwards while inside (and on exit).

    FSDP keeps a root module's gathered parameters from its forward to the
    backward after it; a teleport runs forwards with no backward and changes
    the blocks in between, and a gathered copy kept from before a change would
    be used, stale, by the next forward. A backward after a resharded forward
    gathers the parameters again, as for any other unit.
    """
    handles = [module.register_forward_hook(_reshard_hook) for module in fsdp_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        reshard(model)


def _reshard_hook(module: nn.Module, args: object, output: object) -> None:
    module.reshard()
