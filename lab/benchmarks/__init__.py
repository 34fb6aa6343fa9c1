"""Benchmarks of null-space teleport against the optimizer step and the baseline methods.

Each registered module provides one experiment kind ``bench.<name>``, run as
``teleport bench <name>`` or ``python -m torch_teleport.lab.benchmarks.<name>``; each writes
``<name>.json`` (medians over repeats after warm-up, the machine, the
settings) and ``bench_<name>.png``. ``common`` holds what they share.
Timing ratios are always taken against a baseline measured in the same
process, interleaved with the subject so that load on the machine hits both.
The standalone scripts (``data_level_set``, ``memory``, ``model_coverage``,
``projector_invariance``) run as ``python -m
torch_teleport.lab.benchmarks.<name>``; all write into ``results/``.
"""
