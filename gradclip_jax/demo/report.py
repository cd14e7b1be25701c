"""Summaries of a demo run: the results table, ``results.json`` and ``results.md``."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import warnings
from typing import Any

import jax
import numpy as np

from gradclip_jax._diagnostics import GradientHealth, health_report
from gradclip_jax.demo.tasks import get_task
from gradclip_jax.demo.train import STRATEGY_SPECS, DemoConfig, TrainingRun

COLUMNS = (
    ("strategy", "strategy"),
    ("success", "solved (seeds)"),
    ("final_loss", "held-out loss (median)"),
    ("training_loss", "training loss (median)"),
    ("steps_to_solve", "steps to solve (median)"),
    ("diverged", "diverged (seeds)"),
    ("clip_rate", "steps clipped"),
)
# A held-out loss above this fraction of the constant-prediction loss learned nothing usable.
STUCK_FRACTION_OF_BASELINE = 0.9


def smoothing_window(steps: int) -> int:
    """Moving-average window for per-batch training losses (5% of the run, 1 to 50 steps)."""
    return max(1, min(50, steps // 20))


def moving_average(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average along the last axis; NaN (after divergence) stays NaN.

    Each value is the mean of its own window, summed directly: a difference of running sums
    would lose every loss after a spike (after a loss of 1e17 the float64 running sum has no
    digits left for losses of 0.07, and the average of a quiet window would read 0.0).
    """
    losses = np.asarray(losses, np.float64)
    finite_or_inf = np.where(np.isnan(losses), 0.0, losses)
    # Pad the start with NaN so that early windows average the steps they have.
    padded = np.concatenate(
        [np.full(losses.shape[:-1] + (window - 1,), np.nan), finite_or_inf], axis=-1
    )
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf never happens: no sums
        averaged = np.nanmean(windows, axis=-1)
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
      A JSON-ready dict. The verdicts come from held-out data: a seed's *held-out loss* is the
      loss of its final parameters on fresh sequences that no seed trained on (``inf`` if it
      diverged), and the seed is *solved* if it never diverged and that loss is below the
      task's ``success_loss``. The *training loss* is the mean training loss over the last
      `smoothing_window` steps, for comparison only. *Steps to solve* (solved seeds only) is
      the first step at which the moving average of the training loss fell below
      ``success_loss``. Every seed that is not solved gets a ``reason`` (`failure_reason`).
    """
    task = get_task(config.task)
    history, diverged_at = run.history[name], run.diverged_at[name]
    diverged = diverged_at >= 0
    held_out = np.where(diverged, np.inf, np.asarray(final["loss"], np.float64))
    held_out = np.where(np.isnan(held_out), np.inf, held_out)
    solved = ~diverged & (held_out < task.success_loss)
    window = smoothing_window(config.steps)
    smoothed = moving_average(history["loss"], window)
    training_loss = np.where(diverged, np.inf, smoothed[:, -1])
    below = smoothed < task.success_loss
    steps_to_solve = [
        int(np.argmax(row)) + 1 if ok and row.any() else None for row, ok in zip(below, solved)
    ]
    reached = [s for s in steps_to_solve if s is not None]
    clip_rate, clipped_fraction = clip_rates(history)
    reasons = [
        None if solved[i] else failure_reason(config, history, i, diverged_at[i], held_out[i])
        for i in range(len(config.seeds))
    ]
    return {
        "strategy": name,
        "solved": int(np.sum(solved)),
        "seeds": len(config.seeds),
        "final_loss_median": float(np.median(held_out)),
        "training_loss_median": float(np.median(training_loss)),
        "steps_to_solve_median": float(np.median(reached)) if reached else None,
        "diverged": int(np.sum(diverged)),
        "clip_rate": clip_rate,
        "clipped_fraction_mean": clipped_fraction,
        "per_seed": {
            "seed": list(config.seeds),
            "held_out_loss": [float(x) for x in held_out],
            "training_loss": [float(x) for x in training_loss],
            "diverged_at_step": [int(x) if x >= 0 else None for x in diverged_at],
            "steps_to_solve": steps_to_solve,
            "reason": reasons,
        },
    }


def failure_reason(
    config: DemoConfig,
    history: dict[str, np.ndarray],
    seed_index: int,
    diverged_at: int,
    held_out: float,
) -> str:
    """Why a seed is not solved, read from its recorded history.

    One of: *diverged at step k* (with the gradient norm and the clipper's threshold at the
    update that broke it, which say whether that update was clipped); *no better than the
    baseline*
    (held-out loss above 90% of the constant prediction's); *too slow* (the training loss
    still fell over the last fifth of the run) or *stalled* (it no longer did).

    Args:
      config: the demo configuration.
      history: the strategy's per-step records (`TrainingRun.history`).
      seed_index: row of the seed in the records.
      diverged_at: the step at which the seed diverged, or -1.
      held_out: the seed's held-out loss.
    """
    task = get_task(config.task)
    if diverged_at >= 0:
        step = int(diverged_at)
        loss = float(history["loss"][seed_index, step])
        # A finite loss at the divergence step: that step's own update overflowed the
        # parameters; otherwise the previous update threw them where the loss is not finite.
        cause = step if np.isfinite(loss) or step == 0 else step - 1
        norm = float(history["grad_norm"][seed_index, cause])
        detail = f"loss {loss:.3g}; gradient norm {norm:.3g} at step {cause}"
        threshold_key = next((k for k in history if k.endswith("/threshold")), None)
        clipped_key = next((k for k in history if k.endswith("/clipped")), None)
        if clipped_key is None:
            detail += ", no clipping"
        else:
            clipped = float(history[clipped_key][seed_index, cause])
            detail += (
                f", clipped ({100 * clipped:.0f}% of its blocks)"
                if clipped > 0
                else ", not clipped"
            )
            if threshold_key is not None:
                detail += f", threshold {float(history[threshold_key][seed_index, cause]):.3g}"
        return f"diverged at step {step} ({detail})"
    if held_out >= STUCK_FRACTION_OF_BASELINE * task.baseline_loss:
        return (
            f"no better than the baseline (held-out {held_out:.3g}, constant prediction"
            f" {task.baseline_loss:.3g})"
        )
    window = smoothing_window(config.steps)
    smoothed = moving_average(history["loss"][seed_index : seed_index + 1], window)[0]
    earlier = float(smoothed[int(0.8 * (config.steps - 1))])
    last = float(smoothed[-1])
    trend = f"training loss {earlier:.3g} -> {last:.3g} over the last 20% of steps"
    if last < 0.9 * earlier:
        return f"too slow (held-out {held_out:.3g} > {task.success_loss:.3g}; {trend})"
    return f"stalled (held-out {held_out:.3g} > {task.success_loss:.3g}; {trend})"


def _format_row(row: dict[str, Any]) -> dict[str, str]:
    steps = row["steps_to_solve_median"]

    def loss(value: float) -> str:
        return "diverged" if math.isinf(value) else f"{value:.3g}"

    return {
        "strategy": row["strategy"],
        "success": f"{row['solved']}/{row['seeds']}",
        "final_loss": loss(row["final_loss_median"]),
        "training_loss": loss(row["training_loss_median"]),
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


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One bullet per strategy with an unsolved seed: each such seed and its reason."""
    lines = []
    for row in rows:
        per_seed = row["per_seed"]
        failed = [
            f"seed {seed}: {reason}"
            for seed, reason in zip(per_seed["seed"], per_seed["reason"])
            if reason is not None
        ]
        if failed:
            lines.append(
                f"* **{row['strategy']}** ({len(failed)}/{row['seeds']}): " + "; ".join(failed)
            )
    return lines or ["Every seed of every strategy was solved."]


