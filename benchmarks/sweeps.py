"""Figures 1, 2 and 6: compile time, run time and memory of one jitted update, vs tree shape.

Two comparisons (one process each): ``leaf_sweep`` (n leaves of 1,000 float32) and
``size_sweep`` (10 equal leaves, 1 M to 50 M float32). For each tree every clipper is
lowered and compiled from a fresh function, then the compiled updates run side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from benchmarks import _clippers
from benchmarks._clippers import Clipper
from benchmarks._config import Config
from benchmarks._hlo import hlo_facts
from benchmarks._measure import (
    compile_fresh,
    device_tree,
    leaf_shape,
    log,
    memory_facts,
    paired_ratio,
    ratio_stats,
    shape_tree,
    state_bytes,
    time_interleaved,
    tree_bytes,
)
from benchmarks._names import GLOBAL, is_adaptive, ratio_key


def _update_fn(clipper: Clipper) -> tuple[Callable[..., Any], Any]:
    """A never-jitted update function of a fresh transformation, and that transformation."""
    tx = clipper.factory()
    if clipper.needs_params:

        def update(updates, state, params):
            return tx.update(updates, state, params)

    else:

        def update(updates, state):
            return tx.update(updates, state)

    return update, tx


def _args(clipper: Clipper, tx: Any, grads: Any, params: Any) -> tuple[Any, ...]:
    """The update's arguments; abstract (for lowering) when ``grads`` are shapes only."""
    state = jax.eval_shape(tx.init, params) if _is_abstract(grads) else tx.init(params)
    return (grads, state, params) if clipper.needs_params else (grads, state)


def _is_abstract(tree: Any) -> bool:
    return isinstance(jax.tree.leaves(tree)[0], jax.ShapeDtypeStruct)


HEADLINE_CAP_FACTOR = 10
# Compile time grows about as n^1.5 to n^2 in the number of leaves on XLA:CPU; the lower
# exponent keeps a noisy small-size measurement from skipping sizes that would fit.
GROWTH_EXPONENT = 1.5


class _CompileBudget:
    """Predicts each clipper's next compile time from its last one; skips past a cap."""

    def __init__(self, cap_s: float):
        self.cap_s = cap_s
        self.last: dict[str, tuple[int, float]] = {}
        self.dead: dict[str, str] = {}

    def skip_reason(self, clipper: Clipper, n_leaves: int) -> str | None:
        if clipper.key in self.dead:
            return self.dead[clipper.key]
        if clipper.key not in self.last:
            return None
        n0, t0 = self.last[clipper.key]
        predicted = t0 * (n_leaves / n0) ** GROWTH_EXPONENT
        # The clip_by_global_norm pair, reference of the compile goal, gets ten times more.
        if predicted <= self.cap_s * (HEADLINE_CAP_FACTOR if clipper.headline else 1):
            return None
        return (
            f"skipped: compile predicted ~{predicted:.0f} s from {t0:.1f} s at {n0} leaves "
            f"(n^{GROWTH_EXPONENT:g}), over --compile-cap {self.cap_s:g} s"
        )


def _skips(clippers: list[Clipper], n_leaves: int, budget: _CompileBudget) -> dict[str, str]:
    """Clippers not to compile at this size; an optax twin goes when ours does."""
    skips = {c.key: r for c in clippers if (r := budget.skip_reason(c, n_leaves))}
    for ours, theirs in _clippers.PAIRS:
        if ours.key in skips and theirs.key not in skips:
            skips[theirs.key] = f"skipped: its twin {ours.key} is not measured at this size"
    return skips


