"""Per-example clipping for differentially private training, with adaptive DP clip norms.

DP-SGD (Abadi et al., 2016) bounds what one example can do to an update: each
example's gradient is clipped to norm ``C`` *before* the batch is summed, so adding or
removing an example moves the sum by at most ``C`` and Gaussian noise of standard
deviation ``noise_multiplier * C`` hides it. The input here is therefore a tree of
*per-example* gradients, every leaf with the batch as its leading axis, e.g.
``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``.

* :func:`per_example_clip` clips and sums (no noise): one norm per example
  (``granularity="global"``, Abadi et al.) or one per example and leaf
  (``granularity="leaf"``, McMahan et al. 2017's per-layer clipping).
* :func:`dp_aggregate` is the DP aggregation step as a gradient transformation: clip,
  sum, add noise, average; the clip norm is fixed or tracked online at a quantile of
  the per-example norms with a noised count (Andrew et al., 2021).

Norms are L2 (the sensitivity DP noise is calibrated to), accumulated in float32 at
least, overflow-safe per example (one ``lax.cond`` for the whole batch) and zero-safe,
like every norm of this library. Clipped sums are scaled sums over the batch axis in
float32 at least (a plain sum, not a contraction, so a batch sharded across devices
needs no output sharding).

Data parallelism: examples never straddle devices, so per-example norms need no
collective; :func:`dp_aggregate` takes ``axis_name`` to sum the clipped gradients and
the counts of a batch split over devices, and adds the noise once. See
``docs/multi_device.md`` for the multi-device patterns of every clipper.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradclip_jax import rules
from gradclip_jax._clip import initial_rule_state
from gradclip_jax._norms import (
    ENTRY_READS,
    accumulation_dtype,
    block_norms,
    entry_width,
    norm_of_norms,
    pair_scale,
    shape_groups,
    tree_norm,
    ungroup,
    wide_dtype,
)
from gradclip_jax._stats import ClipStats, NamedStats, check_name
from gradclip_jax._tree import inexact_leaves, is_inexact, refill
from gradclip_jax._validate import check_choice, check_range, check_threshold, is_tracer

__all__ = ["DPAggregateState", "dp_aggregate", "per_example_clip"]

_GRANULARITIES = ("global", "leaf")
# Andrew et al. (2021): clip to the median, geometric rate 0.2, start small.
_ANDREW_DEFAULTS = rules.Quantile(target=0.5, learning_rate=0.2, initial=0.1)
# Andrew et al.'s default noise on the unclipped count: expected batch size / 20.
_COUNT_STDDEV_PER_EXAMPLE = 1 / 20


def _example_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _batch_size(fn: str, tree: Any, leaves: list[jax.Array]) -> int:
    if not leaves and jax.tree.leaves(tree):
        raise ValueError(
            f"{fn}: no floating-point leaf to clip: the per-example gradients' leaves are "
            f"{sorted({str(jnp.asarray(x).dtype) for x in jax.tree.leaves(tree)})}."
        )
    sizes = {x.shape[0] if x.ndim else None for x in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        shapes = jax.tree.map(jnp.shape, tree)
        raise ValueError(
            f"{fn}: expects per-example gradients, every floating-point leaf with the "
            f"batch as its leading axis (one size for all); got shapes {shapes}. Compute "
            "them with jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)."
        )
    batch = sizes.pop()
    if batch == 0:
        raise ValueError(f"{fn}: the batch is empty (a leading axis of size 0).")
    return batch


def _leaf_limits(leaves: list[jax.Array], max_norm: Any, uniform: bool) -> list[jax.Array]:
    """Per-leaf clip norms whose squares sum to ``max_norm**2`` (McMahan et al.)."""
    bound = jnp.asarray(max_norm, jnp.float32)
    if uniform:
        return [bound / math.sqrt(len(leaves))] * len(leaves)
    sizes = [math.prod(x.shape[1:]) for x in leaves]  # parameters per example
    total = max(sum(sizes), 1)
    return [bound * math.sqrt(size / total) for size in sizes]


class _Clipped(NamedTuple):
    groups: list  # shape_groups of the leaves: (positions, (array,), stacked)
    sums: list[jax.Array]  # per group, the clipped sums in the accumulation dtype
    norms: jax.Array  # (batch,) global norm of each example, before clipping
    example_clipped: jax.Array  # (batch,) bool, the example was scaled down (any leaf)
    leaf_clipped: list[jax.Array]  # per group, examples scaled down per leaf; [] if global


def _example_scale(norm: jax.Array, limit: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(s, inverse, over)``: ``x * inverse * s == x * min(1, limit / norm)`` per
    example (:func:`pair_scale`), ``over`` where it is scaled down. A norm above both the
    limit and 2^100 is applied in two factors, as everywhere in the library:
    ``limit / norm`` alone would be subnormal for norms near float32's maximum and flush
    the example to zero instead of clipping it."""
    limit = jnp.asarray(limit, norm.dtype)
    over = norm > limit
    inverse = jnp.where(over & (norm > 2.0**100), 2.0**-100, 1).astype(norm.dtype)
    return pair_scale(norm * inverse, inverse, limit), inverse, over


