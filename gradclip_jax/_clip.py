"""The one clipping core: measure at a granularity, ask a rule for the threshold, act.

Every clipper of the library is :func:`clipper` with a granularity, a rule and a name:
``clip_by_global_norm`` is ``("global", rules.constant(max_norm))``, ``zclip`` is
``("global", rules.zscore(...))``, ``adagc`` is ``("leaf", rules.adagc(...))``, ``agc`` is
``("unit", rules.constant(clipping))`` with thresholds relative to the parameters. See
``docs/design.md``.

Granularities:

* ``"global"``: one norm for the whole update, one threshold, one scale;
* ``"leaf"``: one norm per inexact leaf; a stateful rule keeps one state per leaf (a
  leading leaf axis, the rule ``vmap``-ed over it);
* ``"unit"``: one L2 norm per unit of each leaf (AGC), stateless rules only;
* ``"element"``: every entry is bounded by the threshold (clipping by value); the
  rule sees the largest magnitude.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradclip_jax._norms import (
    accumulation_dtype,
    entries,
    leaf_norm_pairs,
    norm_of_norms,
    norm_of_parts,
    pair_scale,
    power_sums,
    rescale_exponent,
    shape_groups,
    signed_pair,
    signed_scale,
    tree_norm,
    tree_norm_pair,
    ungroup,
    unit_axes,
    wide_dtype,
)
from gradclip_jax._stats import ClipStats, NamedStats, check_name
from gradclip_jax._tree import inexact_leaves, refill
from gradclip_jax._validate import check_choice

GRANULARITIES = ("global", "leaf", "unit", "element")


class ClipState(NamedTuple):
    """State of every clipper: its rule's state and its named statistics.

    ``rule_state`` is ``()`` for a constant threshold; under ``granularity="leaf"`` a
    stateful rule's arrays carry a leading leaf axis.
    """

    rule_state: Any
    stats: NamedStats  # ClipStats under the clipper's name


class Measured(NamedTuple):
    """What one step measured: turned into :class:`ClipStats`."""

    norm: Any
    threshold: Any
    clipped_norm: Any
    clipped: Any


# ----------------------------------------------------------------------------- act


def clip_scale(norm: jax.Array, threshold: Any) -> jax.Array:
    """``min(1, threshold / norm)`` without NaN: 1 when ``norm <= threshold``.

    Zero norms, zero thresholds and infinite thresholds all give a finite scale with a
    finite derivative. A NaN norm gives 1 (the NaN propagates through the update); an
    infinite norm gives 0.
    """
    threshold = jnp.asarray(threshold, norm.dtype)
    over = norm > threshold
    return jnp.where(over, threshold / jnp.where(over, norm, 1), 1)


def scale_leaf(x: jax.Array, scale: jax.Array, inverse: Any = None) -> jax.Array:
    """``x * scale`` (``x * inverse * scale`` for a norm given as a :func:`pair_scale`
    pair) in the accumulation precision, back in ``x``'s dtype; half-precision and
    float8 leaves do not underflow on tiny scales."""
    wide = wide_dtype(x.dtype)
    factor = None if inverse is None else _as_factor(inverse, wide)
    return _scaled(x, wide, factor, _as_factor(scale, wide))


def _scaled(x: jax.Array, wide: Any, inverse: Any, scale: jax.Array) -> jax.Array:
    """``x * inverse * scale`` in ``wide`` (factors already in it), back in ``x``'s dtype.

    Written in ``lax`` (no promotion to resolve): a clipper calls it once per leaf, and
    ``jnp``'s dispatch was most of its tracing time.
    """
    out = lax.convert_element_type(x, wide)
    if inverse is not None:
        out = lax.mul(out, inverse)
    return lax.convert_element_type(lax.mul(out, scale), x.dtype)


def _as_factor(value: Any, dtype: Any) -> jax.Array:
    """A real scalar factor in the accumulation dtype, then in ``dtype`` (complex if the
    leaf is): the rounding of ``jnp``'s promotion, written out."""
    real = lax.convert_element_type(value, jnp.finfo(dtype).dtype)
    return lax.convert_element_type(real, dtype)


