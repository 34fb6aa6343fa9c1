"""The structured and the full gradient path of null-space teleport at tau < 1, for every zoo model.

The same run as `teleport bench gradient_paths`; writes benchmarks/results/gradient_paths.json and
docs/figures/bench_gradient_paths.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("gradient_paths", Path(__file__).resolve().parent.parent))
