"""Guards: wrappers that skip a step on a spike or a non-finite gradient.

A guard wraps an inner transformation (usually the whole optimizer). When it rejects
a step it returns zero updates and the inner state *unchanged, bit for bit*: Adam's
moments and step count stay as they were, so a run with rejected batches continues
exactly as a run in which those batches never happened. The rejection is a
``lax.cond``, so only one branch runs: a skipped step does not pay for the inner
update, and an accepted one pays only for the test.

State layout follows one rule so that ``optax.MultiSteps`` and checkpoints keep it
intact: only arrays; counters and flags are int32, never bool (older ``MultiSteps``
blended states as ``(1 - emit) * old + emit * new``, which turned boolean state into
integers: optax issue #828; today it selects with ``jnp.where``); the buffers and
counters that decisions rest on hold finite values only (``0 * inf`` is NaN under
such blending).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradclip_jax._core import check_choice, check_count, check_range
from gradclip_jax._norms import (
    blocks_of,
    collective,
    global_norm,
    is_inexact,
    is_tracer,
    reduce_blocks,
)

__all__ = [
    "OnNonfiniteState",
    "OnNonfiniteStats",
    "SkipOnSpikeState",
    "SkipOnSpikeStats",
    "on_nonfinite",
    "skip_on_spike",
]

# How far (relative to the window's mean) the spread of a window is floored, so that
# float round-off on a constant history is not mistaken for a spike.
_RELATIVE_SPREAD_FLOOR = 1e-6
# The most leaf paths an error message lists.
_MAX_PATHS_SHOWN = 10


def _check_inner(fn: str, inner: Any) -> optax.GradientTransformationExtraArgs:
    if not (hasattr(inner, "init") and hasattr(inner, "update")):
        hint = ""
        if callable(inner):
            hint = " It looks like a factory: call it, e.g. `optax.adam(1e-3)`, not `optax.adam`."
        raise ValueError(
            f"{fn}: `inner` must be an optax transformation (an object with `init` and "
            f"`update`); got {inner!r}.{hint}"
        )
    return optax.with_extra_args_support(inner)


def _zeros_like_struct(s: jax.ShapeDtypeStruct) -> jax.Array:
    """Zeros of the shape, dtype, sharding and (under shard_map) varying axes of ``s``."""
    zeros = jnp.zeros(s.shape, s.dtype, out_sharding=s.sharding)
    varying = tuple(getattr(getattr(s, "manual_axis_type", None), "varying", ()) or ())
    return lax.pcast(zeros, varying, to="varying") if varying else zeros


def _guarded_update(
    inner: optax.GradientTransformationExtraArgs,
    reject: Any,
    updates: Any,
    inner_state: Any,
    params: Any,
    extra_args: dict[str, Any],
) -> tuple[Any, Any]:
    """``inner.update`` unless ``reject``; then zero updates and ``inner_state`` as it was.

    The zeros take the shapes and dtypes of the inner transformation's output (read
    with ``eval_shape``), which may differ from its input: e.g. Adam with
    ``mu_dtype=float32`` turns bfloat16 gradients into float32 updates.
    """

    def apply():
        return inner.update(updates, inner_state, params, **extra_args)

    def skip():
        shapes, _ = jax.eval_shape(apply)
        return jax.tree.map(_zeros_like_struct, shapes), inner_state

    return lax.cond(reject, skip, apply)


# --------------------------------------------------------------------------- spikes


class SkipOnSpikeStats(NamedTuple):
    """What :func:`skip_on_spike` saw at its last step (found by :func:`gradclip_jax.stats`).

    Attributes:
      norm: global norm of the incoming gradient (float32).
      norm_threshold: the norm above which the step was a spike: the window's mean plus
        ``sigma`` standard deviations (float32); ``inf`` when no norm could be a spike
        (warm-up, a history without spread, or the norm not watched).
      loss_threshold: the same for the loss (float32); ``inf`` when the loss is not
        watched or during warm-up.
      skipped: 1 if this step was skipped, else 0 (int32).
      skip_count: number of steps skipped so far (int32).
      last_spike_value: the value that caused the last skip: the norm if it was a spike
        (or non-finite), else the loss; 0 before the first skip (float32).
      last_spike_step: index (from 0, counting this wrapper's updates) of the last
        skipped step; -1 before the first skip (int32).
    """

    norm: jax.Array
    norm_threshold: jax.Array
    loss_threshold: jax.Array
    skipped: jax.Array
    skip_count: jax.Array
    last_spike_value: jax.Array
    last_spike_step: jax.Array


class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`.

    The window's size is the length of its buffers, so it is fixed when the state is
    created (``optax.inject_hyperparams`` cannot change it later).
    """

    inner_state: Any
    norms: jax.Array  # float32[window] recent global norms; float32[0] if not watched
    losses: jax.Array  # float32[window] recent losses; float32[0] if not watched
    count: jax.Array  # int32, values entered so far; the next slot is count % window
    step: jax.Array  # int32, updates seen so far
    stats: SkipOnSpikeStats


def _window_size(state: SkipOnSpikeState) -> int:
    return max(state.norms.shape[0], state.losses.shape[0])


def _default_min_history(window: int) -> int:
    return max(2, window // 2)


def _threshold(buffer: jax.Array, filled: jax.Array, sigma: jax.Array) -> jax.Array:
    """``mean + sigma * std`` of the first ``filled`` entries; ``inf`` without spread.

    The standard deviation uses Bessel's correction. A history whose spread is zero
    (every value exactly 0) gives ``inf``: a deviation cannot be measured against it,
    and a finite threshold there would reject every later step.
    """
    valid = jnp.arange(buffer.shape[0]) < filled
    n = jnp.maximum(filled, 1).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, buffer, 0)) / n
    squares = jnp.sum(jnp.where(valid, (buffer - mean) ** 2, 0))
    std = jnp.sqrt(squares / jnp.maximum(n - 1, 1))
    spread = jnp.maximum(std, _RELATIVE_SPREAD_FLOOR * jnp.abs(mean))
    has_spread = spread > 0
    return jnp.where(has_spread, mean + sigma * jnp.where(has_spread, spread, 1), jnp.inf)


