"""``teleport run`` under ``torchrun``: rank 0 alone writes and prints, and the replicas stay identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEADLINE_SECONDS

from torch_teleport.lab.launch import free_port

TORCHRUN_CONFIG = """
kind = "train"
threads = 1
[model]
name = "mlp"
options = { input_dim = 64, hidden = [32, 32], output_dim = 10 }
[dataset]
name = "digits"
[training]
epochs = 2
batch_size = 16
seeds = [0]
with_teleport = [true]
target_loss = 1.0
optimizers = [{ name = "momentum", lr = 0.05 }]
[teleport]
lr = 0.01
steps = 3
batch_size = 8
[teleport.schedule]
name = "every"
options = { every = 15 }
[distributed]
verify = true
"""


@pytest.mark.slow  # spawns processes
def test_teleport_run_under_torchrun_logs_once_and_keeps_replicas_identical(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(TORCHRUN_CONFIG)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()), "--no-python", str(Path(sys.executable).parent / "teleport"),
        "run", str(config), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=DEADLINE_SECONDS)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints: one table, one closing line (verify=true found no divergence).
    assert done.stdout.count("outputs in") == 1 and done.stdout.count("| momentum | yes |") == 1
    results = json.loads((out / "results.json").read_text())["runs"][0]
    # Each rank trains on half of the 1438 digits: 45 steps per epoch, a teleport every 15 steps.
    assert len(results["teleports"]) == 6
    assert all(t["loss_change"] < 1e-5 for t in results["teleports"])
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["momentum-teleport-seed0"]
