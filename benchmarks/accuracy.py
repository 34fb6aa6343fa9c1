"""Loss drift and gradient-norm gain after 1..T steps, null-space (several tau) against symmetry and
level-set teleport (paper Fig. 1).

The same run as `teleport bench accuracy`; writes benchmarks/results/accuracy.json and
docs/figures/bench_accuracy.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("accuracy", Path(__file__).resolve().parent.parent))
