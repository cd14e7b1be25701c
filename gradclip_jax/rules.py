"""Threshold rules for :func:`gradclip_jax.adaptive_clip`: thresholds that follow the gradients.

A *rule* decides, at every step, how large a norm may be. It is a small pure object
(its fields are its hyperparameters) with two methods:

* ``init() -> state``: the state before the first step, a pytree of arrays of fixed
  shapes and dtypes (no Python lists, no growth);
* ``step(state, norm, global_norm) -> (threshold, state)``: the threshold for the
  current step, given the norm just measured, and the state for the next step. The
  threshold must be a scalar ``>= 0`` and never NaN for finite norms (``inf`` means
  "do not clip"); the new state has the structure, shapes and dtypes of the old.

One method for both, so that what the threshold and the next state share (a window
with the new norm in it, a z-score) is computed once.

``norm`` is the norm of the block being clipped: the global norm of the updates under
``granularity="global"``, one leaf's norm under ``granularity="leaf"`` (where the
methods are ``jax.vmap``-ed over a leading leaf axis of the state). ``global_norm`` is
always the norm of the whole update; most rules ignore it. Both are non-negative
float32 scalars (float64 for float64 updates).

:func:`~gradclip_jax.adaptive_clip` does the rest: it measures, clips, advances the
state, records :class:`~gradclip_jax.ClipStats`, and never lets a step whose global
norm is NaN or infinite reach the state, so a rule need not handle non-finite norms.

Write the methods with ``jnp`` operations and ``jnp.where`` (no Python ``if`` on
arrays): they run under ``jax.jit``. Hyperparameters may arrive as traced arrays when
the transformation is wrapped in ``optax.inject_hyperparams``, so a size that shapes the
state (a buffer length) is read from the state's shape inside ``step``, never from a
field.

Examples:
  A rule that lets the norm grow at most 50% from one step to the next:

  >>> import dataclasses
  >>> import jax.numpy as jnp, optax
  >>> import gradclip_jax
  >>> @dataclasses.dataclass(frozen=True)
  ... class GrowthLimit:
  ...     growth: float = 1.5
  ...
  ...     def init(self):
  ...         return jnp.array(jnp.inf, jnp.float32)  # the previous step's clipped norm
  ...
  ...     def step(self, previous, norm, global_norm):
  ...         threshold = self.growth * previous
  ...         clipped = jnp.minimum(norm, threshold)
  ...         return threshold, jnp.where(clipped > 0, clipped, previous)  # zeros carry no scale
  >>> tx = optax.chain(gradclip_jax.adaptive_clip(GrowthLimit()), optax.adam(1e-3))
  >>> params = jnp.zeros(2)
  >>> state = tx.init(params)
  >>> for g in (1.0, 1.2, 10.0):
  ...     _, state = tx.update(jnp.array([g, 0.0]), state, params)
  >>> logs = gradclip_jax.stats(state)
  >>> print(f"{logs['adaptive_clip/norm']:.1f} clipped to {logs['adaptive_clip/clipped_norm']:.1f}")
  10.0 clipped to 1.8

  ``examples/custom_rule.py`` is a longer version of this.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, NamedTuple, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradclip_jax._norms import ratio
from gradclip_jax._validate import (
    check_choice,
    check_count,
    check_positive_finite,
    check_range,
    check_threshold,
    state_size,
)
from gradclip_jax._validate import (
    is_tracer as _traced,
)

__all__ = [
    "AdaGC",
    "Constant",
    "MeanStd",
    "MeanStdState",
    "AdaGCState",
    "EMA",
    "EMAState",
    "Percentile",
    "PercentileState",
    "Quantile",
    "QuantileState",
    "Rule",
    "ZScore",
    "ZScoreState",
    "adagc",
    "constant",
    "ema",
    "mean_std",
    "percentile",
    "quantile",
    "zscore",
]

State = TypeVar("State")


class Rule(Protocol[State]):
    """What :func:`gradclip_jax.adaptive_clip` needs from a threshold rule.

    Any object with these two methods is a rule; subclassing is not needed. See the
    module documentation for the contract and a complete example.
    """

    def init(self) -> State:
        """The state before the first step: a pytree of fixed-size arrays."""
        ...

    def step(
        self, state: State, norm: jax.Array, global_norm: jax.Array
    ) -> tuple[jax.Array, State]:
        """The threshold (a scalar ``>= 0``, never NaN) for the norm measured now, and
        the next state, with the structure, shapes and dtypes of ``state``."""
        ...


def _f32(value: Any) -> jax.Array:
    return jnp.asarray(value, jnp.float32)


def _cap(threshold: jax.Array, max_norm: Any) -> jax.Array:
    return threshold if max_norm is None else jnp.minimum(threshold, _f32(max_norm))


# Cold start. A rule without history cannot tell an explosive norm from an ordinary one:
# the first nonzero norm is clipped to an absolute `initial_threshold`, later warm-up
# norms to `cold_factor` times the smallest nonzero clipped norm so far (a ratchet: the
# warm-up threshold never exceeds cold_factor * initial_threshold).
def _cold_threshold(smallest: jax.Array, initial_threshold: Any, cold_factor: Any) -> jax.Array:
    """``initial_threshold`` before any nonzero norm, then ``cold_factor * smallest``."""
    return jnp.where(jnp.isinf(smallest), _f32(initial_threshold), _f32(cold_factor) * smallest)


def _smallest(smallest: jax.Array, norm: jax.Array) -> jax.Array:
    """The smallest nonzero (clipped) norm so far (``inf`` before the first one)."""
    norm = norm.astype(jnp.float32)
    return jnp.where(norm > 0, jnp.minimum(smallest, norm), smallest)


def _check_cold_start(fn: str, rule: Any) -> None:
    check_threshold(fn, "initial_threshold", rule.initial_threshold)
    check_range(fn, "cold_factor", rule.cold_factor, low_inclusive=False)


def _check_reference(fn: str, reference: Any) -> None:
    if not isinstance(reference, (bool, np.bool_)):
        raise ValueError(f"{fn}: `reference` must be True or False; got {reference!r}.")


_building_for: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gradclip_rule_factory", default=None
)


class _Validated:
    """Rules check their hyperparameters when built, naming the function the user called."""

    def __post_init__(self) -> None:
        self.validate(_building_for.get() or f"rules.{type(self).__name__}")

    def validate(self, fn: str) -> None:
        raise NotImplementedError


def build(fn: str, rule_class: type, *args: Any, **kwargs: Any) -> Any:
    """``rule_class(*args, **kwargs)``, whose validation errors name ``fn``."""
    token = _building_for.set(fn)
    try:
        return rule_class(*args, **kwargs)
    finally:
        _building_for.reset(token)


# --------------------------------------------------------------------------------------
# A constant threshold.


@dataclasses.dataclass(frozen=True)
class Constant(_Validated):
    """A fixed (possibly injected or scheduled) threshold; build it with :func:`constant`."""

    value: Any = 1.0

    def validate(self, fn: str, arg: str = "max_norm") -> None:
        check_threshold(fn, arg, self.value)

    def init(self) -> tuple:
        return ()

    def step(self, state: tuple, norm: jax.Array, global_norm: jax.Array):
        del norm, global_norm
        # Not cast to float32: under x64 a float64 tree is clipped at the exact value.
        return jnp.asarray(self.value), state


def constant(value: float | jax.Array) -> Constant:
    """A constant threshold: what :func:`gradclip_jax.clip_by_global_norm` and the other
    fixed clippers use. ``value >= 0``; ``math.inf`` never clips.

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> tx = gradclip_jax.adaptive_clip(gradclip_jax.rules.constant(1.0))
      >>> updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
      >>> print(updates)
      [0.6 0.8]
    """
    return build("rules.constant", Constant, value)


# --------------------------------------------------------------------------------------
# AutoClip: a percentile of the history of norms.


class PercentileState(NamedTuple):
    """State of the :func:`percentile` rule: ring buffers of past unclipped norms."""

    # (history,) float32: each stored norm divided by the level when it was stored (the
    # norm itself with `level_window=None` or `reference=True`); slots at and after
    # `filled` are unused
    norms: jax.Array
    position: jax.Array  # () int32, the slot the next norm is written to
    filled: jax.Array  # () int32, the number of norms stored, at most `history`
    threshold: jax.Array  # () float32, the previous step's threshold (initial_threshold)
    # (level_window,) float32: the last stored norms themselves, oldest first ((1,) and
    # unused with `level_window=None` or `reference=True`)
    recent: jax.Array
    # (history,) float32: `norms[:filled]` in ascending order, then +inf, kept sorted by
    # one removal and one insertion a step ((1,) and unused with `reference=True`)
    ordered: jax.Array


def _interpolate(ordered: jax.Array, count: jax.Array, q: Any) -> jax.Array:
    """The ``q``-th percentile of ``ordered[:count]`` (ascending; ``count`` at least 1)
    with ``np.percentile``'s default ("linear") interpolation between order statistics."""
    count = jnp.maximum(count, 1)
    position = _f32(q) / 100 * (count - 1).astype(jnp.float32)
    low = jnp.floor(position).astype(jnp.int32)
    high = jnp.minimum(low + 1, count - 1)
    fraction = position - low.astype(jnp.float32)
    below, above = ordered[low], ordered[high]
    return jnp.where(fraction > 0, below + (above - below) * fraction, below)


