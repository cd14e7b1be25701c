"""Clippers with a fixed (or injected) threshold: by value, global norm, leaf norm, block RMS."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gradclip_jax import rules
from gradclip_jax._clip import ClipState, clipper
from gradclip_jax._validate import check_ord, check_threshold

__all__ = [
    "ClipByBlockRMSState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
]

# Every clipper's state is a ClipState; the names remain for code that annotates with them.
ClipByValueState = ClipState
ClipByGlobalNormState = ClipState
ClipByLeafNormState = ClipState
ClipByBlockRMSState = ClipState


def _constant(fn: str, arg: str, value: Any) -> rules.Constant:
    check_threshold(fn, arg, value)
    return rules.build(fn, rules.Constant, value)


def clip_by_value(
    max_abs: float | jax.Array, *, axis_name: Any = None, name: str | None = None
) -> optax.GradientTransformation:
    """Clips every element of the updates to ``[-max_abs, max_abs]``.

    Complex elements are scaled to magnitude ``max_abs``, keeping their phase.
    Statistics measure the largest magnitude (the infinity norm): ``norm`` before,
    ``clipped_norm`` after; ``clipped`` is 1 when any element was clipped.

    Args:
      max_abs: the largest magnitude an element may keep; ``>= 0``, ``math.inf`` never
        clips.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when each device holds
        part of the tree: the clipping is element-wise either way, and the statistics
        become those of the whole tree (the same on every device).

      name: the prefix of this clipper's keys in :func:`gradclip_jax.stats`; default
        its factory's name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_value(1.0), optax.sgd(1.0))
      >>> params = jnp.zeros(3)
      >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(params), params)
      >>> print(updates)
      [ 1.  -0.5 -1. ]
    """
    rule = _constant("clip_by_value", "max_abs", max_abs)
    return clipper("clip_by_value", rule, "element", name=name, axis_name=axis_name)


def clip_by_global_norm(
    max_norm: float | jax.Array,
    *,
    ord: int | float | None = None,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Scales the updates down so that their global norm is at most ``max_norm``.

    The whole tree is multiplied by ``min(1, max_norm / norm)``: one scalar, one
    multiply per element, direction preserved. Unlike ``optax.clip_by_global_norm``
    the norm accumulates in float32 for half-precision leaves, does not overflow for
    float32 entries up to ~1e38, gives zeros (not NaN) for zero updates with
    ``max_norm=0``, rejects negative thresholds, and is reported in the state.

    Args:
      max_norm: largest global norm allowed; ``>= 0``, ``math.inf`` never clips.
      ord: the norm: 2 (``None``, the default, as in Pascanu et al.), 1 or ``math.inf``;
        structural
        (under ``optax.inject_hyperparams``, list it in ``static_args``).
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when each device holds
        part of the tree, so that the norm is that of the whole tree. Not needed under
        ``jax.jit`` on sharded arrays.

      name: the prefix of this clipper's keys in :func:`gradclip_jax.stats`; default
        its factory's name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([30.0, 40.0])}
      >>> updates, state = tx.update(grads, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['clip_by_global_norm/norm']:.1f} -> "
      ...       f"{logs['clip_by_global_norm/clipped_norm']:.1f}")
      50.0 -> 1.0
    """
    fn = "clip_by_global_norm"
    rule = _constant(fn, "max_norm", max_norm)
    return clipper(fn, rule, "global", name=name, ord=check_ord(fn, ord), axis_name=axis_name)


def clip_by_leaf_norm(
    max_norm: float | jax.Array,
    *,
    ord: int | float | None = None,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """Scales each leaf (layer tensor) separately so that its own norm is at most ``max_norm``.

    Statistics: ``norm`` / ``clipped_norm`` are global norms before / after, and
    ``clipped`` is the fraction of leaves that were scaled down.

    Args:
      max_norm: largest norm a leaf may keep; ``>= 0``, ``math.inf`` never clips.
      ord: 2 (``None``, the default), 1 or ``math.inf``; structural (under
        ``optax.inject_hyperparams``, list it in ``static_args``).
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when *every* leaf is
        split across devices (e.g. reduce-scattered gradients): each leaf's norm is that
        of the whole leaf. Not needed under ``jax.jit`` on sharded arrays.

      name: the prefix of this clipper's keys in :func:`gradclip_jax.stats`; default
        its factory's name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = gradclip_jax.clip_by_leaf_norm(1.0)
      >>> grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
      >>> updates, state = tx.update(grads, tx.init(grads))
      >>> print(updates["a"], updates["b"])
      [0.6 0.8] [0.5]
      >>> print(gradclip_jax.stats(state)["clip_by_leaf_norm/clipped"])  # fraction of leaves
      0.5
    """
    fn = "clip_by_leaf_norm"
    rule = _constant(fn, "max_norm", max_norm)
    return clipper(fn, rule, "leaf", name=name, ord=check_ord(fn, ord), axis_name=axis_name)


def clip_by_block_rms(
    threshold: float | jax.Array, *, axis_name: Any = None, name: str | None = None
) -> optax.GradientTransformation:
    """Scales each leaf so that its root-mean-square is at most ``threshold``.

    Same semantics as ``optax.clip_by_block_rms`` (a leaf is divided by
    ``max(1, rms / threshold)``), with our numerics: float32 accumulation, no overflow,
    no NaN for zero leaves with ``threshold=0``, and statistics (global norms before /
    after, fraction of leaves scaled).

    Args:
      threshold: largest RMS a leaf may keep; ``>= 0``, ``math.inf`` never clips.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when *every* leaf is
        split evenly across devices: the RMS is that of the whole leaf. Not needed
        under ``jax.jit`` on sharded arrays.

      name: the prefix of this clipper's keys in :func:`gradclip_jax.stats`; default
        its factory's name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> tx = gradclip_jax.clip_by_block_rms(1.0)
      >>> updates, _ = tx.update({"w": jnp.array([2.0, -2.0])}, tx.init(None))
      >>> print(updates["w"])
      [ 1. -1.]
    """
    fn = "clip_by_block_rms"
    rule = _constant(fn, "threshold", threshold)
    return clipper(fn, rule, "leaf", name=name, axis_name=axis_name, per_size=True)
