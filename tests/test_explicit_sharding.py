"""Every public transformation on a tree of differently sharded leaves, under ``jax.jit``
on meshes with explicit and with automatic axes (8 simulated CPU devices).

The cases are pytest tests in ``tests/_explicit_sharding_cases.py`` (its docstring says
what they compare). They need 8 devices and this process has one, so pytest runs them
in a subprocess; each case below reports its case's outcome there, failure message
included.
"""

import inspect
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from _explicit_sharding_cases import MESHES, TRANSFORMS

import gradclip_jax

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "_explicit_sharding_cases.py"
TEST = "test_matches_single_device_and_keeps_shardings"
IDS = [f"{mesh}-{name}" for mesh in MESHES for name in sorted(TRANSFORMS)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, str]:
    """``{case id: "passed" | failure message}`` of the subprocess's pytest run."""
    report = tmp_path_factory.mktemp("explicit_sharding") / "report.xml"
    # LLVM optimisations off: compiling is most of this run's time.
    flags = " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + flags).strip(),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        # -n 0: one process (pyproject's -n auto already spreads the outer run).
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-n", "0", "-p", "no:cacheprovider"]
        + ["--tb=short", f"--junitxml={report}"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
        check=False,
    )
    if not report.is_file():
        pytest.fail(
            f"the 8-device pytest run wrote no report (exit status {proc.returncode}).\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    found = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = case.get("name", "")
        problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
        found[name.removeprefix(f"{TEST}[").removesuffix("]")] = (
            "passed"
            if not problems
            else "\n".join(f"{p.tag}: {p.get('message')}\n{p.text or ''}" for p in problems)
        )
    return found


@pytest.mark.slow
@pytest.mark.parametrize("case", IDS)
def test_case(outcomes, case):
    assert case in outcomes, f"the 8-device run did not report {case}: {sorted(outcomes)}"
    if outcomes[case] != "passed":
        pytest.fail(outcomes[case], pytrace=False)


def test_every_public_transformation_is_a_case():
    public = {
        name
        for name in gradclip_jax.__all__
        if inspect.isfunction(obj := getattr(gradclip_jax, name))
        and "GradientTransformation" in str(inspect.signature(obj).return_annotation)
    }
    assert public, "found no public transformation"
    assert public <= set(TRANSFORMS), f"not checked: {sorted(public - set(TRANSFORMS))}"
