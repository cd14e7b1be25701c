"""Every public transformation still gives the numbers recorded in tests/golden/golden.npz.

The generator runs on 8 simulated CPU devices (it has sharded trees), so it runs in its
own process; see tests/golden/generate.py for what is recorded.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GENERATOR = Path(__file__).resolve().parent / "golden" / "generate.py"


@pytest.mark.slow
def test_every_transformation_matches_the_golden_file():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--compare"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "0 mismatches" in proc.stdout