def _percentile(values: jax.Array, used: jax.Array, count: jax.Array, q: Any) -> jax.Array:
    """The ``q``-th percentile of ``values[used]`` (``count`` of them, at least 1)."""
    return _interpolate(jnp.sort(jnp.where(used, values, jnp.inf)), count, q)


def _replace_sorted(ordered: jax.Array, old: jax.Array, new: jax.Array, full: jax.Array):
    """``ordered`` (ascending, +inf padded) without one ``old`` (if ``full``) and with
    ``new``: O(len) elementwise work instead of a sort."""
    i = jnp.arange(ordered.shape[0])
    shifted_left = jnp.concatenate([ordered[1:], jnp.full((1,), jnp.inf, ordered.dtype)])
    kept = jnp.where(full & (i >= jnp.sum(ordered < old)), shifted_left, ordered)
    at = jnp.sum(kept < new)
    return jnp.where(i < at, kept, jnp.where(i == at, new, jnp.roll(kept, 1)))


def _median_of_last(recent: jax.Array, filled: jax.Array) -> jax.Array:
    """The median of the last ``min(filled, len(recent))`` entries of ``recent``."""
    size = recent.shape[0]
    count = jnp.minimum(filled, size)
    return _percentile(recent, jnp.arange(size) >= size - count, count, 50.0)


