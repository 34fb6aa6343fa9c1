"""Hypothesis profiles (``ci``, the default for ``make test``, and ``dev``) and one torch thread."""

import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile("ci")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread, as `make test` sets: the suite's models are tiny, and on a shared
    2-core machine a second thread's idle waits cost them far more than it gains (results do
    not depend on it)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def transformers_unloaded():
    """These tests check that nothing here imports ``transformers``; other test modules of the same
    run may have loaded it (``test_real_models``; ``pytorch_lightning`` through ``torchmetrics``
    when the ``models`` extra is installed), so it leaves ``sys.modules`` while they run."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in sys.modules if n == "transformers" or n.startswith("transformers.")]:
            patch.delitem(sys.modules, name)
        yield
