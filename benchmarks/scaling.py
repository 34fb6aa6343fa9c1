"""Time of one teleport, null-space against symmetry teleport, as t, d, n, l and b vary
(paper Fig. 5).

The same run as `teleport bench scaling`; writes benchmarks/results/scaling.json and
docs/figures/bench_scaling.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("scaling", Path(__file__).resolve().parent.parent))
