"""Clippers with a fixed (or injected) threshold: by value, global norm, leaf norm, block RMS."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax._core import (
    Measured,
    check_threshold,
    clip_scale,
    scale_leaf,
    scale_tree,
    stats_only_clipper,
)
from gradclip_jax._norms import (
    accumulation_dtype,
    check_ord,
    dispatch_ord,
    global_norm,
    is_inexact,
    leaf_sums,
    norm_of_norms,
    restore_norms,
    stack_scalars,
)
from gradclip_jax._stats import ClipStats

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


class ClipByValueState(NamedTuple):
    """State of :func:`clip_by_value`."""

    stats: ClipStats


class ClipByGlobalNormState(NamedTuple):
    """State of :func:`clip_by_global_norm`."""

    stats: ClipStats


class ClipByLeafNormState(NamedTuple):
    """State of :func:`clip_by_leaf_norm`."""

    stats: ClipStats


class ClipByBlockRMSState(NamedTuple):
    """State of :func:`clip_by_block_rms`."""

    stats: ClipStats


def _clip_value_leaf(x: Any, max_abs: jax.Array) -> Any:
    if not is_inexact(x):
        return x
    if jnp.iscomplexobj(x):
        # Complex entries keep their phase: each is scaled so that |x| <= max_abs.
        magnitude = jnp.abs(x).astype(accumulation_dtype(x.dtype))
        return scale_leaf(x, clip_scale(magnitude, max_abs))
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    bound = max_abs.astype(wide.dtype)
    return jnp.clip(wide, -bound, bound).astype(x.dtype)


def clip_by_value(
    max_abs: float | jax.Array, *, axis_name: Any = None
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

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ClipByValueState`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_value(1.0), optax.sgd(1.0))
      >>> params = jnp.zeros(3)
      >>> updates, state = tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(params), params)
      >>> print(updates)
      [ 1.  -0.5 -1. ]
    """
    check_threshold("clip_by_value", "max_abs", max_abs)

    def clip(updates, params):
        del params
        bound = jnp.asarray(max_abs, jnp.float32)
        largest = global_norm(updates, math.inf, axis_name=axis_name)
        clipped = jax.tree.map(lambda x: _clip_value_leaf(x, bound), updates)
        after = jnp.minimum(largest, bound.astype(largest.dtype))
        return clipped, Measured(largest, bound, after, largest > bound)

    return stats_only_clipper(ClipByValueState, clip)


def clip_by_global_norm(
    max_norm: float | jax.Array, *, ord: int | float = 2, axis_name: Any = None
) -> optax.GradientTransformation:
    """Scales the updates down so that their global norm is at most ``max_norm``.

    The whole tree is multiplied by ``min(1, max_norm / norm)``: one scalar, one
    multiply per element, direction preserved. Unlike ``optax.clip_by_global_norm``
    the norm accumulates in float32 for half-precision leaves, does not overflow for
    float32 entries up to ~1e38, gives zeros (not NaN) for zero updates with
    ``max_norm=0``, rejects negative thresholds, and is reported in the state.

    Args:
      max_norm: largest global norm allowed; ``>= 0``, ``math.inf`` never clips.
      ord: the norm: 2 (default, as in Pascanu et al.), 1 or ``math.inf``.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when each device holds
        part of the tree, so that the norm is that of the whole tree. Not needed under
        ``jax.jit`` on sharded arrays.

    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`ClipByGlobalNormState`.

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
    check_threshold("clip_by_global_norm", "max_norm", max_norm)
    check_ord(ord, "clip_by_global_norm")

    def clip(updates, params):
        del params
        norm = global_norm(updates, ord, axis_name=axis_name)
        scale = clip_scale(norm, max_norm)
        return scale_tree(updates, scale), Measured(norm, max_norm, norm * scale, scale < 1)

    return stats_only_clipper(ClipByGlobalNormState, clip)


def _clip_leaves(updates, ord, limit_for_size, axis_name=None):
    """Scales each leaf by ``min(1, limit / norm)``; returns updates and Measured.

    ``limit_for_size(n)`` is the threshold of a leaf of ``n`` elements (it must also
    accept an array of sizes); with ``axis_name``, every leaf is split evenly across the
    axis and ``n`` is the size of the whole leaf. Each leaf's norm and scale feed only
    its own multiply, so XLA fuses them into one kernel per leaf; the statistics are
    recomputed on stacked vectors, a few kernels whatever the number of leaves.
    """
    leaves, treedef = jax.tree.flatten(updates)
    inexact = [x for x in leaves if is_inexact(x)]
    if not inexact:
        zero = jnp.zeros((), jnp.float32)
        return updates, Measured(zero, zero, zero, zero)

    def norms_for(o):
        sums, fixed = leaf_sums(inexact, o, axis_name)
        per_leaf = [restore_norms(s, f, o) for s, f in zip(sums, fixed)]
        return per_leaf, restore_norms(stack_scalars(sums), stack_scalars(fixed), o)

    norms, norm_vector = dispatch_ord(ord, norms_for)
    devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
    it = iter(norms)
    out = [
        scale_leaf(x, clip_scale(next(it), limit_for_size(x.size * devices)))
        if is_inexact(x)
        else x
        for x in leaves
    ]
    sizes = np.array([x.size * devices for x in inexact], np.float32)
    scale_vector = clip_scale(norm_vector, limit_for_size(sizes))
    before = dispatch_ord(ord, lambda o: norm_of_norms(norm_vector, o))
    after = dispatch_ord(ord, lambda o: norm_of_norms(norm_vector * scale_vector, o))
    clipped = jnp.mean(scale_vector < 1)
    return jax.tree.unflatten(treedef, out), Measured(before, None, after, clipped)


def clip_by_leaf_norm(
    max_norm: float | jax.Array, *, ord: int | float = 2, axis_name: Any = None
) -> optax.GradientTransformation:
    """Scales each leaf (layer tensor) separately so that its own norm is at most ``max_norm``.

    Statistics: ``norm`` / ``clipped_norm`` are global norms before / after, and
    ``clipped`` is the fraction of leaves that were scaled down.

    Args:
      max_norm: largest norm a leaf may keep; ``>= 0``, ``math.inf`` never clips.
      ord: 2 (default), 1 or ``math.inf``.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when *every* leaf is
        split across devices (e.g. reduce-scattered gradients): each leaf's norm is that
        of the whole leaf. Not needed under ``jax.jit`` on sharded arrays.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ClipByLeafNormState`.

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
    check_threshold("clip_by_leaf_norm", "max_norm", max_norm)
    check_ord(ord, "clip_by_leaf_norm")

    def clip(updates, params):
        del params
        updates, measured = _clip_leaves(updates, ord, lambda size: max_norm, axis_name)
        return updates, measured._replace(threshold=max_norm)

    return stats_only_clipper(ClipByLeafNormState, clip)


def clip_by_block_rms(
    threshold: float | jax.Array, *, axis_name: Any = None
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

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ClipByBlockRMSState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> tx = gradclip_jax.clip_by_block_rms(1.0)
      >>> updates, _ = tx.update({"w": jnp.array([2.0, -2.0])}, tx.init(None))
      >>> print(updates["w"])
      [ 1. -1.]
    """
    check_threshold("clip_by_block_rms", "threshold", threshold)

    def clip(updates, params):
        del params

        def limit(size):
            return jnp.asarray(threshold, jnp.float32) * np.sqrt(np.float32(size))

        updates, measured = _clip_leaves(updates, 2, limit, axis_name)
        return updates, measured._replace(threshold=threshold)

    return stats_only_clipper(ClipByBlockRMSState, clip)
