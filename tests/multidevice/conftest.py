"""Tests that need 8 devices, run in a process whose jax started with 8 CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice

``tests/test_sharding.py`` runs this folder so, in a subprocess. The device count is
fixed when jax starts, so in any other process (the main test run, on one device) this
folder is left out of collection; asked for by name there, its tests fail and say what
to set.
"""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from _cases import DEVICES, Outcomes, clippers, run_together, scan_all, stacked_steps, tree_of

HERE = Path(__file__).resolve().parent


def _asked_for(config: pytest.Config) -> bool:
    for arg in config.args:
        path = Path(config.invocation_params.dir, arg.split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if jax.device_count() != DEVICES and not _asked_for(config):
        return True
    return None


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    if jax.device_count() != DEVICES:
        pytest.fail(
            f"these tests need {DEVICES} devices and jax has {jax.device_count()}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} before jax starts "
            "(tests/test_sharding.py runs them so)"
        )


@pytest.fixture(scope="session")
def reference() -> Outcomes:
    """Every clipper run on one device over the steps: what every suite must reproduce."""
    steps, params = jax.device_put(stacked_steps()), tree_of(0)
    return run_together(
        clippers(), scan_all, lambda run: jax.jit(run)(steps, params), steps, params
    )