@dataclasses.dataclass(frozen=True)
class Percentile(_Validated):
    """The AutoClip rule; build it with :func:`percentile`."""

    p: Any = 10.0
    history: Any = 1024
    initial_threshold: Any = 1.0
    reference: bool = False
    bound_factor: Any = 4.0
    level_window: Any = 32
    max_rise: Any = 0.01

    def validate(self, fn: str) -> None:
        check_range(fn, "p", self.p, 0.0, 100.0)
        check_count(fn, "history", self.history, minimum=1)
        check_threshold(fn, "initial_threshold", self.initial_threshold)
        _check_reference(fn, self.reference)
        check_range(fn, "bound_factor", self.bound_factor, 1.0)
        if self.level_window is not None:
            check_count(fn, "level_window", self.level_window, minimum=2)
        check_range(fn, "max_rise", self.max_rise, 0.0)

    @property
    def _levelled(self) -> bool:
        return self.level_window is not None and not self.reference

    def init(self) -> PercentileState:
        fn = "rules.percentile"
        size = state_size(fn, "history", self.history)
        recent = state_size(fn, "level_window", self.level_window) if self._levelled else 1
        return PercentileState(
            jnp.zeros((size,), jnp.float32),
            jnp.zeros((), jnp.int32),
            jnp.zeros((), jnp.int32),
            _f32(self.initial_threshold),
            jnp.zeros((recent,), jnp.float32),
            jnp.full((1 if self.reference else size,), jnp.inf, jnp.float32),
        )

    def step(self, state: PercentileState, norm: jax.Array, global_norm: jax.Array):
        del global_norm
        size = state.norms.shape[0]
        norm = norm.astype(jnp.float32)
        # A norm enters the history bounded at `bound_factor` times the previous
        # threshold: norms that stay explosive from the first step on become the scale
        # gradually, not at once.
        bound = jnp.where(state.threshold > 0, _f32(self.bound_factor) * state.threshold, jnp.inf)
        entered = norm if self.reference else jnp.minimum(norm, bound)
        position = (state.position + 1) % size
        filled = jnp.minimum(state.filled + 1, size)
        recent = state.recent
        if self._levelled:
            # Stored relative to the median of the last `level_window` norms, so that
            # the percentile measures the spread around the current level, not a drift.
            recent = jnp.concatenate([recent[1:], entered[None]])
            level = _median_of_last(recent, filled)
            # (safe division: no NaN derivative from the untaken branch)
            entered = jnp.where(level > 0, entered / jnp.where(level > 0, level, 1.0), 1.0)
        norms = state.norms.at[state.position].set(entered)
        window = PercentileState(norms, position, filled, state.threshold, recent, state.ordered)
        if self.reference:
            # Slots are filled in order before the buffer wraps: the used ones come first.
            used = jnp.arange(size) < window.filled
            threshold = _percentile(window.norms, used, window.filled, self.p)
        else:
            full = state.filled == size  # the slot written held the oldest norm
            ordered = _replace_sorted(state.ordered, state.norms[state.position], entered, full)
            window = window._replace(ordered=ordered)
            # A zero norm (a frozen or unused parameter) carries no scale: a history of
            # zeros would hold the threshold at 0.
            window = jax.tree.map(lambda new, old: jnp.where(norm > 0, new, old), window, state)
            threshold = _interpolate(window.ordered, window.filled, self.p)
        if self._levelled:
            level = _median_of_last(window.recent, window.filled)
            threshold = threshold * jnp.where(window.filled > 0, level, 1.0)
        if not self.reference:
            # The threshold rises by at most `max_rise` a step: a drift is slower than
            # that, an explosion (norms x4 and more a step) is not.
            limit = state.threshold * (1 + _f32(self.max_rise))
            threshold = jnp.where(state.threshold > 0, jnp.minimum(threshold, limit), threshold)
            # Cold start: without a nonzero norm in the history, the current one cannot
            # be compared with anything.
            threshold = jnp.where(state.filled == 0, _f32(self.initial_threshold), threshold)
        return threshold, window._replace(threshold=threshold)


def percentile(
    p: float | jax.Array = 10.0,
    history: int | jax.Array = 1024,
    *,
    initial_threshold: float | jax.Array = 1.0,
    bound_factor: float | jax.Array = 4.0,
    level_window: int | jax.Array | None = 32,
    max_rise: float | jax.Array = 0.01,
    reference: bool = False,
) -> Percentile:
    """AutoClip: the threshold is the ``p``-th percentile of the recent unclipped norms.

    The norms are those measured before clipping, the current one included.
    Percentiles interpolate linearly between order statistics, as ``np.percentile``
    does.

    Five deviations from the reference, all off with ``reference=True``:

    * cold start: in the reference the first step never clips (its percentile is its
      own norm), so an explosive first step passes whole. Here a step without a
      nonzero norm in the history is clipped to ``initial_threshold``;
    * zero norms are not stored: a run of zero gradients (frozen or unused
      parameters) would otherwise hold the percentile, and the threshold, at 0;
    * a norm enters the history bounded at ``bound_factor`` times the previous
      threshold. Norms that stay explosive from the first step on (an IRNN at
      initialisation: 2e4-2e5 for several steps) would otherwise be the percentile
      from the second step on;
    * the threshold rises by at most ``max_rise`` (1%) a step. A drift is slower (x10
      over 2,000 steps is 0.12% a step); an explosion is faster, and the demo's IRNN
      explodes for tens of steps: without the limit the bounded norms still raised
      the threshold x4 per tenth of the filled history, to 16 by step 20, where
      seeds diverged (1 of 5 at length 120 with the raw percentile, 5 of 5 at 100 and
      120 with the level below). A lasting x10 rise is adopted in about 230
      steps, and a model whose ordinary norms are far above ``initial_threshold`` is
      clipped until the threshold has climbed to them (460 steps for norms of 100):
      set ``initial_threshold`` near a known scale, or ``max_rise=math.inf``;
    * the percentile is taken of the norms relative to their level, and scaled by
      the current level: each norm is stored divided by the median of the last
      ``level_window`` stored norms (itself included), and the threshold is the
      percentile of those ratios times the current median. On a stationary sequence
      this is the plain percentile (the median of 32 norms moves little). A
      percentile of raw norms lags a drift by about ``(1 - p / 100) * history``
      steps: during a slow x10 rise over 2,000 steps a window of 1,024 norms clipped
      every step, each to a third of its norm, and during a x0.1 fall it clipped 4% of
      the steps instead of 90%. With the level the lag is that of the median,
      ``level_window / 2`` steps (see ``docs/adaptive_defaults.md`` for the drifts it
      follows and the one it does not). ``level_window=None`` keeps the percentile of
      the raw norms.

    The reference implementation keeps every norm since the start of training in a
    growing list. This rule keeps the last ``history`` norms in a ring buffer (fixed
    memory, jit friendly): results are identical for the first ``history`` steps; after
    that the percentile is over a sliding window of the last ``history`` norms, so the
    threshold follows the recent gradient scale instead of being anchored by the
    (usually larger) norms of early training. Use a larger ``history`` to stay closer
    to the reference; each step sorts the buffer, O(history log history) scalar work.

    Args:
      p: the percentile, in [0, 100]; AutoClip's default 10 clips about 90% of steps
        to the 10th-percentile norm.
      history: the number of norms kept, ``>= 1``. It sets the state's size, so under
        ``optax.inject_hyperparams`` the value given when the state is created stays in
        force.
      initial_threshold: the threshold while the history holds no nonzero norm (the
        first step), ``>= 0``; ``math.inf`` lets the first step pass as the reference
        does. See ``docs/adaptive_defaults.md``.
      bound_factor: a norm enters the history bounded at this multiple of the
        previous threshold, ``>= 1``.
      level_window: the number of recent norms whose median is the level, an integer
        ``>= 2`` (at most ``history`` take part), or ``None`` for the percentile of
        the raw norms. A smaller window follows faster drifts and tolerates shorter
        bursts of spikes: the median moves once half the window is spikes. Like
        ``history`` it sets the state's size.
      max_rise: the threshold rises by at most this fraction a step, ``>= 0``
        (``math.inf``: no limit).
      reference: ``True`` for the reference's exact semantics (no cold start, zeros
        stored, no level, no rise limit).

    Returns:
      A :class:`Percentile` rule for :func:`gradclip_jax.adaptive_clip`.

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source Separation
      Networks <https://arxiv.org/abs/2007.14469>`_, 2020

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> import math
      >>> # The plain percentile of the stored norms: no level, no limit on the rise.
      >>> rule = gradclip_jax.rules.percentile(
      ...     p=50.0, history=4, level_window=None, max_rise=math.inf
      ... )
      >>> tx = optax.chain(gradclip_jax.adaptive_clip(rule), optax.adam(1e-3))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in (1.0, 2.0, 3.0, 30.0):
      ...     _, state = tx.update(jnp.array([g]), state, params)
      >>> # the median of 1, 2, 3 and 30, stored bounded at bound_factor x 2 = 8
      >>> print(f"{gradclip_jax.stats(state)['adaptive_clip/threshold']:.1f}")
      2.5
    """
    return build(
        "rules.percentile",
        Percentile,
        p=p,
        history=history,
        initial_threshold=initial_threshold,
        bound_factor=bound_factor,
        level_window=level_window,
        max_rise=max_rise,
        reference=reference,
    )


