"""Benchmarks of null-space teleport against the optimizer step and the baseline methods.

Each module registers one experiment kind ``bench.<name>``, run as
``teleport bench <name>`` or ``python benchmarks/<name>.py``; each writes
``<name>.json`` (medians over repeats after warm-up, the machine, the
settings) and ``bench_<name>.png``. ``common`` holds what they share.
Timing ratios are always taken against a baseline measured in the same
process, interleaved with the subject so that load on the machine hits both.
"""
