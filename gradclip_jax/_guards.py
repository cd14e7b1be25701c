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

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradclip_jax import rules
from gradclip_jax._clip import check_rule, initial_rule_state
from gradclip_jax._norms import (
    any_nonfinite,
    blocks_of,
    collective,
    nonfinite_probe,
    shape_groups,
    tree_norm,
)
from gradclip_jax._stats import NamedStats, check_name
from gradclip_jax._tree import inexact_leaves, is_inexact, map_inexact
from gradclip_jax._validate import check_choice, check_count

__all__ = [
    "OnNonfiniteState",
    "OnNonfiniteStats",
    "SkipOnSpikeState",
    "SkipOnSpikeStats",
    "on_nonfinite",
    "skip_on_spike",
]

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
    if not isinstance(inner, optax.GradientTransformationExtraArgs) and _takes_keywords(
        inner.update
    ):
        # E.g. MultiSteps(...).gradient_transformation(): a plain GradientTransformation
        # whose update takes extra arguments, which with_extra_args_support would drop.
        return optax.GradientTransformationExtraArgs(inner.init, inner.update)
    return optax.with_extra_args_support(inner)


def _takes_keywords(update: Any) -> bool:
    try:
        parameters = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _zeros_like_struct(s: Any) -> jax.Array:
    """Zeros of the shape, dtype, sharding and (under shard_map) varying axes of ``s``
    (a ``jax.ShapeDtypeStruct`` or an abstract value)."""
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

    traced = []  # the types of apply's updates, recorded as lax.cond traces it

    def apply():
        out = inner.update(updates, inner_state, params, **extra_args)
        traced.append(jax.tree.map(jax.typeof, out[0]))
        return out

    def skip():
        # lax.cond traces its first branch (apply) first: its output types spare a
        # second trace of the whole inner update (eval_shape, kept as the fallback),
        # which was a third of the guard's cost to compile (100 leaves, Adam).
        shapes = traced[-1] if traced else jax.eval_shape(apply)[0]
        return jax.tree.map(_zeros_like_struct, shapes), inner_state

    return lax.cond(jnp.logical_not(reject), apply, skip)


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

    @classmethod
    def initial(cls) -> SkipOnSpikeStats:
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        i32 = lambda v: jnp.asarray(v, jnp.int32)
        return cls(f32(0), f32(jnp.inf), f32(jnp.inf), i32(0), i32(0), f32(0), i32(-1))

    def advance(self, norm, norm_threshold, loss_threshold, spike, spike_value, step):
        """The record for a new step; ``step`` is the index of this step."""
        return SkipOnSpikeStats(
            norm=norm,
            norm_threshold=norm_threshold,
            loss_threshold=loss_threshold,
            skipped=spike.astype(jnp.int32),
            skip_count=jnp.where(spike, optax.safe_increment(self.skip_count), self.skip_count),
            last_spike_value=jnp.where(spike, spike_value, self.last_spike_value),
            last_spike_step=jnp.where(spike, step, self.last_spike_step),
        )


