"""Checkpoints that survive a crash at any moment, and the random state a resumed run needs.

A checkpoint is one ``torch.save`` file, ``checkpoint-<step>.pt``, in a
checkpoint folder. It is written to a temporary file in the same folder,
flushed and fsynced, then renamed into place (``os.replace`` is atomic), so
a crash leaves either the old state or the new one, never half a file.
Only then is ``latest.json`` (the newest file's name, step and SHA-256)
replaced the same way, and only after that are checkpoints older than the
``keep`` newest removed: the last good checkpoint is never overwritten or
deleted before its successor is safely on disk.

Loading verifies the SHA-256 before unpickling (with
``weights_only=True``: a checkpoint cannot run code), so a truncated or
corrupted file gives a :class:`CheckpointError` naming it, and the earlier
checkpoints still there.

A sharded model (FSDP2) is saved with :func:`save_sharded_checkpoint`, on
every rank: ``torch.distributed.checkpoint`` writes each rank's blocks of the
model and optimizer, and each rank's own state (its trainer's or teleport
events' ``state_dict()``, its random state) beside them, into a temporary
folder that rank 0 renames into place once every rank is done, then
``latest.json`` as above. No rank gathers the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

LATEST = "latest.json"
PATTERN = "checkpoint-*.pt"
SHARDED_PATTERN = "checkpoint-*[0-9]"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, partial or corrupt; the message names the file."""


def save_checkpoint(folder: str | Path, state: dict[str, Any], step: int, *, keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` in ``folder``, atomically; return its path.

    ``state`` holds tensors, numbers, strings, lists and dicts (what
    ``torch.load(weights_only=True)`` reads back). The ``keep`` newest
    checkpoints stay; older ones are removed once the new one is in place.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"checkpoint-{int(step):08d}.pt"
    digest = hashlib.sha256()
    with _atomic_file(path) as file:
        torch.save(state, _Hashing(file, digest))
    manifest = {"file": path.name, "step": int(step), "sha256": digest.hexdigest()}
    with _atomic_file(folder / LATEST) as file:
        file.write((json.dumps(manifest, indent=2) + "\n").encode())
    for old in sorted(folder.glob(PATTERN))[:-keep]:
        if old != path:
            old.unlink()
    return path


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    """The newest checkpoint in ``folder``, verified; :class:`CheckpointError` if it is not sound."""
    folder = Path(folder)
    manifest_path = folder / LATEST
    if not manifest_path.is_file():
        raise CheckpointError(f"no checkpoint in {folder} ({LATEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        path, expected = folder / manifest["file"], manifest["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is corrupt ({error})") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} named by {manifest_path} is missing{_others(folder, path)}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or partial (its SHA-256 does not match {LATEST}){_others(folder, path)}"
        )
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as error:  # unreadable despite the hash: written by something else
        raise CheckpointError(f"checkpoint {path} cannot be read: {error}") from error


def _others(folder: Path, bad: Path) -> str:
    others = [p.name for p in sorted(folder.glob(PATTERN)) if p != bad]
    return f"; earlier checkpoints still there: {', '.join(others)}" if others else ""


# -- sharded models ----------------------------------------------------------------------
def save_sharded_checkpoint(
    folder: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write the checkpoint of ``step`` of a sharded ``model`` (and ``optimizer``) on every rank.

    Each rank writes the blocks it holds (``torch.distributed.checkpoint``;
    no rank gathers the model) and its own ``state``, plain data such as a
    trainer's ``state_dict()`` and :func:`rng_state`. Every rank must call
    it, with the same ``folder`` on a file system they share. The ``keep``
    newest checkpoints stay.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    folder, rank = Path(folder), dist.get_rank()
    final, temporary = folder / f"checkpoint-{int(step):08d}", folder / f".checkpoint-{int(step):08d}.tmp"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    own = io.BytesIO()
    torch.save(state or {}, own)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state, "ranks": {str(rank): own.getvalue()}},
        checkpoint_id=temporary,
    )
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        _sync_folder(folder)
        manifest = {"file": final.name, "step": int(step), "ranks": dist.get_world_size()}
        with _atomic_file(folder / LATEST) as file:
            file.write((json.dumps(manifest, indent=2) + "\n").encode())
        for old in sorted(folder.glob(SHARDED_PATTERN))[:-keep]:
            if old != final:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_sharded_checkpoint(
    folder: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load the newest sharded checkpoint in ``folder`` into ``model`` (and ``optimizer``) on every rank;
    return this rank's own state. The model must be sharded as when it was saved, on as many ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder, rank = Path(folder), dist.get_rank()
    try:
        manifest = json.loads((folder / LATEST).read_text(encoding="utf-8"))
        path, ranks = folder / manifest["file"], int(manifest["ranks"])
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {folder} ({LATEST} is missing)") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{folder / LATEST} is corrupt ({error})") from None
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path} named by {folder / LATEST} is missing or partial")
    if ranks != dist.get_world_size():
        raise CheckpointError(
            f"checkpoint {path} was written by {ranks} ranks; load it on as many (this run has {dist.get_world_size()})"
        )
    model_state, optimizer_state = get_state_dict(model, [] if optimizer is None else [optimizer])
    saved = {"model": model_state, "optimizer": optimizer_state, "ranks": {str(rank): b""}}
    dcp.load(saved, checkpoint_id=path)
    set_state_dict(
        model, [] if optimizer is None else [optimizer],
        model_state_dict=saved["model"], optim_state_dict=saved["optimizer"],
    )  # fmt: skip
    return torch.load(io.BytesIO(saved["ranks"][str(rank)]), weights_only=True)


# -- random state ----------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global random state of torch (CPU and CUDA), NumPy and Python, as plain data."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))


# -- files ----------------------------------------------------------------------------
@contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` that replaces ``path`` only once fully written and synced."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _Hashing:
    """A write-only file that hashes what passes through it (one pass: no reading back)."""

    def __init__(self, file: IO[bytes], digest: Any) -> None:
        self.file, self.digest = file, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()
