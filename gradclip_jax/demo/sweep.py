"""Threshold sweep: K copies of one model, K clipping thresholds, one compiled program.

The clipper is built with ``optax.inject_hyperparams`` so its threshold lives in the
optimizer state as an array; ``jax.vmap`` over that array trains every copy side by side
inside one ``lax.scan`` training loop. All copies start from the same initialisation and
see the same batches, so they differ only by the threshold. This is the grid search users
run to choose a threshold, at the cost of one (wider) run instead of K.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradclip_jax
from gradclip_jax.demo.models import DeepRNN
from gradclip_jax.demo.tasks import get_task

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The model, task and training shared by every copy of a sweep.

    The defaults are the demo's IRNN (ReLU, identity recurrence) on the adding problem,
    whose unclipped training explodes, trained with plain SGD.
    """

    task: str = "adding"
    length: int = 50
    hidden: int = 32
    depth: int = 1
    activation: str = "relu"
    recurrent_init: str = "identity"
    recurrent_scale: float = 1.0
    learning_rate: float = 0.05
    steps: int = 500
    batch_size: int = 32
    seed: int = 0


class SweepResult(NamedTuple):
    """Per-threshold outcome of :func:`sweep` (NumPy arrays, K thresholds).

    Attributes:
      thresholds: ``(K,)`` the thresholds, in the order given.
      losses: ``(K, steps)`` training loss at each step (NaN / inf once diverged).
      diverged: ``(K,)`` whether the loss became non-finite.
      divergence_step: ``(K,)`` first step with a non-finite loss, ``-1`` if none.
      final_loss: ``(K,)`` mean loss over the last 10% of steps (NaN if diverged).
    """

    thresholds: np.ndarray
    losses: np.ndarray
    diverged: np.ndarray
    divergence_step: np.ndarray
    final_loss: np.ndarray


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_trainer(
    config: SweepConfig,
    clipper: Callable[..., optax.GradientTransformation] = gradclip_jax.clip_by_global_norm,
    hyperparameter: str = "max_norm",
) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """A pure function ``threshold -> (losses (steps,), divergence_step)``: one training run.

    The function is jittable and vmappable over ``threshold``; :func:`sweep` vmaps it,
    :func:`sequential_sweep` calls it once per threshold. After the first non-finite loss
    the parameters and optimizer state are frozen (updates masked) and the step recorded.

    Args:
      config: the shared model, task and training settings.
      clipper: a clipping factory taking ``hyperparameter`` as a keyword, wrapped with
        ``optax.inject_hyperparams`` and chained before ``optax.sgd``.
      hyperparameter: the name of the swept argument of ``clipper``.

    Returns:
      The training function.
    """
    task = get_task(config.task)
    model = DeepRNN(
        task.input_size,
        config.hidden,
        task.output_size,
        depth=config.depth,
        activation=config.activation,  # type: ignore[arg-type]
        recurrent_init=config.recurrent_init,  # type: ignore[arg-type]
        recurrent_scale=config.recurrent_scale,
        rngs=nnx.Rngs(jax.random.key(config.seed)),
    )
    graphdef, params = nnx.split(model)
    tx = optax.chain(
        optax.inject_hyperparams(clipper)(**{hyperparameter: 1.0}),
        optax.sgd(config.learning_rate),
    )
    data_key = jax.random.fold_in(jax.random.key(config.seed), 1)

    def loss_fn(params, inputs, targets):
        return task.loss(nnx.merge(graphdef, params)(inputs), targets)

    def train(threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
        injected, optimizer_state = tx.init(params)
        hyperparams = dict(injected.hyperparams)
        hyperparams[hyperparameter] = jnp.asarray(threshold, jnp.float32)
        opt_state = (injected._replace(hyperparams=hyperparams), optimizer_state)

        def step(carry, index):
            params, opt_state, divergence_step = carry
            inputs, targets = task.sample(
                jax.random.fold_in(data_key, index), config.batch_size, config.length
            )
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            alive = (divergence_step < 0) & jnp.isfinite(loss) & _all_finite(new_params)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(alive, n, o), new, old)
            divergence_step = jnp.where((divergence_step < 0) & ~alive, index, divergence_step)
            carry = (keep(new_params, params), keep(new_opt_state, opt_state), divergence_step)
            return carry, loss

        init = (params, opt_state, jnp.asarray(-1, jnp.int32))
        (_, _, divergence_step), losses = jax.lax.scan(
            step, init, jnp.arange(config.steps, dtype=jnp.int32)
        )
        # A masked step still reports the loss it computed; after divergence report NaN.
        after = jnp.arange(config.steps) > jnp.where(
            divergence_step < 0, config.steps, divergence_step
        )
        return jnp.where(after, jnp.nan, losses), divergence_step

    return train


