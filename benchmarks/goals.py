"""The goals of the issue, judged on ratios measured side by side in the same run.

Each goal is ``met``, ``missed`` or ``not measured`` (with the reason). A missed goal
carries a diagnosis built from what XLA compiled (the optimized HLO's fusions,
reductions and conditionals, and XLA's estimate of the bytes it moves).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks._names import (
    ADAM,
    GLOBAL,
    OPTAX_GLOBAL,
    OURS_NORM,
    PAIRS,
    TORCH,
    XLA_FLOOR,
    is_adaptive,
    label,
    ratio_key,
)
from benchmarks.diagnosis import compile_gap, norm_gap, run_gap, step_gap, torch_gap

Goal = dict[str, Any]


def _goal(
    goal_id: str, text: str, where: str, value: float | None, target: float, at_most: bool
) -> Goal:
    if value is None:
        status = "not measured"
    elif (value <= target) if at_most else (value >= target):
        status = "met"
    else:
        status = "missed"
    return {
        "id": goal_id,
        "goal": text,
        "where": where,
        "value": value,
        "target": f"{'<=' if at_most else '>='} {target:g}",
        "status": status,
        "diagnosis": None,
    }


def _record(comparison: dict[str, Any] | None, **match: Any) -> dict[str, Any] | None:
    for record in (comparison or {}).get("records", []):
        if all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def _why_unmeasured(record: dict[str, Any] | None, keys: tuple[str, ...], what: str) -> str:
    if record is None:
        return f"not measured: no {what} in this run"
    for key in keys:
        entry = record["clippers"].get(key, {})
        for field in ("skipped", "error"):
            if field in entry:
                return f"{label(key)}: {entry[field]}"
    return f"not measured: {what} has no timing for {', '.join(keys)}"


def _noise(stats: dict[str, float] | None, target: float) -> str:
    """How far this run's rounds scatter around the ratio, and whether the target is inside."""
    if not stats:
        return ""
    note = (
        f"; per-round ratios {stats['q1']:.2f}-{stats['q3']:.2f} (quartiles of "
        f"{stats['rounds']} rounds), fastest-run ratio {stats['of_minima']:.2f}"
    )
    if stats["q1"] <= target:
        note += ": the target lies within this run's scatter, so rerun on a quiet machine"
    return note


def _pair_goal(
    goal_id: str,
    text: str,
    where: str,
    record: dict[str, Any] | None,
    pair: tuple[str, str],
    target: float,
    explain: Callable[[dict[str, Any], str, str], str],
) -> Goal:
    value = (record or {}).get("ratios", {}).get(ratio_key(*pair))
    goal = _goal(goal_id, text, where, value, target, at_most=True)
    if value is None:
        goal["diagnosis"] = _why_unmeasured(record, pair, where)
    elif goal["status"] == "missed":
        stats = record.get("ratio_stats", {}).get(ratio_key(*pair))
        goal["diagnosis"] = explain(record, *pair) + _noise(stats, target)
    return goal


def _compile_goals(results: dict[str, Any], cfg: dict[str, Any]) -> list[Goal]:
    n = cfg["compile_goal_leaves"]
    record = _record(results["comparisons"].get("leaf_sweep"), n_leaves=n)
    where = f"{n} leaves of {cfg['leaf_size']} float32"
    value = None
    if record:
        ours = record["clippers"].get(GLOBAL, {}).get("compile")
        theirs = record["clippers"].get(OPTAX_GLOBAL, {}).get("compile")
        if ours and theirs:
            value = ours["total_s"] / theirs["total_s"]
    goal = _goal(
        "compile_global_norm",
        "compile (lower + compile) of clip_by_global_norm, ours / optax",
        where,
        value,
        0.10,
        at_most=True,
    )
    if value is None:
        goal["diagnosis"] = _why_unmeasured(record, (GLOBAL, OPTAX_GLOBAL), where)
    elif goal["status"] == "missed":
        goal["diagnosis"] = compile_gap(record, GLOBAL, OPTAX_GLOBAL)
    return [goal]


def _run_goals(results: dict[str, Any], cfg: dict[str, Any]) -> list[Goal]:
    comparisons = results["comparisons"]
    n, size = cfg["run_goal_leaves"], cfg["leaf_size"]
    leaves = _record(comparisons.get("leaf_sweep"), n_leaves=n)
    total = cfg["run_goal_total"]
    k = cfg["size_leaves"]
    sizes = _record(comparisons.get("size_sweep"), total_size=total, n_leaves=k)
    goals = []
    for ours, theirs in PAIRS:
        name = ours.removeprefix("ours:")
        text = f"one jitted update, {label(ours)} / {label(theirs)}"
        for tag, where, record, target in (
            ("leaves", f"{n} leaves x {size}", leaves, 0.8),
            ("size", f"{k} leaves x {total // k}", sizes, 1.0),
        ):
            goal_id = f"run_{tag}_{name}"
            goals.append(_pair_goal(goal_id, text, where, record, (ours, theirs), target, run_gap))
    return goals


