"""Studies of sharpness, curvature and teleport (Zhao, Gower, Walters, Yu, ICLR 2024) as experiment kinds.

Each module registers one experiment kind, run as ``teleport run
configs/study_<name>.toml``; each writes ``table.md``, ``results.json`` and
PNG figures into the run folder. ``common`` holds what they share.
"""
