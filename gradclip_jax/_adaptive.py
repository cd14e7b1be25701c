"""Adaptive clipping: thresholds from a rule that follows the gradients, and named strategies."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gradclip_jax import rules
from gradclip_jax._clip import ClipState, clipper
from gradclip_jax._validate import check_choice

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

# Every clipper's state is a ClipState; the names remain for code that annotates with them.
AdaptiveClipState = ClipState
AutoclipState = ClipState
ZclipState = ClipState
AdagcState = ClipState
QuantileClipState = ClipState


def adaptive_clip(
    rule: rules.Rule | None = None,
    *,
    granularity: str = "global",
    axis_name: Any = None,
    name: str | None = None,
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

    The default rule is ``rules.zscore()`` (ZClip without its absolute cap): it clips
    anomalies, norms whose z-score against an EMA of recent norms exceeds 2.5, so
    ordinary steps pass untouched (percentile or quantile rules clip a fixed fraction
    of all steps); it needs no knowledge of the model's gradient scale (a fixed
    ``max_norm`` does); its state is four scalars; and it was evaluated on LLM
    pre-training spikes. Its cold start clips the first nonzero norm to 1.0 and the
    rest of its 25 warm-up steps to 4 times the smallest clipped norm, and a
    lasting change of the norm level is adopted within tens of steps (see
    ``docs/adaptive_defaults.md`` for the scenarios measured, and
    :func:`gradclip_jax.rules.zscore` for how this departs from the paper).

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

      name: the prefix of the statistics\' keys in :func:`gradclip_jax.stats`; default
        the factory\'s name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`. Under ``granularity="leaf"`` its ``init`` must get a
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
    fn = "adaptive_clip"
    check_choice(fn, "granularity", granularity, ("global", "leaf"))
    rule = rules.build(fn, rules.ZScore) if rule is None else rule
    return clipper(fn, rule, granularity, name=name, axis_name=axis_name)


def autoclip(
    p: float | jax.Array = 10.0,
    history: int | jax.Array = 1024,
    *,
    initial_threshold: float | jax.Array = 1.0,
    bound_factor: float | jax.Array = 4.0,
    level_window: int | jax.Array | None = 32,
    max_rise: float | jax.Array = 0.01,
    reference: bool = False,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """AutoClip: clip the global norm to the ``p``-th percentile of recent norms.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.percentile`; see there for the
    ring buffer of ``history`` norms and how it differs from the reference's unbounded
    list once it wraps. By default the first step is clipped to ``initial_threshold``
    (in the reference it never clips, so an explosive first step passes whole), zero
    norms are not stored, a norm enters the history bounded at ``bound_factor``
    times the previous threshold (so that norms explosive from the first step on do not
    become the percentile at once), the threshold rises by at most ``max_rise`` a step
    (an explosion is faster than any drift), and the percentile is of the norms
    relative to the median of the last ``level_window`` norms, times the current median
    (so that a drift of the norms' level is followed within about ``level_window / 2``
    steps, not ``0.9 * history``); ``reference=True`` restores the reference's
    semantics.

    Args:
      p: the percentile, in [0, 100].
      history: the number of recent norms kept, ``>= 1`` (it sets the state's size).
      initial_threshold: the threshold of the first step (no history yet), ``>= 0``.
      bound_factor: a norm enters the history bounded at this multiple of the
        previous threshold, ``>= 1``.
      level_window: the number of recent norms whose median sets the level, ``>= 2``
        (it sets the state's size), or ``None`` for the percentile of the raw norms
        (see :func:`gradclip_jax.rules.percentile`).
      max_rise: the threshold rises by at most this fraction a step, ``>= 0``
        (``math.inf``: no limit).
      reference: ``True`` for AutoClip's exact semantics (first step unclipped).
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` (see
        :func:`adaptive_clip`).

      name: the prefix of the statistics\' keys in :func:`gradclip_jax.stats`; default
        the factory\'s name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

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
      >>> # 3.0 (the first step, clipped to initial_threshold), 2.0 and 20.0 were clipped;
      >>> # the threshold rises by at most max_rise (1%) a step
      >>> print(f"{logs['autoclip/threshold']:.2f} {logs['autoclip/clip_count']}")
      1.03 3
    """
    rule = rules.build(
        "autoclip",
        rules.Percentile,
        p=p,
        history=history,
        initial_threshold=initial_threshold,
        bound_factor=bound_factor,
        level_window=level_window,
        max_rise=max_rise,
        reference=reference,
    )
    return clipper("autoclip", rule, "global", name=name, axis_name=axis_name)


def zclip(
    z_thresh: float | jax.Array = 2.5,
    decay: float | jax.Array = 0.97,
    warmup_steps: int | jax.Array = 25,
    mode: str = "reciprocal",
    max_norm: float | jax.Array | None = None,
    *,
    eps: float | jax.Array = 1e-6,
    initial_threshold: float | jax.Array = 1.0,
    cold_factor: float | jax.Array = 4.0,
    reference: bool = False,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """ZClip: clip global-norm spikes detected by a z-score against EMA statistics.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.zscore`. Two defaults differ
    from the paper's:

    * no ``max_norm`` cap: with the paper's ``max_norm=1.0`` the rule is
      ``clip_by_global_norm(1.0)`` whenever the norms exceed 1, and it can never follow
      a lasting rise above 1;
    * ``reference=False``: a cold start clips the warm-up steps, and spikes feed the
      statistics the spike boundary, so that a lasting change is adopted (see the
      rule).

    ``zclip(max_norm=1.0, reference=True)`` is the paper and its reference
    implementation, step for step.

    Args:
      z_thresh: the z-score above which a norm is a spike, ``>= 0``.
      decay: the EMA decay (the reference's ``alpha``), in [0, 1].
      warmup_steps: steps collecting the initial mean and variance, ``>= 1``.
      mode: ``"reciprocal"`` (clip to ``mean + z_thresh**2 * std / z``) or ``"mean"``.
      max_norm: a hard cap on the threshold, ``>= 0``; ``None`` for none (the paper:
        1.0).
      eps: added to the standard deviation before dividing, ``>= 0``.
      initial_threshold: the cold-start threshold of the first nonzero norm, ``>= 0``.
      cold_factor: warm-up norms are clipped to this multiple of the smallest nonzero
        clipped norm so far, ``> 0``.
      reference: ``True`` for the reference implementation's exact semantics.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` (see
        :func:`adaptive_clip`).

      name: the prefix of the statistics\' keys in :func:`gradclip_jax.stats`; default
        the factory\'s name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

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
    rule = rules.build(
        "zclip",
        rules.ZScore,
        z_thresh,
        decay,
        warmup_steps,
        mode,
        max_norm,
        eps,
        initial_threshold,
        cold_factor,
        reference,
    )
    return clipper("zclip", rule, "global", name=name, axis_name=axis_name)