def _result(thresholds: np.ndarray, losses: Any, divergence_step: Any) -> SweepResult:
    losses = np.asarray(losses, np.float64)
    divergence_step = np.asarray(divergence_step, np.int64)
    diverged = divergence_step >= 0
    tail = max(1, losses.shape[1] // 10)
    final = np.where(diverged, np.nan, losses[:, -tail:].mean(axis=1))
    return SweepResult(thresholds, losses, diverged, divergence_step, final)


def sweep(
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    config: SweepConfig = SweepConfig(),
    **trainer_kwargs: Any,
) -> SweepResult:
    """Trains one copy per threshold in one compiled program (``jax.vmap`` over thresholds).

    Args:
      thresholds: the K thresholds (``math.inf`` trains an unclipped copy).
      config: the shared model, task and training settings.
      **trainer_kwargs: ``clipper`` / ``hyperparameter`` for :func:`make_trainer`.

    Returns:
      A :class:`SweepResult`.

    Examples:
      >>> config = SweepConfig(length=5, hidden=4, steps=3, batch_size=4)
      >>> result = sweep([0.1, 1.0], config)
      >>> result.losses.shape, result.diverged.tolist()
      ((2, 3), [False, False])
    """
    thresholds = np.asarray(thresholds, np.float32)
    train = jax.jit(jax.vmap(make_trainer(config, **trainer_kwargs)))
    return _result(thresholds, *train(jnp.asarray(thresholds)))


def sequential_sweep(
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    config: SweepConfig = SweepConfig(),
    **trainer_kwargs: Any,
) -> SweepResult:
    """The same runs as :func:`sweep`, one after the other (one compiled run, K calls)."""
    thresholds = np.asarray(thresholds, np.float32)
    train = jax.jit(make_trainer(config, **trainer_kwargs))
    runs = [train(jnp.asarray(t)) for t in thresholds]
    return _result(thresholds, [r[0] for r in runs], [r[1] for r in runs])


def plot_sweep(
    result: SweepResult,
    path: str | pathlib.Path,
    title: str = "",
    baseline: float | None = None,
) -> None:
    """Final loss against threshold (log x); diverged copies are marked at the top.

    Args:
      result: the sweep to plot.
      path: the PNG to write.
      title: the plot title.
      baseline: if given, drawn as a horizontal line (the loss of a model that learned
        nothing, e.g. the task's ``baseline_loss``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thresholds = np.asarray(result.thresholds, np.float64)
    finite_threshold = np.isfinite(thresholds)
    # An infinite threshold (no clipping) is drawn one decade right of the largest.
    right = thresholds[finite_threshold].max() * 10 if finite_threshold.any() else 1.0
    x = np.where(finite_threshold, thresholds, right)
    ok = ~result.diverged
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x[ok], result.final_loss[ok], "o-", color="tab:blue", label="final loss")
    if result.diverged.any():
        top = np.nanmax(result.final_loss) if ok.any() else 1.0
        ax.plot(
            x[~ok],
            np.full((~ok).sum(), top),
            "x",
            color="tab:red",
            markersize=10,
            markeredgewidth=2,
            label="diverged (non-finite loss)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="constant-prediction baseline")
    if not finite_threshold.all():
        # Rounded first: float32 0.01 is 0.0099999998, whose log10 floors to -3.
        low = np.round(np.log10(thresholds[finite_threshold].min()), 6)
        high = np.round(np.log10(right / 10), 6)
        ticks = [10.0**k for k in range(int(np.floor(low)), int(np.ceil(high)) + 1)]
        labels = [f"$10^{{{k}}}$" for k in range(int(np.floor(low)), int(np.ceil(high)) + 1)]
        ax.set_xticks(ticks + [right], labels + ["none"])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("clipping threshold (max global norm, log scale; none = unclipped)")
    ax.set_ylabel("final training loss (mean of last 10% steps)")
    ax.set_title(title or "Threshold sweep")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_sweep(
    out_dir: str | pathlib.Path,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    config: SweepConfig = SweepConfig(),
) -> SweepResult:
    """The demo's ``sweep`` mode: runs :func:`sweep`, writes ``sweep.png`` and ``sweep.json``
    (thresholds, final losses, divergence steps; ``inf`` is written as ``Infinity``) and
    prints a table.

    Args:
      out_dir: output folder (created if missing).
      thresholds: the thresholds to compare.
      config: the shared model, task and training settings.

    Returns:
      The :class:`SweepResult`.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = sweep(thresholds, config)
    title = (
        f"{config.task}, length {config.length}, SGD lr {config.learning_rate}, "
        f"{config.steps} steps"
    )
    plot_sweep(result, out_dir / "sweep.png", title, get_task(config.task).baseline_loss)
    record = {
        "config": dataclasses.asdict(config),
        "thresholds": [float(t) for t in result.thresholds],
        "final_loss": [None if np.isnan(v) else float(v) for v in result.final_loss],
        "divergence_step": [int(v) for v in result.divergence_step],
    }
    (out_dir / "sweep.json").write_text(json.dumps(record, indent=1))
    print(f"{'threshold':>10} {'final loss':>11} {'diverged at':>11}")
    for t, loss, step in zip(result.thresholds, result.final_loss, result.divergence_step):
        print(f"{t:>10.4g} {loss:>11.4g} {'-' if step < 0 else step:>11}")
    return result
