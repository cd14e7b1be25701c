"""Multi-device correctness on 8 simulated CPU devices.

The device count is fixed when jax starts, and this process (conftest.py) has started it
with one device, so the checks run in a subprocess: ``tests/_sharding_checks.py``, whose
docstring lists what each check compares. Each suite below fails with every failing
check's message and traceback. ``examples/data_parallel.py`` runs too: it trains with
both data-parallel patterns and exits non-zero when they disagree.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = [
    "jit_fsdp",
    "jit_tensor",
    "shard_map_pmean",
    "shard_map_scatter",
    "pmap_scatter",
    "shard_map_dp",
]
# Every clipper of the library, checked under jax.jit on both meshes.
CLIPPERS = {
    "clip_by_value",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_block_rms",
    "agc",
    "adaptive_clip",
    "adaptive_clip_leaf",
    "autoclip",
    "zclip",
    "adagc",
    "quantile_clip",
    "skip_on_spike",
    "on_nonfinite",
}
# The ones with an axis_name, checked with it under shard_map on split gradients.
WITH_AXIS_NAME = CLIPPERS - {"agc"}


def _run(args, timeout):
    # LLVM optimisations off: compiling is most of these runs' time.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


@pytest.fixture(scope="module")
def results():
    proc = _run([str(ROOT / "tests" / "_sharding_checks.py")], timeout=900)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(
            f"tests/_sharding_checks.py did not report (exit status {proc.returncode}).\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )


@pytest.mark.parametrize("suite", SUITES)
def test_suite(results, suite):
    checks = {k: v for k, v in results.items() if k == suite or k.startswith(f"{suite}/")}
    assert checks, f"suite {suite} reported no check: {sorted(results)}"
    failed = {k: v for k, v in checks.items() if v != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{message}" for name, message in failed.items())


def test_every_clipper_is_checked(results):
    for suite, expected in (
        ("jit_fsdp", CLIPPERS),
        ("jit_tensor", CLIPPERS),
        ("shard_map_scatter", WITH_AXIS_NAME),
    ):
        checked = {k.split("/", 1)[1] for k in results if k.startswith(f"{suite}/")}
        assert expected <= checked, f"{suite} misses {sorted(expected - checked)}"


def test_data_parallel_example_patterns_agree():
    proc = _run([str(ROOT / "examples" / "data_parallel.py"), "--steps", "40"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "devices: 8" in proc.stdout
    assert "max |parameter difference| between the two patterns" in proc.stdout