# --------------------------------------------------------------------------------------
# ZClip: z-score anomaly detection on EMA mean / variance of the norm.


class ZScoreState(NamedTuple):
    """State of the :func:`zscore` rule."""

    count: jax.Array  # () int32, steps absorbed so far (saturating)
    mean: jax.Array  # () float32, warm-up mean, then EMA of the norm
    variance: jax.Array  # () float32, warm-up population variance, then EMA
    smallest: jax.Array  # () float32, smallest nonzero clipped norm (cold start); inf before


@dataclasses.dataclass(frozen=True)
class ZScore(_Validated):
    """The ZClip rule; build it with :func:`zscore`."""

    z_thresh: Any = 2.5
    decay: Any = 0.97
    warmup_steps: Any = 25
    mode: str = "reciprocal"
    max_norm: Any = None
    eps: Any = 1e-6
    initial_threshold: Any = 1.0
    cold_factor: Any = 4.0
    reference: bool = False

    def validate(self, fn: str) -> None:
        check_range(fn, "z_thresh", self.z_thresh, high_inclusive=False)
        check_range(fn, "decay", self.decay, 0.0, 1.0)
        check_count(fn, "warmup_steps", self.warmup_steps, minimum=1)
        check_choice(fn, "mode", self.mode, ("reciprocal", "mean"))
        if self.max_norm is not None:
            check_threshold(fn, "max_norm", self.max_norm)
        check_range(fn, "eps", self.eps, high_inclusive=False)
        _check_cold_start(fn, self)
        _check_reference(fn, self.reference)

    def init(self) -> ZScoreState:
        zero = jnp.zeros((), jnp.float32)
        return ZScoreState(jnp.zeros((), jnp.int32), zero, zero, jnp.array(jnp.inf, jnp.float32))

    def step(self, state: ZScoreState, norm: jax.Array, global_norm: jax.Array):
        del global_norm
        norm = norm.astype(jnp.float32)
        z_thresh = _f32(self.z_thresh)
        warm = state.count < self.warmup_steps
        # sqrt with a zero (not infinite) derivative at 0, for users who differentiate
        # through the optimizer.
        positive = state.variance > 0
        std = jnp.where(positive, jnp.sqrt(jnp.where(positive, state.variance, 1)), 0)
        z = (norm - state.mean) / (std + _f32(self.eps))
        spike = ~warm & (z > z_thresh)
        if self.mode == "reciprocal":
            # On a spike z > z_thresh >= 0, so the division is safe.
            clipped = state.mean + z_thresh**2 * std / jnp.where(spike, z, 1)
        else:
            clipped = state.mean
        # Outside spikes, report the largest norm that is not a spike (z == z_thresh).
        boundary = state.mean + z_thresh * (std + _f32(self.eps))
        calm = jnp.where(norm > boundary, norm, boundary)  # rounding at z == z_thresh
        adaptive = jnp.where(spike, clipped, calm)
        decay = _f32(self.decay)
        if self.reference:
            cold = jnp.array(jnp.inf, jnp.float32)
            # Warm-up absorbs every norm; afterwards the EMAs absorb the clipped value.
            absorb_warm = jnp.array(True)
            warm_value = norm
            fed = jnp.where(spike, clipped, norm)
            absorb = jnp.array(True)
        else:
            cold = _cold_threshold(state.smallest, self.initial_threshold, self.cold_factor)
            # Zero norms carry no scale and are not absorbed (a warm-up of zeros would
            # give mean = std = 0: a zero threshold for good). A first norm above
            # `initial_threshold` is not absorbed either: with no history it may be the
            # explosion; the next nonzero norm is measured against it.
            absorb_warm = (norm > 0) & (~jnp.isinf(state.smallest) | (norm <= cold))
            warm_value = jnp.minimum(norm, cold)
            # Lasting shifts: a spike feeds the EMAs the spike boundary (the largest
            # ordinary norm), not its clipped value. One spike moves them as little as a
            # borderline norm; a lasting rise widens the boundary geometrically (about
            # 15% a step with the defaults) until the new level is ordinary.
            fed = jnp.where(spike, boundary, norm)
            absorb = norm > 0
        threshold = jnp.where(warm, cold, adaptive)
        # Warm-up: running mean and population variance (Welford), exact for the sample.
        n = (state.count + 1).astype(jnp.float32)
        delta = warm_value - state.mean
        warm_mean = state.mean + delta / n
        warm_var = (state.variance * (n - 1) + delta * (warm_value - warm_mean)) / n
        # After warm-up: EMAs; the variance uses the new mean.
        ema_mean = decay * state.mean + (1 - decay) * fed
        ema_var = decay * state.variance + (1 - decay) * (fed - ema_mean) ** 2
        take = jnp.where(warm, absorb_warm, absorb)
        mean = jnp.where(take, jnp.where(warm, warm_mean, ema_mean), state.mean)
        # Squares of norms beyond ~1e19 overflow float32; a variance clamped to the
        # largest float (instead of inf) decays back once the norms are ordinary again.
        variance = jnp.where(take, jnp.where(warm, warm_var, ema_var), state.variance)
        variance = jnp.minimum(variance, jnp.finfo(jnp.float32).max)
        count = jnp.where(take | ~warm, optax.safe_increment(state.count), state.count)
        # The cold start's scale is the smallest norm let through, clipped: a norm that
        # stays explosive from the first step on does not become the scale.
        smallest = _smallest(state.smallest, jnp.minimum(norm, cold))
        new_state = ZScoreState(count, mean, variance, smallest)
        return _cap(threshold, self.max_norm), new_state