def adagc(
    abs_max: float | jax.Array = 1.0,
    relative: float | jax.Array = 1.1,
    decay: float | jax.Array = 0.95,
    warmup_steps: int | jax.Array = 100,
    *,
    reference: bool = False,
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformation:
    """AdaGC: per-tensor clipping relative to an EMA of each tensor's clipped norms.

    :func:`adaptive_clip` with :func:`gradclip_jax.rules.adagc` and
    ``granularity="leaf"``: global clipping at ``abs_max`` for ``warmup_steps`` steps,
    then each leaf is clipped to ``relative`` times the EMA of its own clipped norms.
    Leaves whose gradient is zero during warm-up are guarded (see the rule). By
    default each leaf's EMA absorbs its norm bounded at twice the threshold, so that a
    lasting rise is adopted at 6% a step, and ``relative=1.1, decay=0.95`` (the
    paper: 1.05 and 0.98) so that a slow drift is not clipped at most steps;
    ``adagc(relative=1.05, decay=0.98, reference=True)`` is the paper (its EMA of
    clipped norms adopts a lasting rise at 0.1% a step). See
    :func:`gradclip_jax.rules.adagc`.

    Args:
      abs_max: the global-norm threshold during warm-up, ``>= 0``.
      relative: the multiple of a leaf's EMA allowed after warm-up, ``>= 1``.
      decay: the EMA decay, in [0, 1].
      warmup_steps: the number of global-clipping steps, ``>= 0``.
      reference: ``True`` for the paper's EMA of clipped norms.
      axis_name: mapped axis name under ``shard_map`` / ``pmap`` when every leaf is
        split across devices (see :func:`adaptive_clip`).

      name: the prefix of the statistics\' keys in :func:`gradclip_jax.stats`; default
        the factory\'s name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`; its ``init`` must get a tree with the same
      inexact leaves as the updates.

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
      0.5 0.44
    """
    rule = rules.build("adagc", rules.AdaGC, abs_max, relative, decay, warmup_steps, reference)
    return clipper("adagc", rule, "leaf", name=name, axis_name=axis_name)


def quantile_clip(
    target: float | jax.Array = 0.5,
    learning_rate: float | jax.Array = 0.2,
    initial: float | jax.Array = 1.0,
    *,
    axis_name: Any = None,
    name: str | None = None,
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

      name: the prefix of the statistics\' keys in :func:`gradclip_jax.stats`; default
        the factory\'s name.
    Returns:
      An ``optax.GradientTransformation`` whose state is a
      :class:`~gradclip_jax.ClipState`.

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
    rule = rules.build("quantile_clip", rules.Quantile, target, learning_rate, initial)
    return clipper("quantile_clip", rule, "global", name=name, axis_name=axis_name)