def _cheap_to_split(leaf: jax.Array, count: int) -> bool:
    """Whether ``count`` leaves like ``leaf`` are clipped as a stack: the sums come out
    as one row per leaf, split with :func:`entries`, whose reads grow with the row's
    size times its grid's width (:func:`entry_width`, ``ceil(sqrt(count))``)."""
    return entry_width(count) <= ENTRY_READS // max(math.prod(leaf.shape[1:]), 1)


def _clip_and_sum(leaves, max_norm, granularity, uniform) -> _Clipped:
    """Norms, scales and clipped sums, computed per group of small leaves of one shape
    and dtype (:func:`shape_groups`, stacked along a new leading axis) rather than per
    leaf: XLA on CPU compiles every reduction and multiply separately, and a kernel per
    leaf made 1,000 small leaves take over a minute to compile."""
    groups = shape_groups(leaves, stackable=_cheap_to_split)
    arrays = [a for _, (a,), _ in groups]
    batch_axes = [int(stacked) for _, _, stacked in groups]  # a stack leads with the leaves
    axes = [tuple(range(b + 1, a.ndim)) for a, b in zip(arrays, batch_axes)]
    norms = block_norms(arrays, 2, axes=axes)  # (leaves, batch) or (batch,) per group
    batch = arrays[0].shape[batch_axes[0]]
    rows = [n.reshape(-1, batch) for n in norms]
    wide = jnp.result_type(*norms)
    # The examples' global norms from their leaves' norms, without overflowing.
    total = norm_of_norms(jnp.concatenate([r.astype(wide) for r in rows]), 2, axis=0)
    if granularity == "global":
        scales = [_example_scale(total, max_norm)] * len(groups)
    else:
        limits = _leaf_limits(leaves, max_norm, uniform)
        scales = []
        for (positions, _, stacked), n in zip(groups, norms):
            limit = [limits[i] for i in positions]
            limit = jnp.stack(limit)[:, None] if stacked else limit[0]
            scales.append(_example_scale(n, limit))
    # A scaled sum over the batch, not a contraction: XLA reads the same values, and a
    # batch axis sharded across devices needs no output sharding to be chosen.
    sums = []
    for x, b, (scale, inverse, _) in zip(arrays, batch_axes, scales):
        acc = accumulation_dtype(x.dtype)
        # (batch,) or (leaves, batch) factors against the leading axes of the block.
        shape = (1,) * (b + 1 - scale.ndim) + scale.shape + (1,) * (x.ndim - b - 1)
        factors = [jnp.reshape(f.astype(acc), shape) for f in (inverse, scale)]
        sums.append(jnp.sum(x.astype(wide_dtype(x.dtype)) * factors[0] * factors[1], axis=b))
    if granularity == "global":
        return _Clipped(groups, sums, total, scales[0][2], [])
    overs = [over.reshape(-1, batch) for _, _, over in scales]
    clipped = jnp.any(jnp.concatenate(overs), axis=0)
    counts = [jnp.sum(o, axis=-1).astype(jnp.int32) for _, _, o in scales]
    return _Clipped(groups, sums, total, clipped, counts)


