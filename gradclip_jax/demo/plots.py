"""PNG plots of a demo run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradclip_jax.demo.report import moving_average, smoothing_window  # noqa: E402
from gradclip_jax.demo.tasks import get_task  # noqa: E402
from gradclip_jax.demo.train import STRATEGY_SPECS, DemoConfig, TrainingRun  # noqa: E402

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _grid(count: int, title: str) -> tuple[Any, list[Any]]:
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.3 * rows), sharex=True, sharey=True, squeeze=False
    )
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return fig, list(axes.flat[:count])


def _save(fig: Any, path: pathlib.Path, legend_from: Sequence[Any] = ()) -> None:
    """Saves ``fig`` with one legend for the entries of the axes ``legend_from``, placed where
    it covers no data: in an empty slot of the grid if there is one, else under the panels."""
    handles: dict[str, Any] = {}
    for ax in legend_from:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    spare = [ax for ax in fig.axes if not ax.get_visible()]
    if not handles:
        fig.tight_layout()
    elif spare:
        spare[0].set_visible(True)
        spare[0].axis("off")
        spare[0].legend(list(handles.values()), list(handles), loc="center", fontsize=9)
        fig.tight_layout()
    else:
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_outer(axes: Sequence[Any], ylabel: str) -> None:
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.label_outer()
        ax.grid(True, which="major", alpha=0.3)


def _finite(values: np.ndarray) -> np.ndarray:
    """float64 copy with non-finite values as NaN (gaps), so log axes stay in range."""
    values = np.asarray(values, np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def _median_over_seeds(values: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN; NaN where every seed is NaN (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(_finite(values), axis=0)


def _title(run: TrainingRun, name: str, diverged_note: str) -> str:
    """Panel title: the strategy, its divergences, and the earlier strategy it repeats exactly
    (same losses at every step and seed), if any."""
    diverged = int(np.sum(run.diverged_at[name] >= 0))
    title = name + (f" ({diverged} {diverged_note})" if diverged else "")
    losses = run.history[name]["loss"]
    for other in run.names[: run.names.index(name)]:
        if np.array_equal(run.history[other]["loss"], losses, equal_nan=True):
            return f"{title}, identical to {other}"
    return title


def plot_losses(config: DemoConfig, run: TrainingRun, path: pathlib.Path) -> None:
    """Training loss (moving average) of every seed, one panel per strategy, log scale."""
    task = get_task(config.task)
    window = smoothing_window(config.steps)
    fig, axes = _grid(
        len(run.names),
        f"{task.name}, length {config.length}: training loss ({window}-step average)",
    )
    steps = np.arange(1, config.steps + 1)
    for ax, name in zip(axes, run.names):
        ax.set_yscale("log")
        smoothed = _finite(moving_average(run.history[name]["loss"], window))
        for seed, curve, diverged_at in zip(config.seeds, smoothed, run.diverged_at[name]):
            (line,) = ax.plot(steps, curve, lw=1, label=f"seed {seed}")
            if diverged_at >= 0:
                ax.plot(diverged_at + 1, task.baseline_loss, "x", color=line.get_color(), ms=10)
        ax.axhline(task.baseline_loss, color="k", ls="--", lw=1, label="constant prediction")
        ax.axhline(task.success_loss, color="g", ls=":", lw=1.5, label="solved below")
        ax.set_title(_title(run, name, "diverged at x"), fontsize=10)
    # Diverging losses reach 1e30: show the range where learning happens.
    axes[0].set_ylim(task.success_loss / 10, task.baseline_loss * 30)
    _label_outer(axes, f"{task.name} loss")
    _save(fig, path, legend_from=axes[:1])


def plot_grad_norms(config: DemoConfig, run: TrainingRun, path: pathlib.Path) -> None:
    """Global gradient norm before clipping per seed, with the threshold or the clipped norm."""
    fig, axes = _grid(len(run.names), "Global gradient norm before clipping, per seed")
    steps = np.arange(1, config.steps + 1)
    for ax, name in zip(axes, run.names):
        ax.set_yscale("log")
        history = run.history[name]
        for seed, norms, diverged_at in zip(
            config.seeds, history["grad_norm"], run.diverged_at[name]
        ):
            norms = _finite(norms)
            if diverged_at >= 0:
                norms[diverged_at + 1 :] = np.nan
            ax.plot(
                steps,
                norms,
                lw=0.7,
                alpha=0.8,
                marker="." if diverged_at >= 0 else None,
                ms=4,
                label=f"seed {seed}",
            )
        key = (
            "threshold"
            if name in STRATEGY_SPECS and STRATEGY_SPECS[name].global_threshold
            else ("clipped_norm")
        )
        stat = next((k for k in history if k.endswith(f"/{key}")), None)
        if stat is not None:
            label = "threshold" if key == "threshold" else "norm after clipping"
            ax.plot(
                steps,
                _median_over_seeds(history[stat]),
                color="k",
                lw=1.2,
                ls="--" if key == "threshold" else ":",
                label=f"{label} (median)",
            )
        ax.set_title(_title(run, name, "diverged"), fontsize=10)
    _label_outer(axes, "global gradient norm")
    _save(fig, path, legend_from=axes)


def plot_hidden_gradients(
    config: DemoConfig,
    initial: np.ndarray,
    final: dict[str, np.ndarray],
    diverged: dict[str, np.ndarray],
    path: pathlib.Path,
) -> None:
    """Norm of dL/dh_t against t, at initialisation and after training, one panel per layer.

    Args:
      config: the demo configuration.
      initial: ``(seeds, depth, length)`` norms at initialisation.
      final: strategy name -> ``(seeds, depth, length)`` norms after training.
      diverged: strategy name -> ``(seeds,)`` bool; diverged seeds are left out of the median.
      path: where to write the PNG.
    """
    depth = initial.shape[1]
    fig, axes = plt.subplots(1, depth, figsize=(6.5 * depth, 4.4), squeeze=False)
    fig.suptitle("How far back the gradient reaches: ||dL/dh_t|| (median over seeds)")
    steps = np.arange(1, config.length + 1)
    for layer, ax in enumerate(axes[0]):
        ax.set_yscale("log")
        ax.plot(steps, np.median(_finite(initial[:, layer]), axis=0), "k--", lw=2, label="at init")
        drawn: dict[str, np.ndarray] = {}
        for i, (name, norms) in enumerate(final.items()):
            kept = _finite(norms[~diverged[name], layer])
            label = f"after: {name}"
            if diverged[name].any():
                label += f" ({int(diverged[name].sum())} diverged, left out)"
            curve = np.median(kept, axis=0) if len(kept) else np.full(config.length, np.nan)
            same = [
                other
                for other, seen in drawn.items()
                if np.allclose(seen, curve, rtol=1e-6, equal_nan=True)
            ]
            if same and not np.all(np.isnan(curve)):
                label += f" (identical to {same[0]})"
            drawn[name] = curve
            # Line styles cycle with the colours, and markers set apart curves that coincide.
            ax.plot(
                steps,
                curve,
                lw=1.2,
                ls=LINE_STYLES[i % len(LINE_STYLES)],
                marker=MARKERS[i % len(MARKERS)],
                markevery=max(1, config.length // 8) + i,
                ms=4,
                label=label,
            )
        ax.set_xlabel("time step t (the loss reads the last step)")
        ax.set_ylabel("||dL/dh_t||")
        ax.set_title(f"layer {layer + 1} of {depth}")
        ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    _save(fig, path)
