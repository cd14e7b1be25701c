"""The PNG: one panel per figure (compile, run ratios, chain, throughput, torch, memory)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

from benchmarks._names import ADAM, PAIRS, is_adaptive, label  # noqa: E402

Axes = Any


RATIO_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1, 1.1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100)


def _ratio_axis(ax: Axes) -> None:
    """Log-scaled ratios labelled as plain numbers (0.8, 1, 1.2) instead of powers of ten."""
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator(RATIO_TICKS))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes)


def _lines(ax: Axes, series: dict[str, list[tuple[float, float]]], dashed=lambda k: False):
    for key, points in series.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, "--" if dashed(key) else "-", marker="o", label=label(key))


def _compile(ax: Axes, fig: dict[str, Any]) -> None:
    series: dict[str, list] = defaultdict(list)
    for r in fig["rows"]:
        if r["in_figure"] and r.get("total_s") is not None:
            series[r["clipper"]].append((r["n_leaves"], r["total_s"]))
    _lines(ax, series, is_adaptive)
    ax.set(xscale="log", yscale="log", xlabel="leaves (1,000 float32 each)")
    ax.set(ylabel="lower + compile (s)", title="1. Compile time vs leaves")


def _run(ax: Axes, fig: dict[str, Any], sweep: str) -> None:
    series: dict[str, list] = defaultdict(list)
    for r in fig["rows"]:
        if r["sweep"] == sweep:
            x = r["total_size"] if sweep == "size" else r["n_leaves"]
            series[f"{r['numerator']}|{r['denominator']}"].append((x, r["ratio"]))
    for key, points in series.items():
        num, den = key.split("|")
        xs, ys = zip(*sorted(points))
        name = label(num) if not is_adaptive(num) else f"{label(num)} / global"
        ax.plot(xs, ys, "--" if is_adaptive(num) else "-", marker="o", label=name)
    goal = 1.0 if sweep == "size" else 0.8
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(goal, color="red", ls=":", lw=1, label=f"goal {goal:g}")
    xlabel = "total float32 (10 leaves)" if sweep == "size" else "leaves (1,000 float32 each)"
    ax.set(xscale="log", xlabel=xlabel, ylabel="time ratio (log scale)")
    _ratio_axis(ax)
    what = "size" if sweep == "size" else "leaves"
    ax.set_title(f"2. Update run time vs {what}: ours / optax twin")


def _chain(ax: Axes, fig: dict[str, Any]) -> None:
    rows = fig["rows"]
    names = [label(r["optimizer"].replace(" + adam", "")) for r in rows]
    names = ["adam alone" if r["optimizer"] == ADAM else n for r, n in zip(rows, names)]
    bars = ax.barh(names, [r["ratio"] or 0 for r in rows])
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axvline(1.15, color="red", ls=":", label="goal 1.15")
    ax.set(xlabel="step time / adam step", title="3. chain(clipper, adam) / adam")
    ax.tick_params(axis="y", labelsize=7)


def _throughput(ax: Axes, fig: dict[str, Any]) -> None:
    series: dict[str, list] = defaultdict(list)
    for r in fig["rows"]:
        series[r["series"]].append((r["total_size"], r["gb_per_s"]))
    _lines(ax, series, lambda k: k == "roof")
    ax.set(xscale="log", yscale="log", xlabel="total float32", ylabel="GB/s read (log scale)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_title("4. Norm throughput vs read roof")


def _torch(ax: Axes, fig: dict[str, Any]) -> None:
    ax.set_title("5. ours / torch clip_grad_norm_")
    if fig["skipped"] or not fig["rows"]:
        _note(ax, f"skipped:\n{fig['skipped']}")
        return
    rows = fig["rows"]
    xs = range(len(rows))
    width = 0.4
    for offset, field, name in ((-1, "ratio", "ours"), (1, "donated_ratio", "ours, donated")):
        values = [r.get(field) or 0 for r in rows]
        bars = ax.bar([x + offset * width / 2 for x in xs], values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs), [f"{r['n_leaves']} x {r['leaf_size']:,}" for r in rows])
    ax.axhline(1.0, color="red", ls=":", label="goal 1.0")
    ax.set(ylabel="time ratio ours / torch", xlabel="tree (leaves x size)")
    ax.tick_params(axis="x", labelsize=7, labelrotation=15)


def _memory(ax: Axes, fig: dict[str, Any], total: int) -> None:
    rows = [
        r for r in fig["rows"] if r["sweep"] == "size" and r["n_leaves"] * r["leaf_size"] == total
    ]
    peak = {r["clipper"]: r["peak_bytes"] / 1e6 for r in rows if r.get("peak_bytes")}
    pairs = [(o, t) for o, t in PAIRS if o in peak and t in peak]
    width = 0.4
    xs = range(len(pairs))
    ax.bar([x - width / 2 for x in xs], [peak[o] for o, _ in pairs], width, label="ours")
    ax.bar([x + width / 2 for x in xs], [peak[t] for _, t in pairs], width, label="optax")
    ax.set_xticks(list(xs), [o.removeprefix("ours:") for o, _ in pairs], fontsize=7, rotation=15)
    ax.set(ylabel="temp + output + argument (MB)", title=f"6. Peak memory, {total:,} float32")


def _state(ax: Axes, fig: dict[str, Any]) -> None:
    ax.set_title("6. State size of adaptive clippers")
    rows = [r for r in fig["rows"] if is_adaptive(r["clipper"]) and r.get("state_bytes")]
    if not rows:
        _note(ax, "no adaptive clipper in gradclip_jax yet")
        return
    series: dict[str, list] = defaultdict(list)
    for r in rows:
        if r["sweep"] == "leaves":
            series[r["clipper"]].append((r["n_leaves"], r["state_bytes"]))
    _lines(ax, series)
    ax.set(xscale="log", yscale="log", xlabel="leaves", ylabel="state bytes")


def plot_figures(results: dict[str, Any], path: Path) -> Path:
    figs, meta = results["figures"], results["meta"]
    fig, axes = plt.subplots(2, 4, figsize=(24, 10.5))
    (a, b, c, d), (e, f, g, h) = axes
    _compile(a, figs["1_compile"])
    _run(b, figs["2_run"], "size")
    _run(c, figs["2_run"], "leaves")
    _chain(d, figs["3_chain_adam"])
    _throughput(e, figs["4_throughput"])
    _torch(f, figs["5_torch"])
    _memory(g, figs["6_memory"], meta["config"]["run_goal_total"])
    _state(h, figs["6_memory"])
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, framealpha=0.6)
    env = meta.get("env") or {}
    fig.suptitle(
        f"gradclip_jax vs optax / PyTorch on {env.get('device_kind', meta['device'])} "
        f"({env.get('cpu_count', '?')} CPUs), jax {env.get('jax', '?')}, "
        f"optax {env.get('optax', '?')}: {meta['mode']} run, {meta['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
