"""Summaries of a demo run: the results table, ``results.json`` and ``results.md``."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from gradclip_jax._diagnostics import GradientHealth, health_report
from gradclip_jax.demo.tasks import get_task
from gradclip_jax.demo.train import DemoConfig, TrainingRun

COLUMNS = (
    ("strategy", "strategy"),
    ("success", "solved (seeds)"),
    ("final_loss", "final loss (median)"),
    ("steps_to_solve", "steps to solve (median)"),
    ("diverged", "diverged (seeds)"),
    ("clip_rate", "steps clipped"),
)


def smoothing_window(steps: int) -> int:
    """Moving-average window for per-batch training losses (5% of the run, 1 to 50 steps)."""
    return max(1, min(50, steps // 20))


def moving_average(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis; NaN (after divergence) stays NaN."""
    # Keep inf (a diverging step averages to inf); NaN only follows a divergence.
    cumulative = np.cumsum(np.where(np.isnan(losses), 0.0, losses.astype(np.float64)), axis=-1)
    lagged = np.zeros_like(cumulative)
    lagged[..., window:] = cumulative[..., :-window]
    counts = np.minimum(np.arange(1, losses.shape[-1] + 1), window)
    with np.errstate(invalid="ignore"):  # inf - inf, only after a divergence: masked below
        averaged = (cumulative - lagged) / counts
    return np.where(np.isnan(losses), np.nan, averaged)


def clip_rates(history: dict[str, np.ndarray]) -> tuple[float, float]:
    """Fraction of trained steps at which the clipper scaled anything down (from its running
    ``clip_count``), and the mean fraction of its blocks scaled down per step; zeros without a
    clipper. Steps after a divergence are not counted."""
    count_key = next((k for k in history if k.endswith("/clip_count")), None)
    fraction_key = next((k for k in history if k.endswith("/clipped")), None)
    if count_key is None or fraction_key is None:
        return 0.0, 0.0
    active = ~np.isnan(history["loss"])
    last = active.sum(axis=1) - 1  # the last trained step of each seed
    counts = history[count_key][np.arange(len(last)), last]
    return float(counts.sum() / active.sum()), float(np.mean(history[fraction_key][active]))


def summarize(
    config: DemoConfig, run: TrainingRun, name: str, final: dict[str, Any]
) -> dict[str, Any]:
    """One row of the results table, with the per-seed values behind it.

    Args:
      config: the demo configuration.
      run: the training run.
      name: the strategy.
      final: `gradclip_jax.demo.train.evaluate` of the strategy's final models.

    Returns:
      A JSON-ready dict. A seed's *final loss* is its mean training loss over the last
      `smoothing_window` steps: every step draws fresh sequences, so this estimates the loss on
      unseen data, averaged over the last iterates rather than read off the noisy last one. A
      seed is *solved* if it never diverged and its final loss is below the task's
      ``success_loss``; *steps to solve* is the first step at which its smoothed training loss
      fell below that threshold. The held-out loss of the last parameters is kept per seed.
    """
    task = get_task(config.task)
    history, diverged_at = run.history[name], run.diverged_at[name]
    diverged = diverged_at >= 0
    window = smoothing_window(config.steps)
    smoothed = moving_average(history["loss"], window)
    final_loss = np.where(diverged, np.inf, smoothed[:, -1])
    below = smoothed < task.success_loss
    steps_to_solve = [int(np.argmax(row)) + 1 if row.any() else None for row in below]
    reached = [s for s in steps_to_solve if s is not None]
    clip_rate, clipped_fraction = clip_rates(history)
    return {
        "strategy": name,
        "solved": int(np.sum(~diverged & (final_loss < task.success_loss))),
        "seeds": len(config.seeds),
        "final_loss_median": float(np.median(final_loss)),
        "steps_to_solve_median": float(np.median(reached)) if reached else None,
        "diverged": int(np.sum(diverged)),
        "clip_rate": clip_rate,
        "clipped_fraction_mean": clipped_fraction,
        "per_seed": {
            "seed": list(config.seeds),
            "final_loss": [float(x) for x in final_loss],
            "held_out_loss": [float(x) for x in final["loss"]],
            "diverged_at_step": [int(x) if x >= 0 else None for x in diverged_at],
            "steps_to_solve": steps_to_solve,
        },
    }


