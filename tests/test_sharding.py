"""Multi-device correctness: the tests in ``tests/multidevice``, on 8 simulated CPU devices.

The device count is fixed when jax starts, and this process (conftest.py) has started it
with one device, so those tests run in their own pytest process; its output, failures
and tracebacks included, is this test's failure message. Run them by hand with

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_multidevice_tests_pass_on_8_devices():
    # LLVM optimisations off: compiling is most of the run's time.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
    )
    proc = subprocess.run(
        # -n 0: one process (pyproject's -n auto already spreads the outer run).
        [sys.executable, "-m", "pytest", "tests/multidevice", "-q", "-n", "0"]
        + ["-p", "no:cacheprovider"]
        + ["--tb=short", "-rfEs"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    output = (proc.stdout + proc.stderr).strip()
    summary = output.splitlines()[-1] if output else "no output"
    # Every test passed, and there were some: none failed, skipped or deselected.
    if proc.returncode == 0 and re.fullmatch(r"\d+ passed in .*", summary):
        return
    # The tail ends with the names of the failed tests (pytest's short summary).
    pytest.fail(
        f"tests/multidevice on 8 devices (exit status {proc.returncode}): {summary}\n\n"
        f"{output[-30000:]}",
        pytrace=False,
    )
