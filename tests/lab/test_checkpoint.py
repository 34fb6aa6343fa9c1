"""Checkpoints: atomic, verified, and a killed training run resumes to the same weights."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torch_teleport.lab.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torch_teleport.lab.cli import main


def state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": [1.5, None], "step": seed}


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_keeps_the_newest_and_one_before(tmp_path):
    for step in range(1, 5):
        save_checkpoint(tmp_path, state(step), step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt", "latest.json"]
    assert_same(load_checkpoint(tmp_path), state(4))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "empty"])
def test_corrupt_checkpoint_is_a_clear_error_naming_it(tmp_path, damage):
    save_checkpoint(tmp_path, state(1), 1)
    path = save_checkpoint(tmp_path, state(2), 2)
    data = bytearray(path.read_bytes())
    if damage == "flip a byte":
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data[: len(data) // 3]) if damage == "truncate" else b"" if damage == "empty" else bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint-00000002.pt is corrupt or partial.*checkpoint-00000001.pt"):
        load_checkpoint(tmp_path)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, state(1), 1)
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="latest.json is corrupt"):
        load_checkpoint(tmp_path)


def test_a_failed_save_leaves_the_last_good_checkpoint_alone(tmp_path):
    save_checkpoint(tmp_path, state(1), 1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    unpicklable = {**state(2), "callback": lambda: None}
    with pytest.raises(Exception, match="pickle|lambda"):
        save_checkpoint(tmp_path, unpicklable, 1)  # the same step: it would replace the good file
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
    assert_same(load_checkpoint(tmp_path), state(1))


class Sneaky:
    """Unpickling it would run a shell command."""

    def __reduce__(self):
        return (os.system, ("echo unpickled > sneaky.txt",))


def test_checkpoints_cannot_run_code(tmp_path):
    save_checkpoint(tmp_path, {"payload": Sneaky()}, 1)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert not Path("sneaky.txt").exists()


def test_random_state_round_trip():
    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_rng_state(saved)
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


# -- a real training run, killed and resumed ------------------------------------------------
CONFIG = """
kind = "train"
threads = 1
[model]
name = "mlp"
options = { input_dim = 64, hidden = [32, 32], output_dim = 10 }
[dataset]
name = "digits"
[training]
epochs = 5
batch_size = 32
seeds = [0]
with_teleport = [true]
target_loss = 0.5
optimizers = [{ name = "momentum", lr = 0.05 }]
[teleport]
lr = 0.01
steps = 3
batch_size = 16
[teleport.schedule]
# Teleports every 10 steps, 2 batches each: the kill falls in the middle of a pass over the
# teleport data, which the resumed run must replay to the same place.
name = "every"
options = { every = 10, batches = 2 }
"""


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints")["run"]


@pytest.mark.slow  # spawns processes
def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    killed = tmp_path / "killed"
    teleport = Path(sys.executable).parent / "teleport"
    process = subprocess.Popen(
        [str(teleport), "run", str(config), "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "latest.json").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert final_state(killed)["trainer"]["epoch"] < 5, "killed too late to prove anything"

    assert main(["run", "--resume", str(killed)]) == 0
    assert main(["run", str(config), "--out", str(tmp_path / "whole")]) == 0

    resumed, whole = final_state(killed), final_state(tmp_path / "whole")
    assert resumed["trainer"]["epoch"] == whole["trainer"]["epoch"] == 5
    difference = max(float((resumed["model"][k] - whole["model"][k]).abs().max()) for k in whole["model"])
    assert difference == 0.0
    assert_same(resumed["history"]["train_loss"], whole["history"]["train_loss"])
    assert resumed["history"]["teleports"] == [
        {**t, "seconds": r["seconds"]} for t, r in zip(whole["history"]["teleports"], resumed["history"]["teleports"], strict=True)
    ]


def test_resume_from_a_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(CONFIG)
    save_checkpoint(run_dir / "checkpoints", state(1), 1)
    good = save_checkpoint(run_dir / "checkpoints", state(2), 2)
    good.write_bytes(good.read_bytes()[:100])
    assert main(["run", "--resume", str(run_dir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("teleport: error: checkpoint") and "corrupt or partial" in error
    assert error.count("\n") == 1
    assert main(["run", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
