"""Adaptive clipping: thresholds from a rule that follows the gradients, and named strategies."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradclip_jax import rules
from gradclip_jax._core import Measured, check_choice, clip_scale, scale_leaf, scale_tree
from gradclip_jax._norms import (
    global_norm,
    is_inexact,
    leaf_norms,
    norm_of_norms,
    stack_scalars,
)
from gradclip_jax._stats import ClipStats

__all__ = [
    "AdagcState",
    "AdaptiveClipState",
    "AutoclipState",
    "QuantileClipState",
    "ZclipState",
    "adagc",
    "adaptive_clip",
    "autoclip",
    "quantile_clip",
    "zclip",
]

_GRANULARITIES = ("global", "leaf")


class AdaptiveClipState(NamedTuple):
    """State of :func:`adaptive_clip`."""

    rule_state: Any  # the rule's state; under granularity="leaf", a leading leaf axis
    stats: ClipStats


class AutoclipState(NamedTuple):
    """State of :func:`autoclip`."""

    rule_state: rules.PercentileState
    stats: ClipStats


class ZclipState(NamedTuple):
    """State of :func:`zclip`."""

    rule_state: rules.ZScoreState
    stats: ClipStats


class AdagcState(NamedTuple):
    """State of :func:`adagc`."""

    rule_state: rules.AdaGCState  # one entry per inexact leaf (leading axis)
    stats: ClipStats


class QuantileClipState(NamedTuple):
    """State of :func:`quantile_clip`."""

    rule_state: rules.QuantileState
    stats: ClipStats


def _rule_name(rule: Any) -> str:
    return type(rule).__name__


def _check_rule(fn: str, rule: Any) -> None:
    missing = [m for m in ("init", "threshold", "advance") if not callable(getattr(rule, m, None))]
    if missing:
        raise TypeError(
            f"{fn}: `rule` must have methods init(), threshold(state, norm, global_norm) and "
            f"advance(state, norm, global_norm); {rule!r} lacks {', '.join(missing)}. "
            "Use a rule from gradclip_jax.rules or see its documentation to write one."
        )


def _initial_rule_state(fn: str, rule: Any) -> Any:
    """The rule's initial state with every leaf a strongly typed array."""
    state = rule.init()
    leaves = jax.tree.leaves(state)
    if not all(hasattr(x, "dtype") or isinstance(x, (int, float)) for x in leaves):
        raise ValueError(
            f"{fn}: {_rule_name(rule)}.init() must return a pytree of arrays; got {state!r}."
        )
    # Strong dtypes, so the state has the same types before and after a step.
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), state)


def _keep_layout(fn: str, rule: Any, old: Any, new: Any) -> Any:
    """``new`` cast to the dtypes of ``old``, after checking it has the same shapes."""
    old_shapes = jax.tree.map(jnp.shape, old)
    new_shapes = jax.tree.map(jnp.shape, new)
    if jax.tree.structure(old) != jax.tree.structure(new) or old_shapes != new_shapes:
        raise ValueError(
            f"{fn}: {_rule_name(rule)}.advance changed the layout of the rule's state from "
            f"{old_shapes} to {new_shapes}. A rule's state must keep its structure and "
            "shapes from step to step, so that it jits and checkpoints."
        )
    return jax.tree.map(lambda o, n: jnp.asarray(n).astype(o.dtype), old, new)


def _check_scalar(fn: str, rule: Any, threshold: Any) -> jax.Array:
    threshold = jnp.asarray(threshold)
    if threshold.shape != ():
        raise ValueError(
            f"{fn}: {_rule_name(rule)}.threshold must return a scalar; got shape {threshold.shape}."
        )
    return threshold


def _sanitized(threshold: jax.Array, finite: jax.Array) -> jax.Array:
    # A rule fed a NaN norm may answer NaN; the update is non-finite anyway, and the
    # reported threshold says "no clipping" instead of NaN.
    return jnp.where(jnp.isnan(threshold) & ~finite, jnp.inf, threshold)


def _absorbed(old: Any, new: Any, finite: jax.Array) -> Any:
    """The advanced state, or the old one at a step whose global norm is not finite."""
    return jax.tree.map(lambda o, n: jnp.where(finite, n, o), old, new)


