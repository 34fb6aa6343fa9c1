"""Input energy captured by the top singular vectors per layer; loss and gradient norm during
teleport for several tau (paper Fig. 6).

The same run as `teleport bench error_control`; writes benchmarks/results/error_control.json and
docs/figures/bench_error_control.png. Options: `--set KEY=VALUE` (e.g. `--set size=tiny`).
"""

from pathlib import Path

from torch_teleport.plugins.benchmarks.common import script_main

if __name__ == "__main__":
    raise SystemExit(script_main("error_control", Path(__file__).resolve().parent.parent))
