"""Threshold rules against plain NumPy transcriptions of their papers' definitions.

Every rule runs inside ``adaptive_clip`` over a fixed sequence of norms (one-element
updates, whose norm is the value itself) with spikes, plateaus, zeros and, for the
percentile rule, a history buffer that wraps several times. The expected thresholds
and clipped norms are computed here, in float64, without calling the library.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import gradclip_jax
from gradclip_jax import rules

RTOL = 2e-5


def _norm_sequence() -> np.ndarray:
    """60 norms: noise around 1, a plateau, a rising ramp, spikes of x20..x1000, zeros."""
    rng = np.random.default_rng(1234)
    norms = 1.0 + 0.1 * rng.standard_normal(60)
    norms[12:20] = 0.8  # plateau
    norms[25:31] = np.linspace(1.0, 1.6, 6)  # slow drift up
    norms[33] = 50.0  # spike
    norms[34] = 20.0  # second spike right after
    norms[41] = 0.0  # a zero gradient
    norms[47] = 1000.0  # huge spike
    norms[48:52] = 0.9  # short plateau
    norms[55] = 7.0
    return norms


NORMS = _norm_sequence()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scan_global(factory, static, norms, hyperparams):
    """Compiled once per rule factory and structural arguments; hyperparameters traced."""
    tx = gradclip_jax.adaptive_clip(factory(**dict(static), **hyperparams))
    params = jnp.zeros(1)

    def step(state, n):
        out, state = tx.update(jnp.reshape(n, (1,)), state, params)
        return state, (jnp.abs(out[0]), state.stats)

    return jax.lax.scan(step, tx.init(params), norms)[1]


def _run_global(factory, norms, static=(), **hyperparams):
    """Per-step (threshold, clipped norm, clipped flag) of adaptive_clip(factory(...)).

    Also checks the other statistics against the updates themselves.
    """
    hyperparams = {k: jnp.asarray(v) for k, v in hyperparams.items()}
    out, stats = _scan_global(factory, tuple(static), jnp.asarray(norms, jnp.float32), hyperparams)
    out, stats = np.asarray(out, np.float64), jax.tree.map(np.asarray, stats)
    np.testing.assert_allclose(stats.norm, np.asarray(norms, np.float32), rtol=1e-6)
    np.testing.assert_allclose(stats.clipped_norm, out, rtol=1e-6)
    np.testing.assert_array_equal(stats.clip_count, np.cumsum(stats.clipped))
    return np.asarray(stats.threshold, np.float64), out, stats.clipped


def _check(thresholds, clipped, expected_thresholds, norms):
    expected_thresholds = np.asarray(expected_thresholds)
    np.testing.assert_allclose(thresholds, expected_thresholds, rtol=RTOL)
    np.testing.assert_allclose(clipped, np.minimum(norms, expected_thresholds), rtol=RTOL)


# ---------------------------------------------------------------------------------------
# AutoClip


@pytest.mark.parametrize("p, history", [(10.0, 8), (50.0, 8), (0.0, 8), (90.0, 1000)])
def test_percentile_matches_autoclip_reference(p, history):
    norms = NORMS.astype(np.float32).astype(np.float64)
    expected = []
    for t in range(len(norms)):
        # AutoClip appends the unclipped norm, then clips to np.percentile(history, p);
        # our history keeps the last `history` norms.
        window = norms[max(0, t + 1 - history) : t + 1]
        expected.append(np.percentile(window, p))
    static = [("history", history), ("reference", True)]
    thresholds, clipped, _ = _run_global(rules.percentile, norms, static, p=p)
    assert history > len(norms) or len(norms) > 3 * history  # small buffers wrap often
    _check(thresholds, clipped, expected, norms)
    assert thresholds[0] == pytest.approx(norms[0])  # step 1 never clips


def _percentile_default(norms, p, history, level_window, max_rise, initial=1.0, bound=4.0):
    """The default (non-reference) percentile rule as its docstring defines it, float64."""
    raw, ratios, thresholds, previous = [], [], [], initial

    def level():
        return np.median(raw[-min(level_window, len(raw)) :])

    for n in norms:
        cold = not raw
        entered = min(n, bound * previous) if previous > 0 else n
        if n > 0:  # zeros are not stored; both windows keep the last `history`
            raw = (raw + [entered])[-history:]
            ratio = entered / level() if level_window else entered
            ratios = (ratios + [ratio])[-history:]
        threshold = np.percentile(ratios, p) * (level() if level_window else 1.0)
        if previous > 0:
            threshold = min(threshold, previous * (1 + max_rise))
        threshold = initial if cold else threshold
        thresholds.append(threshold)
        previous = threshold
    return np.array(thresholds)


@pytest.mark.parametrize(
    "p, history, level_window, max_rise",
    [(10.0, 8, 4, 0.05), (50.0, 1000, 32, math.inf), (10.0, 16, None, 0.01), (90.0, 5, 32, 0.2)],
)
def test_percentile_defaults_match_their_definition(p, history, level_window, max_rise):
    # A level of the last `level_window` stored norms, the percentile of the norms
    # relative to it, a rise limit, bounded and zero norms: on a sequence with spikes,
    # a drift, a zero and a history that wraps.
    norms = np.concatenate([NORMS, NORMS * np.geomspace(1.0, 5.0, len(NORMS))])
    norms = norms.astype(np.float32).astype(np.float64)
    expected = _percentile_default(norms, p, history, level_window, max_rise)
    static = [("history", history), ("level_window", level_window)]
    thresholds, clipped, _ = _run_global(rules.percentile, norms, static, p=p, max_rise=max_rise)
    _check(thresholds, clipped, expected, norms)


def test_percentile_threshold_rises_at_most_max_rise_a_step():
    # Norms that stay explosive (x2 a step from 1e3) raise the threshold by 1% a step
    # from initial_threshold, not by bound_factor; a fall is followed at once.
    norms = np.concatenate([1e3 * 2.0 ** np.arange(40), np.full(40, 0.5)])
    thresholds, clipped, _ = _run_global(rules.percentile, norms.astype(np.float32))
    np.testing.assert_allclose(thresholds[:40], 1.01 ** np.arange(40), rtol=1e-5)
    assert clipped[:40].max() <= 1.01**39 * (1 + 1e-6)
    assert np.all(thresholds[50:] < 0.6)  # the level of 0.5, within tens of steps


_SMALL_PERCENTILE = gradclip_jax.adaptive_clip(rules.percentile(history=5, level_window=3))


@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.0, 2.0, 3.5, 1e3, 1e30]), max_size=40))
def test_percentile_keeps_its_ordered_buffer_sorted(norms):
    # The sorted copy is kept by one removal and one insertion a step (no sort): it
    # must stay the sorted stored norms through wraps, ties, zeros and bounded norms.
    tx = _SMALL_PERCENTILE  # one transformation: its jitted step compiles once
    state = tx.init(jnp.zeros(1))
    for n in norms:
        _, state = _ordered_step(tx, state, jnp.float32(n))
        rule = state.rule_state
        filled = int(rule.filled)
        expected = np.sort(np.asarray(rule.norms[:filled]))
        np.testing.assert_array_equal(np.asarray(rule.ordered[:filled]), expected)
        assert np.all(np.isinf(np.asarray(rule.ordered[filled:])))


@functools.partial(jax.jit, static_argnums=0)
def _ordered_step(tx, state, n):
    return tx.update(jnp.reshape(n, (1,)), state, jnp.zeros(1))


def test_percentile_level_ignores_a_burst_of_spikes():
    # 15 consecutive x100 norms are fewer than half of the level's 32: every one is
    # clipped near the base, and the threshold afterwards is the threshold before. No
    # rise limit: the level alone holds (with level_window=8 the burst passes at x50).
    rng = np.random.default_rng(5)
    norms = np.abs(1.0 + 0.05 * rng.standard_normal(1300))
    norms[1000:1015] *= 100.0
    norms = norms.astype(np.float32)
    thresholds, clipped, _ = _run_global(rules.percentile, norms, max_rise=math.inf)
    before = thresholds[990:1000].mean()
    assert np.all(clipped[1000:1015] <= 1.2 * before)
    np.testing.assert_allclose(thresholds[1100:1110].mean(), before, rtol=0.03)


# ---------------------------------------------------------------------------------------
# ZClip


def _zclip_reference(norms, z_thresh, alpha, warmup, mode, max_norm, eps=1e-6):
    """Transcription of the ZClip reference step (bluorion-com/ZClip), in float64.

    Returns the threshold we report: max_norm during warm-up, the spike's clip value
    on spikes, and otherwise the spike boundary mean + z_thresh * (std + eps); always
    capped at max_norm. Also returns the z-scores, to keep test data off the boundary.
    """
    cap = math.inf if max_norm is None else max_norm
    buffer, mean, var = [], None, None
    thresholds, zs = [], []
    for g in norms:
        if mean is None:
            buffer.append(g)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            thresholds.append(cap)
            zs.append(math.nan)
            continue
        std = var**0.5
        z = (g - mean) / (std + eps)
        zs.append(z)
        if z > z_thresh:
            clip_val = mean + (z_thresh * std) / (z / z_thresh) if mode == "reciprocal" else mean
            threshold, fed = clip_val, clip_val
        else:
            threshold, fed = mean + z_thresh * (std + eps), g
        thresholds.append(min(threshold, cap))
        mean = alpha * mean + (1 - alpha) * fed
        var = alpha * var + (1 - alpha) * (fed - mean) ** 2
    return np.array(thresholds), np.array(zs)


@pytest.mark.parametrize(
    "z_thresh, decay, warmup, mode, max_norm",
    [
        (2.5, 0.97, 10, "reciprocal", 50.0),
        (2.5, 0.97, 1, "reciprocal", 1.5),
        (2.0, 0.9, 5, "mean", None),
    ],
)
def test_zscore_matches_zclip_reference(z_thresh, decay, warmup, mode, max_norm):
    norms = NORMS.astype(np.float32).astype(np.float64)
    expected, zs = _zclip_reference(norms, z_thresh, decay, warmup, mode, max_norm)
    finite_z = zs[np.isfinite(zs)]
    assert np.all(np.abs(finite_z - z_thresh) > 1e-2), "test data too close to the boundary"
    assert np.sum(finite_z > z_thresh) >= 3  # the sequence has spikes to clip
    static = [("mode", mode), ("reference", True)]
    static += [("max_norm", None)] if max_norm is None else []
    hyperparams = {} if max_norm is None else {"max_norm": max_norm}
    thresholds, clipped, flags = _run_global(
        rules.zscore,
        norms,
        static,
        z_thresh=z_thresh,
        decay=decay,
        warmup_steps=warmup,
        **hyperparams,
    )
    _check(thresholds, clipped, expected, norms)
    np.testing.assert_array_equal(flags, norms > expected)


# ---------------------------------------------------------------------------------------
# factor x EMA


@pytest.mark.parametrize("factor, decay, warmup", [(2.0, 0.9, 10), (1.2, 0.5, 1)])
@pytest.mark.parametrize("first", [1.0, 0.5, 300.0, 0.0])
def test_ema_matches_definition(factor, decay, warmup, first):
    norms = NORMS.astype(np.float32).astype(np.float64)
    norms[0] = first
    expected, mean, count, smallest = [], 0.0, 0, math.inf
    for g in norms:
        if count < warmup:  # cold start; plain mean of the clipped warm-up norms
            threshold = 1.0 if math.isinf(smallest) else 4.0 * smallest
            if g > 0 and (g <= threshold or not math.isinf(smallest)):
                count += 1
                mean += (min(g, threshold) - mean) / count
        else:
            threshold = factor * mean
            if g > 0:  # zeros carry no scale
                mean = decay * mean + (1 - decay) * min(g, threshold)
        expected.append(threshold)
        if g > 0:  # the cold start's scale: the smallest clipped norm (a ratchet)
            cold = 1.0 if math.isinf(smallest) else 4.0 * smallest
            smallest = min(smallest, g, cold)
    thresholds, clipped, _ = _run_global(
        rules.ema, norms, factor=factor, decay=decay, warmup_steps=warmup
    )
    _check(thresholds, clipped, expected, norms)


# ---------------------------------------------------------------------------------------
# Online quantile (Andrew et al. 2021)


@pytest.mark.parametrize("target, lr, initial", [(0.5, 0.2, 1.0), (0.9, 0.5, 0.1)])
def test_quantile_matches_geometric_update(target, lr, initial):
    norms = NORMS.astype(np.float32).astype(np.float64)
    expected, c = [], initial
    for g in norms:
        expected.append(c)
        assert abs(g - c) > 1e-4 * c, "test data too close to the threshold"
        b = 1.0 if g <= c else 0.0
        c = c * math.exp(-lr * (b - target))
    thresholds, clipped, _ = _run_global(
        rules.quantile, norms, target=target, learning_rate=lr, initial=initial
    )
    _check(thresholds, clipped, expected, norms)


def test_quantile_recovers_after_a_long_run_of_zero_norms():
    rule = rules.quantile(learning_rate=1.0)

    @jax.jit
    def run():
        norms = jnp.concatenate([jnp.zeros(500), jnp.ones(200)])
        step = lambda state, n: rule.step(state, n, n)[::-1]
        return jax.lax.scan(step, rule.init(), norms)[1]

    thresholds = np.asarray(run())
    assert 0 < thresholds[500] < 1e-30  # zeros drove it to the bottom of the range
    assert thresholds[-1] > 0.5  # and it found its way back


# ---------------------------------------------------------------------------------------
# AdaGC


def _adagc_reference(rows, abs_max, relative, beta, warmup, bound=1.0):
    """AdaGC (Wang et al. 2025), per leaf, plus the zero-norm guard we document.

    Warm-up: g_hat = min(1, abs_max / ||g||) * g, gamma = min(gamma, ||g_hat_i||) from
    gamma = inf. Then h_i = min(1, relative * gamma_i / ||g_i||), gamma_i <- beta *
    gamma_i + (1 - beta) * ||g_hat_i||. Guard: a zero clipped norm is not absorbed, and
    a leaf whose gamma is still unset stays in warm-up. The threshold of a leaf during
    warm-up is its share abs_max * ||g_i|| / ||g||.
    """
    n = rows.shape[1]
    gamma = np.full(n, math.inf)
    thresholds, clipped = [], []
    for t, row in enumerate(rows):
        total = np.sqrt(np.sum(row**2))
        h_global = min(1.0, abs_max / total) if total > 0 else 1.0
        thr_row, out_row = [], []
        for i in range(n):
            warm = t < warmup or math.isinf(gamma[i])
            if warm:
                thr = abs_max * row[i] / total if total > 0 else abs_max
                out = h_global * row[i]
            else:
                thr = relative * gamma[i]
                out = min(1.0, thr / row[i]) * row[i] if row[i] > 0 else 0.0
            if out > 0:
                fed = out if warm else min(row[i], bound * thr)
                gamma[i] = min(gamma[i], out) if warm else beta * gamma[i] + (1 - beta) * fed
            thr_row.append(thr)
            out_row.append(out)
        thresholds.append(thr_row)
        clipped.append(out_row)
    return np.array(thresholds), np.array(clipped)


@pytest.mark.parametrize("reference", [True, False])
def test_adagc_matches_paper_per_leaf(reference):
    rng = np.random.default_rng(7)
    steps, warmup = 40, 6
    rows = np.abs(0.3 + 0.05 * rng.standard_normal((steps, 3)))
    rows[:, 1] *= 3.0
    rows[2, :] *= 10.0  # a spike during warm-up: global clipping at abs_max
    rows[:10, 2] = 0.0  # leaf 2 is zero during warm-up and a bit beyond
    rows[20:24, 0] = 0.0  # leaf 0 pauses after warm-up
    rows[15, 1] = 30.0  # per-leaf spikes after warm-up
    rows[30, 0] = 5.0
    rows[31:34, 1] = 1.2  # a plateau above the EMA
    rows = rows.astype(np.float32).astype(np.float64)
    abs_max, relative, beta = 1.0, 1.05, 0.9
    bound = 1.0 if reference else 2.0
    expected_thr, expected_out = _adagc_reference(rows, abs_max, relative, beta, warmup, bound)

    tx = gradclip_jax.adaptive_clip(
        rules.adagc(abs_max, relative, beta, warmup, reference=reference), granularity="leaf"
    )
    params = {"a": jnp.zeros(1), "b": jnp.zeros(1), "c": jnp.zeros(1)}

    @jax.jit
    def run(rows):
        def step(state, row):
            grads = {k: row[i : i + 1] for i, k in enumerate("abc")}
            out, state = tx.update(grads, state, params)
            norms = jnp.stack([jnp.abs(out[k][0]) for k in "abc"])
            return state, (norms, state.stats.threshold)

        return jax.lax.scan(step, tx.init(params), rows)[1]

    out, reported = run(jnp.asarray(rows, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), expected_out, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(np.asarray(reported), expected_thr.max(axis=1), rtol=RTOL)
    # The guard: the leaf that was zero through warm-up is clipped to a positive bound.
    assert expected_out[10, 2] > 0 and np.all(expected_out[11:, 2] > 0)


def test_adagc_without_the_guard_would_freeze_a_leaf():
    # The published update with gamma = min(gamma, 0) during warm-up gives a zero
    # threshold for good; ours keeps the leaf trainable.
    rule = rules.adagc(warmup_steps=3)
    state = rule.init()
    zero = jnp.zeros((), jnp.float32)
    for _ in range(3):
        _, state = rule.step(state, zero, jnp.asarray(1.0, jnp.float32))
    norm = jnp.asarray(0.5, jnp.float32)
    threshold, state = rule.step(state, norm, norm)
    assert float(threshold) > 0
    assert float(state.gamma) == pytest.approx(0.5)
    assert float(rule.step(state, norm, norm)[0]) == pytest.approx(1.1 * 0.5)


# ---------------------------------------------------------------------------------------
# Contract shared by every rule


ALL_RULES = {
    "percentile": lambda: rules.percentile(10.0, 16),
    "zscore": lambda: rules.zscore(warmup_steps=3, max_norm=None),
    "zscore_capped": lambda: rules.zscore(warmup_steps=3, mode="mean", max_norm=0.0),
    "ema": lambda: rules.ema(warmup_steps=3),
    "quantile": lambda: rules.quantile(),
    "adagc": lambda: rules.adagc(abs_max=0.0, warmup_steps=3),
}


@functools.cache
def _two_leaf_runner(name):
    """(magnitudes) -> per-step thresholds and outputs of a clipper of a 2-leaf tree."""
    granularity = "leaf" if name == "adagc" else "global"  # AdaGC is a per-leaf rule
    tx = gradclip_jax.adaptive_clip(ALL_RULES[name](), granularity=granularity)
    params = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}

    @jax.jit
    def run(magnitudes):
        def step(state, m):
            grads = {"a": jnp.array([m, 0.0]), "b": jnp.full((2, 2), 0.5 * m)}
            out, state = tx.update(grads, state, params)
            return state, (state.stats.threshold, out)

        return jax.lax.scan(step, tx.init(params), magnitudes)

    return run


_magnitudes = st.sampled_from([0.0, 0.0, 1e-30, 1e-6, 0.5, 1.0, 3.0, 1e4, 1e30])


@given(st.lists(_magnitudes, min_size=24, max_size=24))
@example([0.0] * 24)
def test_thresholds_are_never_negative_or_nan_and_zeros_stay_zero(magnitudes):
    magnitudes = jnp.asarray(magnitudes, jnp.float32)
    zero_steps = np.asarray(magnitudes) == 0
    for name in ALL_RULES:
        state, (thresholds, out) = _two_leaf_runner(name)(magnitudes)
        thresholds = np.asarray(thresholds)
        assert np.all(thresholds >= 0), (name, thresholds)  # also false for NaN
        for leaf in jax.tree.leaves(out):
            leaf = np.asarray(leaf).reshape(len(magnitudes), -1)
            assert np.all(np.isfinite(leaf)), name
            assert np.all(leaf[zero_steps] == 0), name
        assert not any(np.any(np.isnan(np.asarray(x))) for x in jax.tree.leaves(state)), name


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "factory, kwargs, fn, arg",
    [
        (rules.percentile, {"p": 101.0}, "rules.percentile", "p"),
        (rules.percentile, {"history": 0}, "rules.percentile", "history"),
        (rules.percentile, {"history": 2.5}, "rules.percentile", "history"),
        (rules.percentile, {"bound_factor": 0.5}, "rules.percentile", "bound_factor"),
        (rules.percentile, {"level_window": 1}, "rules.percentile", "level_window"),
        (rules.percentile, {"level_window": 2.5}, "rules.percentile", "level_window"),
        (rules.percentile, {"max_rise": -0.01}, "rules.percentile", "max_rise"),
        (rules.percentile, {"max_rise": math.nan}, "rules.percentile", "max_rise"),
        (rules.zscore, {"cold_factor": 0.0}, "rules.zscore", "cold_factor"),
        (rules.zscore, {"initial_threshold": -1.0}, "rules.zscore", "initial_threshold"),
        (rules.zscore, {"reference": 1}, "rules.zscore", "reference"),
        (rules.zscore, {"z_thresh": -1.0}, "rules.zscore", "z_thresh"),
        (rules.zscore, {"decay": 1.5}, "rules.zscore", "decay"),
        (rules.zscore, {"warmup_steps": 0}, "rules.zscore", "warmup_steps"),
        (rules.zscore, {"mode": "adaptive"}, "rules.zscore", "mode"),
        (rules.zscore, {"max_norm": -1.0}, "rules.zscore", "max_norm"),
        (rules.zscore, {"eps": -1e-6}, "rules.zscore", "eps"),
        (rules.ema, {"factor": 0.0}, "rules.ema", "factor"),
        (rules.ema, {"decay": -0.1}, "rules.ema", "decay"),
        (rules.ema, {"warmup_steps": 0}, "rules.ema", "warmup_steps"),
        (rules.quantile, {"target": 1.5}, "rules.quantile", "target"),
        (rules.quantile, {"learning_rate": -1.0}, "rules.quantile", "learning_rate"),
        (rules.quantile, {"initial": 0.0}, "rules.quantile", "initial"),
        (rules.quantile, {"initial": math.inf}, "rules.quantile", "initial"),
        (rules.adagc, {"abs_max": -1.0}, "rules.adagc", "abs_max"),
        (rules.adagc, {"relative": 0.0}, "rules.adagc", "relative"),
        (rules.adagc, {"decay": math.nan}, "rules.adagc", "decay"),
        (rules.adagc, {"warmup_steps": -1}, "rules.adagc", "warmup_steps"),
    ],
)
def test_invalid_hyperparameters_raise(factory, kwargs, fn, arg):
    (value,) = kwargs.values()
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    message = str(info.value)
    assert message.startswith(f"{fn}: `{arg}`")
    assert repr(value) in message or str(value) in message


def test_rules_are_not_callable():
    # optax.inject_hyperparams treats callables as schedules: a rule must not be one.
    for make in ALL_RULES.values():
        assert not callable(make())
