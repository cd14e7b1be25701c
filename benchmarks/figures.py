"""Tidy rows per figure, derived from the raw comparison results (no JAX needed)."""

from __future__ import annotations

from typing import Any

from benchmarks._names import (
    ADAM,
    DONATED,
    GLOBAL,
    OPTAX_GLOBAL,
    PAIRS,
    ROOF,
    TORCH,
    is_adaptive,
    ratio_key,
)

TWIN = {ours: theirs for ours, theirs in PAIRS}
COMPILE_FIGURE = (GLOBAL, OPTAX_GLOBAL)


def _figure(title: str, source: dict[str, Any] | None, rows: list[dict[str, Any]], **extra):
    source = source or {}
    return {
        "title": title,
        "env": source.get("env"),
        "sizes": source.get("sizes"),
        "wall_s": source.get("wall_s"),
        "skipped": source.get("skipped") or source.get("error"),
        "rows": rows,
        **extra,
    }


def _compile_rows(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for record in sweep.get("records", []):
        optax_total = record["clippers"].get(OPTAX_GLOBAL, {}).get("compile", {}).get("total_s")
        for key, entry in record["clippers"].items():
            row: dict[str, Any] = {"n_leaves": record["n_leaves"], "clipper": key}
            if "compile" in entry:
                row.update(entry["compile"])
                if optax_total:
                    row["ratio_to_optax_global"] = entry["compile"]["total_s"] / optax_total
            row["skipped"] = entry.get("skipped") or entry.get("error")
            row["in_figure"] = key in COMPILE_FIGURE or is_adaptive(key)
            rows.append(row)
    return rows


def _run_rows(comparisons: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for sweep_name, tag in (("size_sweep", "size"), ("leaf_sweep", "leaves")):
        for record in (comparisons.get(sweep_name) or {}).get("records", []):
            entries = record["clippers"]
            for key, ratio in record.get("ratios", {}).items():
                num, den = key.split(" / ")
                stats = record.get("ratio_stats", {}).get(key, {})
                rows.append(
                    {
                        "sweep": tag,
                        "n_leaves": record["n_leaves"],
                        "leaf_size": record["leaf_size"],
                        "total_size": record["total_size"],
                        "numerator": num,
                        "denominator": den,
                        "numerator_s": entries[num]["run"]["median_s"],
                        "denominator_s": entries[den]["run"]["median_s"],
                        "ratio": ratio,
                        "q1": stats.get("q1"),
                        "q3": stats.get("q3"),
                        "of_minima": stats.get("of_minima"),
                    }
                )
    return rows


def _chain_rows(chain: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, entry in chain.get("optimizers", {}).items():
        ratio = 1.0 if name == ADAM else chain["ratios"].get(ratio_key(name, ADAM))
        rows.append({"optimizer": name, "median_s": entry["run"]["median_s"], "ratio": ratio})
    return rows


def _throughput_rows(throughput: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for record in throughput.get("records", []):
        for name, series in record["series"].items():
            rows.append(
                {
                    "total_size": record["total_size"],
                    "n_leaves": record["n_leaves"],
                    "series": name,
                    "median_s": series["median_s"],
                    "gb_per_s": series["gb_per_s"],
                    "fraction_of_roof": 1.0 if name == ROOF else record["fraction_of_roof"][name],
                }
            )
    return rows


def _torch_rows(torch: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for record in torch.get("records", []):
        runs = record["runs"]
        rows.append(
            {
                "n_leaves": record["n_leaves"],
                "leaf_size": record["leaf_size"],
                "total_size": record["total_size"],
                "ours_s": runs[GLOBAL]["median_s"],
                "optax_s": runs[OPTAX_GLOBAL]["median_s"],
                "torch_s": runs[TORCH]["median_s"],
                "donated_s": runs.get(DONATED, {}).get("median_s"),
                "ratio": record["ratios"][ratio_key(GLOBAL, TORCH)],
                "donated_ratio": record["ratios"].get(ratio_key(DONATED, TORCH)),
            }
        )
    return rows


def _memory_rows(comparisons: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compiled update's memory; ``reference`` marks the trees the goals use."""
    reference = {("size", cfg["run_goal_total"]), ("leaves", cfg["run_goal_leaves"])}
    rows = []
    for sweep_name, tag in (("size_sweep", "size"), ("leaf_sweep", "leaves")):
        for record in (comparisons.get(sweep_name) or {}).get("records", []):
            entries = record["clippers"]
            for key, entry in entries.items():
                if "memory" not in entry:
                    continue
                twin = entries.get(TWIN.get(key, ""), {}).get("memory", {})
                peak = entry["memory"].get("peak_bytes")
                row = {
                    "sweep": tag,
                    "n_leaves": record["n_leaves"],
                    "leaf_size": record["leaf_size"],
                    "tree_bytes": record["tree_bytes"],
                    "clipper": key,
                    "reference": (
                        tag,
                        record["total_size"] if tag == "size" else record["n_leaves"],
                    )
                    in reference,
                    **entry["memory"],
                    "state_bytes": entry.get("state_bytes"),
                    "peak_ratio_to_twin": peak / twin["peak_bytes"]
                    if peak and twin.get("peak_bytes")
                    else None,
                }
                rows.append(row)
    return rows


def figures(results: dict[str, Any]) -> dict[str, Any]:
    """The six figures of the issue, each with its sizes and the device it ran on."""
    c = results["comparisons"]
    leaf, size = c.get("leaf_sweep") or {}, c.get("size_sweep") or {}
    return {
        "1_compile": _figure("Compile time vs number of leaves", leaf, _compile_rows(leaf)),
        "2_run": _figure("Run time of one jitted update, ours / optax", size or leaf, _run_rows(c)),
        "3_chain_adam": _figure(
            "chain(clipper, adam) vs adam",
            c.get("chain_adam"),
            _chain_rows(c.get("chain_adam") or {}),
        ),
        "4_throughput": _figure(
            "Global-norm throughput vs read roof",
            c.get("throughput"),
            _throughput_rows(c.get("throughput") or {}),
            roof=(c.get("throughput") or {}).get("roof"),
        ),
        "5_torch": _figure(
            "clip_by_global_norm vs torch clip_grad_norm_(foreach=True)",
            c.get("torch"),
            _torch_rows(c.get("torch") or {}),
            torch=(c.get("torch") or {}).get("torch"),
        ),
        "6_memory": _figure(
            "Memory of the compiled update",
            size or leaf,
            _memory_rows(c, results["meta"]["config"]),
        ),
    }
