"""The lab: the ``teleport`` command, configs, the experiment runner, checkpoints, the model zoo,
datasets, the train experiment, studies and benchmarks.

Its models, datasets and experiments reach the registry through this distribution's entry points
(``pyproject.toml``), as a third party's would; the library never imports it.
"""