def _compile_all(
    clippers: list[Clipper], structs: Any, cfg: Config, results: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Lowers and compiles each clipper from fresh functions, interleaved; keeps the last."""
    samples: dict[str, list[dict[str, float]]] = {c.key: [] for c in clippers}
    executables: dict[str, Any] = {}
    for r in range(cfg.compile_repeats):
        shift = r % max(len(clippers), 1)
        for c in clippers[shift:] + clippers[:shift]:
            done = samples.get(c.key)
            if done is None or (done and done[0]["total_s"] >= cfg.compile_repeat_below_s):
                continue
            try:
                fn, tx = _update_fn(c)
                exe, times = compile_fresh(fn, _args(c, tx, structs, structs))
            except Exception as error:  # record it, and stop measuring this clipper
                results[c.key] = {"error": f"error: {error!r}"[:500]}
                samples.pop(c.key)
                executables.pop(c.key, None)
                continue
            done.append(times)
            executables[c.key] = exe
            if r == 0:
                log(f"{c.key} compiled in {times['total_s']:.2f} s")
    for key, done in samples.items():
        results[key] = {
            "compile": {
                field: sorted(s[field] for s in done)[len(done) // 2]
                for field in ("lower_s", "compile_s", "total_s")
            }
            | {"repeats": len(done)}
        }
    return executables


def measure_tree(
    n_leaves: int, leaf_size: int, clippers: list[Clipper], cfg: Config, budget: _CompileBudget
) -> dict[str, Any]:
    """Compile (timed), memory, HLO facts and interleaved run time for one tree shape."""
    log(f"tree of {n_leaves} x {leaf_size}")
    structs = shape_tree(n_leaves, leaf_size)
    record: dict[str, Any] = {
        "n_leaves": n_leaves,
        "leaf_size": leaf_size,
        "leaf_shape": list(leaf_shape(leaf_size)),
        "total_size": n_leaves * leaf_size,
        "tree_bytes": tree_bytes(structs),
        "clippers": {},
    }
    results: dict[str, dict[str, Any]] = record["clippers"]
    skips = _skips(clippers, n_leaves, budget)
    active = [c for c in clippers if c.key not in skips]
    executables = _compile_all(active, structs, cfg, results)
    results.update({key: {"skipped": reason} for key, reason in skips.items()})
    record["clippers"] = {c.key: results[c.key] for c in clippers}
    for c in active:
        if "error" in results[c.key]:
            budget.dead[c.key] = results[c.key]["error"]
    for key, exe in executables.items():
        entry = results[key]
        budget.last[key] = (n_leaves, entry["compile"]["total_s"])
        entry["memory"] = memory_facts(exe)
        entry["hlo"] = hlo_facts(exe)
        entry["state_bytes"] = state_bytes(_clippers_by_key(clippers)[key].factory(), structs)
    if executables:
        _time_runs(record, clippers, executables, cfg)
    return record


def _clippers_by_key(clippers: list[Clipper]) -> dict[str, Clipper]:
    return {c.key: c for c in clippers}


def _time_runs(
    record: dict[str, Any], clippers: list[Clipper], executables: dict[str, Any], cfg: Config
) -> None:
    n_leaves, leaf_size = record["n_leaves"], record["leaf_size"]
    grads = device_tree(n_leaves, leaf_size, seed=0)
    by_key = _clippers_by_key(clippers)
    params = None
    if any(by_key[k].needs_params for k in executables):
        params = device_tree(n_leaves, leaf_size, seed=1)
    calls = {}
    for key, exe in executables.items():
        c = by_key[key]
        args = _args(c, c.factory(), grads, params if c.needs_params else grads)
        calls[key] = lambda exe=exe, args=args: exe(*args)
    timings = time_interleaved(calls, cfg.repeats_for(record["total_size"]), cfg.min_sample_s)
    for key, timing in timings.items():
        record["clippers"][key]["run"] = timing
    ratios = {}
    for ours, theirs in _clippers.PAIRS:
        if ours.key in timings and theirs.key in timings:
            ratios[ratio_key(ours.key, theirs.key)] = paired_ratio(timings, ours.key, theirs.key)
    for key in timings:
        if is_adaptive(key) and GLOBAL in timings:
            ratios[ratio_key(key, GLOBAL)] = paired_ratio(timings, key, GLOBAL)
    record["ratios"] = ratios
    record["ratio_stats"] = ratio_stats(timings, ratios)
    log(f"{n_leaves} x {leaf_size}: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))


def _all_clippers(cfg: Config) -> tuple[list[Clipper], dict[str, str]]:
    adaptive, left_out = _clippers.adaptive(cfg.max_adaptive)
    return _clippers.twinned(cfg.clipper_subset) + adaptive, left_out


def leaf_sweep(cfg: Config) -> dict[str, Any]:
    """Compile time, memory and run time vs number of leaves."""
    clippers, left_out = _all_clippers(cfg)
    budget = _CompileBudget(cfg.compile_cap_s)
    records = [measure_tree(n, cfg.leaf_size, clippers, cfg, budget) for n in cfg.leaf_counts]
    return {
        "sizes": {"leaf_counts": list(cfg.leaf_counts), "leaf_size": cfg.leaf_size},
        "adaptive_left_out": left_out,
        "records": records,
    }


def size_sweep(cfg: Config) -> dict[str, Any]:
    """Run time and memory vs total size, at a fixed number of leaves."""
    clippers, left_out = _all_clippers(cfg)
    budget = _CompileBudget(float("inf"))
    records = [
        measure_tree(cfg.size_leaves, total // cfg.size_leaves, clippers, cfg, budget)
        for total in cfg.size_totals
    ]
    return {
        "sizes": {"totals": list(cfg.size_totals), "n_leaves": cfg.size_leaves},
        "adaptive_left_out": left_out,
        "records": records,
    }
