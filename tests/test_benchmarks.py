"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` writes well-formed files.

The quick run uses tiny trees and one or two repeats, so its numbers mean nothing; what
is tested is that every comparison still runs and reports, so the suite never rots.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURES = ("1_compile", "2_run", "3_chain_adam", "4_throughput", "5_torch", "6_memory")
STATUSES = {"met", "missed", "not measured"}


def _strict_json(text: str) -> dict:
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


@pytest.mark.slow
def test_quick_run_writes_json_with_every_figure(quick_run):
    out, _ = quick_run
    results = _strict_json((out / "cpu.json").read_text())
    meta = results["meta"]
    assert meta["mode"] == "quick" and meta["device"] == "cpu"
    assert meta["env"]["platform"] == "cpu" and meta["env"]["cpu_count"] >= 1
    assert set(results["figures"]) == set(FIGURES)
    for name in FIGURES:
        figure = results["figures"][name]
        if name == "5_torch" and importlib.util.find_spec("torch") is None:
            assert "torch" in figure["skipped"]
            continue
        assert figure["skipped"] is None, (name, figure["skipped"])
        assert figure["rows"], name
        assert figure["sizes"], name
        env = figure["env"]
        assert {"device_kind", "platform", "cpu_count", "jax", "optax"} <= set(env)


@pytest.mark.slow
def test_quick_run_judges_every_goal(quick_run):
    out, stdout = quick_run
    goals = _strict_json((out / "cpu.json").read_text())["goals"]
    ids = {g["id"] for g in goals}
    assert {"compile_global_norm", "run_leaves_clip_by_global_norm", "norm_throughput"} <= ids
    assert {"chain_adam", "run_size_agc"} <= ids
    for goal in goals:
        assert goal["status"] in STATUSES, goal
        if goal["status"] != "met":
            assert goal["diagnosis"], goal
    measured = [g for g in goals if g["id"] in ("compile_global_norm", "chain_adam")]
    assert all(g["value"] is not None for g in measured)
    assert "| goal |" in stdout


@pytest.mark.slow
def test_quick_run_writes_markdown_and_png(quick_run):
    out, _ = quick_run
    text = (out / "cpu.md").read_text()
    assert text.startswith("# gradclip_jax benchmarks: cpu (quick run)")
    for heading in ("## Goals", "### Diagnoses", "## 1. Compile time", "## 6. Memory"):
        assert heading in text
    if importlib.util.find_spec("matplotlib") is not None:
        png = (out / "cpu.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_hlo_facts_count_kernels_and_bytes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import jax
    import jax.numpy as jnp

    from benchmarks._hlo import hlo_facts

    x = jnp.ones((256, 256), jnp.float32)
    compiled = jax.jit(lambda x: (jnp.sum(x * x), x * 2)).lower(x).compile()
    facts = hlo_facts(compiled)
    assert facts["fusion"] >= 1 and facts["reduce"] >= 1
    assert facts["conditional"] == 0 and facts["branch_bytes"] == 0
    # One read for the sum, one read and one write for the product.
    assert 2.9 <= facts["entry_bytes"] / x.nbytes <= 3.2
