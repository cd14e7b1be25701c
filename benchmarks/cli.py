"""``python -m benchmarks``: measure, then write ``<out>/<device>.json``, ``.md`` and ``.png``."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from benchmarks import report, suite, torch_side

REPO = Path(__file__).resolve().parent.parent
PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}  # --device -> jax_platforms


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny trees, 1-2 rounds")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--only", nargs="+", choices=list(suite.FIGURES), help="these figures")
    parser.add_argument("--device", choices=list(PLATFORMS), help="default: JAX's backend")
    parser.add_argument(
        "--max-leaves", type=int, help="skip trees with more leaves (their compiles take minutes)"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    return next((d.version for d in metadata.distributions(name=package)), None)


def _meta(device: str, cfg: suite.Config, argv: list[str], quick: bool) -> dict[str, Any]:
    dev = jax.devices()[0]
    packages = ("jax", "jaxlib", "optax", "numpy", "gradclip_jax", "torch")
    return {
        "device": device,
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}",
        "versions": {"python": platform.python_version()} | {p: _version(p) for p in packages},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "gradclip_jax", "benchmarks/*.py")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if quick else "full",
        "command": " ".join(["python -m benchmarks", *argv]),
        "config": asdict(cfg),
    }


def measure(cfg: suite.Config, figures: list[str]) -> dict[str, Any]:
    """Tree by tree: every transformation the figures name, then PyTorch (if it runs)."""
    pairs = [p for f in figures if f != "torch" for p in suite.FIGURES[f][1]]
    names = list(dict.fromkeys(n for p in pairs for n in (p.ours, p.ref)))
    skip = torch_side.skip_reason() if "torch" in figures else "not asked for"
    measured: dict[str, Any] = {"jax": {}, "torch": {}, "torch_skipped": skip}
    for tree in cfg.trees:
        start = time.perf_counter()
        if names:
            measured["jax"][tree.name] = suite.measure_tree(tree, names, cfg)
        if skip is None:
            measured["torch"][tree.name] = torch_side.measure_tree(tree, cfg)
        log(f"tree {tree.name}: {time.perf_counter() - start:.1f} s")
    return measured


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device:
        jax.config.update("jax_platforms", PLATFORMS[args.device])
    # A persistent cache would turn compile measurements into cache reads.
    jax.config.update("jax_enable_compilation_cache", False)
    backend = jax.default_backend()
    device = args.device or ("gpu" if backend in ("gpu", "cuda", "rocm") else backend)
    cfg = suite.QUICK if args.quick else suite.FULL
    if args.max_leaves is not None:
        trees = tuple(t for t in cfg.trees if t.n_leaves <= args.max_leaves)
        cfg = dataclasses.replace(cfg, trees=trees)
    figures = args.only or list(suite.FIGURES)
    started = time.perf_counter()
    measured = measure(cfg, figures)
    results: dict[str, Any] = {"meta": _meta(device, cfg, argv, args.quick), "figures": {}}
    results["meta"]["wall_s"] = time.perf_counter() - started
    for name in figures:
        title, pairs = suite.FIGURES[name]
        skipped = measured["torch_skipped"] if name == "torch" else None
        rows = suite.figure_rows(pairs, cfg.trees, measured["torch" if name == "torch" else "jax"])
        results["figures"][name] = {"title": title, "skipped": skipped, "rows": rows}
    results["measured"] = measured
    stem = args.out / device
    args.out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: strict JSON (every ratio is of positive finite times or None).
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, allow_nan=False))
    stem.with_suffix(".md").write_text(report.markdown(results))
    report.plot(results, stem.with_suffix(".png"))
    log(f"wrote {stem}.json, .md, .png in {time.perf_counter() - started:.0f} s")
    print(report.summary(results))
    return 0
