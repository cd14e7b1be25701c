"""Robust norms of pytrees: global, per-leaf and unit-wise.

Every norm here

* accumulates in float32 at least (float64 for float64 leaves), so float16 and
  bfloat16 gradients never overflow while being squared;
* is overflow-safe: the common path squares once; only when that sum is not finite
  (float32 entries beyond ~1e19) is it recomputed with every value divided by the
  largest magnitude, inside a ``lax.cond`` so the common path pays nothing for it;
* is zero-safe: a zero tree has norm 0 and a finite (zero) gradient;
* treats complex leaves with ``|x|^2 = re^2 + im^2`` and skips ``None``, integer and
  boolean leaves;
* compiles in near-constant time in the number of leaves: small leaves are
  concatenated into one reduction per accumulation dtype instead of one reduction
  chain per leaf (the cost of optax's global norm on trees of thousands of leaves).

NaN entries give a NaN norm and ``inf`` entries an infinite one: norms report, the
guards module decides what to do about it.

Precision limit: float32 trees whose entries are all below ~1e-18 in magnitude have
squares in the subnormal range (flushed to zero on CPU), so their L2 norm loses
relative precision and may read 0. Such a tree never needs clipping unless the
threshold is as small, so the common path does not pay a second pass to fix it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["global_norm", "leaf_norms", "unitwise_norms", "unit_axes"]

# Leaves with at most this many elements are concatenated into a shared reduction.
# Concatenation makes compile time independent of the number of small leaves, but a
# concatenate fusion is slower per element on CPU than a plain reduction, so large
# leaves (which are few in any tree that fits in memory) keep their own reduction.
SMALL_LEAF_SIZE = 4096

_ORDS = (1, 2, math.inf)


def is_tracer(value: Any) -> bool:
    """True when ``value`` is an abstract value inside a JAX transformation."""
    return isinstance(value, jax.core.Tracer)


def float_leaves(tree: Any) -> list[jax.Array]:
    """The inexact (floating or complex) array leaves of ``tree``, in tree order."""
    return [x for x in jax.tree.leaves(tree) if is_inexact(x)]


def is_inexact(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """float32 for half / single precision (real or complex), float64 for double."""
    real = jnp.finfo(dtype).dtype
    return jnp.promote_types(real, jnp.float32)


def _magnitude_power(x: jax.Array, power: float, inv_scale: jax.Array | None = None):
    """``(|x| * inv_scale) ** power`` element-wise in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    if power == math.inf or power == 1:
        m = jnp.abs(x).astype(acc)
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
    """``|x|`` in the accumulation dtype."""
    return _magnitude_power(x, 1)