def _adaptive_goals(results: dict[str, Any], cfg: dict[str, Any]) -> list[Goal]:
    comparisons = results["comparisons"]
    n, size = cfg["run_goal_leaves"], cfg["leaf_size"]
    total, k = cfg["run_goal_total"], cfg["size_leaves"]
    places = (
        ("leaves", f"{n} leaves x {size}", _record(comparisons.get("leaf_sweep"), n_leaves=n)),
        (
            "size",
            f"{k} leaves x {total // k}",
            _record(comparisons.get("size_sweep"), total_size=total),
        ),
    )
    keys = sorted({key for _, _, r in places if r for key in r["clippers"] if is_adaptive(key)})
    if not keys:
        left_out = (comparisons.get("size_sweep") or {}).get("adaptive_left_out", {})
        goal = _goal("run_adaptive", "adaptive clippers / our global clip", "-", None, 1.1, True)
        goal["diagnosis"] = "no adaptive clipper measured: " + (
            "; ".join(f"{k}: {v}" for k, v in left_out.items()) or "none found"
        )
        return [goal]
    goals = []
    for key in keys:
        text = f"one jitted update, {label(key)} / {label(GLOBAL)}"
        for tag, where, record in places:
            goal_id = f"run_{tag}_{key.removeprefix('ours:')}"
            goals.append(_pair_goal(goal_id, text, where, record, (key, GLOBAL), 1.1, run_gap))
    return goals


def _throughput_goal(results: dict[str, Any]) -> Goal:
    records = (results["comparisons"].get("throughput") or {}).get("records", [])
    record = records[-1] if records else None
    where = f"{record['n_leaves']} leaves, {record['total_size']:,} float32" if record else "-"
    value = record["fraction_of_roof"].get(OURS_NORM) if record else None
    goal = _goal("norm_throughput", "global_norm throughput / read roof", where, value, 0.7, False)
    if value is None:
        goal["diagnosis"] = "not measured"
    elif goal["status"] == "missed" or value > 1:
        goal["diagnosis"] = norm_gap(record, OURS_NORM, XLA_FLOOR)
    return goal


def _chain_goal(results: dict[str, Any]) -> Goal:
    chain = results["comparisons"].get("chain_adam") or {}
    name = f"{GLOBAL} + adam"
    value = chain.get("ratios", {}).get(ratio_key(name, ADAM))
    where = f"{chain['sizes']['total_size']:,} params" if "sizes" in chain else "-"
    goal = _goal("chain_adam", "chain(clip_by_global_norm, adam) / adam", where, value, 1.15, True)
    if value is None:
        goal["diagnosis"] = chain.get("error", "not measured")
    elif goal["status"] == "missed":
        stats = chain.get("ratio_stats", {}).get(ratio_key(name, ADAM))
        goal["diagnosis"] = step_gap(chain, name, ADAM) + _noise(stats, 1.15)
    return goal


def _torch_goals(results: dict[str, Any]) -> list[Goal]:
    torch = results["comparisons"].get("torch") or {"skipped": "not run"}
    if "records" not in torch:
        goal = _goal("torch", "clip_by_global_norm ours / torch", "-", None, 1.0, True)
        goal["diagnosis"] = torch.get("skipped") or torch.get("error")
        return [goal]
    goals = []
    for record in torch["records"]:
        where = f"{record['n_leaves']} leaves x {record['leaf_size']}"
        value = record["ratios"].get(ratio_key(GLOBAL, TORCH))
        goal = _goal(
            f"torch_{record['n_leaves']}x{record['leaf_size']}",
            "clip_by_global_norm ours / torch.nn.utils.clip_grad_norm_(foreach=True)",
            where,
            value,
            1.0,
            True,
        )
        if goal["status"] == "missed":
            stats = record.get("ratio_stats", {}).get(ratio_key(GLOBAL, TORCH))
            goal["diagnosis"] = torch_gap(record, GLOBAL, TORCH) + _noise(stats, 1.0)
        goals.append(goal)
    return goals


def evaluate(results: dict[str, Any]) -> list[Goal]:
    """Every goal of the issue, judged on this run's results."""
    cfg = results["meta"]["config"]
    return [
        *_compile_goals(results, cfg),
        *_run_goals(results, cfg),
        _throughput_goal(results),
        _chain_goal(results),
        *_adaptive_goals(results, cfg),
        *_torch_goals(results),
    ]
