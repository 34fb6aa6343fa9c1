"""Wall-clock and epochs to a fixed train loss, with and without teleport, per optimizer and
zoo model.

The same run as `teleport bench time_to_target`; writes benchmarks/results/time_to_target.json and
docs/figures/bench_time_to_target.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("time_to_target", Path(__file__).resolve().parent.parent))
