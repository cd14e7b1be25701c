"""The markdown report: environment, goals (met / missed and why), one table per figure."""

from __future__ import annotations

import importlib.util
from typing import Any

from benchmarks._names import label


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3g}"


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e6:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def goals_table(goals: list[dict[str, Any]]) -> str:
    rows = [
        [g["goal"], g["where"], _num(g["value"]), g["target"], f"**{g['status']}**"] for g in goals
    ]
    return _table(["goal", "where", "measured", "target", "status"], rows)


def _diagnoses(goals: list[dict[str, Any]]) -> str:
    lines = [f"- **{g['id']}** ({g['status']}): {g['diagnosis']}" for g in goals if g["diagnosis"]]
    return "\n".join(lines) or "All goals met."


def _env_line(env: dict[str, Any] | None) -> str:
    if not env:
        return "(no environment recorded)"
    return (
        f"{env['device_kind']} ({env['platform']}), {env['cpu_count']} CPUs, "
        f"python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
        f"optax {env['optax']}, numpy {env['numpy']}, gradclip_jax {env['gradclip_jax']}"
    )


def _git_line(meta: dict[str, Any]) -> str:
    git = meta.get("git")
    if not git:
        return "commit unknown"
    dirty = " with uncommitted library changes" if git["library_dirty"] else ""
    return f"commit {git['commit'][:10]}{dirty}"


def _compile(fig: dict[str, Any]) -> str:
    rows = [
        [
            _num(r["n_leaves"]),
            label(r["clipper"]),
            _num(r.get("lower_s")),
            _num(r.get("compile_s")),
            _num(r.get("total_s")),
            _num(r.get("ratio_to_optax_global")),
            r["skipped"] or "",
        ]
        for r in fig["rows"]
    ]
    header = ["leaves", "clipper", "lower s", "compile s", "total s", "/ optax global", "note"]
    return _table(header, rows)


def _run(fig: dict[str, Any]) -> str:
    rows = [
        [
            r["sweep"],
            f"{r['n_leaves']} x {r['leaf_size']:,}",
            f"{label(r['numerator'])} / {label(r['denominator'])}",
            _ms(r["numerator_s"]),
            _ms(r["denominator_s"]),
            _num(r["ratio"]),
            f"{_num(r.get('q1'))}-{_num(r.get('q3'))}",
            _num(r.get("of_minima")),
        ]
        for r in fig["rows"]
    ]
    header = ["sweep", "tree", "ratio of", "ms (num)", "ms (den)", "ratio", "quartiles", "fastest"]
    note = (
        "ratio: median over rounds of the per-round ratio; quartiles: of those per-round "
        "ratios; fastest: ratio of the two fastest samples.\n\n"
    )
    return note + _table(header, rows)


def _chain(fig: dict[str, Any]) -> str:
    rows = [[label(r["optimizer"]), _ms(r["median_s"]), _num(r["ratio"])] for r in fig["rows"]]
    return _table(["optimizer step", "ms", "/ adam"], rows)


def _throughput(fig: dict[str, Any]) -> str:
    rows = [
        [
            f"{r['total_size']:,}",
            label(r["series"]),
            _ms(r["median_s"]),
            _num(r["gb_per_s"]),
            _num(r["fraction_of_roof"]),
        ]
        for r in fig["rows"]
    ]
    note = f"Roof: {fig.get('roof')}.\n\n"
    return note + _table(["float32", "series", "ms", "GB/s", "of roof"], rows)


def _torch(fig: dict[str, Any]) -> str:
    rows = [
        [
            f"{r['n_leaves']} x {r['leaf_size']:,}",
            _ms(r["ours_s"]),
            _ms(r["optax_s"]),
            _ms(r["torch_s"]),
            _ms(r.get("donated_s")),
            _num(r["ratio"]),
            _num(r.get("donated_ratio")),
        ]
        for r in fig["rows"]
    ]
    info = fig.get("torch") or {}
    note = f"torch {info.get('version')}, {info.get('threads')} threads, {info.get('device')}.\n\n"
    header = ["tree", "ours ms", "optax ms", "torch ms", "ours donated ms"]
    return note + _table([*header, "ours / torch", "donated / torch"], rows)


def _memory(fig: dict[str, Any]) -> str:
    rows = [
        [
            r["sweep"],
            f"{r['n_leaves']} x {r['leaf_size']:,}",
            label(r["clipper"]),
            _mb(r.get("argument_size_in_bytes")),
            _mb(r.get("output_size_in_bytes")),
            _mb(r.get("temp_size_in_bytes")),
            _mb(r.get("peak_bytes")),
            _num(r.get("peak_ratio_to_twin")),
            _num(r.get("state_bytes")),
        ]
        for r in fig["rows"]
        if r["reference"]
    ]
    header = ["sweep", "tree", "clipper", "arg MB", "out MB", "temp MB", "peak MB", "/ twin"]
    note = "The trees the goals use; every tree is in the JSON (`figures.6_memory.rows`).\n\n"
    return note + _table([*header, "state bytes"], rows)


_SECTIONS = {
    "1_compile": _compile,
    "2_run": _run,
    "3_chain_adam": _chain,
    "4_throughput": _throughput,
    "5_torch": _torch,
    "6_memory": _memory,
}


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"# gradclip_jax benchmarks: {meta['device']} ({meta['mode']} run)",
        f"`{meta['command']}` on {meta['date']}, {meta['wall_s']:.0f} s, {_git_line(meta)}.\n\n"
        f"Device: {_env_line(meta['env'])}.",
        *(
            ["**Quick run: tiny trees and one repeat; the numbers mean nothing.**"]
            if meta["mode"] == "quick"
            else []
        ),
        "## Goals\n\n" + goals_table(results["goals"]),
        "### Diagnoses\n\n" + _diagnoses(results["goals"]),
    ]
    for number, (key, fig) in enumerate(results["figures"].items(), start=1):
        heading = f"## {number}. {fig['title']}"
        if fig["skipped"]:
            parts.append(f"{heading}\n\nNot measured: {fig['skipped']}")
            continue
        wall = f"{fig['wall_s']:.0f} s" if fig.get("wall_s") else "-"
        sizes = ", ".join(f"{k} {v}" for k, v in (fig["sizes"] or {}).items())
        parts.append(
            f"{heading}\n\nSizes: {sizes}. Measured in {wall} on "
            f"{_env_line(fig['env'])}.\n\n{_SECTIONS[key](fig)}"
        )
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, Any], path: Any) -> Any:
    """Writes the PNG (``None`` when matplotlib is not installed)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from benchmarks.plot import plot_figures

    return plot_figures(results, path)
