"""Measure: robust norms of pytrees at every granularity (global, leaf, unit, example).

Every norm is computed by one reduction helper, :func:`block_norms`, which

* accumulates in float32 at least (float64 for float64 leaves), so float16, bfloat16
  and float8 gradients never overflow while being squared;
* is overflow-safe: the common path squares once; only when some sum is not finite
  (float32 entries beyond ~1e19) is it recomputed with every value scaled by a power
  of two, inside one ``lax.cond`` so the common path pays nothing for it;
* is zero-safe: a zero block has norm 0 and a finite (zero) gradient;
* treats complex leaves with ``|x|^2 = re^2 + im^2``;
* is NaN-aware: a NaN entry gives a NaN norm (XLA's max reductions may drop NaN);
* keeps each leaf's sharding: it never reshapes or concatenates sharded leaves.

The global norm groups small leaves into one reduction per dtype, so it compiles in
near-constant time in the number of leaves. Norms report; the guards decide what to do
about NaN and infinity. See ``docs/design.md`` for the layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradclip_jax._tree import inexact_leaves, is_inexact, refill
from gradclip_jax._validate import check_ord

__all__ = ["global_norm", "leaf_norms", "unitwise_norms", "unit_axes"]

# Leaves with at most this many elements are concatenated into a shared reduction.
SMALL_LEAF_SIZE = 4096
# The most leaves one stack joins (shape_groups). XLA on CPU compiles a concatenation
# of n operands in time growing faster than n: 2,000 leaves of (32, 32) took 1.9 s as
# one and 0.7-0.9 s as runs of 64-256 (2 CPUs), 500 leaves 0.28 s and 0.19-0.22 s.
CHUNK_LEAVES = 128
# The most elements per row times sqrt(rows) to split with entries(), which reads its
# input about sqrt(rows) times (2 sqrt(rows) when this was measured, before the last
# level became slices: the bound is conservative). dp_aggregate's run time against one
# kernel per leaf, 2 CPUs: 1,000 rows of 128 or 300 of 256 0.8-0.9x, 100 of 512 1.2x
# (all below this bound); 1,000 of 256 1.6x and 300 of 1,024 6x (above it).
ENTRY_READS = 6144
# The longest axis entries() sums over: XLA on CPU rewrites longer reductions as a
# reduce-window tree, three kernels per entry instead of one (2,000 entries: 8.2 s of
# compilation).
PICK_WIDTH = 32


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float32 for 8-, 16- and 32-bit floats (real or complex), float64 for double."""
    real = jnp.finfo(dtype).dtype
    return jnp.dtype(jnp.float64 if real.itemsize >= 8 else jnp.float32)


def wide_dtype(dtype: Any) -> jnp.dtype:
    """The dtype a leaf is computed in: its accumulation dtype, complex if it is complex.

    Written out because JAX does not promote float8 types implicitly.
    """
    acc = accumulation_dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if acc == jnp.float64 else jnp.complex64)
    return acc


def _magnitude_power(x: jax.Array, power: float, inv_scale: jax.Array | None = None):
    """``(|x| * inv_scale) ** power`` element-wise in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    if power == math.inf or power == 1:
        m = jnp.abs(x.astype(wide_dtype(x.dtype))).astype(acc)
        return m if inv_scale is None else m * inv_scale
    parts = (x.real, x.imag) if jnp.iscomplexobj(x) else (x,)
    total = None
    for part in parts:
        p = part.astype(acc)
        if inv_scale is not None:
            p = p * inv_scale
        total = p * p if total is None else total + p * p
    return total


def _magnitude(x: jax.Array) -> jax.Array:
    return _magnitude_power(x, 1)


def _on_mesh(x: jax.Array) -> bool:
    """True when ``x`` is traced with a device mesh (sharded under ``jit``, ``shard_map``)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and not mesh.empty