def _clip_global(fn, rule, rule_state, updates, axis_name):
    norm = global_norm(updates, axis_name=axis_name)
    finite = jnp.isfinite(norm)
    threshold = _sanitized(_check_scalar(fn, rule, rule.threshold(rule_state, norm, norm)), finite)
    scale = clip_scale(norm, threshold)
    advanced = _keep_layout(fn, rule, rule_state, rule.advance(rule_state, norm, norm))
    measured = Measured(norm, threshold, norm * scale, scale < 1)
    return scale_tree(updates, scale), _absorbed(rule_state, advanced, finite), measured


def _entries(vector: jax.Array) -> list[jax.Array]:
    """The entries of a vector as separate scalars (one per leaf), cheap to compile.

    XLA on CPU compiles a kernel that slices a vector slowly (about 25 ms per slice,
    and the rule's arithmetic is fused into every slicing kernel), so ``vector[i]`` for
    each of thousands of leaves dominates compile time. Masked sums over a
    ``sqrt(n) x sqrt(n)`` grid read the same values exactly (every other term is 0)
    with small kernels: measured for 300 leaves, 6 s of compilation instead of 13,
    and no slower to run.
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


def _clip_leaves(fn, rule, rule_state, updates, axis_name):
    leaves, treedef = jax.tree.flatten(updates)
    norms = jax.tree.leaves(leaf_norms(updates, axis_name=axis_name))
    state_leaves = jax.tree.leaves(rule_state)
    expected = state_leaves[0].shape[0] if state_leaves else len(norms)
    if len(norms) != expected:
        raise ValueError(
            f"{fn}: the updates have {len(norms)} inexact leaves but the state was built for "
            f"{expected}. With granularity='leaf', `init` must get a tree with the same "
            "floating-point leaves as the updates."
        )
    if not norms:
        zero = jnp.zeros((), jnp.float32)
        return updates, rule_state, Measured(zero, zero, zero, zero)
    norms = stack_scalars(norms)
    total = norm_of_norms(norms)
    finite = jnp.isfinite(total)

    def threshold(state, norm):
        return _check_scalar(fn, rule, rule.threshold(state, norm, total))

    thresholds = _sanitized(jax.vmap(threshold)(rule_state, norms), finite)
    advanced = jax.vmap(lambda state, norm: rule.advance(state, norm, total))(rule_state, norms)
    advanced = _keep_layout(fn, rule, rule_state, advanced)
    scales = clip_scale(norms, thresholds)
    per_leaf = iter(_entries(scales))
    out = [scale_leaf(x, next(per_leaf)) if is_inexact(x) else x for x in leaves]
    measured = Measured(
        total, jnp.max(thresholds), norm_of_norms(norms * scales), jnp.mean(scales < 1)
    )
    return jax.tree.unflatten(treedef, out), _absorbed(rule_state, advanced, finite), measured


def _adaptive(
    fn: str, state_class: type, rule: Any, granularity: str, axis_name: Any
) -> optax.GradientTransformation:
    """``adaptive_clip`` with the state class (and so the stats key) of a named strategy."""
    _check_rule(fn, rule)
    check_choice(fn, "granularity", granularity, _GRANULARITIES)

    def init_fn(params):
        rule_state = _initial_rule_state(fn, rule)
        if granularity == "leaf":
            n = sum(1 for x in jax.tree.leaves(params) if is_inexact(x))
            rule_state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), rule_state)
        return state_class(rule_state=rule_state, stats=ClipStats.initial())

    def update_fn(updates, state, params=None):
        del params
        if granularity == "global":
            updates, rule_state, measured = _clip_global(
                fn, rule, state.rule_state, updates, axis_name
            )
        else:
            updates, rule_state, measured = _clip_leaves(
                fn, rule, state.rule_state, updates, axis_name
            )
        return updates, state_class(rule_state=rule_state, stats=state.stats.advance(*measured))

    return optax.GradientTransformation(init_fn, update_fn)


def adaptive_clip(
    rule: rules.Rule | None = None,
    *,
    granularity: str = "global",
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """Clips to a threshold that a rule derives from the history of the gradient norms.

    At every step: measure the norm (one global norm, or one per leaf), ask the rule
    for the threshold, scale down what exceeds it (``min(1, threshold / norm)``, one
    multiply per element), advance the rule's state with the measured norm, and record
    :class:`~gradclip_jax.ClipStats`. The rule adds O(1) (or O(history)) scalar work;
    the gradients are read once, for their norm, and written once.

    With ``granularity="leaf"`` every inexact leaf (tensor) has its own rule state:
    the state's arrays carry a leading leaf axis and the rule's methods are
    ``jax.vmap``-ed over it, so thousands of leaves cost one vectorised rule step.

    The default rule is ``rules.zscore(max_norm=None)`` (ZClip without its absolute
    cap): it clips only anomalies, norms whose z-score against an EMA of recent norms
    exceeds 2.5, so ordinary steps pass untouched (percentile or quantile rules clip a
    fixed fraction of all steps); it needs no knowledge of the model's gradient scale
    (a fixed ``max_norm`` does); its state is three scalars; and it was evaluated on
    LLM pre-training spikes. Its 25 warm-up steps are not clipped.

    Non-finite steps: a step whose global norm is NaN or infinite is not absorbed into
    the rule's state (its statistics would poison every later threshold); the update
    itself is returned non-finite, as the library's default, and the threshold
    recorded for it is ``inf`` if the rule answered NaN. Wrap with a guard from this
    library to skip or zero such steps.

    Statistics (:class:`~gradclip_jax.ClipStats`): ``norm`` and ``clipped_norm`` are the
    global norms before and after; ``threshold`` is the rule's threshold (for
    ``granularity="leaf"``, the largest leaf threshold); ``clipped`` is 0/1, or the
    fraction of leaves scaled down.

    Args:
      rule: a threshold rule (see :mod:`gradclip_jax.rules`); ``None`` for the default.
      granularity: ``"global"`` (one norm for the whole update) or ``"leaf"`` (one
        norm and one rule state per inexact leaf).
      axis_name: under ``shard_map`` / ``pmap`` with the tree split across devices, the
        mapped axis name, so that the norms are those of the whole tree (with
        ``granularity="leaf"``, every leaf must be split across the axis: each leaf's
        partial sums are combined). See ``docs/multi_device.md``.

    Returns:
      An ``optax.GradientTransformation`` whose state is an
      :class:`AdaptiveClipState`. Under ``granularity="leaf"`` its ``init`` must get a
      tree with the same inexact leaves as the updates (``optax.chain`` passes the
      parameters).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.adaptive_clip(), optax.adam(1e-3))
      >>> params = {"w": jnp.zeros(3)}
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for step in range(30):
      ...     grads = {"w": jnp.full(3, 1.0 + 0.01 * (step % 3))}
      ...     _, state = update(grads, state, params)
      >>> _, state = update({"w": jnp.full(3, 50.0)}, state, params)  # a spike
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['adaptive_clip/norm']:.1f} -> {logs['adaptive_clip/clipped_norm']:.2f}")
      86.6 -> 1.75
    """
    rule = rules.ZScore(max_norm=None) if rule is None else rule
    return _adaptive("adaptive_clip", AdaptiveClipState, rule, granularity, axis_name)


def autoclip(
    p: float | jax.Array = 10.0, history: int | jax.Array = 1024, *, axis_name: Any = None
) -> optax.GradientTransformation:
    """AutoClip: clip the global norm to the ``p``-th percentile of recent norms.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.percentile`; see there for the
    ring buffer of ``history`` norms and how it differs from the reference's unbounded
    list once it wraps.

    Args:
      p: the percentile, in [0, 100].
      history: the number of recent norms kept, ``>= 1`` (it sets the state's size).
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` (see
        :func:`adaptive_clip`).

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`AutoclipState`.

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source Separation
      Networks <https://arxiv.org/abs/2007.14469>`_, 2020

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.autoclip(p=10.0), optax.adam(1e-3))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for g in (3.0, 1.0, 2.0, 20.0):
      ...     _, state = tx.update(jnp.array([g, 0.0]), state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['autoclip/threshold']:.1f} {logs['autoclip/clip_count']}")
      1.3 2
    """
    rule = rules.Percentile(p, history).validate("autoclip")
    return _adaptive("autoclip", AutoclipState, rule, "global", axis_name)


def zclip(
    z_thresh: float | jax.Array = 2.5,
    decay: float | jax.Array = 0.97,
    warmup_steps: int | jax.Array = 25,
    mode: str = "reciprocal",
    max_norm: float | jax.Array | None = 1.0,
    *,
    eps: float | jax.Array = 1e-6,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """ZClip: clip global-norm spikes detected by a z-score against EMA statistics.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.zscore`, the paper's defaults
    included: ``max_norm=1.0`` caps the threshold (and is the only clipping during the
    25 warm-up steps); pass ``max_norm=None`` for purely adaptive clipping.

    Args:
      z_thresh: the z-score above which a norm is a spike, ``>= 0``.
      decay: the EMA decay (the reference's ``alpha``), in [0, 1].
      warmup_steps: steps collecting the initial mean and variance, ``>= 1``.
      mode: ``"reciprocal"`` (clip to ``mean + z_thresh**2 * std / z``) or ``"mean"``.
      max_norm: a hard cap on the threshold, ``>= 0``; ``None`` for none.
      eps: added to the standard deviation before dividing, ``>= 0``.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` (see
        :func:`adaptive_clip`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ZclipState`.

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.zclip(warmup_steps=5), optax.adam(1e-3))
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for g in (0.5, 0.6, 0.4, 0.5, 0.55, 0.45, 8.0):
      ...     _, state = update(jnp.array([g, 0.0]), state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['zclip/norm']:.2f} -> {logs['zclip/clipped_norm']:.2f}")
      8.00 -> 0.51
    """
    rule = rules.ZScore(z_thresh, decay, warmup_steps, mode, max_norm, eps).validate("zclip")
    return _adaptive("zclip", ZclipState, rule, "global", axis_name)


def adagc(
    abs_max: float | jax.Array = 1.0,
    relative: float | jax.Array = 1.05,
    decay: float | jax.Array = 0.98,
    warmup_steps: int | jax.Array = 100,
    *,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """AdaGC: per-tensor clipping relative to an EMA of each tensor's clipped norms.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.adagc` and
    ``granularity="leaf"``: global clipping at ``abs_max`` for ``warmup_steps`` steps,
    then each leaf is clipped to ``relative`` times the EMA of its own clipped norms.
    Leaves whose gradient is zero during warm-up are guarded (see the rule).

    Args:
      abs_max: the global-norm threshold during warm-up, ``>= 0``.
      relative: the multiple of a leaf's EMA allowed after warm-up, ``> 0``.
      decay: the EMA decay, in [0, 1].
      warmup_steps: the number of global-clipping steps, ``>= 0``.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when every leaf is
        split across devices (see :func:`adaptive_clip`).

    Returns:
      An ``optax.GradientTransformation`` whose state is an :class:`AdagcState`; its
      ``init`` must get a tree with the same inexact leaves as the updates.

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.adagc(warmup_steps=2), optax.adam(1e-3))
      >>> params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> for scale in (1.0, 1.0, 30.0):  # b spikes at the third step
      ...     grads = {"a": jnp.array([0.3, 0.0]), "b": jnp.array([0.4 * scale, 0.0])}
      ...     _, state = tx.update(grads, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['adagc/clipped']:.1f} {logs['adagc/threshold']:.2f}")  # half the leaves
      0.5 0.42
    """
    rule = rules.AdaGC(abs_max, relative, decay, warmup_steps).validate("adagc")
    return _adaptive("adagc", AdagcState, rule, "leaf", axis_name)


def quantile_clip(
    target: float | jax.Array = 0.5,
    learning_rate: float | jax.Array = 0.2,
    initial: float | jax.Array = 1.0,
    *,
    axis_name: Any = None,
) -> optax.GradientTransformation:
    """Clip the global norm to an online estimate of its ``target`` quantile.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.quantile`: the geometric
    quantile tracker of Andrew et al. (2021), without the privacy noise.

    Args:
      target: the fraction of steps that should pass unclipped, in [0, 1].
      learning_rate: the geometric step size, ``>= 0``.
      initial: the threshold at the first step, ``> 0`` and finite.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` (see
        :func:`adaptive_clip`).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`QuantileClipState`.

    References:
      Andrew et al., `Differentially Private Learning with Adaptive Clipping
      <https://arxiv.org/abs/1905.03871>`_, 2021

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.quantile_clip(initial=1.0), optax.adam(1e-3))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> _, state = tx.update(jnp.array([3.0]), state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['quantile_clip/clipped_norm']:.1f} {logs['quantile_clip/clip_count']}")
      1.0 1
    """
    rule = rules.Quantile(target, learning_rate, initial).validate("quantile_clip")
    return _adaptive("quantile_clip", QuantileClipState, rule, "global", axis_name)
