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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

LATEST = "latest.json"
PATTERN = "checkpoint-*.pt"


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
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
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