def zscore(
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
) -> ZScore:
    """ZClip: clip norms whose z-score against an EMA of past norms exceeds ``z_thresh``.

    With ``reference=True`` (and the paper's ``max_norm=1.0``) this follows the
    reference implementation (``bluorion-com/ZClip``) step for step:

    * warm-up, the first ``warmup_steps`` steps: norms are collected and clipped at
      ``max_norm`` only; afterwards the mean and variance start as the mean and
      *population* variance of the warm-up norms;
    * then ``z = (norm - mean) / (std + eps)``; a spike is ``z > z_thresh``, clipped to
      ``mean + z_thresh**2 * std / z`` (``mode="reciprocal"``, the reference's
      "adaptive_scaling": the larger the spike, the tighter the clip) or to ``mean``
      (``mode="mean"``);
    * the EMAs absorb the clipped value on spikes and the raw norm otherwise (before
      the ``max_norm`` cap, as in the reference); the variance EMA uses the already
      updated mean: ``var <- decay * var + (1 - decay) * (x - new_mean)**2``;
    * the threshold never exceeds ``max_norm``.

    The default (``reference=False``) changes three things, measured in
    ``docs/adaptive_defaults.md``:

    * cold start: warm-up is not unclipped. The first nonzero norm is clipped to
      ``initial_threshold``; later warm-up norms to ``cold_factor`` times the smallest
      nonzero clipped norm so far (a ratchet: during warm-up the threshold never
      exceeds ``cold_factor * initial_threshold``, so norms that stay explosive from
      the first step on are clipped throughout). The warm-up statistics absorb the norm
      bounded by that threshold, except a first norm above ``initial_threshold`` (it
      may be the explosion), so an explosive first step neither passes nor poisons the
      mean. The cost: a model whose ordinary norm is far above ``cold_factor *
      initial_threshold`` is clipped until the lasting-shift policy below has adopted
      its scale (261 of the first 300 steps for norms of 100; set ``initial_threshold`` near
      the expected norm to shorten it);
    * lasting shifts: on a spike the EMAs absorb the spike boundary ``mean + z_thresh
      * (std + eps)`` instead of the clipped value. The reference's clipped value lies
      near the mean, so a lasting rise looks like a spike forever (a x1.5 rise at 5%
      noise is clipped at every step); the boundary widens the statistics by about
      15% per clipped step, so a lasting change is adopted within tens of steps while
      an isolated spike moves them as little as a borderline norm;
    * zero norms are not absorbed and do not count towards warm-up: a warm-up of zero
      gradients would give ``mean = std = 0`` and a zero threshold for good.

    ``max_norm`` defaults to ``None`` here (the paper's 1.0 makes the rule
    ``clip_by_global_norm(1.0)`` whenever the norms exceed 1, and prevents it from
    following a lasting rise).

    On steps that are not spikes the reported threshold is the spike boundary
    (capped at ``max_norm``): the largest norm that passes unclipped, so a plot of
    threshold against norm shows the margin. During warm-up it is the cold-start
    threshold (``max_norm``, or ``inf`` without it, under ``reference=True``).

    Args:
      z_thresh: the z-score above which a norm is a spike, ``>= 0``.
      decay: the EMA decay (the reference's ``alpha``), in [0, 1].
      warmup_steps: the number of warm-up steps, an integer ``>= 1``.
      mode: ``"reciprocal"`` or ``"mean"``, the spike threshold (see above).
      max_norm: a hard cap on the threshold, ``>= 0``; ``None`` for none.
      eps: added to the standard deviation before dividing, ``>= 0`` (reference: 1e-6).
      initial_threshold: the cold-start threshold of the first nonzero norm, ``>= 0``.
      cold_factor: warm-up norms are clipped to this multiple of the smallest nonzero
        clipped norm so far, ``> 0``.
      reference: ``True`` for the reference implementation's exact semantics (no cold
        start, spikes feed their clipped value, zeros absorbed).

    Returns:
      A :class:`ZScore` rule for :func:`gradclip_jax.adaptive_clip`.

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> rule = gradclip_jax.rules.zscore(warmup_steps=3, max_norm=None)
      >>> tx = optax.chain(gradclip_jax.adaptive_clip(rule), optax.adam(1e-3))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in (1.0, 1.2, 0.8, 1.1, 9.0):
      ...     _, state = tx.update(jnp.array([g]), state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['adaptive_clip/norm']:.1f} -> {logs['adaptive_clip/clipped_norm']:.2f}")
      9.0 -> 1.02
    """
    return build(
        "rules.zscore",
        ZScore,
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


# --------------------------------------------------------------------------------------
# A multiple of the EMA of past norms.


class EMAState(NamedTuple):
    """State of the :func:`ema` rule."""

    count: jax.Array  # () int32, nonzero norms absorbed so far (saturating)
    mean: jax.Array  # () float32, warm-up mean, then EMA of the clipped norm
    smallest: jax.Array  # () float32, smallest nonzero clipped norm (cold start); inf before


@dataclasses.dataclass(frozen=True)
class EMA(_Validated):
    """A multiple of the EMA of past norms; build it with :func:`ema`."""

    factor: Any = 2.0
    decay: Any = 0.99
    warmup_steps: Any = 100
    initial_threshold: Any = 1.0
    cold_factor: Any = 4.0

    def validate(self, fn: str) -> None:
        check_range(fn, "factor", self.factor, low_inclusive=False)
        check_range(fn, "decay", self.decay, 0.0, 1.0)
        check_count(fn, "warmup_steps", self.warmup_steps, minimum=1)
        _check_cold_start(fn, self)

    def init(self) -> EMAState:
        return EMAState(
            jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), jnp.array(jnp.inf, jnp.float32)
        )

    def step(self, state: EMAState, norm: jax.Array, global_norm: jax.Array):
        del global_norm
        norm = norm.astype(jnp.float32)
        warm = state.count < self.warmup_steps
        cold = _cold_threshold(state.smallest, self.initial_threshold, self.cold_factor)
        threshold = jnp.where(warm, cold, _f32(self.factor) * state.mean)
        clipped = jnp.minimum(norm, threshold)
        # Warm-up averages with weight 1/n (a plain mean), then with weight 1 - decay.
        weight = jnp.where(warm, 1 / (state.count + 1).astype(jnp.float32), 1 - _f32(self.decay))
        mean = state.mean + weight * (clipped - state.mean)
        # Zeros carry no scale (a warm-up of zeros would fix the threshold at 0), and a
        # first norm above `initial_threshold` may be the explosion: neither is absorbed.
        take = (norm > 0) & (~warm | ~jnp.isinf(state.smallest) | (norm <= cold))
        return threshold, EMAState(
            jnp.where(take, optax.safe_increment(state.count), state.count),
            jnp.where(take, mean, state.mean),
            _smallest(state.smallest, jnp.minimum(norm, cold)),
        )