def per_example_clip(
    per_example_grads: Any,
    max_norm: float | jax.Array,
    *,
    granularity: str = "global",
    uniform: bool = True,
) -> tuple[Any, Any]:
    """Clips every example's gradient to ``max_norm`` and sums over the batch.

    ``granularity="global"`` (Abadi et al.): each example's whole gradient is scaled by
    ``min(1, max_norm / ||g_i||)``; the same as ``optax.per_example_global_norm_clip``.

    ``granularity="leaf"`` (McMahan et al.'s per-layer clipping): each leaf of each
    example is clipped to its own norm ``C_l``, with ``sum_l C_l**2 = max_norm**2`` so
    the sum's sensitivity is still ``max_norm``. ``uniform=True`` gives every one of
    the ``K`` leaves ``C_l = max_norm / sqrt(K)``; ``uniform=False`` gives a leaf with
    ``D_l`` of the model's ``D`` parameters (per example) ``max_norm * sqrt(D_l / D)``.
    The same as ``optax.per_example_layer_norm_clip``.

    A zero example is never counted as clipped (also with ``max_norm=0``); ``math.inf``
    never clips. Non-finite per-example gradients propagate into the sum.

    Args:
      per_example_grads: a tree whose floating-point leaves all have the batch as their
        leading axis. Other leaves (integer, ``None``) are returned as they are.
      max_norm: the L2 bound of one example's gradient, ``>= 0``.
      granularity: ``"global"`` or ``"leaf"``.
      uniform: with ``granularity="leaf"``, how ``max_norm`` is split among the leaves
        (see above); ignored for ``"global"``.

    Returns:
      ``(clipped_sum, clipped_count)``: the sum over the batch of the clipped
      gradients, a tree like one example's gradient (in the leaves' dtypes), and the
      number of examples scaled down: an int32 scalar for ``"global"``, a tree of
      int32 scalars (one per leaf, ``None`` for other leaves) for ``"leaf"``.

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016

      McMahan et al., `Learning Differentially Private Recurrent Language Models
      <https://arxiv.org/abs/1710.06963>`_, 2017

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> grads = {"w": jnp.array([[0.0, 0.0], [3.0, 4.0], [0.3, 0.4]])}  # 3 examples
      >>> total, count = gradclip_jax.per_example_clip(grads, 1.0)
      >>> print(total["w"], count)  # (0, 0) + (0.6, 0.8) + (0.3, 0.4)
      [0.90000004 1.2       ] 1
      >>> grads = {"a": jnp.array([[3.0, 4.0]]), "b": jnp.array([[0.1]])}
      >>> total, counts = gradclip_jax.per_example_clip(grads, 1.0, granularity="leaf")
      >>> print(f"{gradclip_jax.global_norm(total['a']):.4f}", counts)  # C_l = 1 / sqrt(2)
      0.7071 {'a': Array(1, dtype=int32), 'b': Array(0, dtype=int32)}
    """
    fn = "per_example_clip"
    check_threshold(fn, "max_norm", max_norm)
    check_choice(fn, "granularity", granularity, _GRANULARITIES)
    leaves = inexact_leaves(per_example_grads)
    _batch_size(fn, per_example_grads, leaves)
    clipped = _clip_and_sum(leaves, max_norm, granularity, uniform)
    sums = [s.astype(a.dtype) for s, (_, (a,), _) in zip(clipped.sums, clipped.groups)]
    total = refill(per_example_grads, ungroup(clipped.groups, sums, len(leaves)))
    if granularity == "global":
        return total, jnp.sum(clipped.example_clipped).astype(jnp.int32)
    counts = refill(per_example_grads, ungroup(clipped.groups, clipped.leaf_clipped, len(leaves)))
    return total, jax.tree.map(lambda c, x: c if is_inexact(x) else None, counts, per_example_grads)


# -------------------------------------------------------------------- DP aggregation


class DPAggregateState(NamedTuple):
    """State of :func:`dp_aggregate`."""

    rng_key: jax.Array  # uint32 key data (uint32[2] for the default PRNG) of the next step
    rule_state: Any  # rules.QuantileState (adaptive clip norm), or () for a fixed one
    stats: NamedStats  # ClipStats under the transformation's name


