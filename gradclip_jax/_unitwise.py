"""Adaptive gradient clipping (AGC): thresholds relative to the parameters' unit norms."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gradclip_jax import rules
from gradclip_jax._clip import ClipState, check_structural, clipper
from gradclip_jax._tree import is_inexact
from gradclip_jax._validate import check_range

__all__ = ["AGCState", "agc"]

AGCState = ClipState


def _paired_params(updates: Any, params: Any) -> list[jax.Array]:
    """The parameters' leaves matching the updates' inexact leaves, checked."""
    if params is None:
        raise ValueError(
            "agc: the update needs the parameters: call "
            "`tx.update(updates, state, params)` (optax.chain passes them through)."
        )
    flat_updates, update_def = jax.tree_util.tree_flatten_with_path(updates)
    flat_params, param_def = jax.tree_util.tree_flatten_with_path(params)
    if update_def != param_def:
        raise ValueError(
            "agc: the updates and the parameters must have the same tree structure; got "
            f"{update_def} and {param_def}."
        )
    paired = []
    for (path, g), (_, p) in zip(flat_updates, flat_params):
        if not is_inexact(g):
            continue
        if not is_inexact(p) or p.shape != g.shape:
            raise ValueError(
                f"agc: the parameter at {jax.tree_util.keystr(path)} is "
                f"{getattr(p, 'dtype', type(p).__name__)}{getattr(p, 'shape', '')} for a "
                f"{g.dtype}{g.shape} gradient; AGC needs a floating-point parameter of the "
                "gradient's shape."
            )
        paired.append(p)
    return paired


def agc(
    clipping: float | jax.Array = 0.01,
    *,
    eps: float | jax.Array = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    name: str | None = None,
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
      axis: axes spanned by one unit, for every leaf of rank >= 2 (vectors and scalars
        are one unit); ``None`` (default) infers them from the rank. Structural: under
        ``optax.inject_hyperparams`` list it in ``static_args``.
      name: the prefix of this clipper's keys in :func:`gradclip_jax.stats`; default
        ``"agc"``.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`. Its update needs ``params``.

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
    check_structural("agc", "axis", axis)
    rule = rules.build("agc", rules.Constant, clipping)
    return clipper("agc", rule, "unit", name=name, axis=axis, eps=eps, pair_params=_paired_params)