def clamp_leaves(leaves: list[jax.Array], bound: jax.Array) -> list[jax.Array]:
    """Every entry of every leaf bounded by ``bound`` in magnitude; complex entries keep
    their phase. The bounds are converted once per dtype and each leaf is one ``lax``
    clamp: ``jnp.clip``, a nested ``jit`` per leaf, had made ``clip_by_value``'s
    tracing 2.3x as long (500 leaves)."""
    bounds: dict[Any, tuple[jax.Array, jax.Array]] = {}
    out = []
    for x in leaves:
        if jnp.iscomplexobj(x):
            out.append(_clamp_complex(x, bound))
            continue
        wide = wide_dtype(x.dtype)
        if wide not in bounds:
            high = lax.convert_element_type(bound, wide)
            bounds[wide] = (lax.neg(high), high)
        low, high = bounds[wide]
        # jnp.clip's operations in its order: the maximum with the lower bound first.
        clamped = lax.min(high, lax.max(low, lax.convert_element_type(x, wide)))
        out.append(lax.convert_element_type(clamped, x.dtype))
    return out


def _clamp_complex(x: jax.Array, bound: jax.Array) -> jax.Array:
    # |x| of finite parts may exceed the dtype's range (|3e38 + 3e38j| in complex64):
    # x * bound / |x| is then formed from x * 2^-64 (exact), so that neither |x| nor
    # the scale leaves the range of normal numbers.
    acc = accumulation_dtype(x.dtype)
    wide = x.astype(wide_dtype(x.dtype))
    beyond = jnp.isinf(jnp.abs(wide)) & jnp.isfinite(wide)
    inverse = jnp.where(beyond, 2.0**-64, 1).astype(acc)
    mantissa = jnp.abs(wide * inverse).astype(acc)
    return scale_leaf(x, pair_scale(mantissa, inverse, bound), inverse)


# ------------------------------------------------------------------------- rules


def check_rule(fn: str, rule: Any) -> None:
    if isinstance(rule, type):
        raise TypeError(
            f"{fn}: `rule` must be a rule object, not the class {rule.__name__}; build "
            f"one, e.g. gradclip_jax.rules.{rule.__name__.lower()}() or "
            f"gradclip_jax.rules.{rule.__name__}()."
        )
    missing = [m for m in ("init", "step") if not callable(getattr(rule, m, None))]
    if missing:
        raise TypeError(
            f"{fn}: `rule` must have methods init() and step(state, norm, global_norm) -> "
            f"(threshold, state); {rule!r} lacks {', '.join(missing)}. Use a rule from "
            "gradclip_jax.rules or see docs/custom_rules.md to write one."
        )


def initial_rule_state(fn: str, rule: Any) -> Any:
    """The rule's initial state with every leaf a strongly typed array of its own."""
    state = rule.init()
    leaves = jax.tree.leaves(state)
    if not all(hasattr(x, "dtype") or isinstance(x, (int, float)) for x in leaves):
        raise ValueError(
            f"{fn}: {type(rule).__name__}.init() must return a pytree of arrays; got {state!r}."
        )
    # Strong dtypes, so the state has the same types before and after a step; a copy
    # each, so a fresh state can be donated.
    return jax.tree.map(lambda x: jnp.array(x, jnp.asarray(x).dtype, copy=True), state)


def _keep_layout(fn: str, rule: Any, old: Any, new: Any) -> Any:
    """``new`` cast to the dtypes of ``old``, after checking it has the same shapes."""
    old_shapes = jax.tree.map(jnp.shape, old)
    new_shapes = jax.tree.map(jnp.shape, new)
    if jax.tree.structure(old) != jax.tree.structure(new) or old_shapes != new_shapes:
        raise ValueError(
            f"{fn}: {type(rule).__name__}.step changed the layout of the rule's state from "
            f"{old_shapes} to {new_shapes}. A rule's state must keep its structure and "
            "shapes from step to step, so that it jits and checkpoints."
        )
    return jax.tree.map(lambda o, n: jnp.asarray(n).astype(o.dtype), old, new)


