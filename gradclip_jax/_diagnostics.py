"""Gradient health diagnostics: which leaves explode or vanish, and how dL/dh_t varies with t.

Two views of a gradient that clipping statistics do not give:

* per leaf: the gradient norm, the parameter norm and their ratio, with a flag for leaves whose
  gradient is out of all proportion to their size (exploding) or too small to ever move them
  (vanishing), see `gradient_health`;
* through time: the norm of the gradient of the loss with respect to every hidden state of a
  recurrent network, from the last step back to the first, see `hidden_state_gradient_norms`.
  Exploding gradients show as norms growing exponentially going back in time, vanishing ones as
  norms decaying exponentially (Pascanu et al., 2013).

All functions are pure JAX and work under ``jit`` except `health_report`, which reads the values
back to the host to format them.

References:
  Pascanu, Mikolov and Bengio, `On the difficulty of training recurrent neural networks
  <https://arxiv.org/abs/1211.5063>`_, 2013.

  Brock, De, Smith and Simonyan, `High-performance large-scale image recognition without
  normalization <https://arxiv.org/abs/2102.06171>`_, 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradclip_jax._norms import leaf_norms, unitwise_norms

# A ratio above EXPLODING_RATIO means a single SGD step at the small learning rate 0.01 would
# move the leaf by its own size: the next step is destroyed rather than improved.
EXPLODING_RATIO = 1e2
# A ratio below VANISHING_RATIO means ten thousand SGD steps at learning rate 0.1 move the leaf
# by less than a thousandth of its size: it is effectively frozen.
VANISHING_RATIO = 1e-6
# Zero-initialised leaves (biases) have no size of their own; they are measured against a
# parameter RMS of PARAMETER_RMS_FLOOR instead (a typical weight of a 10^4-wide layer).
PARAMETER_RMS_FLOOR = 1e-2


class GradientHealth(NamedTuple):
    """Per-leaf gradient health; every field has the structure of the gradients.

    Attributes:
      grad_norm: L2 norm of each gradient leaf (float32 scalars).
      param_norm: L2 norm of each parameter leaf.
      ratio: ``grad_rms / max(param_rms, rms_floor)``, equal to ``grad_norm / param_norm``
        whenever the parameter RMS is above the floor.
      exploding: non-finite gradient, or ``ratio > exploding_ratio`` (bool scalars).
      vanishing: ``ratio < vanishing_ratio`` (bool scalars).
    """

    grad_norm: Any
    param_norm: Any
    ratio: Any
    exploding: Any
    vanishing: Any


def gradient_health(
    grads: Any,
    params: Any,
    *,
    exploding_ratio: float = EXPLODING_RATIO,
    vanishing_ratio: float = VANISHING_RATIO,
    rms_floor: float = PARAMETER_RMS_FLOOR,
) -> GradientHealth:
    """Measures every gradient leaf against its parameter leaf and flags the outliers.

    The ratio of gradient to parameter size is scale-free (it does not depend on the width of the
    layer or on the units of the loss's inputs) and is what an SGD step of learning rate ``lr``
    changes a leaf by, relative to its size: ``lr * ratio``.

    Args:
      grads: gradient pytree of floating-point arrays.
      params: parameter pytree with the same structure.
      exploding_ratio: flag a leaf whose ratio exceeds this (default `EXPLODING_RATIO` = 100).
      vanishing_ratio: flag a leaf whose ratio is below this (default `VANISHING_RATIO` = 1e-6).
      rms_floor: smallest parameter RMS a gradient is measured against (default
        `PARAMETER_RMS_FLOOR` = 0.01), so that zero-initialised leaves get a finite ratio.

    Returns:
      A `GradientHealth` of per-leaf scalars.

    Examples:
      >>> import jax.numpy as jnp
      >>> params = {"w": jnp.ones((3, 3)), "b": jnp.zeros(3)}
      >>> grads = {"w": jnp.full((3, 3), 1e3), "b": jnp.full(3, 1e-9)}
      >>> health = gradient_health(grads, params)
      >>> bool(health.exploding["w"]), bool(health.vanishing["b"])
      (True, True)
      >>> print(f"{float(health.ratio['w']):.0f}")
      1000
    """
    grad_norm = leaf_norms(grads)
    param_norm = leaf_norms(params)

    def ratio(p: jax.Array, g_norm: jax.Array, p_norm: jax.Array) -> jax.Array:
        # Gradient and parameter have the same size, so the RMS ratio is the norm ratio.
        return g_norm / jnp.maximum(p_norm, rms_floor * math.sqrt(p.size))

    ratios = jax.tree.map(ratio, params, grad_norm, param_norm)
    exploding = jax.tree.map(
        lambda n, r: ~jnp.isfinite(n) | (r > exploding_ratio), grad_norm, ratios
    )
    vanishing = jax.tree.map(lambda r: r < vanishing_ratio, ratios)
    return GradientHealth(grad_norm, param_norm, ratios, exploding, vanishing)


def health_report(health: GradientHealth) -> list[dict[str, Any]]:
    """Reads a `GradientHealth` back to the host as one row per leaf, for printing or JSON.

    Returns:
      Dicts with ``path`` (``"layer/0/kernel"``), ``grad_norm``, ``param_norm``, ``ratio`` (Python
      floats) and ``status``: ``"exploding"``, ``"vanishing"`` or ``"ok"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> health = gradient_health({"w": jnp.full(2, 1e3)}, {"w": jnp.ones(2)})
      >>> [(row["path"], row["status"]) for row in health_report(health)]
      [('w', 'exploding')]
    """
    rows = []
    paths_and_norms, _ = jax.tree_util.tree_flatten_with_path(health.grad_norm)
    fields = [jax.tree.leaves(getattr(health, name)) for name in GradientHealth._fields[1:]]
    for (path, grad_norm), param_norm, ratio, exploding, vanishing in zip(paths_and_norms, *fields):
        status = "exploding" if bool(exploding) else "vanishing" if bool(vanishing) else "ok"
        rows.append(
            {
                "path": jax.tree_util.keystr(path, simple=True, separator="/"),
                "grad_norm": float(grad_norm),
                "param_norm": float(param_norm),
                "ratio": float(ratio),
                "status": status,
            }
        )
    return rows


def hidden_state_gradient_norms(
    loss_of_perturbation: Callable[[jax.Array], jax.Array],
    perturbation: jax.Array,
    *,
    time_axis: int = 0,
    keep_axes: Sequence[int] = (),
) -> jax.Array:
    """Norm of dL/dh_t for every step t of a recurrent network.

    The model adds a perturbation ``delta`` to its hidden states (``h_t + delta_t`` is what the
    next step and the output see); at ``delta = 0`` the gradient of the loss with respect to
    ``delta_t`` is exactly dL/dh_t. This function takes that gradient and reduces it to one L2
    norm per time step (and per entry of ``keep_axes``, e.g. per layer).

    Args:
      loss_of_perturbation: ``delta -> scalar loss`` (model, inputs and targets closed over).
      perturbation: the point at which to differentiate, normally zeros of the hidden states'
        shape, e.g. ``(length, batch, hidden)`` or ``(depth, length, batch, hidden)``.
      time_axis: the time axis of ``perturbation``.
      keep_axes: further axes not to reduce (for example the layer axis).

    Returns:
      Norms with the kept axes (time included) in their original order.

    Examples:
      A linear recurrence ``h_t = 2 h_{t-1} + x_t`` read out at the last step amplifies the
      gradient by 2 per step going back in time:

      >>> import jax, jax.numpy as jnp
      >>> def loss(delta):
      ...     def step(h, d):
      ...         h = 2.0 * h + 1.0 + d
      ...         return h, h
      ...     _, states = jax.lax.scan(step, jnp.zeros(3), delta)
      ...     return jnp.sum(states[-1])
      >>> norms = hidden_state_gradient_norms(loss, jnp.zeros((4, 3)))
      >>> print(norms / norms[-1])
      [8. 4. 2. 1.]
    """
    grad = jax.grad(loss_of_perturbation)(perturbation)
    kept = {axis % grad.ndim for axis in (time_axis, *keep_axes)}
    reduced = tuple(axis for axis in range(grad.ndim) if axis not in kept)
    return jnp.squeeze(unitwise_norms(grad, axis=reduced), axis=reduced)
