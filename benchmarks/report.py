"""The markdown report (a header, then one table per figure) and the one-image plot."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

UNITS = {"run": (1e3, "ms"), "compile": (1.0, "s"), "memory": (1e-6, "MB")}


def _num(value: float | None, scale: float = 1.0, unit: str = "") -> str:
    return "-" if value is None else f"{value * scale:.3g}{' ' + unit if unit else ''}"


def _counts(rows: list[dict[str, Any]]) -> str:
    counts = Counter(r["status"] for r in rows)
    statuses = ("met", "missed", "not measured", "no target")
    return ", ".join(f"{s} {counts[s]}" for s in statuses if counts[s])


def _header(meta: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    dirty = " (with uncommitted changes)" if meta["git_dirty"] else ""
    cfg = meta["config"]
    return [
        f"# gradclip_jax benchmarks: {meta['device']} ({meta['mode']} run)\n",
        f"- machine: {meta['device_kind']} ({meta['platform']}), {meta['cpu_count']} CPUs, "
        f"{meta['machine']}",
        f"- versions: {versions}",
        f"- commit {(meta['git_commit'] or 'unknown')[:10]}{dirty}, {meta['date']}, "
        f"{meta['wall_s']:.0f} s",
        f"- command: `{meta['command']}`\n",
        f"Ratios: ours / reference, the median and quartiles of {cfg['rounds']} interleaved "
        f"run-time rounds or {cfg['compile_rounds']} fresh compiles; memory: XLA's temp + "
        "output + argument bytes. Met: ratio <= target. Method: `benchmarks/README.md`.",
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| metric | tree | ours | reference | ours value | reference value | ratio | quartiles "
        "| target | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        scale, unit = UNITS[r["metric"]]
        quartiles = "-" if r["q1"] is None else f"{r['q1']:.3g}-{r['q3']:.3g}"
        target = "-" if r["target"] is None else f"<= {r['target']:g}"
        values = [_num(r["ours_value"], scale, unit), _num(r["ref_value"], scale, unit)]
        cells = [r["metric"], r["tree"], r["ours"], r["ref"], *values, _num(r["ratio"])]
        lines.append("| " + " | ".join([*cells, quartiles, target, r["status"]]) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = _header(results["meta"])
    if results["meta"]["mode"] == "quick":
        lines.append("\nA `--quick` smoke run on tiny trees: its numbers mean nothing.")
    for i, (name, fig) in enumerate(results["figures"].items(), 1):
        lines.append(f"\n## {i}. {fig['title']} (`{name}`)\n")
        if fig["skipped"]:
            lines.append(f"Skipped: {fig['skipped']}.")
        else:
            lines += [_counts(fig["rows"]) + ".\n", *_table(fig["rows"])]
    return "\n".join(lines) + "\n"


def summary(results: dict[str, Any]) -> str:
    """One line per figure: how many rows met, missed or had no target."""
    return "\n".join(
        f"{name}: " + (f"skipped ({fig['skipped']})" if fig["skipped"] else _counts(fig["rows"]))
        for name, fig in results["figures"].items()
    )


def _panel(ax: Any, name: str, fig: dict[str, Any]) -> None:
    """Ratio per tree, a line per pair and metric (run -, compile --, memory :); quartiles as
    error bars, targets as short bars."""
    ax.set_title(f"{name}: {fig['title']}", fontsize=8)
    rows = [r for r in fig["rows"] if r["ratio"] is not None]
    if fig["skipped"] or not rows:
        ax.text(0.5, 0.5, f"skipped: {fig['skipped']}", ha="center", fontsize=8, wrap=True)
        return ax.set_axis_off()
    trees = list(dict.fromkeys(r["tree"] for r in rows))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['metric']}: {r['ours']} / {r['ref']}", []).append(r)
    for label, points in series.items():
        xs = [trees.index(r["tree"]) for r in points]
        ys = [r["ratio"] for r in points]
        low = [r["ratio"] - (r["q1"] or r["ratio"]) for r in points]
        high = [(r["q3"] or r["ratio"]) - r["ratio"] for r in points]
        style = {"run": "-", "compile": "--", "memory": ":"}[points[0]["metric"]]
        line = ax.errorbar(xs, ys, [low, high], ls=style, marker="o", ms=3, capsize=2, label=label)
        marks = [(x, r["target"]) for x, r in zip(xs, points) if r["target"] is not None]
        if marks:
            ax.plot(*zip(*marks), "_", ms=14, mew=2, color=line[0].get_color())
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.tick_params(axis="y", which="both", labelsize=6)
    ax.set_xticks(range(len(trees)), trees, fontsize=7)
    ax.set_ylabel("ours / reference (log scale)", fontsize=7)
    ax.legend(fontsize=5, ncol=2)


def plot(results: dict[str, Any], path: Path) -> None:
    """One PNG, a panel per figure."""
    figures, meta = results["figures"], results["meta"]
    cols = min(3, len(figures))
    nrows = -(-len(figures) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 5 * nrows), squeeze=False)
    for ax, (name, figure) in zip(axes.flat, figures.items()):
        _panel(ax, name, figure)
    for ax in list(axes.flat)[len(figures) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"gradclip_jax benchmarks, {meta['device']} ({meta['cpu_count']} CPUs), "
        f"{meta['mode']} run, {meta['date']}; short bars: targets"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
