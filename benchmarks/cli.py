"""Command line: run each comparison in its own process, then write JSON, markdown and PNG."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from benchmarks import figures, goals, report
from benchmarks._child import COMPARISONS
from benchmarks._config import FULL, QUICK
from benchmarks._jsonsafe import finite

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"
# --device -> JAX_PLATFORMS of the child processes.
PLATFORMS = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Side-by-side benchmarks of gradclip_jax against optax and PyTorch.",
    )
    parser.add_argument("--device", choices=sorted(PLATFORMS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1-2 repeats (CI)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--only", nargs="+", choices=list(COMPARISONS), help="run only these comparisons"
    )
    parser.add_argument(
        "--compile-cap",
        type=float,
        help="seconds: skip non-headline clippers whose predicted compile is longer "
        f"(default {FULL.compile_cap_s:g}; 'inf' measures everything)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="measure nothing: rebuild the goals, markdown and PNG from a results JSON",
    )
    parser.add_argument(
        "--torch-python",
        default=sys.executable,
        help="interpreter for the PyTorch comparison (an environment with torch, jax, "
        "optax and gradclip_jax); default: this one",
    )
    return parser.parse_args(argv)


def _run_child(name: str, python: str, cfg_path: Path, out: Path, env: dict[str, str]):
    """Runs one comparison; streams its progress; returns its result or the error."""
    start = time.perf_counter()
    command = [python, "-m", "benchmarks._child", name, str(cfg_path), str(out)]
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())
    if process.returncode != 0:
        return {"error": f"exit status {process.returncode}: " + "\n".join(tail)}
    with open(out) as f:
        result = json.load(f)
    result["process_wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        return _write(results, args.out / results["meta"]["device"])
    cfg = QUICK if args.quick else FULL
    if args.compile_cap is not None:
        cfg = dataclasses.replace(cfg, compile_cap_s=args.compile_cap)
    env = dict(os.environ, JAX_PLATFORMS=PLATFORMS[args.device])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    comparisons: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.json"
        cfg_path.write_text(json.dumps(cfg.to_json()))
        for name in args.only or list(COMPARISONS):
            python = args.torch_python if name == "torch" else sys.executable
            if python == sys.executable and name == "torch" and not _has_torch():
                comparisons[name] = {"skipped": "torch is not installed (see --torch-python)"}
                continue
            print(f"[bench] === {name} ===", file=sys.stderr, flush=True)
            comparisons[name] = _run_child(name, python, cfg_path, Path(tmp) / name, env)
    results = {
        "meta": {
            "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": args.device,
            "mode": "quick" if args.quick else "full",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - started,
            "config": cfg.to_json(),
            "git": _git_state(),
            "env": next((c["env"] for c in comparisons.values() if "env" in c), None),
        },
        "comparisons": comparisons,
    }
    return _write(results, args.out / args.device)


def _write(results: dict[str, Any], stem: Path) -> int:
    """Judges the goals, writes ``stem``.json / .md / .png; non-zero if a comparison failed."""
    results["figures"] = figures.figures(results)
    results["goals"] = goals.evaluate(results)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(finite(results), indent=1, allow_nan=False))
    stem.with_suffix(".md").write_text(report.markdown(results))
    plotted = report.plot(results, stem.with_suffix(".png"))
    written = [stem.with_suffix(s) for s in (".json", ".md")] + ([plotted] if plotted else [])
    print("[bench] wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    print(report.goals_table(results["goals"]))
    failed = [name for name, c in results["comparisons"].items() if "error" in c]
    if failed:
        print(f"[bench] comparisons that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _git_state() -> dict[str, Any] | None:
    """The commit measured, and whether the library had uncommitted changes."""

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return {"commit": commit, "library_dirty": bool(git("status", "--porcelain", "gradclip_jax"))}
