"""The sharding benchmark at a tiny size, on 1 and 2 ranks: it runs, and each rank holds half the model.

Nothing here looks at how long anything took or how much memory it needed:
those are the benchmark's output, never a test's condition.
"""

from __future__ import annotations

import json

import pytest

from torch_teleport.lab.benchmarks.sharded import main


@pytest.mark.slow  # spawns processes
def test_the_parameter_blocks_of_two_ranks_split_the_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    main(["--size", "tiny", "--ranks", "1", "2", "--out", str(tmp_path / "sharded.json")])
    data = json.loads((tmp_path / "sharded.json").read_text())
    whole = data["results"]["1"]["ranks"][0]
    halves = data["results"]["2"]["ranks"]
    assert sum(row["parameter_bytes"] for row in halves) == whole["parameter_bytes"] == 4 * whole["parameters"]
    assert all(row["parameter_bytes"] <= 0.6 * whole["parameter_bytes"] for row in halves)
    for row in (whole, *halves):
        assert row["teleport_steps"] == [2, 2] and all(change < 1e-4 for change in row["loss_change"])
    assert capsys.readouterr().out.startswith("| ranks | parameters per rank (MiB)")
