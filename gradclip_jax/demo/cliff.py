"""The loss cliff of Pascanu et al. (2013), Fig. 6: why clipping works, in one picture.

A one-unit recurrent network ``x_t = w * sigmoid(x_{t-1}) + b`` from ``x_0 = 0.5`` is run
for 50 steps and scored by ``(sigmoid(x_50) - 0.7) ** 2``. For ``w > 4`` the map has two
stable fixed points over a band of ``b``; where the run switches from converging to one to
converging to the other, ``x_50`` jumps and the loss surface has a wall: a thin ridge on
which the gradient is orders of magnitude larger than anywhere else. A plain gradient step
that lands on the wall is thrown far away, into a flat plateau; the same step with its
norm clipped moves a bounded distance and keeps descending.

References:
  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, 2013 (Section 3.2 and Fig. 6).
"""

from __future__ import annotations

import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax

STEPS_IN_TIME = 50
INITIAL_STATE = 0.5
TARGET = 0.7

# The window and starts show the wall (near the saddle-node bifurcation of the map) and
# the valley of zero loss below it; found by scanning the surface numerically.
W_RANGE = (0.0, 10.0)
B_RANGE = (-8.0, 8.0)
STARTS = ((4.5, -3.0), (5.5, -3.5), (6.0, -4.5), (5.0, -2.0))
LEARNING_RATE = 1.0
DESCENT_STEPS = 80
MAX_NORM = 1.0


def cliff_loss(params: jax.Array) -> jax.Array:
    """``(sigmoid(x_50) - 0.7) ** 2`` for ``params = (w, b)``.

    Args:
      params: ``(2,)`` array holding ``w`` and ``b``.

    Returns:
      The scalar loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> print(f"{cliff_loss(jnp.array([0.0, 0.0])):.4f}")  # x_50 = 0, sigmoid = 0.5
      0.0400
    """
    w, b = params[0], params[1]

    def step(x, _):
        return w * jax.nn.sigmoid(x) + b, None

    x, _ = jax.lax.scan(step, jnp.asarray(INITIAL_STATE, params.dtype), None, STEPS_IN_TIME)
    return (jax.nn.sigmoid(x) - TARGET) ** 2