def ema(
    factor: float | jax.Array = 2.0,
    decay: float | jax.Array = 0.99,
    warmup_steps: int | jax.Array = 100,
    *,
    initial_threshold: float | jax.Array = 1.0,
    cold_factor: float | jax.Array = 4.0,
) -> EMA:
    """Clip to ``factor`` times the exponential moving average of past norms.

    Warm-up, the first ``warmup_steps`` nonzero norms: the average is the plain mean of
    the norms seen (clipped), so the EMA starts from an unbiased estimate instead of
    from zero, and the threshold is the cold start's: ``initial_threshold`` for the
    first nonzero norm (which is not absorbed if it exceeds it), then ``cold_factor``
    times the smallest nonzero clipped norm so far. Afterwards the threshold is ``factor *
    mean`` with the mean of the *previous* steps, and the mean absorbs the norm after
    clipping: ``mean <- decay * mean + (1 - decay) * min(norm, threshold)``, so one
    spike moves it by at most ``(1 - decay) * (factor - 1) * mean`` and a lasting rise
    is followed at ``(1 - decay) * (factor - 1)`` (1%) per step. Zero norms are not
    absorbed: a warm-up of zeros would fix the threshold at 0.

    Args:
      factor: the multiple of the average norm allowed, ``> 0``.
      decay: the EMA decay, in [0, 1].
      warmup_steps: nonzero norms averaged before the EMA takes over, ``>= 1``.
      initial_threshold: the cold-start threshold of the first nonzero norm, ``>= 0``.
      cold_factor: warm-up norms are clipped to this multiple of the smallest nonzero
        clipped norm so far, ``> 0``.

    Returns:
      An :class:`EMA` rule for :func:`gradclip_jax.adaptive_clip`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> rule = gradclip_jax.rules.ema(factor=2.0, warmup_steps=2)
      >>> tx = optax.chain(gradclip_jax.adaptive_clip(rule), optax.adam(1e-3))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in (1.0, 3.0, 10.0):  # warm-up mean 2.0, then clip at 4.0
      ...     _, state = tx.update(jnp.array([g]), state, params)
      >>> print(f"{gradclip_jax.stats(state)['adaptive_clip/clipped_norm']:.1f}")
      4.0
    """
    return build("rules.ema", EMA, factor, decay, warmup_steps, initial_threshold, cold_factor)


# --------------------------------------------------------------------------------------
# Online geometric quantile tracking (Andrew et al. 2021, without privacy noise).


class QuantileState(NamedTuple):
    """State of the :func:`quantile` rule."""

    threshold: jax.Array  # () float32, the current estimate of the target quantile


@dataclasses.dataclass(frozen=True)
class Quantile(_Validated):
    """Online quantile tracking; build it with :func:`quantile`."""

    target: Any = 0.5
    learning_rate: Any = 0.2
    initial: Any = 1.0

    def validate(self, fn: str) -> None:
        check_range(fn, "target", self.target, 0.0, 1.0)
        check_range(fn, "learning_rate", self.learning_rate, high_inclusive=False)
        check_positive_finite(fn, "initial", self.initial)

    def init(self) -> QuantileState:
        return QuantileState(_f32(self.initial))

    def step(self, state: QuantileState, norm: jax.Array, global_norm: jax.Array):
        del global_norm
        below = (norm <= state.threshold).astype(jnp.float32)
        return state.threshold, QuantileState(self.adjust(state.threshold, below))

    def adjust(self, threshold: jax.Array, unclipped: jax.Array) -> jax.Array:
        """Andrew et al.'s update ``C * exp(-lr * (b - target))``.

        ``b`` is the unclipped indicator (0 or 1), or a fraction of unclipped examples
        (possibly noised, as in DP aggregation).
        """
        step = jnp.exp(-_f32(self.learning_rate) * (unclipped - _f32(self.target)))
        # Keep the estimate a normal positive float: from 0 or inf it could never return.
        finfo = jnp.finfo(jnp.float32)
        return jnp.clip(threshold * step, finfo.tiny, finfo.max)


def quantile(
    target: float | jax.Array = 0.5,
    learning_rate: float | jax.Array = 0.2,
    initial: float | jax.Array = 1.0,
) -> Quantile:
    """Track the ``target`` quantile of the norm online and clip to it.

    The threshold ``C`` is used for the current step, then updated geometrically:
    ``C <- C * exp(-learning_rate * (b - target))`` with ``b = 1`` if the norm was
    ``<= C`` and 0 otherwise. At equilibrium a fraction ``target`` of the steps pass
    unclipped. O(1) state; ``C`` is kept within float32's normal range so that it can
    always recover (a long run of zero gradients would otherwise drive it to 0 for
    good).

    Args:
      target: the fraction of steps that should pass unclipped, in [0, 1].
      learning_rate: the geometric step size, ``>= 0``.
      initial: the threshold at the first step, ``> 0`` and finite.

    Returns:
      A :class:`Quantile` rule for :func:`gradclip_jax.adaptive_clip`.

    References:
      Andrew et al., `Differentially Private Learning with Adaptive Clipping
      <https://arxiv.org/abs/1905.03871>`_, 2021 (the quantile estimator, without the
      privacy noise)

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> rule = gradclip_jax.rules.quantile(target=0.5, learning_rate=0.2, initial=1.0)
      >>> tx = optax.chain(gradclip_jax.adaptive_clip(rule), optax.adam(1e-3))
      >>> params = jnp.zeros(1)
      >>> state = tx.init(params)
      >>> for g in (5.0, 5.0):  # above C: C grows by exp(0.1) each step
      ...     _, state = tx.update(jnp.array([g]), state, params)
      >>> print(f"{gradclip_jax.stats(state)['adaptive_clip/threshold']:.4f}")
      1.1052
    """
    return build("rules.quantile", Quantile, target, learning_rate, initial)


