"""One teleport ascent step and the basis, each relative to one SGD step, for every zoo model.

The same run as `teleport bench step_cost`; writes benchmarks/results/step_cost.json and
docs/figures/bench_step_cost.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("step_cost", Path(__file__).resolve().parent.parent))