def _on_mesh(x: jax.Array) -> bool:
    """True when ``x`` is traced with a device mesh (sharded under ``jit``, ``shard_map``)."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return mesh is not None and not mesh.empty


def blocks_of(leaves: Sequence[jax.Array]) -> list[jax.Array]:
    """The leaves as few arrays: each large leaf alone, small ones concatenated.

    Small leaves of one dtype become one flat array, materialised behind an
    optimisation barrier. A plain copy is cheap, whereas a concatenation fused into a
    reduction is slow on CPU both to compile and to run (measured: 300 leaves of 1,000
    floats compile in 0.5 s this way against 2.5 s fused, and run 4x faster).
    Reductions and the overflow fallback then see a handful of operands whatever the
    leaf count.

    Leaves are never reshaped or concatenated when they are large or carry a mesh
    (sharded arrays under ``jit``): flattening a sharded array all-gathers it, and a
    concatenation of differently sharded leaves is an error under explicit sharding
    and, under automatic sharding, pulls the leaves' other uses (the clipped update)
    to its sharding. Their reductions keep each leaf's own shape and sharding.
    """
    small: dict[Any, list[jax.Array]] = {}
    blocks = []
    for x in leaves:
        if not x.size:
            continue
        if x.size > SMALL_LEAF_SIZE or _on_mesh(x):
            blocks.append(x)
        else:
            small.setdefault(x.dtype, []).append(x.reshape(-1))
    for group in small.values():
        blocks.append(group[0] if len(group) == 1 else jnp.concatenate(group))
    return list(lax.optimization_barrier(blocks)) if blocks else blocks


def _max(values: jax.Array) -> jax.Array:
    """``jnp.max`` (0 when empty) that is NaN whenever a value is NaN.

    For short vectors (per-block or per-leaf partial results): it reads ``values``
    twice.
    """
    largest = jnp.max(values, initial=0)
    if not jnp.issubdtype(values.dtype, jnp.inexact):
        return largest
    # XLA's max reductions may drop NaN, on CPU and across devices; a sum never does
    # (the values here are >= 0, so no inf - inf).
    return jnp.where(jnp.isnan(jnp.sum(values)), jnp.nan, largest).astype(largest.dtype)


def maxima(arrays: Sequence[jax.Array], elementwise: Callable[[jax.Array], jax.Array]) -> list:
    """``max(elementwise(a))`` of each array (0 when empty), NaN when it holds a NaN.

    ``elementwise`` must not turn finite entries into NaN (``|a|`` does not).

    XLA's max reductions may drop NaN: on CPU, ``jnp.max(jnp.abs(x))`` of a float32
    array of 10,000 entries or more holding a NaN returns its largest number, and a
    maximum across devices may too. Testing ``isnan`` inside the reduction, or with a
    second reduction of the same values, makes XLA write ``elementwise(a)`` out and
    read it back (measured: 3 to 4x slower on 10 leaves of 2M floats). Here each array
    is read by two fused reductions: the maximum of its values, and ``sum(a - a)``,
    which is NaN exactly when some entry is NaN or infinite. Only then (a step that is
    not finite anyway) does one ``lax.cond`` tell NaN from ``inf``.
    """
    values = [elementwise(a) for a in arrays]
    if not values or not jnp.issubdtype(values[0].dtype, jnp.inexact):
        return [_max(v) for v in values]
    largest = [jnp.max(v, initial=0) for v in values]
    # x - x is 0, or NaN where x is NaN or infinite. On the arrays themselves, not on
    # the values: XLA would write out values that two reductions read.
    nonfinite = jnp.isnan(stack_scalars([jnp.sum(a - a) for a in arrays]))

    def with_nan(largest):
        return [
            jnp.where(jnp.any(jnp.isnan(elementwise(a))), jnp.nan, m).astype(m.dtype)
            for a, m in zip(arrays, largest)
        ]

    return lax.cond(jnp.any(nonfinite), with_nan, lambda largest: largest, largest)


def reduce_blocks(
    blocks: Sequence[jax.Array],
    elementwise: Callable[[jax.Array], jax.Array],
    combine: str,
) -> jax.Array:
    """Applies ``elementwise`` to every block and reduces everything to one scalar."""
    if combine == "sum":
        op, partials = jnp.sum, [jnp.sum(elementwise(b)) for b in blocks]
    else:
        op, partials = _max, maxima(blocks, elementwise)
    if not partials:
        return jnp.zeros((), jnp.float32)
    if len(partials) == 1:
        return partials[0]
    wide = jnp.result_type(*partials)
    return op(jnp.stack([p.astype(wide) for p in partials]))


def _root(total: jax.Array, power: float) -> jax.Array:
    """``total ** (1/power)`` with a finite derivative at zero; NaN stays NaN."""
    if power != 2:
        return total
    positive = total > 0
    # Zero (and NaN) pass through unchanged: the derivative at zero stays finite.
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1)), total)


def collective(value: Any, combine: str, axis_name: Any) -> Any:
    """``value`` (a pytree of scalars >= 0) summed or maximised across ``axis_name``.

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


