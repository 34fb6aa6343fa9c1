"""What a launched experiment needs: joining the group ``torchrun`` describes
(:func:`join_launch`), rank-0-only output (:func:`is_main_process`,
:class:`Silent`) and gathering per-rank state. See ``docs/scale.md``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def join_launch(device: torch.device) -> bool:
    """Join the process group a launcher such as ``torchrun`` describes in the environment.

    Returns whether this process is one of several ranks (``WORLD_SIZE > 1``).
    The backend is NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo
    otherwise. Idempotent: a group already initialised is kept.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def leave_launch() -> None:
    """Leave the process group :func:`join_launch` joined, once every rank is done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now: where rank 0 of a :func:`local_group` serves."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_group(rank: int, world: int, port: int, backend: str = "gloo", timeout: timedelta = timedelta(minutes=5)) -> Iterator[None]:
    """This spawned process as rank ``rank`` of ``world`` on localhost (the store on ``port``), torn down after.

    A rank that finished waits for the others before it tears its connections down: a rank
    still finishing its last collective then never meets a peer already gone (a gloo rank torn
    down under a peer's traffic can abort its process). After an error no rank waits.
    """
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timeout
    )
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks (``(0, 1)`` outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process is rank 0, the one that logs and writes files."""
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group): e.g. until rank 0 wrote a checkpoint."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Silent:
    """Stands in for a logger (a ``SummaryWriter``) on ranks other than 0: every call does nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` outside a process group); pickled."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