def _format_row(row: dict[str, Any]) -> dict[str, str]:
    loss = row["final_loss_median"]
    steps = row["steps_to_solve_median"]
    return {
        "strategy": row["strategy"],
        "success": f"{row['solved']}/{row['seeds']}",
        "final_loss": "diverged" if math.isinf(loss) else f"{loss:.4f}",
        "steps_to_solve": "-" if steps is None else f"{steps:.0f}",
        "diverged": f"{row['diverged']}/{row['seeds']}",
        "clip_rate": f"{100 * row['clip_rate']:.0f}%",
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `summarize` rows, aligned so that it also reads as plain text."""
    cells = [[title for _, title in COLUMNS]]
    cells += [[_format_row(row)[key] for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(values) for values in cells[1:]])


def timing_line(config: DemoConfig, run: TrainingRun, total_seconds: float) -> str:
    """How long the run took; strategies share one program, so there is one time for all."""
    per_step = 1e3 * run.train_seconds / config.steps
    return (
        f"{len(run.names)} strategies x {len(config.seeds)} seeds trained in one compiled program:"
        f" compile {run.compile_seconds:.1f} s, {config.steps} steps {run.train_seconds:.1f} s"
        f" ({per_step:.1f} ms/step); whole run {total_seconds:.0f} s."
    )


def seed_median_health(health: GradientHealth) -> list[dict[str, Any]]:
    """Per-leaf health across seeds: median norms and ratio, and how many seeds were flagged."""
    num_seeds = len(jax.tree.leaves(health.ratio)[0])
    per_seed = [health_report(jax.tree.map(lambda x, i=i: x[i], health)) for i in range(num_seeds)]
    rows = []
    for leaf_rows in zip(*per_seed):
        medians = {
            key: float(np.median([r[key] for r in leaf_rows]))
            for key in ("grad_norm", "param_norm", "ratio")
        }
        rows.append(
            {
                "path": leaf_rows[0]["path"],
                **medians,
                "exploding_seeds": sum(r["status"] == "exploding" for r in leaf_rows),
                "vanishing_seeds": sum(r["status"] == "vanishing" for r in leaf_rows),
            }
        )
    return rows


def health_table(columns: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table, one row per leaf, one column per state (``init``, strategies...)."""
    names = list(columns)
    lines = ["| leaf | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, row in enumerate(columns[names[0]]):
        cells = []
        for name in names:
            leaf = columns[name][i]
            flags = "".join(
                f" {label}{leaf[key]}"
                for label, key in (("E", "exploding_seeds"), ("V", "vanishing_seeds"))
                if leaf[key]
            )
            cells.append(f"{leaf['ratio']:.2g}{flags}")
        lines.append(f"| {row['path']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_history(out_dir: pathlib.Path, run: TrainingRun) -> None:
    """Writes every per-step record to ``history.npz``: ``"<strategy>/<record>"`` arrays of shape
    ``(seeds, steps)`` (see `TrainingRun.history`) and ``"<strategy>/diverged_at"`` ``(seeds,)``.
    """
    arrays = {
        f"{name}/{key}": values for name in run.names for key, values in run.history[name].items()
    }
    arrays |= {f"{name}/diverged_at": run.diverged_at[name] for name in run.names}
    np.savez_compressed(out_dir / "history.npz", **arrays)


def write_results(
    out_dir: pathlib.Path,
    config: DemoConfig,
    rows: list[dict[str, Any]],
    health: dict[str, list[dict[str, Any]]],
    run: TrainingRun,
    total_seconds: float,
) -> None:
    """Writes ``results.json`` and ``results.md`` into ``out_dir``."""
    task = get_task(config.task)
    payload = {
        "config": dataclasses.asdict(config),
        "task": {"baseline_loss": task.baseline_loss, "success_loss": task.success_loss},
        "strategies": rows,
        "gradient_health": health,
        "timing": {
            "compile_seconds": run.compile_seconds,
            "train_seconds": run.train_seconds,
            "total_seconds": total_seconds,
        },
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    settings = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    markdown = [
        f"# gradclip-demo results: {config.task}",
        "",
        f"Configuration: {settings}.",
        "",
        f"Baseline loss (constant prediction) {task.baseline_loss:.3f}. Final loss: mean training"
        f" loss over the last {smoothing_window(config.steps)} steps (fresh sequences every"
        f" step); a seed is solved when it is below {task.success_loss:.3g}. Steps to solve: first"
        " step at which that moving average fell below the threshold."
        " Steps clipped: fraction of steps at which the clipper scaled anything down (its"
        " `clip_count`); results.json also has the mean fraction of blocks (tree, leaves, units or"
        " elements) scaled down per step.",
        "",
        results_table(rows),
        "",
        timing_line(config, run, total_seconds),
        "",
        "## Gradient health (gradient / parameter RMS ratio, median over seeds)",
        "",
        "E<n> / V<n>: flagged exploding / vanishing in n seeds (`gradclip_jax.gradient_health`).",
        "",
        health_table(health),
        "",
        "Plots: `loss.png`, `grad_norm.png`, `hidden_grad.png`; per-step records: `history.npz`.",
        "",
    ]
    (out_dir / "results.md").write_text("\n".join(markdown))