def _scalar_loss(loss: Any, axis_name: Any) -> jax.Array:
    loss = jnp.asarray(loss)
    if loss.ndim:
        raise ValueError(
            f"skip_on_spike: `loss` must be a scalar; got an array of shape {loss.shape}. "
            "Pass the mean loss of the batch."
        )
    loss = loss.astype(jnp.float32)
    # Every device must take the same decision, or their optimizer states diverge.
    return loss if axis_name is None else lax.pmean(loss, axis_name)


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    window: int | jax.Array = 128,
    sigma: float | jax.Array = 6.0,
    min_history: int | jax.Array | None = None,
    watch: Literal["norm", "loss", "both"] = "norm",
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose gradient norm (or loss) spikes far above its recent history.

    The wrapper keeps a ring buffer of the last ``window`` global gradient norms (and
    losses, when watched). Once it holds ``min_history`` values, a step whose value
    exceeds the window's ``mean + sigma * std`` is *skipped*: the wrapper returns zero
    updates and ``inner``'s state unchanged bit for bit (Adam's step count does not
    advance). With ``watch="both"`` a spike of either skips the step. A non-finite norm
    or watched loss is always skipped, warm-up included; wrap with
    :func:`on_nonfinite` too for a choice of policy and a consecutive count.

    **What enters the window.** Values of accepted steps enter as they are. A skipped
    finite value enters *clamped to the threshold it exceeded*; non-finite values never
    enter. Levanter's ``skip_step`` and MaxText's ``skip_step_on_spikes`` admit the raw
    value, so that a lasting change of scale becomes the new baseline; but one x1000
    spike then inflates the standard deviation ~90-fold for ``window`` steps, hiding
    the next spikes, and a burst of a few spikes lets its own tail through. Keeping
    skipped values out entirely would instead skip forever after a lasting change of
    scale. Clamping (the reasoning of ZClip, which updates its statistics with the
    clipped norm) keeps both properties: a single spike moves the statistics no more
    than a borderline step, while a lasting jump raises the threshold geometrically
    and is accepted after a few dozen skipped steps (about 16 for a x3 jump, 30 for
    x10 and 70 for x1000, with a window of 128 and 5% noise).

    The standard deviation uses Bessel's correction and is floored at ``1e-6 * |mean|``
    so that round-off on a constant history is not a spike.

    Args:
      inner: the transformation to guard, usually the whole optimizer chain.
      window: number of recent values the statistics use, an integer ``>= 2``. It sets
        the buffers' shape, so it must be concrete when the state is created: under a
        jitted ``optax.inject_hyperparams`` init, list it in ``static_args``.
      sigma: how many standard deviations above the mean a spike lies, ``> 0``;
        ``math.inf`` skips only non-finite values.
      min_history: number of values in the window before anything is skipped, an
        integer in ``[2, window]``; ``None`` (default) means ``max(2, window // 2)``.
      watch: ``"norm"`` (default) watches the global gradient norm; ``"loss"`` the
        loss, passed as ``tx.update(grads, state, params, loss=loss)``; ``"both"``
        watches both. The norm is always measured and reported.
      axis_name: mapped axis name under ``shard_map`` / ``pmap``: the norm is that of the
        whole gradient and the loss is averaged over the axis, so every device takes
        the same decision.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SkipOnSpikeState`; its statistics appear in :func:`gradclip_jax.stats`
      under ``"skip_on_spike/..."``. Extra keyword arguments (``loss`` included) are
      passed on to ``inner``.

    References:
      Chowdhery et al., `PaLM: Scaling Language Modeling with Pathways
      <https://arxiv.org/abs/2204.02311>`_, 2022 (restarted before loss spikes and
      skipped the batches around them)

      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025 (statistics updated with the clipped
      value)

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = gradclip_jax.skip_on_spike(optax.adam(0.1), window=8, min_history=4)
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for scale in [1.0, 1.1, 0.9, 1.0, 1.05, 1000.0]:  # the last step spikes
      ...     updates, state = update({"w": jnp.array([scale, 0.0])}, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(logs["skip_on_spike/skip_count"], f"{logs['skip_on_spike/last_spike_value']:.0f}")
      1 1000
      >>> print(updates["w"], state.inner_state[0].count)  # zero update; Adam saw 5 steps
      [0. 0.] 5
    """
    fn = "skip_on_spike"
    inner = _check_inner(fn, inner)
    check_choice(fn, "watch", watch, ("norm", "loss", "both"))
    check_count(fn, "window", window, minimum=2)
    check_range(fn, "sigma", sigma, low=0.0, low_inclusive=False)
    if min_history is not None:
        check_count(fn, "min_history", min_history, minimum=2)
        if not is_tracer(window) and not is_tracer(min_history) and min_history > window:
            raise ValueError(
                f"{fn}: `min_history` must lie in [2, window={window}]; got {min_history!r}. "
                "The window never holds more than `window` values."
            )
    watch_norm = watch in ("norm", "both")
    watch_loss = watch in ("loss", "both")

    def init_fn(params):
        if is_tracer(window):
            raise ValueError(
                f"{fn}: `window` sets the shape of the state's buffers, so it must be a "
                "concrete integer when the state is created; it is traced here (an "
                "`optax.inject_hyperparams` init under `jit`). Make it static: "
                "`optax.inject_hyperparams(gradclip_jax.skip_on_spike, "
                "static_args=('window',))(...)`."
            )
        size = int(window)
        zero32 = jnp.zeros((), jnp.float32)
        zero_i = jnp.zeros((), jnp.int32)
        return SkipOnSpikeState(
            inner_state=inner.init(params),
            norms=jnp.zeros((size if watch_norm else 0,), jnp.float32),
            losses=jnp.zeros((size if watch_loss else 0,), jnp.float32),
            count=zero_i,
            step=zero_i,
            stats=SkipOnSpikeStats(
                norm=zero32,
                norm_threshold=jnp.asarray(jnp.inf, jnp.float32),
                loss_threshold=jnp.asarray(jnp.inf, jnp.float32),
                skipped=zero_i,
                skip_count=zero_i,
                last_spike_value=zero32,
                last_spike_step=jnp.full((), -1, jnp.int32),
            ),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = extra_args.get("loss")
        if watch_loss and loss is None:
            raise ValueError(
                f"{fn}(watch={watch!r}) needs the loss at every step: call "
                "`tx.update(grads, state, params, loss=loss)`."
            )
        size = _window_size(state)
        needed = _default_min_history(size) if min_history is None else min_history
        ready = state.count >= needed
        filled = jnp.minimum(state.count, size)
        spread_factor = jnp.asarray(sigma, jnp.float32)
        inf = jnp.asarray(jnp.inf, jnp.float32)

        norm = global_norm(updates, axis_name=axis_name).astype(jnp.float32)
        norm_threshold = inf
        if watch_norm:
            norm_threshold = jnp.where(ready, _threshold(state.norms, filled, spread_factor), inf)
        norm_spike = ~jnp.isfinite(norm) | (norm > norm_threshold)

        loss_threshold, loss_spike = inf, jnp.asarray(False)
        if watch_loss:
            loss = _scalar_loss(loss, axis_name)
            loss_threshold = jnp.where(ready, _threshold(state.losses, filled, spread_factor), inf)
            loss_spike = ~jnp.isfinite(loss) | (loss > loss_threshold)
        spike = norm_spike | loss_spike

        # Finite values enter the window, clamped to the threshold they exceeded.
        watched = ([(state.norms, norm, norm_threshold)] if watch_norm else []) + (
            [(state.losses, loss, loss_threshold)] if watch_loss else []
        )
        admit = jnp.all(jnp.stack([jnp.isfinite(value) for _, value, _ in watched]))
        slot = state.count % size
        buffers = [
            buffer.at[slot].set(jnp.where(admit, jnp.minimum(value, threshold), buffer[slot]))
            for buffer, value, threshold in watched
        ]
        norms = buffers[0] if watch_norm else state.norms
        losses = buffers[-1] if watch_loss else state.losses
        count = jnp.where(admit, optax.safe_increment(state.count), state.count)

        new_updates, inner_state = _guarded_update(
            inner, spike, updates, state.inner_state, params, extra_args
        )

        old = state.stats
        spike_value = norm if not watch_loss else jnp.where(norm_spike, norm, loss)
        stats = SkipOnSpikeStats(
            norm=norm,
            norm_threshold=norm_threshold,
            loss_threshold=loss_threshold,
            skipped=spike.astype(jnp.int32),
            skip_count=jnp.where(spike, optax.safe_increment(old.skip_count), old.skip_count),
            last_spike_value=jnp.where(spike, spike_value, old.last_spike_value),
            last_spike_step=jnp.where(spike, state.step, old.last_spike_step),
        )
        new_state = SkipOnSpikeState(
            inner_state=inner_state,
            norms=norms,
            losses=losses,
            count=count,
            step=optax.safe_increment(state.step),
            stats=stats,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------- non-finite values


class OnNonfiniteStats(NamedTuple):
    """What :func:`on_nonfinite` saw (found by :func:`gradclip_jax.stats`).

    Attributes:
      nonfinite: 1 if this step's gradient had a NaN or Inf entry, else 0 (int32).
      nonfinite_count: number of such steps so far (int32).
      consecutive: number of such steps in a row up to this one; 0 after a finite
        step (int32).
    """

    nonfinite: jax.Array
    nonfinite_count: jax.Array
    consecutive: jax.Array


class OnNonfiniteState(NamedTuple):
    """State of :func:`on_nonfinite`."""

    inner_state: Any
    stats: OnNonfiniteStats


def _any_nonfinite(leaves: list[jax.Array], axis_name: Any) -> jax.Array:
    """True when some entry of some leaf is NaN or infinite (on any device of the axis)."""
    if not leaves:
        return jnp.asarray(False)
    bad = reduce_blocks(blocks_of(leaves), lambda x: ~jnp.isfinite(x), "max").astype(jnp.int32)
    return collective(bad, "max", axis_name) > 0


def _zero_nonfinite(x: Any) -> Any:
    if not is_inexact(x):
        return x
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _error_reporter(
    description: str, paths: list[str], policy: str
) -> Callable[[Any, Any, Any], None]:
    """The host function the error callback calls; it runs only on a bad step."""

    def report(finite, consecutive, limit) -> None:
        # Under vmap the callback sees a batch of flags: a leaf is bad if bad anywhere.
        bad = ~np.asarray(finite, bool).reshape(-1, len(paths)).all(axis=0)
        names = [path for path, b in zip(paths, bad) if b]
        listed = ", ".join(names[:_MAX_PATHS_SHOWN])
        if len(names) > _MAX_PATHS_SHOWN:
            listed += f" and {len(names) - _MAX_PATHS_SHOWN} more"
        where = (
            f"in {len(names)} of {len(paths)} leaves: {listed}" if names else "on another device"
        )
        if policy == "raise":
            message = (
                f"{description}: the gradient has non-finite values (NaN or Inf) {where}. "
                "The step was not applied. To survive such steps use policy='skip' (drop "
                "the step) or policy='zero' (zero the bad entries); to find their source, "
                "run with jax.config.update('jax_debug_nans', True)."
            )
        else:
            message = (
                f"{description}: {int(np.max(consecutive))} consecutive steps had "
                f"non-finite gradients (NaN or Inf), more than max_consecutive="
                f"{int(np.max(limit))}; the last one {where}. The step was not applied. "
                "Training is not recovering: restore a checkpoint or lower the learning "
                "rate, and look for the source with jax.config.update('jax_debug_nans', True)."
            )
        raise FloatingPointError(message)

    return report


def on_nonfinite(
    inner: optax.GradientTransformation,
    *,
    policy: Literal["skip", "zero", "raise", "propagate"] = "skip",
    max_consecutive: int | jax.Array | None = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Handles gradients with NaN or Inf entries before they reach ``inner``.

    Policies:

    * ``"skip"`` (default): a step with any non-finite entry returns zero updates and
      ``inner``'s state unchanged bit for bit (Adam's moments and step count included);
      the counters in the statistics advance.
    * ``"zero"``: non-finite entries become 0 and the step goes on through ``inner``.
    * ``"raise"``: a step with a non-finite entry raises an error naming the offending
      leaves' paths, under ``jax.jit`` too (see below); the step is not applied.
    * ``"propagate"``: the gradient passes through untouched (the library's default
      for clippers, made explicit); the statistics still count non-finite steps.

    **How errors are raised.** With a ``jax.debug.callback`` placed in the branch of a
    ``lax.cond`` that runs only on a bad step: the common path has no host round trip,
    and nothing has to be functionalised (``jax.experimental.checkify`` would require
    the user to wrap the training step, and fails to trace otherwise). The callback
    raises ``FloatingPointError``; under ``jit`` it reaches the caller as a
    ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) carrying the same message, when
    the step's results are computed. As a second line of defence the step is skipped.

    **max_consecutive.** With ``max_consecutive=N``, up to ``N`` consecutive bad steps
    are handled by the policy; the next one *raises* (as above) instead of being
    applied or skipped again, whatever the policy: a run that keeps producing NaN is
    not recovering, and skipping forever would waste it silently (optax's
    ``apply_if_finite`` instead applies the non-finite update at that point). The
    count is in the statistics (``consecutive``) for logging either way.
    ``max_consecutive`` cannot be combined with ``policy="raise"``, which raises at
    the first bad step.

    Inside ``optax.MultiSteps`` the guard sees the accumulated gradient, and a NaN
    micro-batch poisons MultiSteps' accumulator for good (``0 * nan`` is NaN); put the
    guard *around* ``MultiSteps`` to reject a bad micro-batch before it is accumulated.

    Args:
      inner: the transformation to guard, usually the whole optimizer chain.
      policy: ``"skip"``, ``"zero"``, ``"raise"`` or ``"propagate"``.
      max_consecutive: ``None`` (default) for no limit, or the number of consecutive
        bad steps tolerated before raising, an integer ``>= 0``.
      axis_name: mapped axis name under ``shard_map`` / ``pmap``: a non-finite entry on
        any device makes the step bad on every device, so they stay in step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`OnNonfiniteState`; its statistics appear in :func:`gradclip_jax.stats`
      under ``"on_nonfinite/..."``. Extra keyword arguments are passed on to
      ``inner``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = gradclip_jax.on_nonfinite(optax.adam(0.1), policy="skip")
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.array([1.0, jnp.nan])}, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(updates["w"], logs["on_nonfinite/nonfinite_count"], state.inner_state[0].count)
      [0. 0.] 1 0
      >>> tx = gradclip_jax.on_nonfinite(optax.sgd(1.0), policy="zero")
      >>> updates, _ = tx.update({"w": jnp.array([1.0, jnp.inf])}, tx.init(params), params)
      >>> print(f"{updates['w'][0]:.1f} {updates['w'][1]:.1f}")
      -1.0 0.0
    """
    fn = "on_nonfinite"
    inner = _check_inner(fn, inner)
    check_choice(fn, "policy", policy, ("skip", "zero", "raise", "propagate"))
    if max_consecutive is not None:
        check_count(fn, "max_consecutive", max_consecutive, minimum=0)
        if policy == "raise":
            raise ValueError(
                f"{fn}: `max_consecutive` has no effect with policy='raise', which raises "
                "at the first non-finite step; drop it, or use policy='skip' / 'zero' / "
                "'propagate' to tolerate some bad steps first."
            )
    description = f"{fn}(policy={policy!r})"

    def init_fn(params):
        zero = jnp.zeros((), jnp.int32)
        return OnNonfiniteState(
            inner_state=inner.init(params), stats=OnNonfiniteStats(zero, zero, zero)
        )

    def update_fn(updates, state, params=None, **extra_args):
        flat = jax.tree_util.tree_flatten_with_path(updates)[0]
        leaves = [x for _, x in flat if is_inexact(x)]
        paths = [jax.tree_util.keystr(p) for p, x in flat if is_inexact(x)]
        bad = _any_nonfinite(leaves, axis_name)
        old = state.stats
        consecutive = jnp.where(bad, optax.safe_increment(old.consecutive), 0)

        if policy == "raise":
            alarm = bad
        elif max_consecutive is None:
            alarm = jnp.asarray(False)
        else:
            alarm = consecutive > max_consecutive
        limit = jnp.asarray(-1 if max_consecutive is None else max_consecutive, jnp.int32)

        def report():
            flags = jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])
            jax.debug.callback(
                _error_reporter(description, paths, policy), flags, consecutive, limit
            )

        if leaves:
            lax.cond(alarm, report, lambda: None)

        if policy == "zero":
            updates = jax.tree.map(_zero_nonfinite, updates)
        reject = alarm | bad if policy in ("skip", "raise") else alarm
        new_updates, inner_state = _guarded_update(
            inner, reject, updates, state.inner_state, params, extra_args
        )
        stats = OnNonfiniteStats(
            nonfinite=bad.astype(jnp.int32),
            nonfinite_count=jnp.where(
                bad, optax.safe_increment(old.nonfinite_count), old.nonfinite_count
            ),
            consecutive=consecutive.astype(jnp.int32),
        )
        return new_updates, OnNonfiniteState(inner_state=inner_state, stats=stats)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