def run_rule(fn, rule, state, norm, global_norm):
    """``rule.step`` checked: a scalar threshold (float32) and a state of the same layout."""
    threshold, new_state = rule.step(state, norm, global_norm)
    threshold = jnp.asarray(threshold)
    if threshold.shape != ():
        raise ValueError(
            f"{fn}: {type(rule).__name__}.step must return a scalar threshold; got shape "
            f"{threshold.shape}."
        )
    # float32 at least; a float64 threshold (under x64) stays exact for float64 trees.
    dtype = jnp.float64 if threshold.dtype == jnp.float64 else jnp.float32
    return threshold.astype(dtype), _keep_layout(fn, rule, state, new_state)


def _absorbed(old: Any, new: Any, finite: jax.Array) -> Any:
    """The advanced rule state, or the old one at a step whose global norm is not finite:
    its statistics would poison every later threshold."""
    return jax.tree.map(lambda o, n: jnp.where(finite, n, o), old, new)


def _sanitized(threshold: jax.Array, finite: jax.Array) -> jax.Array:
    # A rule fed a NaN norm may answer NaN; the update is non-finite anyway, and the
    # reported threshold says "no clipping" instead of NaN.
    return jnp.where(jnp.isnan(threshold) & ~finite, jnp.inf, threshold)


# ------------------------------------------------------------------ granularities


def _clip_global(fn, rule, state, leaves, ctx):
    mantissa, inverse = tree_norm_pair(leaves, ctx.ord, ctx.axis_name)
    norm = mantissa / inverse
    threshold, new_state = run_rule(fn, rule, state, norm, norm)
    finite = jnp.isfinite(norm)
    threshold = _sanitized(threshold, finite)
    signed = signed_scale(mantissa, inverse, threshold)
    scale = jnp.abs(signed)
    out = scale_leaves(leaves, signed, inverse.dtype)
    measured = Measured(norm, threshold, mantissa * scale, inverse * scale < 1)
    return out, _absorbed(state, new_state, finite), measured


def _clip_element(fn, rule, state, leaves, ctx):
    largest = tree_norm(leaves, math.inf, ctx.axis_name)
    threshold, new_state = run_rule(fn, rule, state, largest, largest)
    # The bound must not wait for the measurement: with a constant it is a constant, and
    # the clamp runs without reading the norm (NaN, from a rule fed NaN, bounds nothing).
    out = clamp_leaves(leaves, jnp.where(jnp.isnan(threshold), jnp.inf, threshold))
    finite = jnp.isfinite(largest)
    threshold = _sanitized(threshold, finite)
    after = jnp.minimum(largest, threshold.astype(largest.dtype))
    measured = Measured(largest, threshold, after, largest > threshold)
    return out, _absorbed(state, new_state, finite), measured


def _leaf_thresholds(fn, rule, state, norms, total, ctx):
    """Per-leaf rule thresholds, the rule ``vmap``-ed over the leaves.

    A stateless rule whose threshold does not depend on the norm (a constant) gives one
    threshold, traced once rather than per leaf.
    """
    step = lambda s, n: run_rule(fn, rule, s, n, total)
    if not jax.tree.leaves(state):
        try:
            return jax.vmap(step, in_axes=(None, 0), out_axes=None)(state, norms)
        except ValueError:  # the threshold depends on the norm: one per leaf
            return jax.vmap(step, in_axes=(None, 0), out_axes=(0, None))(state, norms)
    check_state_rows(fn, state, norms.shape[0])
    return jax.vmap(step)(state, norms)


def check_state_rows(fn: str, state: Any, leaves: int) -> None:
    rows = jax.tree.leaves(state)[0].shape[0]
    if rows != leaves:
        raise ValueError(
            f"{fn}: the updates have {leaves} inexact leaves but the state was built for "
            f"{rows}. With granularity='leaf', `init` must get a tree with the same "
            "floating-point leaves as the updates."
        )


def scale_leaves(leaves: list[jax.Array], signed: jax.Array, units: Any = None) -> list:
    """:func:`_scale_signed` of every leaf by one scalar ``signed``: its factors are
    formed once per dtype, so that tracing is one multiply per leaf."""
    factors: dict[Any, tuple] = {}
    out = []
    for x in leaves:
        if x.dtype not in factors:
            factors[x.dtype] = _signed_factors(x.dtype, signed, units)
        out.append(_scaled(x, *factors[x.dtype]))
    return out