def loss_surface(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Loss and gradient norm on the grid ``w x b``.

    Args:
      w: ``(n,)`` values of ``w`` (columns).
      b: ``(m,)`` values of ``b`` (rows).

    Returns:
      ``loss`` and ``gradient_norm``, both ``(m, n)`` float64 arrays.
    """
    ww, bb = np.meshgrid(w, b)
    points = jnp.asarray(np.stack([ww.ravel(), bb.ravel()], axis=1), jnp.float32)
    loss, grads = jax.jit(jax.vmap(jax.value_and_grad(cliff_loss)))(points)
    norms = jnp.linalg.norm(grads, axis=1)
    return (
        np.asarray(loss, np.float64).reshape(ww.shape),
        np.asarray(norms, np.float64).reshape(ww.shape),
    )


def descend(
    starts: jax.Array, tx: optax.GradientTransformation, steps: int
) -> tuple[jax.Array, jax.Array]:
    """Runs ``steps`` optimizer steps on `cliff_loss` from each start.

    Args:
      starts: ``(k, 2)`` initial ``(w, b)``.
      tx: the optimizer (e.g. ``optax.sgd``, optionally chained after a clipper).
      steps: number of steps.

    Returns:
      ``path`` ``(k, steps + 1, 2)`` of parameters (the start first) and ``losses``
      ``(k, steps + 1)`` along it.
    """

    def run(start):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(cliff_loss)(params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), params

        _, path = jax.lax.scan(step, (start, tx.init(start)), None, steps)
        path = jnp.concatenate([start[None], path])
        return path, jax.vmap(cliff_loss)(path)

    return jax.jit(jax.vmap(run))(starts)


class Cliff(NamedTuple):
    """Everything the cliff figure shows (float64 NumPy arrays)."""

    w: np.ndarray  # (n,)
    b: np.ndarray  # (m,)
    loss: np.ndarray  # (m, n)
    gradient_norm: np.ndarray  # (m, n)
    unclipped_path: np.ndarray  # (k, steps + 1, 2)
    clipped_path: np.ndarray  # (k, steps + 1, 2)
    unclipped_loss: np.ndarray  # (k, steps + 1)
    clipped_loss: np.ndarray  # (k, steps + 1)


def compute_cliff(
    resolution: int = 200,
    starts: Any = STARTS,
    learning_rate: float = LEARNING_RATE,
    steps: int = DESCENT_STEPS,
    max_norm: float = MAX_NORM,
) -> Cliff:
    """The loss surface and gradient-descent paths with and without clipping.

    Both descents use ``optax.sgd(learning_rate)`` for ``steps`` steps from the same
    starts; the clipped one first applies ``gradclip_jax.clip_by_global_norm(max_norm)``
    to the 2-vector gradient.

    Args:
      resolution: grid points along each axis.
      starts: ``(k, 2)`` initial ``(w, b)``.
      learning_rate: SGD step size.
      steps: number of descent steps.
      max_norm: clipping threshold.

    Returns:
      A :class:`Cliff`.
    """
    w = np.linspace(*W_RANGE, resolution)
    b = np.linspace(*B_RANGE, resolution)
    loss, norms = loss_surface(w, b)
    starts = jnp.asarray(starts, jnp.float32)
    plain = optax.sgd(learning_rate)
    clipped = optax.chain(gradclip_jax.clip_by_global_norm(max_norm), optax.sgd(learning_rate))
    unclipped_path, unclipped_loss = descend(starts, plain, steps)
    clipped_path, clipped_loss = descend(starts, clipped, steps)
    as64 = lambda x: np.asarray(x, np.float64)
    return Cliff(
        w,
        b,
        loss,
        norms,
        as64(unclipped_path),
        as64(clipped_path),
        as64(unclipped_loss),
        as64(clipped_loss),
    )


def plot_cliff(cliff: Cliff, path: str | pathlib.Path) -> None:
    """Saves the loss surface (log colour scale) twice, side by side: plain descent from every
    start on the left, clipped descent from the same starts on the right (drawn on one plane,
    the two paths coincide until the wall and hide each other)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.8), sharey=True)
    floor = max(float(cliff.loss[cliff.loss > 0].min()), 1e-8)
    norm = LogNorm(vmin=floor, vmax=float(cliff.loss.max()))
    panels = (
        (axes[0], cliff.unclipped_path, "tab:red", "plain gradient descent"),
        (axes[1], cliff.clipped_path, "white", f"gradient clipped to norm {MAX_NORM:g}"),
    )
    for ax, paths, color, title in panels:
        mesh = ax.pcolormesh(
            cliff.w,
            cliff.b,
            np.maximum(cliff.loss, floor),
            norm=norm,
            cmap="viridis",
            shading="auto",
        )
        for k, path_k in enumerate(paths):
            first = k == 0
            ax.plot(
                *path_k.T,
                "-",
                color=color,
                marker=".",
                ms=4,
                lw=1.2,
                label="path" if first else None,
            )
            ax.plot(
                *path_k[-1],
                "X",
                color=color,
                markeredgecolor="black",
                ms=9,
                label="end" if first else None,
            )
            ax.plot(
                *path_k[0],
                "o",
                color="black",
                markeredgecolor="white",
                ms=7,
                label="start" if first else None,
            )
        ax.set_xlim(cliff.w[0], cliff.w[-1])
        ax.set_ylim(cliff.b[0], cliff.b[-1])
        ax.set_xlabel("w (recurrent weight)")
        ax.set_title(f"{title}, {DESCENT_STEPS} steps of rate {LEARNING_RATE:g}")
        # Under the plane, not over it.
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.13),
            ncol=3,
            facecolor="0.35",
            labelcolor="white",
            framealpha=0.9,
            fontsize=8,
        )
    axes[0].set_ylabel("b (bias)")
    fig.suptitle(
        r"Loss cliff of $x_t = w\,\sigma(x_{t-1}) + b$, 50 steps (Pascanu et al. 2013, Fig. 6)"
    )
    fig.colorbar(mesh, ax=list(axes), label=r"loss $(\sigma(x_{50}) - 0.7)^2$ (log scale)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _largest_step(paths: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(paths, axis=1), axis=-1).max())


def run_cliff(out_dir: str | pathlib.Path, resolution: int = 200) -> dict[str, Any]:
    """Computes the cliff, writes ``cliff.png`` into ``out_dir`` and returns summary numbers.

    Args:
      out_dir: output folder (created if missing).
      resolution: grid points along each axis of the surface.

    Returns:
      A dict: ``max_gradient_norm`` and ``median_gradient_norm`` on the grid, their
      ``wall_ratio``, per-start ``final_loss_unclipped`` / ``final_loss_clipped`` lists,
      ``starts_where_clipping_wins`` (unclipped ends higher), the longest single step
      of either descent (``largest_step_unclipped`` / ``largest_step_clipped``; the
      clipped one is at most ``LEARNING_RATE * MAX_NORM``) and ``png`` (the path).
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cliff = compute_cliff(resolution)
    png = out_dir / "cliff.png"
    plot_cliff(cliff, png)
    unclipped = cliff.unclipped_loss[:, -1]
    clipped = cliff.clipped_loss[:, -1]
    largest = float(np.nanmax(cliff.gradient_norm))
    median = float(np.nanmedian(cliff.gradient_norm))
    return {
        "max_gradient_norm": largest,
        "median_gradient_norm": median,
        "wall_ratio": largest / median,
        "final_loss_unclipped": unclipped.tolist(),
        "final_loss_clipped": clipped.tolist(),
        "starts_where_clipping_wins": int(np.sum(unclipped > clipped)),
        "largest_step_unclipped": _largest_step(cliff.unclipped_path),
        "largest_step_clipped": _largest_step(cliff.clipped_path),
        "png": str(png),
    }