class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`.

    The rules' states are ``()`` for a signal that is not watched. A window's size is
    the length of its buffer, fixed when the state is created.
    """

    inner_state: Any
    norm_rule: Any  # the spike rule's state for the gradient norm
    loss_rule: Any  # the spike rule's state for the loss
    step: jax.Array  # int32, updates seen so far
    stats: NamedStats  # SkipOnSpikeStats under the guard's name


def _spike_test(rule, watched, rule_state, value):
    """``(threshold, new rule state, spike)`` of one watched signal; a non-finite value
    is always a spike. An unwatched signal has threshold ``inf`` and no spike."""
    if not watched:
        return jnp.asarray(jnp.inf, jnp.float32), rule_state, jnp.asarray(False)
    threshold, new_state = rule.step(rule_state, value, value)
    threshold = jnp.asarray(threshold, jnp.float32)
    return threshold, new_state, ~jnp.isfinite(value) | (value > threshold)


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
    rule: rules.Rule | None = None,
    *,
    window: int | jax.Array | None = None,
    sigma: float | jax.Array | None = None,
    min_history: int | jax.Array | None = None,
    watch: Literal["norm", "loss", "both"] = "norm",
    axis_name: Any = None,
    name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Skips a step whose gradient norm (or loss) spikes far above its recent history.

    A step whose global gradient norm (or loss, when watched) exceeds the threshold of
    the spike ``rule`` is *skipped*: the wrapper returns zero
    updates and ``inner``'s state unchanged bit for bit (Adam's step count does not
    advance). With ``watch="both"`` a spike of either skips the step. A non-finite norm
    or watched loss is always skipped, warm-up included; wrap with
    :func:`on_nonfinite` too for a choice of policy and a consecutive count.

    The default rule, :func:`gradclip_jax.rules.mean_std`, keeps a ring buffer of the
    last ``window`` values; once it holds ``min_history`` of them, the threshold is the
    window's ``mean + sigma * std``. Any rule of :mod:`gradclip_jax.rules` works (one
    state per watched signal), e.g. ``rules.zscore(max_norm=None)`` for ZClip's test.
    Non-finite values never reach a rule's state.

    **What enters the window** (the default rule). Values of accepted steps enter as
    they are; a skipped finite value enters *clamped to the threshold it exceeded*.
    Levanter's ``skip_step`` and MaxText's ``skip_step_on_spikes`` admit the raw value,
    so that a lasting change of scale becomes the new baseline; but one x1000 spike
    then inflates the standard deviation ~90-fold for ``window`` steps, hiding the next
    spikes. Keeping skipped values out entirely would instead skip forever after a
    lasting change of scale. Clamping keeps both properties: a lasting jump is
    accepted after a few dozen skipped steps (about 16 for a x3 jump, 30 for x10 and 70
    for x1000, with a window of 128 and 5% noise).

    The standard deviation uses Bessel's correction and is floored at ``1e-6 * |mean|``
    so that round-off on a constant history is not a spike.

    Args:
      inner: the transformation to guard, usually the whole optimizer chain.
      rule: the spike test, a rule whose threshold a spike exceeds; default
        ``rules.mean_std(window, sigma, min_history)``. With a rule given, leave
        ``window``, ``sigma`` and ``min_history`` unset.
      window: number of recent values the statistics use, an integer ``>= 2``
        (default 128). It sets the buffers' shape, so it must be concrete when the
        state is created: under a jitted ``optax.inject_hyperparams`` init, list it in
        ``static_args``.
      sigma: how many standard deviations above the mean a spike lies, ``> 0``
        (default 6); ``math.inf`` skips only non-finite values.
      min_history: number of values in the window before anything is skipped, an
        integer in ``[2, window]``; ``None`` (default) means ``max(2, window // 2)``.
      watch: ``"norm"`` (default) watches the global gradient norm; ``"loss"`` the
        loss, passed as ``tx.update(grads, state, params, loss=loss)``; ``"both"``
        watches both. The norm is always measured and reported.
      axis_name: mapped axis name under ``shard_map`` / ``pmap``: the norm is that of the
        whole gradient and the loss is averaged over the axis, so every device takes
        the same decision.
      name: the prefix of the statistics' keys in :func:`gradclip_jax.stats`; default
        ``"skip_on_spike"``.

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
    name = check_name(fn, fn if name is None else name)
    rule = _spike_rule(fn, rule, window, sigma, min_history)
    watch_norm, watch_loss = watch in ("norm", "both"), watch in ("loss", "both")

    def init_fn(params):
        def rule_state(watched):
            return initial_rule_state(fn, rule) if watched else ()

        return SkipOnSpikeState(
            inner.init(params),
            rule_state(watch_norm),
            rule_state(watch_loss),
            jnp.zeros((), jnp.int32),
            NamedStats(name, SkipOnSpikeStats.initial()),
        )

    def update_fn(updates, state, params=None, **extra_args):
        loss = extra_args.get("loss")
        if watch_loss and loss is None:
            raise ValueError(
                f"{fn}(watch={watch!r}) needs the loss at every step: call "
                "`tx.update(grads, state, params, loss=loss)`."
            )
        norm = tree_norm(inexact_leaves(updates), 2, axis_name).astype(jnp.float32)
        loss = _scalar_loss(loss, axis_name) if watch_loss else jnp.zeros((), jnp.float32)
        norm_threshold, norm_rule, norm_spike = _spike_test(rule, watch_norm, state.norm_rule, norm)
        loss_threshold, loss_rule, loss_spike = _spike_test(rule, watch_loss, state.loss_rule, loss)
        norm_spike = norm_spike | ~jnp.isfinite(norm)  # whatever is watched
        spike = norm_spike | loss_spike
        # Finite values enter the rules' states (both at once, so windows stay aligned).
        admit = jnp.isfinite(norm) & jnp.isfinite(loss)
        keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(admit, n, o), old, new)
        new_updates, inner_state = _guarded_update(
            inner, spike, updates, state.inner_state, params, extra_args
        )
        spike_value = jnp.where(norm_spike | (not watch_loss), norm, loss)
        stats = state.stats.record.advance(
            norm, norm_threshold, loss_threshold, spike, spike_value, state.step
        )
        new_state = SkipOnSpikeState(
            inner_state,
            keep(state.norm_rule, norm_rule),
            keep(state.loss_rule, loss_rule),
            optax.safe_increment(state.step),
            state.stats.replace(stats),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _spike_rule(fn, rule, window, sigma, min_history):
    """The spike rule: the given one, or ``mean_std`` from the window arguments."""
    if rule is None:
        window = 128 if window is None else window
        sigma = 6.0 if sigma is None else sigma
        return rules.build(fn, rules.MeanStd, window, sigma, min_history)
    check_rule(fn, rule)
    given = [
        a
        for a, v in (("window", window), ("sigma", sigma), ("min_history", min_history))
        if v is not None
    ]
    if given:
        raise ValueError(
            f"{fn}: {', '.join(given)} configure the default rule; with `rule` given, set "
            "them on the rule (e.g. rules.mean_std(window=..., sigma=...))."
        )
    return rule


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

    @classmethod
    def initial(cls) -> OnNonfiniteStats:
        return cls(*(jnp.zeros((), jnp.int32) for _ in range(3)))

    def advance(self, bad: jax.Array) -> OnNonfiniteStats:
        return OnNonfiniteStats(
            nonfinite=bad.astype(jnp.int32),
            nonfinite_count=jnp.where(
                bad, optax.safe_increment(self.nonfinite_count), self.nonfinite_count
            ),
            consecutive=jnp.where(bad, optax.safe_increment(self.consecutive), 0).astype(jnp.int32),
        )


class OnNonfiniteState(NamedTuple):
    """State of :func:`on_nonfinite`."""

    inner_state: Any
    stats: NamedStats  # OnNonfiniteStats under the guard's name


def _any_nonfinite(leaves: list[jax.Array], axis_name: Any) -> jax.Array:
    """True when some entry of some leaf is NaN or infinite (on any device of the axis)."""
    bad = any_nonfinite(blocks_of(leaves))  # no block: no leaf, or only zero-size ones
    return collective(bad.astype(jnp.int32), "max", axis_name) > 0


def _zero_nonfinite(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def _error_reporter(description: str, paths: list[str], policy: str) -> Callable[..., None]:
    """The host function the error callback calls; it runs only on a bad step."""

    def report(positions, alarm, finite, consecutive, limit) -> None:
        # Under vmap (a sweep over states) the cond below becomes a select, so this runs
        # on every step with a batch of flags: it raises only where some state alarms,
        # and reports the leaves bad in those.
        alarm = np.asarray(alarm, bool).reshape(-1)
        if not alarm.any():
            return
        finite = _leaf_order(finite, positions, alarm.size, len(paths))
        bad = ~finite[alarm].all(axis=0)
        consecutive = np.asarray(consecutive).reshape(-1)[alarm]
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


def _finite_flags(groups: list) -> list[jax.Array]:
    """Per group of :func:`shape_groups`, whether each of its leaves is all finite: a
    vector for a stack, a scalar for a lone leaf (:func:`nonfinite_probe` of each row);
    per group rather than per leaf, as a kernel per leaf took seconds to compile for a
    thousand leaves."""
    return [
        jnp.logical_not(jnp.isnan(nonfinite_probe(a, tuple(range(int(stacked), a.ndim)))))
        for _, (a,), stacked in groups
    ]


def _leaf_order(flags: list, positions: list[list[int]], rows: int, count: int) -> np.ndarray:
    """The groups' flags (of :func:`_finite_flags`, each with ``rows`` leading rows under
    ``vmap``) as one ``(rows, count)`` array in leaf order."""
    out = np.ones((rows, count), bool)
    for where, f in zip(positions, flags):
        out[:, where] = np.asarray(f, bool).reshape(rows, len(where))
    return out


def _report_if(alarm, leaves, consecutive, limit, reporter) -> None:
    """Calls ``reporter`` on the host only on a step that raises (inside a ``lax.cond``,
    which also holds the grouping: a step that does not raise pays for none of it)."""
    if not leaves:
        return

    def report():
        groups = shape_groups(leaves)
        positions = [where for where, _, _ in groups]
        flags = _finite_flags(groups)
        limit_ = jnp.asarray(limit, jnp.int32)
        jax.debug.callback(partial(reporter, positions), alarm, flags, consecutive, limit_)

    lax.cond(alarm, report, lambda: None)


def on_nonfinite(
    inner: optax.GradientTransformation,
    *,
    policy: Literal["skip", "zero", "raise", "propagate"] = "skip",
    max_consecutive: int | jax.Array | None = None,
    axis_name: Any = None,
    name: str | None = None,
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
    raises ``FloatingPointError``, which reaches the caller as a
    ``jax.errors.JaxRuntimeError`` (a ``RuntimeError``) carrying the same message, when
    the step's results are computed, eagerly and under ``jit`` alike (a bare
    ``FloatingPointError`` only under ``jax.disable_jit()``; docs/numerics.md). As a
    second line of defence the step is skipped. The cost: a program that holds a host
    callback is dispatched by JAX's slower path, about 9 microseconds per argument of
    the jitted function per call on CPU (4.4 ms for 500 arrays, measured with jax
    0.10), even on steps that never call it. So ``"raise"`` and ``max_consecutive``
    suit debugging; ``"skip"`` and ``"zero"`` without ``max_consecutive`` hold no
    callback and cost one read of the gradient.

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
      name: the prefix of the statistics' keys in :func:`gradclip_jax.stats`; default
        ``"on_nonfinite"``.

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
    name = check_name(fn, fn if name is None else name)

    def init_fn(params):
        return OnNonfiniteState(inner.init(params), NamedStats(name, OnNonfiniteStats.initial()))

    def update_fn(updates, state, params=None, **extra_args):
        flat = jax.tree_util.tree_flatten_with_path(updates)[0]
        leaves = [x for _, x in flat if is_inexact(x)]
        paths = [jax.tree_util.keystr(p) or "(the whole tree)" for p, x in flat if is_inexact(x)]
        bad = _any_nonfinite(leaves, axis_name)
        stats = state.stats.record.advance(bad)
        if policy == "raise":
            alarm = bad
        elif max_consecutive is None:
            alarm = jnp.asarray(False)
        else:
            alarm = stats.consecutive > max_consecutive
        limit = -1 if max_consecutive is None else max_consecutive
        if policy == "raise" or max_consecutive is not None:
            # Only where an alarm is possible: the reporting branch holds every leaf, and
            # its lax.cond cost 2-4x the run time of the update it guards on CPU.
            reporter = _error_reporter(description, paths, policy)
            _report_if(alarm, leaves, stats.consecutive, limit, reporter)
        if policy == "zero":
            updates = map_inexact(_zero_nonfinite, updates)
        reject = alarm | bad if policy in ("skip", "raise") else alarm
        new_updates, inner_state = _guarded_update(
            inner, reject, updates, state.inner_state, params, extra_args
        )
        return new_updates, OnNonfiniteState(inner_state, state.stats.replace(stats))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