def record_noise_multiplier(noise_multiplier: Any, count_stddev: Any) -> jax.Array:
    """The noise multiplier of the clipped sum that keeps the total at ``noise_multiplier``.

    Andrew et al. (2021), Theorem 1: a step releasing the clipped sum with noise
    multiplier ``z_r`` and the unclipped count with noise of standard deviation
    ``sigma_b`` costs as much privacy as one Gaussian sum query with noise multiplier
    ``z = (z_r**-2 + (2 sigma_b)**-2)**-1/2``: the count adds ``b_i - 1/2``, in
    ``{-1/2, 1/2}``, so its noise multiplier is ``2 sigma_b`` (with fixed-size batches,
    as here, the shift by 1/2 does not change the released fraction). Solved for
    ``z_r``: ``(z**-2 - (2 sigma_b)**-2)**-1/2``, the formula of TensorFlow Federated's
    adaptive clipping too; 0 when ``z == 0``; NaN (so the update is NaN) when
    ``2 sigma_b <= z``, where no ``z_r`` exists.
    """
    z = jnp.asarray(noise_multiplier, jnp.float32)
    count = 2 * jnp.asarray(count_stddev, jnp.float32)
    positive = z > 0
    z_safe = jnp.where(positive, z, 1)
    # 1 / (2 sigma_b)**2 is 0 for an infinite count noise and inf for none.
    remaining = z_safe**-2 - jnp.where(count > 0, 1 / jnp.where(count > 0, count, 1) ** 2, jnp.inf)
    return jnp.where(positive, jnp.where(remaining > 0, lax.rsqrt(remaining), jnp.nan), 0)


def _key_data(seed: Any) -> jax.Array:
    """The key data of an integer seed or of a (typed or raw) PRNG key."""
    if hasattr(seed, "dtype") and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    seed = jnp.asarray(seed)
    if seed.ndim:  # raw key data, as from jax.random.PRNGKey
        return seed.astype(jnp.uint32)
    return jax.random.key_data(jax.random.key(seed))


def _gaussian(key: jax.Array, like: jax.Array) -> jax.Array:
    """Standard normal noise shaped like ``like``; complex: each part has variance 1."""
    noise = jax.random.normal(key, like.shape, like.dtype)
    # jax draws complex normals with variance 1/2 per part; DP needs the full variance
    # on each real coordinate.
    return noise * math.sqrt(2) if jnp.issubdtype(like.dtype, jnp.complexfloating) else noise


def _layout(x: jax.Array) -> Any:
    sharding = getattr(jax.typeof(x), "sharding", None)
    return getattr(sharding, "spec", None)


def _gaussians(keys: jax.Array, groups: list, sums: list[jax.Array]) -> list[jax.Array]:
    """Per group of leaves, noise shaped like its sums: each leaf's row drawn with
    ``_gaussian(keys[leaf], row)``, the numbers one draw per leaf gives (as optax's).
    Rows of the same shape, dtype and layout, a stack's or single leaves', come from one
    draw ``vmap``-ed over their keys: one random-number kernel per shape rather than per
    leaf, whose compile time grew far faster than the number of leaves."""
    kinds: dict[Any, list[int]] = {}
    for g, ((_, _, stacked), s) in enumerate(zip(groups, sums)):
        row = s.shape[1:] if stacked else s.shape
        kinds.setdefault((row, s.dtype, _layout(s)), []).append(g)
    noise: list[Any] = [None] * len(groups)
    for (row, dtype, _), members in kinds.items():
        like = jax.ShapeDtypeStruct(row, dtype)
        leaves = np.concatenate([np.asarray(groups[g][0]) for g in members])
        draws = jax.vmap(lambda k, like=like: _gaussian(k, like))(keys[leaves])
        start = 0
        for g in members:
            positions, _, stacked = groups[g]
            if not stacked:
                noise[g] = draws[start]
            elif len(positions) == len(leaves):
                noise[g] = draws
            else:
                noise[g] = draws[start : start + len(positions)]
            start += len(positions)
    return noise