def _scale_signed(x: jax.Array, signed: jax.Array, units: Any = None) -> jax.Array:
    """:func:`scale_leaf` from :func:`signed_pair` (a scalar, or unit scales that broadcast)."""
    return _scaled(x, *_signed_factors(x.dtype, signed, units))


def _signed_factors(dtype: Any, signed: jax.Array, units: Any) -> tuple:
    """``(wide, inverse, scale)`` for :func:`_scaled` of a leaf of ``dtype`` by ``signed``.

    Negative entries count in the rescue units of the dtype ``units`` (default: the
    leaf's accumulation dtype, in which per-leaf and per-unit norms are measured).
    """
    acc = accumulation_dtype(dtype)
    if units is not None and jnp.finfo(units).bits > jnp.finfo(acc).bits:
        # A float32 leaf in a norm measured in float64 (x64): the units 2^-996 and the
        # scale near 2^996 exist only in float64, so the leaf is scaled there.
        complex_leaf = jnp.issubdtype(dtype, jnp.complexfloating)
        dtype = wide_dtype(jnp.result_type(units, jnp.complex64) if complex_leaf else units)
        acc = accumulation_dtype(dtype)
    signed = lax.convert_element_type(signed, acc)
    beyond = lax.lt(signed, np.zeros(signed.shape, acc))
    unit = 2.0 ** -rescale_exponent(acc if units is None else units)  # power_sums' rescue
    inverse = lax.select(beyond, np.full(signed.shape, unit, acc), np.ones(signed.shape, acc))
    wide = wide_dtype(dtype)
    return wide, _as_factor(inverse, wide), _as_factor(lax.abs(signed), wide)


def _clip_leaves(fn, rule, state, leaves, ctx):
    if not leaves:  # nothing to clip (e.g. optax.masked with an all-False mask)
        if jax.tree.leaves(state) and jax.tree.leaves(state)[0].shape[0] != 1:
            check_state_rows(fn, state, 0)  # built for float leaves that are gone
        zero = jnp.zeros((), jnp.float32)
        thresholds, _ = _leaf_thresholds(fn, rule, state, zero[None], zero, ctx)
        return [], state, Measured(zero, jnp.max(thresholds), zero, zero)
    mantissas, inverses = leaf_norm_pairs(leaves, ctx.ord, ctx.axis_name)
    norms = mantissas / inverses
    total = norm_of_norms(norms, ctx.ord)
    finite = jnp.isfinite(total)
    thresholds, new_state = _leaf_thresholds(fn, rule, state, norms, total, ctx)
    thresholds = _sanitized(thresholds, finite)
    sizes = np.array([x.size * ctx.devices for x in leaves], np.float32)
    limits = thresholds * np.sqrt(sizes) if ctx.per_size else thresholds
    # Every scale in one small kernel; each leaf's multiply reads its own entry.
    signed = signed_scale(mantissas, inverses, limits)
    scales = jnp.abs(signed)
    out = [_scale_signed(x, e) for x, e in zip(leaves, entries(signed))]
    after = norm_of_norms(mantissas * scales, ctx.ord)
    clipped = jnp.mean(inverses * scales < 1)
    measured = Measured(total, jnp.max(thresholds), after, clipped)
    return out, _absorbed(state, new_state, finite), measured