# --------------------------------------------------------------------------------------
# AdaGC: per-tensor EMA of clipped norms after a global-clipping warm-up.


# After warm-up, AdaGC's default EMA absorbs the norm bounded at this multiple of the
# threshold (the paper: at the threshold).
_ADAGC_BOUND = 2.0


class AdaGCState(NamedTuple):
    """State of the :func:`adagc` rule (per leaf under ``granularity="leaf"``)."""

    count: jax.Array  # () int32, steps absorbed so far (saturating)
    gamma: jax.Array  # () float32, minimum then EMA of clipped norms; inf until one > 0


@dataclasses.dataclass(frozen=True)
class AdaGC(_Validated):
    """The AdaGC rule; build it with :func:`adagc`."""

    abs_max: Any = 1.0
    relative: Any = 1.1
    decay: Any = 0.95
    warmup_steps: Any = 100
    reference: bool = False

    def validate(self, fn: str) -> None:
        check_threshold(fn, "abs_max", self.abs_max)
        check_range(fn, "relative", self.relative, 1.0, high_inclusive=False)
        check_range(fn, "decay", self.decay, 0.0, 1.0)
        check_count(fn, "warmup_steps", self.warmup_steps)
        _check_reference(fn, self.reference)

    def init(self) -> AdaGCState:
        return AdaGCState(jnp.zeros((), jnp.int32), jnp.array(jnp.inf, jnp.float32))

    def step(self, state: AdaGCState, norm: jax.Array, global_norm: jax.Array):
        # A block that has only seen zero norms has no scale yet: it stays in warm-up.
        warm = (state.count < self.warmup_steps) | jnp.isinf(state.gamma)
        # Global clipping at abs_max, expressed as this block's share of the budget.
        positive = global_norm > 0
        # A block whose norm is beyond the float32 range (the global one is too) takes
        # the whole budget; the others' shares are then 0.
        part = jnp.where(positive, ratio(norm, jnp.where(positive, global_norm, 1)), 1)
        share = _f32(self.abs_max) * jnp.where(jnp.isinf(norm), 1, part)
        threshold = jnp.where(warm, share, _f32(self.relative) * state.gamma)
        clipped = jnp.minimum(norm, threshold)
        # The paper's EMA absorbs the clipped norm: after a lasting rise it grows by
        # (1 - decay) * (relative - 1) a step (0.1% with the paper's values). By default
        # it absorbs the norm bounded at twice the threshold: an isolated spike moves
        # gamma by at most (1 - decay) * (2 * relative - 1), and a lasting rise is
        # adopted at that rate (6% a step with the defaults).
        fed = clipped if self.reference else jnp.minimum(norm, _ADAGC_BOUND * threshold)
        decay = _f32(self.decay)
        gamma = jnp.where(
            warm,
            jnp.minimum(state.gamma, clipped),
            decay * state.gamma + (1 - decay) * fed,
        )
        # A zero norm (a frozen or unused parameter) says nothing about the scale.
        gamma = jnp.where(clipped > 0, gamma, state.gamma)
        return threshold, AdaGCState(optax.safe_increment(state.count), gamma)


def adagc(
    abs_max: float | jax.Array = 1.0,
    relative: float | jax.Array = 1.1,
    decay: float | jax.Array = 0.95,
    warmup_steps: int | jax.Array = 100,
    *,
    reference: bool = False,
) -> AdaGC:
    """AdaGC: clip each block to ``relative`` times an EMA of its own clipped norms.

    Meant for ``granularity="leaf"`` (one state per tensor), as in the paper:

    * warm-up, the first ``warmup_steps`` steps: the whole update is clipped to global
      norm ``abs_max`` (a leaf's threshold is its share ``abs_max * norm /
      global_norm``), and ``gamma`` tracks the minimum of the leaf's clipped norms;
    * then ``threshold = relative * gamma`` and
      ``gamma <- decay * gamma + (1 - decay) * min(norm, threshold)`` (the paper's
      update, ``reference=True``).

    The warm-up (global clipping at ``abs_max``) is the paper's cold start. Two
    defaults differ from the paper (``relative=1.05, decay=0.98, reference=True``):

    * ``gamma`` absorbs ``min(norm, 2 * threshold)`` instead of the clipped norm. With
      the paper's update a lasting rise of the norm is adopted at ``(1 - decay) *
      (relative - 1)`` a step, 0.1% with its values (a x1.5 rise takes 400 steps, x10
      2,300); with the bounded norm at ``(1 - decay) * (2 * relative - 1)`` a step (6%
      with the defaults), which is also the most an isolated spike moves ``gamma``;
    * ``relative=1.1, decay=0.95`` instead of 1.05 and 0.98: an EMA of a drifting norm
      lags behind it by about ``decay / (1 - decay)`` steps of drift, 49 steps with
      0.98, which on a x10 drift over 2,000 steps is 6%, more than the paper's 5%
      margin: most steps were clipped. With the defaults the lag is 2% of a 10% margin.
      See ``docs/adaptive_defaults.md``.

    Guard against a known pitfall: a norm of exactly zero (a parameter unused in that
    batch, or frozen) is not absorbed, so a leaf whose gradient is zero during warm-up
    does not get ``gamma = 0`` (a zero threshold forever). A leaf that has seen only
    zero norms stays in warm-up mode until its first nonzero norm, which starts its
    ``gamma``. The reported :class:`~gradclip_jax.ClipStats` threshold is the largest
    leaf threshold.

    Args:
      abs_max: the global-norm threshold during warm-up, ``>= 0`` (the paper's
        lambda_abs).
      relative: the multiple of ``gamma`` allowed after warm-up, ``>= 1`` (lambda_rel;
        below 1 the threshold would decay towards 0).
      decay: the EMA decay of ``gamma`` (beta), in [0, 1].
      warmup_steps: the number of global-clipping steps, an integer ``>= 0``.
      reference: ``True`` for the paper's EMA of clipped norms (see above).

    Returns:
      An :class:`AdaGC` rule for :func:`gradclip_jax.adaptive_clip`.

    References:
      Wang et al., `AdaGC: Improving Training Stability for Large Language Model
      Pretraining <https://arxiv.org/abs/2502.11034>`_, 2025

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> rule = gradclip_jax.rules.adagc(warmup_steps=1)
      >>> clip = gradclip_jax.adaptive_clip(rule, granularity="leaf")
      >>> tx = optax.chain(clip, optax.adam(1e-3))
      >>> params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([0.4])}, state, params)
      >>> _, state = tx.update({"a": jnp.array([0.3]), "b": jnp.array([4.0])}, state, params)
      >>> print(f"{gradclip_jax.stats(state)['adaptive_clip/clipped_norm']:.3f}")  # b: 1.1 * 0.4
      0.533
    """
    return build("rules.adagc", AdaGC, abs_max, relative, decay, warmup_steps, reference)