def _clipped_totals(leaves, clip_norm, granularity, uniform, axis_name, batch):
    """The batch's clipped sums, clipped and unclipped counts and mean norm (all devices;
    ``batch`` counts the examples of all of them). The mean is a sum of ``norm / batch``:
    a sum of norms near float32's maximum would overflow."""
    clipped = _clip_and_sum(leaves, clip_norm, granularity, uniform)
    totals = (
        clipped.sums,
        jnp.sum(clipped.example_clipped).astype(jnp.float32),
        jnp.sum(clipped.norms <= clip_norm).astype(jnp.float32),
        jnp.sum(clipped.norms / batch),
    )
    if axis_name is not None:
        totals = lax.psum(totals, axis_name)
    return clipped.groups, totals


def _noised_means(sums, keys, groups, noise_std, batch):
    """Each group's clipped sums plus Gaussian noise of ``noise_std``, over the batch
    size, in the leaves' dtype."""
    return [
        ((s + noise_std.astype(s.real.dtype) * z) / batch).astype(a.dtype)
        for s, z, (_, (a,), _) in zip(sums, _gaussians(keys, groups, sums), groups)
    ]


def _checked_seed(fn: str, seed: Any, noise_multiplier: Any, max_norm: Any) -> Any:
    """The seed, required with noise; an infinite clip norm only without noise."""
    noiseless = not is_tracer(noise_multiplier) and np.asarray(noise_multiplier) == 0
    if seed is None and not noiseless:
        raise ValueError(
            f"{fn}: pass `seed` (an integer or a JAX PRNG key) from a secret source, e.g. "
            "seed=secrets.randbits(63): the noise must not be reproducible by others, as "
            "a fixed default seed would be."
        )
    inf_norm = isinstance(max_norm, (int, float)) and math.isinf(max_norm)
    if inf_norm and not noiseless:
        raise ValueError(
            f"{fn}: `max_norm`=inf bounds no example's contribution, so no noise can hide "
            "it; use a finite clip norm (or noise_multiplier=0 for no privacy)."
        )
    return 0 if seed is None else seed


def _dp_rule(fn: str, max_norm: Any) -> rules.Quantile | None:
    """The adaptive clip norm's rule, or ``None`` for a fixed clip norm (checked)."""
    if max_norm is None:
        return _ANDREW_DEFAULTS
    if isinstance(max_norm, rules.Quantile):
        max_norm.validate(fn)
        return max_norm
    if hasattr(max_norm, "init") and hasattr(max_norm, "step"):
        raise ValueError(
            f"{fn}: an adaptive clip norm must be a rules.quantile rule; got {max_norm!r}. "
            "Its update reads only a noised count, which the privacy analysis of Andrew et "
            "al. covers; other rules read the norms themselves and would leak them."
        )
    check_threshold(fn, "max_norm", max_norm)
    return None


def _count_stddev(fn: str, batch: int, noise_multiplier: Any, clipped_count_stddev: Any) -> Any:
    """The noise on the unclipped count (default batch / 20), checked against the budget."""
    if clipped_count_stddev is not None:
        stddev = clipped_count_stddev
    elif is_tracer(noise_multiplier):
        return jnp.where(noise_multiplier > 0, batch * _COUNT_STDDEV_PER_EXAMPLE, 0.0)
    else:
        stddev = batch * _COUNT_STDDEV_PER_EXAMPLE if noise_multiplier > 0 else 0.0
    concrete = not (is_tracer(stddev) or is_tracer(noise_multiplier))
    if concrete and noise_multiplier > 0 and not 2 * np.asarray(stddev) > noise_multiplier:
        raise ValueError(
            f"{fn}: clipped_count_stddev = {float(stddev):g} (default batch / 20 = "
            f"{batch}/20) must exceed noise_multiplier / 2 = {noise_multiplier / 2:g}: "
            "with less noise the count alone would cost more privacy than the budget. "
            "Use larger batches, a larger clipped_count_stddev or a smaller "
            "noise_multiplier."
        )
    return stddev


