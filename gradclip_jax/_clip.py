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

from gradclip_jax._norms import (
    accumulation_dtype,
    block_norms,
    norm_of_norms,
    stack_scalars,
    tree_norm,
    unit_norm_list,
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


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * scale`` in the accumulation precision, back in ``x``'s dtype: one multiply
    per element; half-precision and float8 leaves do not underflow on tiny scales."""
    return (x.astype(wide_dtype(x.dtype)) * scale.astype(accumulation_dtype(x.dtype))).astype(
        x.dtype
    )


def clamp_leaf(x: jax.Array, bound: jax.Array) -> jax.Array:
    """Every entry of ``x`` bounded by ``bound`` in magnitude; complex entries keep
    their phase."""
    if jnp.iscomplexobj(x):
        return scale_leaf(x, clip_scale(jnp.abs(x).astype(accumulation_dtype(x.dtype)), bound))
    wide = x.astype(wide_dtype(x.dtype))
    bound = bound.astype(wide.dtype)
    return jnp.clip(wide, -bound, bound).astype(x.dtype)


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
    norm = tree_norm(leaves, ctx.ord, ctx.axis_name)
    threshold, new_state = run_rule(fn, rule, state, norm, norm)
    finite = jnp.isfinite(norm)
    threshold = _sanitized(threshold, finite)
    scale = clip_scale(norm, threshold)
    out = [scale_leaf(x, scale) for x in leaves]
    return (
        out,
        _absorbed(state, new_state, finite),
        Measured(norm, threshold, norm * scale, scale < 1),
    )


def _clip_element(fn, rule, state, leaves, ctx):
    largest = tree_norm(leaves, math.inf, ctx.axis_name)
    threshold, new_state = run_rule(fn, rule, state, largest, largest)
    # The bound must not wait for the measurement: with a constant it is a constant, and
    # the clamp runs without reading the norm (NaN, from a rule fed NaN, bounds nothing).
    out = [clamp_leaf(x, jnp.where(jnp.isnan(threshold), jnp.inf, threshold)) for x in leaves]
    finite = jnp.isfinite(largest)
    threshold = _sanitized(threshold, finite)
    after = jnp.minimum(largest, threshold.astype(largest.dtype))
    measured = Measured(largest, threshold, after, largest > threshold)
    return out, _absorbed(state, new_state, finite), measured


def _entries(vector: jax.Array) -> list[jax.Array]:
    """The entries of a vector as separate scalars, cheap to compile.

    XLA on CPU compiles a kernel that slices a vector slowly (about 25 ms per slice),
    so ``vector[i]`` for each of thousands of leaves dominates compile time. Masked sums
    over a ``sqrt(n) x sqrt(n)`` grid read the same values exactly (every other term is
    0) with small kernels: for 300 leaves, 6 s of compilation instead of 13.
    """
    n = vector.shape[0]
    width = math.isqrt(max(n - 1, 0)) + 1
    rows = -(-n // width)
    grid = jnp.pad(vector, (0, rows * width - n)).reshape(rows, width)
    row_index = jax.lax.broadcasted_iota(jnp.int32, grid.shape, 0)
    row_vectors = [jnp.sum(jnp.where(row_index == r, grid, 0), axis=0) for r in range(rows)]
    column_index = jax.lax.iota(jnp.int32, width)
    entries = [
        jnp.sum(jnp.where(column_index == c, row, 0)) for row in row_vectors for c in range(width)
    ]
    return entries[:n]


def _leaf_thresholds(fn, rule, state, norms, total, ctx):
    """Per-leaf rule thresholds, the rule ``vmap``-ed over the leaves.

    A stateless rule whose threshold does not depend on the norm (a constant) gives one
    threshold: each leaf's scale then fuses with its own norm and multiply, with no
    slicing of a vector of scales.
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


def _clip_leaves(fn, rule, state, leaves, ctx):
    norm_list = block_norms(leaves, ctx.ord, ctx.axis_name)
    norms = stack_scalars(norm_list)
    total = norm_of_norms(norms, ctx.ord)
    finite = jnp.isfinite(total)
    thresholds, new_state = _leaf_thresholds(fn, rule, state, norms, total, ctx)
    thresholds = _sanitized(thresholds, finite)
    sizes = np.array([x.size * ctx.devices for x in leaves], np.float32)
    limits = thresholds * np.sqrt(sizes) if ctx.per_size else thresholds
    scales = clip_scale(norms, limits)
    if thresholds.ndim:  # one threshold per leaf: each leaf reads its own entry
        per_leaf = _entries(scales)
    else:  # one threshold: each leaf's scale fuses with its own norm and multiply
        per_leaf = [
            clip_scale(n, thresholds * math.sqrt(s) if ctx.per_size else thresholds)
            for n, s in zip(norm_list, sizes)
        ]
    out = [scale_leaf(x, s) for x, s in zip(leaves, per_leaf)]
    after = norm_of_norms(norms * scales, ctx.ord)
    measured = Measured(total, jnp.max(thresholds), after, jnp.mean(scales < 1))
    return out, _absorbed(state, new_state, finite), measured


def _clip_units(fn, rule, state, leaves, ctx):
    if jax.tree.leaves(state):
        raise ValueError(f"{fn}: granularity='unit' takes a stateless rule (a constant).")
    units = unit_norm_list(leaves, ctx.axis)
    # Per leaf first, then across leaves: never a concatenation of differently sharded
    # unit vectors.
    leaf_norms = [norm_of_norms(u) for u in units]
    total = norm_of_norms(stack_scalars(leaf_norms)) if leaves else jnp.zeros((), jnp.float32)
    threshold, _ = run_rule(fn, rule, state, total, total)
    param_units = unit_norm_list(ctx.param_leaves, ctx.axis)
    scales = [
        clip_scale(u, threshold.astype(p.dtype) * jnp.maximum(p, jnp.asarray(ctx.eps, p.dtype)))
        for u, p in zip(units, param_units)
    ]
    out = [scale_leaf(x, s) for x, s in zip(leaves, scales)]
    after = [norm_of_norms(u * s) for u, s in zip(units, scales)]
    count = sum(jnp.sum(s < 1) for s in scales)
    fraction = count / max(sum(s.size for s in scales), 1)
    after = norm_of_norms(stack_scalars(after)) if leaves else total
    return out, state, Measured(total, threshold, after, fraction)


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
            n = len(inexact_leaves(params))
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