def blocks_of(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """The leaves as few arrays: each large or sharded leaf alone, small ones concatenated.

    Small leaves of one dtype become one flat array behind an optimisation barrier: a
    plain copy is cheap, whereas a concatenation fused into a reduction compiles and
    runs slowly on CPU. Large leaves and leaves on a mesh are never reshaped or
    concatenated: flattening a sharded array all-gathers it, and concatenating
    differently sharded leaves is an error under explicit sharding.
    """
    small: dict[Any, list[jax.Array]] = {}
    blocks = []
    for x in leaves:
        if not x.size:
            continue
        if x.size > SMALL_LEAF_SIZE or _on_mesh(x):
            blocks.append(x)
        else:
            small.setdefault(x.dtype, []).append(lax.reshape(x, (x.size,)))
    for group in small.values():
        # One block, not runs of CHUNK_LEAVES: runs compiled faster (2,000 leaves of
        # (32, 32): 5.3-7.5 s instead of 8.6-9.6 s) but ran 7-15% slower.
        blocks.append(group[0] if len(group) == 1 else jnp.concatenate(group))
    return list(lax.optimization_barrier(blocks)) if blocks else blocks


def chunks(items: Sequence[Any], most: int = CHUNK_LEAVES) -> list[list[Any]]:
    """``items`` in order, as the fewest runs of at most ``most``, of equal lengths to
    within one (equal shapes compile to one kernel)."""
    count = -(-len(items) // most)
    if not count:
        return []
    bounds = [len(items) * k // count for k in range(count + 1)]
    return [list(items[a:b]) for a, b in zip(bounds, bounds[1:])]


def _max(values: jax.Array, axis: Any = None) -> jax.Array:
    """``jnp.max`` (0 when empty) that is NaN wherever a value is NaN (short inputs)."""
    largest = jnp.max(values, axis=axis, initial=0)
    if not jnp.issubdtype(values.dtype, jnp.inexact):
        return largest
    # The values are >= 0, so their sum is NaN exactly when one is NaN.
    return jnp.where(jnp.isnan(jnp.sum(values, axis=axis)), jnp.nan, largest).astype(largest.dtype)


def maxima(arrays: Sequence[jax.Array]) -> list:
    """The largest magnitude of each array (0 when empty) in its accumulation dtype, NaN
    when it holds a NaN.

    XLA's CPU max drops NaN from 10,000 entries on, and so does a fused elementwise
    minimum; testing ``isnan`` inside the reduction makes XLA write the values out and
    read them back. So each array is read by two float reductions: the maximum of
    ``|a|`` and :func:`nan_probe`'s sum of the signs of ``a`` (of its real and imaginary
    parts when complex). Nothing but the conversion to the accumulation dtype is shared
    between them: a shared ``|a|`` would be written out as a full-size temporary (the
    conversion of a half-precision or float8 array is, in any form tried).
    """
    out = []
    for a in arrays:
        acc = accumulation_dtype(a.dtype)
        if jnp.iscomplexobj(a):
            largest, parts = jnp.max(_magnitude(a), initial=0), (lax.real(a), lax.imag(a))
        else:
            parts = (lax.convert_element_type(a, acc),)
            largest = jnp.max(lax.abs(parts[0]), initial=0)
        out.append(jnp.where(nan_probe(parts), jnp.nan, largest).astype(acc))
    return out


def nan_probe(parts: Sequence[jax.Array]) -> jax.Array:
    """Whether some entry of the real ``parts`` is NaN: a float sum of the entries'
    signs, NaN exactly then (an infinite entry's sign is +-1; the sum of at most one per
    entry, in float32 or wider, cannot overflow)."""
    return jnp.isnan(sum(jnp.sum(lax.sign(p), dtype=accumulation_dtype(p.dtype)) for p in parts))


def any_nonfinite(arrays: Sequence[jax.Array]) -> jax.Array:
    """Whether some entry of some array is NaN or infinite (False for none).

    One float sum per array of ``a - a`` (0 when every entry is finite, so it cannot
    overflow; NaN otherwise), the sums added into one float32 flag (complex: both
    parts). XLA on CPU compiles a boolean ``any(~isfinite(a))`` reduction 4-5x slower
    (0.3 s against 0.07 s for 100 leaves), and a stacked flag per array more slowly too.
    """
    total = None
    for a in arrays:
        # Converted before adding: the arrays' dtypes may not promote (float8, float32).
        probe = lax.convert_element_type(nonfinite_probe(a), np.float32)
        total = probe if total is None else lax.add(total, probe)
    return jnp.asarray(False) if total is None else jnp.isnan(total)


def nonfinite_probe(a: jax.Array, axis: Any = None) -> jax.Array:
    """The sum of ``a - a`` over ``axis`` (complex: both parts added): 0 where every
    entry is finite, NaN where one is not; it cannot overflow."""
    probe = jnp.sum(a - a, axis=axis)
    if jnp.iscomplexobj(probe):
        probe = lax.add(lax.real(probe), lax.imag(probe))
    return probe


def collective(value: Any, combine: str, axis_name: Any) -> Any:
    """``value`` (a pytree of arrays >= 0) summed or maximised across ``axis_name``.

    The maximum is NaN where some device's value is NaN (``lax.pmax`` may drop it).
    """
    if axis_name is None:
        return value
    if combine == "sum":
        return lax.psum(value, axis_name)

    def nan_if_any(largest, nan_count):
        if not jnp.issubdtype(largest.dtype, jnp.inexact):
            return largest
        return jnp.where(nan_count > 0, jnp.nan, largest).astype(largest.dtype)

    nan_counts = lax.psum(jax.tree.map(lambda v: jnp.isnan(v).astype(jnp.int32), value), axis_name)
    return jax.tree.map(nan_if_any, lax.pmax(value, axis_name), nan_counts)


def rescale_exponent(dtype: Any) -> int:
    """``k`` of the ``2^-k`` by which an overflowed sum in ``dtype`` is recomputed."""
    return jnp.finfo(dtype).maxexp - 28


def _overflow_rescaling(dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Power-of-two ``(factor, inverse)`` for recomputing an overflowed sum in ``dtype``.

    A float32 sum of squares overflows only when its largest term is above ~2^44;
    multiplied by ``2^-(maxexp - 28)`` = 2^-100 every value below 2^128 lands under
    2^28, and those that matter stay normal numbers when squared. The inverse is an
    exact power of two, unlike ``1 / max``, and a constant needs no pass to find the
    largest value. ``inf`` stays ``inf`` and NaN stays NaN.
    """
    k = rescale_exponent(dtype)
    # Opaque to XLA's algebraic simplifier, which would otherwise rewrite
    # (x * c)^2 as x^2 * c^2 and fold c^2 = 2^-200 to zero in float32.
    return lax.optimization_barrier((jnp.asarray(2.0**k, dtype), jnp.asarray(2.0**-k, dtype)))


def _root(total: jax.Array, power: float) -> jax.Array:
    """``total ** (1/power)`` with a finite derivative at zero; NaN stays NaN."""
    if power != 2:
        return total
    positive = total > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1)), total)


class Sums(NamedTuple):
    """Per array, the sum of ``|x|^power`` over its axes, and how to read it safely.

    ``raw`` is the plain sum (``inf`` when it overflows); ``rescued`` equals ``raw``
    except on a step where some sum is not finite, when every sum is recomputed with
    the values scaled by ``2^-k`` (``k`` per accumulation dtype).
    """

    raw: list
    rescued: list
    scales: dict  # accumulation dtype -> (2^k, 2^-k)

    def pairs(self, power: float) -> list[tuple[jax.Array, jax.Array]]:
        """:func:`norm_pair` of every array."""
        return [self.pair(r, f, power) for r, f in zip(self.raw, self.rescued)]

    def pair(self, raw: jax.Array, rescued: jax.Array, power: float):
        return norm_pair(raw, rescued, power, self.scales[raw.dtype])

    def scale(self, raw, rescued, power, limit, relative=None):
        return sums_scale(raw, rescued, power, self.scales[raw.dtype], limit, relative)

    def relative(self, raw, rescued, floor):
        """``relative`` argument of :meth:`scale`: limits relative to this block."""
        return raw, rescued, floor, self.scales[raw.dtype]


def _all_finite(values: Sequence[jax.Array]) -> jax.Array:
    if len(values) == 1:
        return jnp.isfinite(jnp.sum(values[0]))
    if any(_on_mesh(v) for v in values):  # never concatenate what is sharded
        return jnp.all(stack_scalars([jnp.all(jnp.isfinite(v)) for v in values]))
    return jnp.isfinite(jnp.sum(stack_scalars(values)))  # sums >= 0: finite iff all are


def power_sums(arrays, power, axes=None, keepdims=False, axis_name=None, total=False) -> Sums:
    """The sums of ``|x|^power`` (1 or 2) of each array over its ``axes``, rescued on
    overflow by one ``lax.cond`` that the common path does not pay for.

    ``total=True`` adds the sums of the arrays of each accumulation dtype into one
    (a norm over all of them): one total per dtype, which the overflow test reads, so
    the test and the totals agree even when only the total overflows.
    """
    if not arrays:
        return Sums([], [], {})
    axes = [None] * len(arrays) if axes is None else axes
    # One (factor, inverse) pair per accumulation dtype: each is an optimisation barrier,
    # and a barrier per leaf would split XLA's fusions (and its compile time) per leaf.
    scales = {dtype: _overflow_rescaling(dtype) for dtype in _dtypes(arrays)}

    def sums(rescaled):
        partial = [
            jnp.sum(
                _magnitude_power(
                    x, power, scales[accumulation_dtype(x.dtype)][1] if rescaled else None
                ),
                axis=a,
                keepdims=keepdims,
            )
            for x, a in zip(arrays, axes)
        ]
        return collective(_totals(partial) if total else partial, "sum", axis_name)

    raw = sums(False)
    rescued = lax.cond(_all_finite(raw), lambda raw: raw, lambda _: sums(True), raw)
    return Sums(raw, rescued, scales)


def _totals(values: Sequence[jax.Array]) -> list[jax.Array]:
    """The sum of the ``values`` of each dtype, in the order of :func:`_dtypes`."""
    by_dtype: dict[Any, jax.Array] = {}
    for v in values:
        by_dtype[v.dtype] = lax.add(by_dtype[v.dtype], v) if v.dtype in by_dtype else v
    return [by_dtype[d] for d in _dtypes(values)]


def _dtypes(arrays) -> list:
    return sorted({accumulation_dtype(x.dtype) for x in arrays}, key=str)


def norm_pair(raw, rescued, power, scale) -> tuple[jax.Array, jax.Array]:
    """``(mantissa, inverse)`` with norm = ``mantissa / inverse``, from :class:`Sums`.

    ``inverse`` is 1 unless the sum of finite values overflowed (a float32 L2 norm
    above ~1.8e19); then it is ``2^-k`` and the mantissa is the norm of the values
    scaled by it, so a clipping scale ``limit / norm`` is formed in two factors that
    stay normal numbers, even for norms beyond the dtype's range (3.4e38).
    ``inverse`` takes only comparisons (cheap for XLA to fuse into a multiply); the
    mantissa takes one root.
    """
    factor, inverse = scale
    finite = jnp.isfinite(raw)
    beyond = ~finite & jnp.isfinite(rescued)
    mantissa = _root(jnp.where(finite, raw, rescued), power) * jnp.where(
        finite | beyond, jnp.ones((), raw.dtype), factor
    )
    return mantissa, jnp.where(beyond, inverse, jnp.ones((), raw.dtype))


def pair_scale(mantissa: jax.Array, inverse: jax.Array, limit: Any) -> jax.Array:
    """``s`` with ``x * inverse * s == x * min(1, limit / norm)``, norm = mantissa / inverse.

    With ``inverse == 1`` this is ``min(1, limit / norm)`` without NaN (zero norms,
    zero and infinite limits give finite scales with finite derivatives; a NaN norm
    gives 1, an infinite one 0). A norm beyond the dtype's range always exceeds a
    finite limit, and ``limit / mantissa`` stays a normal number.
    """
    numerator, denominator = _scale_terms(mantissa, inverse, limit)
    return numerator / denominator


def signed_scale(mantissa: jax.Array, inverse: jax.Array, limit: Any) -> jax.Array:
    """:func:`pair_scale` and ``inverse`` as one number: the scale, negative where the
    norm is given in units of ``2^-k`` (``inverse < 1``).

    It is one division (a select at its root would be copied by XLA into every kernel
    that reads it, with the whole computation of the norm): a clipper computes it once,
    and each leaf's multiply reads one scalar.
    """
    numerator, denominator = _scale_terms(mantissa, inverse, limit)
    return signed_pair(numerator, inverse) / denominator


def signed_pair(scales: jax.Array, inverses: jax.Array) -> jax.Array:
    """The pair ``(scale, inverse)`` of every leaf or unit as one number, so that a leaf
    reads a single entry: the scale, negative where the norm is given in units of
    ``2^-k`` (``inverse < 1``)."""
    return jnp.where(inverses < 1, -scales, scales)


def _scale_terms(mantissa, inverse, limit) -> tuple[jax.Array, jax.Array]:
    """``(limit, mantissa)`` where the norm exceeds the limit, else ``(1, inverse)``."""
    limit = jnp.asarray(limit, mantissa.dtype)
    # A NaN or infinite part elsewhere in the tree makes the mantissa non-finite: then
    # the plain rules hold (NaN: unchanged, x * inverse / inverse; inf: scale 0).
    beyond = (inverse < 1) & jnp.isfinite(mantissa)
    over = jnp.where(beyond, limit < jnp.inf, mantissa > limit)
    return jnp.where(over, limit, 1), jnp.where(over, mantissa, inverse)


def sums_scale(raw, rescued, power, scale, limit, relative=None) -> tuple[jax.Array, jax.Array]:
    """``(s, inverse)`` of :func:`pair_scale` straight from the sums of one block.

    The same numbers as :func:`norm_pair` then :func:`pair_scale` (to rounding: the
    root and the division are one ``rsqrt``), written so that XLA computes the scale
    in one small kernel and fuses ``inverse`` (comparisons only) into the multiply: a
    per-leaf clipper then costs a reduction, this kernel and the multiply per leaf.
    ``relative=(raw, rescued, floor, scale)`` of a second block (power 2) makes the
    limit ``limit * max(its norm, floor)`` (AGC: relative to the parameters' norms).
    """
    factor, inverse = scale
    limit = jnp.asarray(limit, raw.dtype)
    finite = jnp.isfinite(raw)
    beyond = ~finite & jnp.isfinite(rescued)
    total = jnp.where(finite, raw, rescued)
    # A zero norm reads as 1 and never clips (finite derivatives at zero).
    zero = total == 0
    total = jnp.where(zero, 1, total)
    units = jnp.where(finite | beyond, jnp.ones((), raw.dtype), inverse)
    if relative is not None:  # limit * max(parameter norm, floor) / norm
        p_raw, p_rescued, floor, (p_factor, p_inverse) = relative
        p_finite = jnp.isfinite(p_raw)
        squares = jnp.where(p_finite, p_raw, p_rescued)
        floor = jnp.asarray(floor, squares.dtype) * jnp.where(p_finite, 1, p_inverse)
        units = units * jnp.where(p_finite, 1, p_factor)  # exact powers of two
        ratio = limit * jnp.sqrt(jnp.maximum(squares, floor * floor) / total) * units
    else:
        ratio = limit * (lax.rsqrt(total) if power == 2 else 1 / total) * units
    # Only `ratio` is computed with roots and divisions; everything after it is cheap.
    over = ~zero & jnp.where(beyond, ratio < jnp.inf, ratio < 1)
    inverse = jnp.where(beyond, inverse, jnp.ones((), raw.dtype))
    return jnp.where(over, ratio, jnp.where(beyond, factor, 1)), inverse


def _norms_from(sums: Sums, power: float) -> list[jax.Array]:
    return [m / i for m, i in sums.pairs(power)]


def block_norms(
    arrays: Sequence[jax.Array],
    ord: float,
    axis_name: Any = None,
    axes: Sequence[Any] | None = None,
    keepdims: bool = False,
) -> list[jax.Array]:
    """The ``ord``-norm of each array, the one reduction every granularity uses.

    Args:
      arrays: inexact arrays.
      ord: 1, 2 or ``math.inf`` (a Python number).
      axis_name: a mapped axis across which every array is split; partial results are
        combined so every device gets the norms of the whole arrays.
      axes: per array, the axes reduced (``None``: all); only with ``ord`` 1 or 2.
      keepdims: keep reduced axes (unit-wise norms broadcast against their leaf).

    Returns:
      One norm per array: float32, or float64 for float64 arrays.
    """
    if not arrays:
        return []
    if ord == math.inf:
        if axes is not None:
            raise ValueError("block_norms: reduction axes need ord 1 or 2")
        return collective(maxima(arrays), "max", axis_name)
    return _norms_from(power_sums(arrays, ord, axes, keepdims, axis_name), ord)


def stack_scalars(values: Sequence[jax.Array]) -> jax.Array:
    """Flattens and concatenates arrays into one materialised vector (a plain copy)."""
    flat = jnp.concatenate([jnp.ravel(v) for v in values])
    return lax.optimization_barrier(flat)


def ratio(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` for ``0 <= num <= den`` up to float32's maximum.

    XLA may divide as ``num * (1 / den)``, and ``1 / den`` is subnormal (flushed to 0
    on CPU, eagerly) for ``den`` above 2^126, which made ``2e38 / 2e38`` zero. Both
    sides are scaled by 2^-100 first (exact; a ``num`` that this flushes is below
    2^-126 of ``den`` and its ratio rounds away anyway).
    """
    shrink = jnp.where(den > 2.0**100, 2.0**-100, 1).astype(den.dtype)
    return (num * shrink) / (den * shrink)


def norm_of_norms(norms: jax.Array, ord: float = 2, axis: int | None = None) -> jax.Array:
    """The norm of a whole from the norms of its parts (along ``axis``), without overflow."""
    if norms.size == 0:
        return jnp.zeros((), jnp.float32)
    norms = norms.astype(jnp.promote_types(norms.dtype, jnp.float32))
    if ord == math.inf:
        return _max(norms, axis)
    if ord == 1:
        return jnp.sum(norms, axis=axis)
    # In units of the largest norm, the squares cannot overflow (a short vector: the
    # division is cheap, and no barrier splits the surrounding fusions).
    largest = _max(norms, axis)
    unit = jnp.where((largest > 0) & jnp.isfinite(largest), largest, 1)
    ratios = ratio(norms, unit if axis is None else jnp.expand_dims(unit, axis))
    return jnp.where(
        jnp.isfinite(largest), unit * _root(jnp.sum(ratios * ratios, axis=axis), 2), largest
    )


def norm_of_parts(parts: Sequence[jax.Array]) -> jax.Array:
    """The L2 norm of all entries of ``parts``: one vector when it can, else per part
    first (parts sharded over a mesh are never concatenated)."""
    if len(parts) == 1:
        return norm_of_norms(jnp.ravel(parts[0]))
    if any(_on_mesh(p) for p in parts):
        return norm_of_norms(stack_scalars([norm_of_norms(p) for p in parts]))
    return norm_of_norms(stack_scalars(parts))


def shape_groups(
    leaves: Sequence[jax.Array],
    *companions: Sequence[jax.Array],
    stackable: Callable[[jax.Array, int], bool] | None = None,
) -> list:
    """The leaves grouped by shape and dtypes: ``(positions, arrays, stacked)`` per group.

    ``arrays`` holds one array per sequence (``leaves``, then each companion, e.g. the
    parameters paired with the updates). Several small leaves of one shape are stacked
    along a new leading axis (``stacked``), behind an optimisation barrier, in runs of
    at most :data:`CHUNK_LEAVES`; a large leaf, one on a mesh, or one whose shape no
    other leaf has stays as it is, and so do the leaves of a run for which
    ``stackable(leaf, run length)`` is false.
    """
    sequences = (leaves, *companions)
    keys: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        big = x.size > SMALL_LEAF_SIZE or any(_on_mesh(s[i]) for s in sequences)
        key = ("alone", i) if big else (x.shape, tuple(s[i].dtype for s in sequences))
        keys.setdefault(key, []).append(i)
    runs = [run for p in keys.values() for run in chunks(p)]
    if stackable is not None:
        split = lambda run: len(run) > 1 and not stackable(leaves[run[0]], len(run))
        runs = [part for run in runs for part in ([[i] for i in run] if split(run) else [run])]
    singles = [(p, tuple(s[p[0]] for s in sequences), False) for p in runs if len(p) == 1]
    several = [p for p in runs if len(p) > 1]
    # Flat pieces joined, then reshaped: XLA on CPU compiles this 1.5-2.5x faster than
    # a concatenation of the leaves along a new axis.
    stacks = [
        [
            lax.reshape(
                lax.concatenate([lax.reshape(s[i], (s[i].size,)) for i in p], 0),
                (len(p), *s[p[0]].shape),
            )
            for s in sequences
        ]
        for p in several
    ]
    stacks = lax.optimization_barrier(stacks) if stacks else stacks
    return singles + [(p, tuple(arrays), True) for p, arrays in zip(several, stacks)]


def ungroup(groups: list, values: Sequence[Any], count: int) -> list:
    """Per leaf, in leaf order, its part of each group's ``values`` (of
    :func:`shape_groups`): the value itself for a lone leaf, its row of a stack's."""
    out: list[Any] = [None] * count
    for (positions, _, stacked), v in zip(groups, values):
        for position, row in zip(positions, entries(v) if stacked else [v]):
            out[position] = row
    return out


def entries(array: jax.Array) -> list[jax.Array]:
    """``array[i]`` for every ``i`` along the leading axis, as separate arrays, cheap to
    compile.

    XLA on CPU compiles every distinct slice of a vector as a kernel of its own (about
    25 ms each), so ``vector[i]`` for each of thousands of leaves dominates compile time.
    The array is laid out as a ``sqrt(n) x sqrt(n)`` grid: masked sums pick its rows
    (exact: every other term is 0; the kernels are identical), and static slices read
    the entries of each row, so that only ``sqrt(n)`` distinct slices exist. The grid
    is read about ``sqrt(n)`` times (:data:`ENTRY_READS` bounds what a caller splits
    this way). Beyond ``32^2`` entries it gets a level per factor of 32
    (:data:`PICK_WIDTH`). Masked sums at the last level as well (the earlier layout)
    compiled in 0.85-0.91x the time at 100 leaves, but ran 1.05-1.28x as long on
    100-2,000 leaves and compiled 1.25-1.3x as long at 2,000.
    """
    n, rest = array.shape[0], array.shape[1:]
    if n == 1:
        return [lax.reshape(array, rest)]
    levels, width = _entry_grid(n)
    rows = -(-n // width ** (levels - 1))
    zero = np.zeros((), array.dtype)
    padding = [(0, rows * width ** (levels - 1) - n, 0)] + [(0, 0, 0)] * len(rest)
    shape = (rows,) + (width,) * (levels - 1) + rest
    grid = lax.reshape(lax.pad(array, zero, padding), shape)

    def pick(block: jax.Array, i: int) -> jax.Array:  # sum(where(index == i, block, 0), 0)
        mask = np.arange(block.shape[0]) == i
        if block.size <= SMALL_LEAF_SIZE:  # small constants (the per-leaf scales)
            mask = np.broadcast_to(mask.reshape((-1,) + (1,) * (block.ndim - 1)), block.shape)
            zeros = np.zeros(block.shape, block.dtype)
        else:  # constants of a large block's shape were captured whole (gigabytes)
            mask = lax.broadcast_in_dim(mask, block.shape, (0,))
            zeros = lax.full(block.shape, 0, block.dtype)
        return lax.reduce_sum(lax.select(mask, block, zeros), (0,))

    def split(block: jax.Array, count: int) -> list[jax.Array]:
        """The first ``count`` entries of ``block``'s leading grid levels, in order."""
        if block.ndim == len(rest) + 1:
            return [lax.index_in_dim(block, i, 0, keepdims=False) for i in range(count)]
        step = width ** (block.ndim - len(rest) - 1)
        parts = range(-(-count // step))
        return [e for r in parts for e in split(pick(block, r), min(step, count - r * step))]

    return split(grid, n)


def _entry_grid(n: int) -> tuple[int, int]:
    """``(levels, width)`` of the grid through which :func:`entries` reads ``n`` entries:
    two levels up to ``PICK_WIDTH**2`` entries, one more per factor of ``PICK_WIDTH``."""
    levels = 2
    while PICK_WIDTH**levels < n:
        levels += 1
    return levels, _root_up(n, levels)


def entry_width(n: int) -> int:
    """The width of :func:`entries`' grid for ``n`` entries (``ceil(sqrt(n))`` up to
    ``PICK_WIDTH**2``): how many times, per level, it reads its input."""
    return _entry_grid(n)[1]


def _root_up(n: int, k: int) -> int:
    """The least integer ``w`` with ``w**k >= n``."""
    w = max(1, round(n ** (1 / k)))
    while w**k < n:
        w += 1
    while w > 1 and (w - 1) ** k >= n:
        w -= 1
    return w


def leaf_norm_pairs(leaves: Sequence[jax.Array], ord: float, axis_name: Any = None):
    """``(mantissa, inverse)`` of every leaf's ``ord``-norm, as two vectors in leaf order.

    The pairs of :func:`norm_pair`, in the widest accumulation dtype of the leaves. Small
    leaves of one shape are measured as one stack (:func:`shape_groups`): XLA on CPU
    compiles every reduction, so a per-leaf clipper's compile time then grows with the
    number of shapes rather than of leaves.
    """
    if ord == math.inf:
        norms = stack_scalars(block_norms(leaves, ord, axis_name))
        return norms, jnp.ones_like(norms)
    groups = shape_groups(leaves)
    arrays = [a for _, (a,), _ in groups]
    axes = [
        tuple(range(1, a.ndim)) if stacked else None for a, (_, _, stacked) in zip(arrays, groups)
    ]
    sums = power_sums(arrays, ord, axes, axis_name=axis_name)
    pairs = [sums.pair(r, f, ord) for r, f in zip(sums.raw, sums.rescued)]
    wide = jnp.result_type(*(m for m, _ in pairs))
    mantissa, inverse = (
        jnp.concatenate([jnp.reshape(p[k].astype(wide), -1) for p in pairs]) for k in (0, 1)
    )
    order = np.concatenate([np.asarray(positions) for positions, _, _ in groups])
    if (order != np.arange(order.size)).any():  # back to leaf order: one constant gather
        back = np.argsort(order)
        mantissa, inverse = mantissa[back], inverse[back]
    return mantissa, inverse


def tree_norm_pair(leaves: Sequence[jax.Array], ord: float, axis_name: Any = None):
    """One norm over all the ``leaves`` as ``(mantissa, inverse)`` (see :func:`norm_pair`)."""
    blocks = blocks_of(leaves)
    if not blocks:
        return jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)
    if ord == math.inf:
        norms = block_norms(blocks, ord, axis_name)
        norm = norms[0] if len(norms) == 1 else norm_of_norms(stack_scalars(norms), ord)
        return norm, jnp.ones((), norm.dtype)
    # One total per accumulation dtype: no norm per block to combine.
    pairs = power_sums(blocks, ord, axis_name=axis_name, total=True).pairs(ord)
    if len(pairs) == 1:
        return pairs[0]
    # float32 and float64 totals (x64). A float32 norm, even one rescued in units of
    # 2^-100, is an ordinary float64 number: every part is put in the units of the
    # float64 total, so that the norm's units are always those of its dtype.
    (wide_mantissa, inverse), *narrow = sorted(pairs, key=lambda p: -p[0].dtype.itemsize)
    wide = wide_mantissa.dtype
    parts = [wide_mantissa] + [m.astype(wide) / i.astype(wide) * inverse for m, i in narrow]
    mantissa = norm_of_norms(stack_scalars(parts), ord)
    # A NaN or inf elsewhere: plain units, so that no entry is scaled by 2^-k for nothing.
    return mantissa, jnp.where(jnp.isfinite(mantissa), inverse, jnp.ones((), wide))


def tree_norm(leaves: Sequence[jax.Array], ord: float, axis_name: Any = None) -> jax.Array:
    """One norm over all the ``leaves``; 0 for none."""
    mantissa, inverse = tree_norm_pair(leaves, ord, axis_name)
    return mantissa / inverse


def global_norm(tree: Any, ord: int | float = 2, *, axis_name: Any = None) -> jax.Array:
    """One norm over every inexact leaf of a pytree, computed robustly.

    Args:
      tree: a pytree of arrays. Integer, boolean and ``None`` leaves are skipped.
      ord: 1, 2 (default) or ``math.inf``; the norm of the concatenation of all leaves.
      axis_name: name of a mapped axis (``shard_map`` / ``pmap``) over which the tree
        is split; partial sums are combined across it so every device gets the norm of
        the whole. Leave it ``None`` under plain ``jax.jit``, sharded arrays included.

    Returns:
      A scalar in float32 (float64 if any leaf is float64).

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> tree = {"w": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
      >>> print(f"{gradclip_jax.global_norm(tree):.1f}")
      5.0
      >>> big = jnp.full((4,), 1e30, jnp.float32)  # squares overflow float32
      >>> print(f"{gradclip_jax.global_norm(big):.3g}")
      2e+30
      >>> print(gradclip_jax.global_norm(jnp.full((3,), 300.0, jnp.float16)).dtype)
      float32
    """
    return tree_norm(inexact_leaves(tree), check_ord("global_norm", ord), axis_name)


def leaf_norms(tree: Any, ord: int | float = 2, *, axis_name: Any = None) -> Any:
    """The norm of each inexact leaf, as a tree of scalars (other leaves give ``None``).

    Same numerics as :func:`global_norm`: float32 accumulation, overflow- and zero-safe.

    Args:
      tree: a pytree of arrays.
      ord: 1, 2 (default) or ``math.inf``.
      axis_name: name of a mapped axis (``shard_map`` / ``pmap``) across which *every*
        leaf is split; each leaf's partial sums are combined across it, so every device
        gets the norms of the whole leaves. Leave it ``None`` under plain ``jax.jit``,
        sharded arrays included.

    Returns:
      A tree with the structure of ``tree`` whose inexact leaves are replaced by their
      norm (float32, or float64 for float64 leaves) and other leaves by ``None``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> norms = gradclip_jax.leaf_norms({"a": jnp.array([3.0, 4.0]), "b": jnp.ones(4)})
      >>> print(f"{norms['a']:.1f} {norms['b']:.1f}")
      5.0 2.0
    """
    ord = check_ord("leaf_norms", ord)
    norms = block_norms(inexact_leaves(tree), ord, axis_name)
    return _with_none(refill(tree, norms))


def _with_none(tree: Any) -> Any:
    """Non-inexact leaves replaced by ``None`` (norm trees mirror their input)."""
    return jax.tree.map(lambda x: x if is_inexact(x) else None, tree)


def unit_axes(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The axes a unit-wise norm reduces over, following NFNets / optax conventions.

    With ``axis=None`` the axes follow the rank, assuming Flax / Haiku layouts where the
    output features come last (a Dense kernel is ``(in, out)``, a Conv kernel is
    ``(H, W, in, out)``): a unit is one output feature's incoming weights.

    * squeezed rank <= 1 (scalars, biases, gains): the whole array is one unit;
    * rank 2 or 3 (Dense, multi-head Dense): axis 0;
    * rank 4 (Conv2D HWIO): axes (0, 1, 2); rank 5 (Conv3D DHWIO): axes (0, 1, 2, 3).

    An explicit ``axis`` applies to leaves of rank >= 2 only; vectors and scalars are
    always one unit. PyTorch-style ``(out, in)`` kernels need ``axis=1``.
    """
    if sum(d != 1 for d in x.shape) <= 1 or x.ndim < 2:
        return tuple(range(x.ndim))
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        normalized = tuple(sorted({a % x.ndim for a in axes}))
        if len(normalized) != len(axes) or any(not -x.ndim <= a < x.ndim for a in axes):
            raise ValueError(
                f"unit_axes: `axis`={axis!r} does not name distinct axes of an array of "
                f"shape {x.shape}."
            )
        return normalized
    if x.ndim in (2, 3):
        return (0,)
    if x.ndim in (4, 5):
        return tuple(range(x.ndim - 1))
    raise ValueError(
        f"unit_axes: no default unit layout for an array of shape {x.shape}; "
        "pass `axis` (the axes a unit's weights span, e.g. axis=(0, 1) )."
    )


def unit_norm_list(leaves: Sequence[jax.Array], axis: Any) -> list[jax.Array]:
    """The L2 norm of every unit of each leaf, kept broadcastable to the leaf."""
    axes = [unit_axes(x, axis) for x in leaves]
    return block_norms(leaves, 2, axes=axes, keepdims=True)


def unitwise_norms(tree: Any, axis: int | tuple[int, ...] | None = None) -> Any:
    """The L2 norm of every unit of every inexact leaf, kept broadcastable to the leaf.

    A leaf of shape ``(in, out)`` gives norms of shape ``(1, out)``: see
    :func:`unit_axes` for the default axes. Overflow- and zero-safe like
    :func:`global_norm`.

    Args:
      tree: a pytree of arrays (usually gradients or parameters).
      axis: axes spanned by one unit, for every leaf of rank >= 2; ``None`` for the
        defaults of :func:`unit_axes`.

    Returns:
      A tree of the same structure; non-inexact leaves give ``None``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> kernel = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in=2, out=2)
      >>> print(gradclip_jax.unitwise_norms(kernel))
      [[5. 1.]]
    """
    return _with_none(refill(tree, unit_norm_list(inexact_leaves(tree), axis)))