def _clip_units(fn, rule, state, leaves, ctx):
    if jax.tree.leaves(state):
        raise ValueError(f"{fn}: granularity='unit' takes a stateless rule (a constant).")
    # Leaves of one shape are stacked with their parameters: one reduction per group.
    groups = shape_groups(leaves, ctx.param_leaves)
    axes = []
    for positions, _, stacked in groups:
        leaf_axes = unit_axes(leaves[positions[0]], ctx.axis)
        axes.append(tuple(a + 1 for a in leaf_axes) if stacked else leaf_axes)
    arrays = [g for _, (g, _), _ in groups] + [p for _, (_, p), _ in groups]
    # The updates' and the parameters' unit sums, rescued together on overflow.
    sums = power_sums(arrays, 2, axes + axes, keepdims=True)
    n = len(groups)
    grads = list(zip(sums.raw[:n], sums.rescued[:n]))
    params = [sums.relative(r, f, ctx.eps) for r, f in zip(sums.raw[n:], sums.rescued[n:])]
    pairs = [sums.pair(r, f, 2) for r, f in grads]
    zero = jnp.zeros((), jnp.float32)
    total = norm_of_parts([m / i for m, i in pairs]) if pairs else zero
    threshold, _ = run_rule(fn, rule, state, total, total)
    scales = [
        sums.scale(r, f, 2, threshold.astype(r.dtype), relative=p)
        for (r, f), p in zip(grads, params)
    ]
    signed = ungroup(groups, [signed_pair(s, i) for s, i in scales], len(leaves))
    out = [_scale_signed(x, e) for x, e in zip(leaves, signed)]
    if not pairs:
        return out, state, Measured(total, threshold, total, zero)
    after = norm_of_parts([m * s for (m, _), (s, _) in zip(pairs, scales)])
    count = sum(jnp.sum(i * s < 1) for s, i in scales)
    size = sum(s.size for s, _ in scales)
    return out, state, Measured(total, threshold, after, count / size)


_CLIP = {
    "global": _clip_global,
    "leaf": _clip_leaves,
    "unit": _clip_units,
    "element": _clip_element,
}


class Context(NamedTuple):
    """The structural choices of a clipper, fixed when it is built."""

    ord: float
    axis_name: Any
    per_size: bool  # leaf thresholds scale with sqrt(leaf size) (block RMS)
    axis: Any  # unit axes (AGC)
    eps: Any  # floor of the parameters' unit norms (AGC)
    param_leaves: list  # the parameters' inexact leaves, paired with the updates' (AGC)
    devices: Any  # devices along axis_name that each hold part of every leaf


# -------------------------------------------------------------------- transformation


def clipper(
    fn: str,
    rule: Any,
    granularity: str,
    *,
    name: str | None = None,
    ord: float = 2,
    axis_name: Any = None,
    per_size: bool = False,
    axis: Any = None,
    eps: Any = None,
    pair_params: Callable[[Any, Any], list] | None = None,
) -> optax.GradientTransformation:
    """A clipping transformation: ``granularity`` x ``rule``, statistics under ``name``.

    ``pair_params(updates, params)`` returns the parameters' leaves matched to the
    updates' inexact leaves, for thresholds relative to the parameters (AGC).
    """
    check_rule(fn, rule)
    check_choice(fn, "granularity", granularity, GRANULARITIES)
    name = check_name(fn, fn if name is None else name)
    clip = _CLIP[granularity]

    def init_fn(params):
        rule_state = initial_rule_state(fn, rule)
        if granularity == "leaf" and jax.tree.leaves(rule_state):
            # A tree without float leaves keeps one unused row: Orbax cannot save
            # zero-size arrays, and the update reads the row's threshold for its record.
            n = max(len(inexact_leaves(params)), 1)
            rule_state = jax.tree.map(lambda x: jnp.repeat(x[None], n, axis=0), rule_state)
        return ClipState(rule_state, NamedStats(name, ClipStats.initial()))

    def update_fn(updates, state, params=None):
        leaves = inexact_leaves(updates)
        devices = 1 if axis_name is None else jax.lax.psum(1, axis_name)
        param_leaves = pair_params(updates, params) if pair_params else []
        ctx = Context(ord, axis_name, per_size, axis, eps, param_leaves, devices)
        out, rule_state, measured = clip(fn, rule, state.rule_state, leaves, ctx)
        stats = state.stats.replace(state.stats.record.advance(*measured))
        return refill(updates, out), ClipState(rule_state, stats)

    return optax.GradientTransformation(init_fn, update_fn)


def check_structural(fn: str, arg: str, value: Any) -> None:
    """A hyperparameter that shapes the computation is a Python value, never an array
    (``optax.inject_hyperparams`` turns numeric arguments into arrays)."""
    if any(isinstance(v, jax.Array) for v in jax.tree.leaves(value)):
        raise ValueError(
            f"{fn}: `{arg}` is structural (it chooses what is computed), so it cannot be "
            f"an array or a traced value; got {value!r}. Under optax.inject_hyperparams, "
            f"name it in static_args=('{arg}',)."
        )