def threshold_table(config: DemoConfig, run: TrainingRun) -> str:
    """Markdown table: each clipper's threshold early, midway and late in the run, and how
    often its adaptive part (rather than a fixed cap) set it."""
    fifth = max(1, config.steps // 5)
    lines = [
        "| strategy | threshold, first 5% | middle | last 20% | steps clipped |"
        " threshold below its cap |",
        "|---|---|---|---|---|---|",
    ]
    for name in run.names:
        history = run.history[name]
        key = next((k for k in history if k.endswith("/threshold")), None)
        if key is None:
            continue
        threshold = np.where(np.isfinite(history[key]), history[key], np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            parts = [
                np.nanmedian(threshold[:, : max(1, config.steps // 20)]),
                np.nanmedian(threshold[:, 2 * fifth : 3 * fifth]),
                np.nanmedian(threshold[:, -fifth:]),
            ]
        spec = STRATEGY_SPECS.get(name)
        # A fixed clipper's threshold is its cap; only an adaptive rule can sit below it.
        cap = (
            None
            if spec is None or spec.factory.startswith("clip_by")
            else spec.kwargs.get("max_norm")
        )
        below_cap = "-"
        if cap is not None:
            trained = ~np.isnan(history["loss"])
            below_cap = f"{100 * np.mean(history[key][trained] < cap):.0f}% (cap {cap:g})"
        clip_rate, _ = clip_rates(history)
        cells = ["-" if np.isnan(p) else f"{p:.3g}" for p in parts]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {100 * clip_rate:.0f}% | {below_cap} |"
        )
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
        f"Baseline loss (constant prediction) {task.baseline_loss:.3f}. Held-out loss: loss of"
        f" the final parameters on {config.eval_batch_size} fresh sequences that no seed trained"
        f" on; a seed is solved when it did not diverge and its held-out loss is below"
        f" {task.success_loss:.3g}. Training loss: mean training loss over the last"
        f" {smoothing_window(config.steps)} steps. Steps to solve (solved seeds): first step at"
        " which that moving average fell below the threshold. Steps clipped: fraction of steps"
        " at which the clipper scaled anything down (its `clip_count`); results.json also has"
        " the mean fraction of blocks (tree, leaves, units or elements) scaled down per step.",
        "",
        results_table(rows),
        "",
        timing_line(config, run, total_seconds),
        "",
        "## Why seeds were not solved (from the recorded history)",
        "",
        *failure_lines(rows),
        "",
        "## How each strategy clipped (median over seeds)",
        "",
        threshold_table(config, run),
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
