"""Adaptive gradient clipping (AGC): thresholds relative to the parameters' unit norms."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradclip_jax._core import Measured, check_range, clip_scale, scale_leaf, stats_only_clipper
from gradclip_jax._norms import is_inexact, norm_of_norms, stack_scalars, unitwise_norms
from gradclip_jax._stats import ClipStats

__all__ = ["AGCState", "agc"]


class AGCState(NamedTuple):
    """State of :func:`agc`."""

    stats: ClipStats


def agc(
    clipping: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-3,
    axis: int | tuple[int, ...] | None = None,
) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (AGC) from NFNets.

    Each unit (one output feature's incoming weights) of each gradient leaf is scaled
    so that ``||G_unit|| <= clipping * max(||W_unit||, eps)``, where ``W`` is the
    parameter. Same semantics and default unit axes as ``optax.adaptive_grad_clip``;
    the layout assumption is Flax's, with output features last: Dense kernels
    ``(in, out)``, Conv kernels ``(H, W, in, out)``; vectors and scalars are one unit
    (see :func:`gradclip_jax.unit_axes`). Pass ``axis`` for other layouts, e.g.
    ``axis=1`` for PyTorch-style ``(out, in)`` kernels.

    Statistics: ``norm`` / ``clipped_norm`` are global norms before / after,
    ``threshold`` is ``clipping`` and ``clipped`` the fraction of units scaled down.

    Args:
      clipping: the largest allowed ratio of gradient to parameter unit norm, ``>= 0``.
        Brock et al. use 0.01 for large batches (and up to 0.16 for small ones).
      eps: floor on parameter norms so zero-initialised units can still move, ``>= 0``.
      axis: axes spanned by one unit, for every leaf of rank >= 2; ``None`` (default)
        infers them from the rank.

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`AGCState`. Its
      update needs ``params``.

    References:
      Brock et al., `High-Performance Large-Scale Image Recognition Without
      Normalization <https://arxiv.org/abs/2102.06171>`_, 2021

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> params = {"kernel": jnp.ones((2, 3))}  # unit norms sqrt(2)
      >>> tx = optax.chain(gradclip_jax.agc(0.01), optax.sgd(1.0))
      >>> grads = {"kernel": jnp.full((2, 3), 10.0)}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> print(f"{-updates['kernel'][0, 0]:.5f}")  # 0.01 * sqrt(2) / sqrt(2)
      0.01000
    """
    check_range("agc", "clipping", clipping)
    check_range("agc", "eps", eps)

    def clip(updates, params):
        if params is None:
            raise ValueError(
                "agc: the update needs the parameters: call "
                "`tx.update(updates, state, params)` (optax.chain passes them through)."
            )
        g_norms = unitwise_norms(updates, axis)
        p_norms = unitwise_norms(params, axis)
        leaves, treedef = jax.tree.flatten(updates)
        g_leaves = jax.tree.leaves(g_norms)
        p_leaves = jax.tree.leaves(p_norms)
        scales = [
            clip_scale(g, jnp.asarray(clipping, p.dtype) * jnp.maximum(p, eps))
            for g, p in zip(g_leaves, p_leaves)
        ]
        it = iter(scales)
        out = [scale_leaf(x, next(it)) if is_inexact(x) else x for x in leaves]
        fraction = jnp.mean(stack_scalars(scales) < 1) if scales else jnp.zeros(())
        g_vector = stack_scalars(g_leaves)
        measured = Measured(
            norm_of_norms(g_vector),
            clipping,
            norm_of_norms(g_vector * stack_scalars(scales)),
            fraction,
        )
        return jax.tree.unflatten(treedef, out), measured

    return stats_only_clipper(AGCState, clip)
