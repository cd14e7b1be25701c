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
    # LLVM optimisations off: the run is mostly compiling (about 170 s at the default
    # level, 110 s without, on 2 CPUs). The numbers agree with those of the default level
    # to far within the comparison's tolerance (2e-6 of each array's largest entry); the
    # file is about what the library computes, not about XLA's code generation, which
    # the other tests run at the default level.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--compare"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "0 mismatches" in proc.stdout