# --------------------------------------------------------------------------------------
# Mean plus a multiple of the standard deviation over a window (spike detection).

# How far (relative to the window's mean) the spread is floored, so that float round-off
# on a constant history is not mistaken for a spike.
_RELATIVE_SPREAD_FLOOR = 1e-6


class MeanStdState(NamedTuple):
    """State of the :func:`mean_std` rule: a ring buffer of recent (clamped) values."""

    values: jax.Array  # (window,) float32; the first min(count, window) slots are used
    count: jax.Array  # () int32, values entered so far; the next slot is count % window


@dataclasses.dataclass(frozen=True)
class MeanStd(_Validated):
    """``mean + sigma * std`` of a window; build it with :func:`mean_std`."""

    window: Any = 128
    sigma: Any = 6.0
    min_history: Any = None

    def validate(self, fn: str) -> None:
        check_count(fn, "window", self.window, minimum=2)
        check_range(fn, "sigma", self.sigma, low_inclusive=False)
        if self.min_history is not None:
            check_count(fn, "min_history", self.min_history, minimum=2)
            window = np.asarray(self.window) if not _traced(self.window) else None
            history = np.asarray(self.min_history) if not _traced(self.min_history) else None
            if window is not None and history is not None and history > window:
                raise ValueError(
                    f"{fn}: `min_history` must lie in [2, window={self.window}]; got "
                    f"{self.min_history!r}. The window never holds more than `window` values."
                )

    def init(self) -> MeanStdState:
        size = state_size("rules.mean_std", "window", self.window)
        return MeanStdState(jnp.zeros((size,), jnp.float32), jnp.zeros((), jnp.int32))

    def step(self, state: MeanStdState, norm: jax.Array, global_norm: jax.Array):
        del global_norm
        size = state.values.shape[0]
        needed = max(2, size // 2) if self.min_history is None else self.min_history
        filled = jnp.minimum(state.count, size)
        valid = jnp.arange(size) < filled
        n = jnp.maximum(filled, 1).astype(jnp.float32)
        mean = jnp.sum(jnp.where(valid, state.values, 0)) / n
        squares = jnp.sum(jnp.where(valid, (state.values - mean) ** 2, 0))
        std = jnp.sqrt(squares / jnp.maximum(n - 1, 1))  # Bessel's correction
        spread = jnp.maximum(std, _RELATIVE_SPREAD_FLOOR * jnp.abs(mean))
        # Without spread no deviation can be measured: a finite threshold would reject
        # every later step.
        has_spread = spread > 0
        bound = mean + _f32(self.sigma) * jnp.where(has_spread, spread, 1)
        ready = (state.count >= needed) & has_spread
        threshold = jnp.where(ready, bound, jnp.inf)
        # A value enters clamped to the threshold it exceeded: one spike moves the
        # statistics no more than a borderline value, a lasting change still gets in.
        entered = jnp.minimum(norm.astype(jnp.float32), threshold)
        values = state.values.at[state.count % size].set(entered)
        return threshold, MeanStdState(values, optax.safe_increment(state.count))


def mean_std(
    window: int | jax.Array = 128,
    sigma: float | jax.Array = 6.0,
    min_history: int | jax.Array | None = None,
) -> MeanStd:
    """The mean of the last ``window`` values plus ``sigma`` standard deviations.

    The spike test of :func:`gradclip_jax.skip_on_spike` (its default rule), usable with
    :func:`gradclip_jax.adaptive_clip` too. The threshold is ``inf`` until the window
    holds ``min_history`` values (default ``max(2, window // 2)``) and while its spread
    is zero. The standard deviation uses Bessel's correction and is floored at ``1e-6 *
    |mean|`` so that round-off on a constant history is no spike. A value enters the
    window clamped to the threshold it exceeded (the reasoning of ZClip, which updates
    its statistics with the clipped norm): a single x1000 spike moves the statistics no
    more than a borderline value, while a lasting jump raises the threshold
    geometrically and is accepted after a few dozen steps.

    Args:
      window: number of recent values kept, an integer ``>= 2``; it sets the state's
        size, so it must be concrete when the state is created.
      sigma: how many standard deviations above the mean the threshold lies, ``> 0``.
      min_history: values needed before the threshold is finite, in ``[2, window]``.

    Returns:
      A :class:`MeanStd` rule.

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022

    Examples:
      >>> import jax.numpy as jnp
      >>> import gradclip_jax
      >>> rule = gradclip_jax.rules.mean_std(window=4, sigma=3.0, min_history=2)
      >>> state = rule.init()
      >>> for value in (1.0, 1.2, 0.8):
      ...     threshold, state = rule.step(state, jnp.float32(value), None)
      >>> print(f"{threshold:.2f}")  # mean 1.1, std 0.141: 1.1 + 3 * 0.141
      1.52
    """
    return build("rules.mean_std", MeanStd, window, sigma, min_history)