def dp_aggregate(
    max_norm: float | jax.Array | rules.Quantile | None = None,
    noise_multiplier: float | jax.Array = 1.0,
    seed: int | jax.Array | None = None,
    *,
    granularity: str = "global",
    uniform: bool = True,
    clipped_count_stddev: float | jax.Array | None = None,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """DP-SGD's aggregation: clip each example, sum, add Gaussian noise, average.

    The update receives per-example gradients (batch leading, see the module
    documentation) and returns the noised *mean* over the batch, like optax's
    ``contrib.differentially_private_aggregate``:
    ``(sum_i clip(g_i) + N(0, (z_r C)^2)) / batch``, one example's shape per leaf.
    The same key gives the same noise as optax's; leaves of one shape, dtype and layout
    share one ``vmap``-ed draw, so compile time grows with the number of distinct
    shapes rather than of leaves.
    The batch size is the leading axis (times the devices along ``axis_name``), treated
    as public, as with fixed-size batches. Put it first in a chain; ``MultiSteps`` or
    ``apply_every`` around it would average noised means, not clip per example.

    The clip norm ``C`` is either fixed (``max_norm`` a number; ``z_r`` is then
    ``noise_multiplier``) or adaptive (a :func:`gradclip_jax.rules.quantile` rule, or
    ``None`` for Andrew et al.'s defaults ``rules.quantile(target=0.5,
    learning_rate=0.2, initial=0.1)``). Adaptive: after each step,
    ``C <- C * exp(-learning_rate * (b - target))`` where ``b`` is the fraction of
    examples with norm ``<= C``, counted with Gaussian noise of standard deviation
    ``clipped_count_stddev``. Releasing that count costs privacy too, so the sum's noise
    multiplier is raised to ``z_r = (z**-2 - (2 sigma_b)**-2)**-1/2`` and the whole step
    costs exactly what one Gaussian query with ``noise_multiplier`` ``z`` costs: account
    for privacy with ``z`` as usual.

    With ``granularity="leaf"`` each leaf has its own clip norm ``C_l`` as in
    :func:`per_example_clip` (``sum_l C_l**2 = C**2``, so the noise is unchanged);
    adaptive ``C`` then tracks the quantile of the examples' global norms.

    Statistics (:class:`~gradclip_jax.ClipStats`): ``norm`` is the mean per-example
    norm before clipping, ``threshold`` the ``C`` used, ``clipped_norm`` the global norm
    of the released (noised) update, ``clipped`` the fraction of examples scaled down
    and ``clip_count`` the steps where any was. ``norm`` and ``clipped`` are computed
    from the raw batch and are **not** differentially private: use them to debug, do
    not publish them. ``threshold`` and ``clipped_norm`` are (post-processing of the
    noised outputs).

    Args:
      max_norm: a fixed clip norm ``>= 0``, a :class:`gradclip_jax.rules.Quantile` rule
        for an adaptive one, or ``None`` (default) for the adaptive defaults above.
      noise_multiplier: ``z >= 0``, the noise's standard deviation over the clip norm
        for the whole step; 0 adds no noise anywhere (no privacy).
      seed: an integer seed or a JAX PRNG key; the key is carried in the state. It is
        required when ``noise_multiplier`` may be positive: a default, public seed
        would let anyone regenerate the noise. Draw it from a secret source (e.g.
        ``secrets.randbits(63)``) and keep it with the checkpoint. Under ``axis_name``
        every device must use the same one: the noise is added once to the sum over
        devices.
      granularity: ``"global"`` (one norm per example) or ``"leaf"`` (per leaf).
      uniform: with ``granularity="leaf"``, equal clip norms per leaf (``True``) or in
        proportion to the square root of the leaf's size (``False``).
      clipped_count_stddev: adaptive only: ``sigma_b``, the noise on the unclipped count;
        ``None`` for Andrew et al.'s ``batch / 20`` (0 when ``noise_multiplier`` is 0).
        It must exceed ``noise_multiplier / 2``: smaller makes the count alone cost more
        than the budget (an error where the values are known when tracing; a NaN update
        when they are traced, e.g. injected).
      axis_name: under ``shard_map`` / ``pmap`` with the batch split over devices, the
        mapped axis name: clipped sums and counts are summed across it, and every
        device gets the same update.

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`DPAggregateState`.

    References:
      Abadi et al., `Deep Learning with Differential Privacy
      <https://arxiv.org/abs/1607.00133>`_, 2016

      Andrew et al., `Differentially Private Learning with Adaptive Clipping
      <https://arxiv.org/abs/1905.03871>`_, 2021

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> dp = gradclip_jax.dp_aggregate(None, noise_multiplier=1.1, seed=0)
      >>> tx = optax.chain(dp, optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> per_example = {"w": jnp.ones((64, 3))}  # 64 examples of norm sqrt(3) > C = 0.1
      >>> update = jax.jit(tx.update)
      >>> for _ in range(10):
      ...     updates, state = update(per_example, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['dp_aggregate/clipped']:.1f}")  # every example was clipped
      1.0
      >>> print(f"{logs['dp_aggregate/threshold']:.1f}")  # C grows ~exp(0.1) a step: 0.1 e^0.9
      0.2

      Without noise the clip norm follows the quantile update exactly:

      >>> tx = gradclip_jax.dp_aggregate(None, noise_multiplier=0.0)
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update(per_example, state)
      >>> print(f"{gradclip_jax.stats(state)['dp_aggregate/threshold']:.4f}")  # 0.1 e^0.2
      0.1221
      >>> print(f"{updates['w'][0]:.4f}")  # the mean clipped gradient, C / sqrt(3)
      0.0705
    """
    fn = "dp_aggregate"
    rule = _dp_rule(fn, max_norm)
    check_range(fn, "noise_multiplier", noise_multiplier)
    seed = _checked_seed(fn, seed, noise_multiplier, max_norm)
    check_choice(fn, "granularity", granularity, _GRANULARITIES)
    if clipped_count_stddev is not None:
        check_range(fn, "clipped_count_stddev", clipped_count_stddev)
    name = check_name(fn, fn if name is None else name)
    adaptive = rule is not None
    typed_key = hasattr(seed, "dtype") and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
    impl = {"impl": jax.random.key_impl(seed)} if typed_key else {}

    def init_fn(params):
        del params
        rule_state = initial_rule_state(fn, rule) if adaptive else ()
        return DPAggregateState(_key_data(seed), rule_state, NamedStats(name, ClipStats.initial()))

    def update_fn(updates, state, params=None):
        del params
        leaves = inexact_leaves(updates)
        batch = _batch_size(fn, updates, leaves)
        if axis_name is not None:
            batch = batch * lax.psum(1, axis_name)
        clip_norm = state.rule_state.threshold if adaptive else jnp.asarray(max_norm, jnp.float32)
        groups, totals = _clipped_totals(leaves, clip_norm, granularity, uniform, axis_name, batch)
        sums, clipped_count, unclipped, norm_mean = totals

        key = jax.random.wrap_key_data(state.rng_key, **impl)
        keys = jax.random.split(key, len(leaves) + 1 + adaptive)
        new_key = keys[0]
        if adaptive:
            stddev = _count_stddev(fn, batch, noise_multiplier, clipped_count_stddev)
            multiplier = record_noise_multiplier(noise_multiplier, stddev)
        else:
            multiplier = jnp.asarray(noise_multiplier, jnp.float32)
        noise_std = jnp.where(multiplier > 0, multiplier * clip_norm, 0.0)  # 0 * inf is NaN
        noised = _noised_means(sums, keys[1 : len(leaves) + 1], groups, noise_std, batch)
        out = refill(updates, ungroup(groups, noised, len(leaves)))

        rule_state = state.rule_state
        if adaptive:
            count_noise = jnp.asarray(stddev, jnp.float32) * jax.random.normal(keys[-1], ())
            fraction = (unclipped + count_noise) / batch
            rule_state = rules.QuantileState(
                rule.adjust(clip_norm, fraction).astype(state.rule_state.threshold.dtype)
            )
        stats = state.stats.replace(
            state.stats.record.advance(
                norm_mean, clip_norm, tree_norm(noised, 2), clipped_count / batch
            )
        )
        return out, DPAggregateState(jax.random.key_data(new_key), rule_state, stats)

    return optax.GradientTransformation(init_fn, update_fn)