def _overflow_rescaling(dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Power-of-two ``(factor, inverse)`` for recomputing an overflowed sum in ``dtype``.

    A float32 sum of squares (or of magnitudes) overflows only when its largest term
    is above ~2^44 (2^128 spread over at most 2^40 elements); multiplied by
    ``2^-(maxexp - 28)`` = 2^-100 every value below 2^128 lands under 2^28, and those
    that matter (within 2^56 of the largest) stay normal numbers when squared. Values
    far smaller may underflow: a relative change of the norm below 2^-100. The
    inverse is an exact power of two, unlike ``1 / max`` (which XLA would compute,
    subnormal above ~1e38 and flushed to zero on CPU). A constant needs no extra pass
    to find the largest value. ``inf`` entries stay ``inf`` and NaN stays NaN.
    """
    k = jnp.finfo(dtype).maxexp - 28
    # Opaque to XLA's algebraic simplifier, which would otherwise rewrite
    # (x * c)^2 as x^2 * c^2 and fold c^2 = 2^-200 to zero in float32.
    factor, inverse = lax.optimization_barrier(
        (jnp.asarray(2.0**k, dtype), jnp.asarray(2.0**-k, dtype))
    )
    return factor, inverse


def _rescaling(largest: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(factor, inverse)`` for values bounded by ``largest``: the overflow rescaling
    of :func:`_overflow_rescaling` where squaring them could overflow, else ``(1, 1)``.
    """
    largest = lax.stop_gradient(largest)
    factor, inverse = _overflow_rescaling(largest.dtype)
    big = largest >= 2.0 ** (jnp.finfo(largest.dtype).maxexp // 2 - 4)
    one = jnp.ones_like(largest)
    return jnp.where(big, one * factor, one), jnp.where(big, one * inverse, one)


def _restore(total: jax.Array, rescaled: jax.Array, power: float) -> jax.Array:
    """The norm from a sum, or from its rescaled recomputation where it overflowed."""
    factor, _ = _overflow_rescaling(total.dtype)
    return jnp.where(jnp.isfinite(total), _root(total, power), factor * _root(rescaled, power))


def _finite_p_norm(blocks: Sequence[jax.Array], power: float, axis_name: Any) -> jax.Array:
    """The ``power``-norm (1 or 2) of the blocks, recomputed rescaled only on overflow."""
    if not blocks:
        return jnp.zeros((), jnp.float32)
    total = collective(
        reduce_blocks(blocks, lambda x: _magnitude_power(x, power), "sum"), "sum", axis_name
    )

    def rescaled(total):
        # Each block in the scale of its own dtype, combined as norms.
        norms = []
        for b in blocks:
            factor, inverse = _overflow_rescaling(accumulation_dtype(b.dtype))
            part = collective(jnp.sum(_magnitude_power(b, power, inverse)), "sum", axis_name)
            norms.append(factor * _root(part, power))
        return norm_of_norms(stack_scalars(norms), power).astype(total.dtype)

    return lax.cond(jnp.isfinite(total), lambda t: _root(t, power), rescaled, total)


def check_ord(ord: Any, fn_name: str) -> None:
    """Raises ``ValueError`` for a concrete ``ord`` outside {1, 2, inf}."""
    if is_tracer(ord):
        return
    try:
        ok = float(ord) in _ORDS
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{fn_name}: `ord` must be 1, 2 or math.inf (jnp.inf); got {ord!r}. "
            "Other orders have no cheap overflow-safe form and are not supported."
        )


def dispatch_ord(ord: Any, compute: Callable[[float], jax.Array]) -> jax.Array:
    """Calls ``compute(ord)`` with a static order, even when ``ord`` is traced.

    ``optax.inject_hyperparams`` turns every numeric argument, ``ord`` included, into
    a traced array. A traced order selects among the three static computations with
    ``lax.switch``, so only the chosen one runs. Unsupported concrete orders are
    rejected at construction by :func:`check_ord`.
    """
    if not is_tracer(ord):
        return compute(float(ord) if float(ord) == math.inf else int(ord))
    index = jnp.where(ord == 1, 0, jnp.where(ord == 2, 1, 2))
    return lax.switch(index, [lambda: compute(1), lambda: compute(2), lambda: compute(math.inf)])


def _global_norm_static(blocks: Sequence[jax.Array], ord: float, axis_name: Any) -> jax.Array:
    if ord == math.inf:
        return collective(reduce_blocks(blocks, _magnitude, "max"), "max", axis_name)
    return _finite_p_norm(blocks, ord, axis_name)


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
    check_ord(ord, "global_norm")
    blocks = blocks_of(float_leaves(tree))
    return dispatch_ord(ord, lambda o: _global_norm_static(blocks, o, axis_name))


def leaf_sums(leaves: Sequence[jax.Array], ord: float, axis_name: Any = None) -> tuple[list, list]:
    """Per-leaf sums of ``|x|^ord`` and their overflow-safe recomputation.

    Returns ``(sums, fixed)``: ``fixed[i]`` equals ``sums[i]`` except on a step where
    some sum overflowed, when it holds the rescaled sum (see :func:`restore_norms`).
    For ``ord=inf`` both are the per-leaf maxima. With ``axis_name`` every leaf is split
    across that mapped axis: the sums (maxima) of all leaves are combined in one
    collective, and the overflow test is on the combined sums, so devices agree.

    One reduction per leaf, deliberately: XLA on CPU compiles a per-leaf reduction
    in a few milliseconds, but slicing per-leaf results out of stacked leaves costs
    tens of milliseconds per slice. One ``lax.cond`` covers the overflow fallback of
    every leaf; it runs only on a step where some sum overflowed.
    """
    if not leaves:
        return [], []
    if ord == math.inf:
        largest = collective(maxima(leaves, _magnitude), "max", axis_name)
        return largest, largest
    sums = collective([jnp.sum(_magnitude_power(x, ord)) for x in leaves], "sum", axis_name)

    def rescaled(sums):
        inverses = [_overflow_rescaling(s.dtype)[1] for s in sums]
        fixed = [jnp.sum(_magnitude_power(x, ord, i)) for x, i in zip(leaves, inverses)]
        return collective(fixed, "sum", axis_name)

    all_finite = jnp.all(stack_scalars([jnp.isfinite(s) for s in sums]))
    return sums, lax.cond(all_finite, lambda s: s, rescaled, sums)


def restore_norms(sums: jax.Array, fixed: jax.Array, ord: float) -> jax.Array:
    """Norms from :func:`leaf_sums` output (element-wise, scalars or stacked vectors)."""
    return sums if ord == math.inf else _restore(sums, fixed, ord)


def leaf_norm_list(
    leaves: Sequence[jax.Array], ord: float, axis_name: Any = None
) -> list[jax.Array]:
    """The norm of each leaf, overflow-safe, as a list of scalars."""
    sums, fixed = leaf_sums(leaves, ord, axis_name)
    return [restore_norms(s, f, ord) for s, f in zip(sums, fixed)]


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
    check_ord(ord, "leaf_norms")
    leaves, treedef = jax.tree.flatten(tree)
    inexact = [x for x in leaves if is_inexact(x)]
    norms = iter(dispatch_ord(ord, lambda o: leaf_norm_list(inexact, o, axis_name)))
    return jax.tree.unflatten(treedef, [next(norms) if is_inexact(x) else None for x in leaves])


def unit_axes(x: jax.Array, axis: int | tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The axes a unit-wise norm reduces over, following NFNets / optax conventions.

    With ``axis=None`` the axes follow the rank, assuming Flax / Haiku layouts where the
    output features come last (a Dense kernel is ``(in, out)``, a Conv kernel is
    ``(H, W, in, out)``): a unit is one output feature's incoming weights.

    * squeezed rank <= 1 (scalars, biases, gains): the whole array is one unit;
    * rank 2 or 3 (Dense, multi-head Dense): axis 0;
    * rank 4 (Conv2D HWIO): axes (0, 1, 2); rank 5 (Conv3D DHWIO): axes (0, 1, 2, 3).

    PyTorch-style ``(out, in)`` kernels need an explicit ``axis``.
    """
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        return tuple(a % x.ndim for a in axes) if x.ndim else ()
    if sum(d != 1 for d in x.shape) <= 1:
        return tuple(range(x.ndim))
    if x.ndim in (2, 3):
        return (0,)
    if x.ndim in (4, 5):
        return tuple(range(x.ndim - 1))
    raise ValueError(
        f"unit_axes: no default unit layout for an array of shape {x.shape}; "
        "pass `axis` (the axes a unit's weights span, e.g. axis=(0, 1) )."
    )


def _unitwise_sum(x, axes, power, inv_scale=None):
    return jnp.sum(_magnitude_power(x, power, inv_scale), axis=axes, keepdims=True)


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
    leaves, treedef = jax.tree.flatten(tree)
    inexact = [x for x in leaves if is_inexact(x)]
    axes = [unit_axes(x, axis) for x in inexact]
    sums = [_unitwise_sum(x, a, 2) for x, a in zip(inexact, axes)]

    def rescaled(sums):
        return [
            _unitwise_sum(x, a, 2, _overflow_rescaling(s.dtype)[1])
            for x, a, s in zip(inexact, axes, sums)
        ]

    if sums:
        all_finite = jnp.all(stack_scalars([jnp.all(jnp.isfinite(s)) for s in sums]))
        fixed = lax.cond(all_finite, lambda s: s, rescaled, sums)
        sums = [_restore(s, f, 2) for s, f in zip(sums, fixed)]
    norms = iter(sums)
    return jax.tree.unflatten(treedef, [next(norms) if is_inexact(x) else None for x in leaves])


def stack_scalars(values: Sequence[jax.Array]) -> jax.Array:
    """Flattens and concatenates arrays into one materialised vector.

    The barrier keeps the concatenation a plain copy instead of fusing it into its
    consumers, which compiles slowly for hundreds of operands.
    """
    flat = jnp.concatenate([jnp.ravel(v) for v in values])
    return lax.optimization_barrier(flat)


def norm_of_norms(norms: jax.Array, ord: float = 2) -> jax.Array:
    """The norm of a tree from the vector of the norms of its parts, without overflow."""
    if norms.size == 0:
        return jnp.zeros((), jnp.float32)
    norms = norms.astype(jnp.promote_types(norms.dtype, jnp.float32))
    if ord == math.inf:
        return _max(norms)
    if ord == 1:
        return jnp.sum(norms)
    total = jnp.sum(norms * norms)
    _, inverse = _overflow_rescaling(norms.dtype)
    return _restore(total, jnp.sum((norms * inverse) ** 2), 2)
