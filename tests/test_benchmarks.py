"""The benchmark harness: ``python -m benchmarks --quick`` writes well-formed, complete files.

The quick run uses tiny trees and one or two rounds, so its numbers mean nothing; what is
tested is that every figure still runs and reports, and that every row's status follows
from its ratio and target. The fast tests check the ratio statistics and the row logic.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURES = ["optax", "rules", "guards", "chain_adam", "floor", "bounds", "torch"]


@pytest.fixture
def suite(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("benchmarks.suite")


def _strict_json(text: str) -> dict:
    def reject(constant: str):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO,
        # LLVM optimisations off (the quick run's numbers mean nothing): 29 -> 24 s.
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


def _check_row(row: dict) -> None:
    assert row["metric"] in ("run", "compile", "memory"), row
    if row["metric"] != "memory":  # times: positive, ratio inside its quartiles
        assert row["ours_value"] > 0 and row["ref_value"] > 0, row
        assert row["q1"] <= row["ratio"] <= row["q3"], row
    if row["target"] is None:
        assert row["status"] == "no target", row
    elif row["ratio"] is None:
        assert row["status"] == "not measured", row
    else:
        assert row["status"] == ("met" if row["ratio"] <= row["target"] else "missed"), row


@pytest.mark.slow
def test_quick_run_writes_strict_json_with_every_figure(quick_run, suite):
    out, stdout = quick_run
    results = _strict_json((out / "cpu.json").read_text())
    meta = results["meta"]
    assert meta["mode"] == "quick" and meta["device"] == "cpu" and meta["platform"] == "cpu"
    assert meta["cpu_count"] >= 1 and meta["date"] and meta["command"].endswith(str(out))
    assert all(meta["versions"][k] for k in ("jax", "jaxlib", "optax", "gradclip_jax"))
    assert meta["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", meta["git_commit"])
    assert list(results["figures"]) == FIGURES == list(suite.FIGURES)
    trees = len(suite.QUICK.trees)
    for name, figure in results["figures"].items():
        if figure["skipped"]:
            assert name == "torch" and importlib.util.find_spec("torch") is None, figure
            assert "torch" in figure["skipped"] and figure["rows"] == []
            continue
        # Every pair on every tree (small-only pairs: on the small ones), each row consistent.
        pairs = suite.FIGURES[name][1]
        small = sum(t.many_small for t in suite.QUICK.trees)
        assert len(figure["rows"]) == sum(small if p.small_only else trees for p in pairs), name
        for row in figure["rows"]:
            _check_row(row)
        assert f"{name}: " in stdout
    for tree, entries in results["measured"]["jax"].items():
        for entry in entries.values():
            assert len(entry["run_s"]) == suite.QUICK.rounds and entry["compile_s"], tree
            assert entry["peak_bytes"] > 0, tree


@pytest.mark.slow
def test_quick_run_writes_markdown_and_png(quick_run):
    out, _ = quick_run
    text = (out / "cpu.md").read_text()
    assert text.startswith("# gradclip_jax benchmarks: cpu (quick run)")
    results = _strict_json((out / "cpu.json").read_text())
    for i, name in enumerate(results["figures"], 1):
        assert re.search(rf"^## {i}\. .*\(`{name}`\)$", text, re.M), name
    table_rows = [
        line for line in text.splitlines() if re.match(r"\| (run|compile|memory) \|", line)
    ]
    assert len(table_rows) == sum(len(f["rows"]) for f in results["figures"].values())
    assert "| metric | tree | ours | reference |" in text
    png = (out / "cpu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_ratio_stats_are_per_round():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.measure import ratio_stats
    finally:
        sys.path.remove(str(REPO))
    # Per-round ratios 2, 2, 3 (not the ratio of medians, 4 / 2).
    assert ratio_stats([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == {"ratio": 2.0, "q1": 2.0, "q3": 2.5}
    assert ratio_stats([1.0], [0.0]) == {"ratio": None, "q1": None, "q3": None}


def test_rows_judge_the_ratio_against_the_target(suite):
    small, big = suite.Tree(500, (32, 32), True), suite.Tree(10, (4, 4), False)
    pairs = suite.FIGURES["optax"][1][:1] + suite.FIGURES["chain_adam"][1]
    fast, slow = {"run_s": [1.0, 1.0, 1.0]}, {"run_s": [2.0, 2.0, 2.0]}
    measured = {
        small.name: {"clip_by_global_norm": fast, "optax.clip_by_global_norm": slow},
        big.name: {"clip_by_global_norm": slow, "optax.clip_by_global_norm": fast},
    }
    rows = suite.figure_rows(pairs, (small, big), measured)
    # The chain pairs are not measured here, so they have no rows.
    assert [(r["tree"], r["ratio"], r["target"], r["status"]) for r in rows] == [
        (small.name, 0.5, 0.9, "met"),
        (big.name, 2.0, 1.0, "missed"),
    ]


@pytest.mark.slow
def test_torch_side_times_the_plain_and_donated_paths(suite, monkeypatch):
    """Without torch, a stand-in for clip_grad_norm_: our two paths are still exercised."""
    torch_side = importlib.import_module("benchmarks.torch_side")
    monkeypatch.setattr(torch_side, "_torch_call", lambda host: lambda: None)
    tree = suite.QUICK.trees[0]
    measured = {tree.name: torch_side.measure_tree(tree, suite.QUICK)}
    rows = suite.figure_rows(suite.FIGURES["torch"][1], (tree,), measured)
    assert [(r["ours"], r["ref"]) for r in rows] == [
        (suite.CLIP, suite.TORCH),
        (suite.DONATED, suite.TORCH),
    ]
    assert all(r["ours_value"] > 0 and r["ratio"] > 0 for r in rows)
