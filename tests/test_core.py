"""The one core: every clipper through the same layers; regressions found on the way."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import gradclip_jax
from gradclip_jax import rules


def _clippers():
    sgd = optax.sgd(1.0)
    return {
        "clip_by_value": lambda: gradclip_jax.clip_by_value(0.5),
        "clip_by_global_norm": lambda: gradclip_jax.clip_by_global_norm(1.0),
        "clip_by_leaf_norm": lambda: gradclip_jax.clip_by_leaf_norm(1.0),
        "clip_by_block_rms": lambda: gradclip_jax.clip_by_block_rms(0.5),
        "agc": lambda: gradclip_jax.agc(0.1),
        "adaptive_clip": lambda: gradclip_jax.adaptive_clip(),
        "adaptive_clip_leaf": lambda: gradclip_jax.adaptive_clip(granularity="leaf"),
        "autoclip": lambda: gradclip_jax.autoclip(),
        "zclip": lambda: gradclip_jax.zclip(),
        "adagc": lambda: gradclip_jax.adagc(),
        "quantile_clip": lambda: gradclip_jax.quantile_clip(),
        "skip_on_spike": lambda: gradclip_jax.skip_on_spike(sgd),
        "on_nonfinite": lambda: gradclip_jax.on_nonfinite(sgd),
    }


CLIPPERS = sorted(_clippers())


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPPERS)
@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2])
def test_float8_leaves_are_clipped_and_keep_their_dtype(name, dtype):
    grads = {"w": jnp.full((4, 3), 3.0, dtype), "b": jnp.ones((3,), dtype)}
    tx = _clippers()[name]()
    updates, state = jax.jit(tx.update)(grads, tx.init(grads), grads)
    assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(lambda x: x.dtype, grads)
    assert all(np.all(np.isfinite(np.asarray(u, np.float32))) for u in jax.tree.leaves(updates))
    logs = gradclip_jax.stats(state)
    assert all(np.isfinite(v) for k, v in logs.items() if k.endswith("/norm"))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIPPERS)
def test_a_fresh_state_can_be_donated(name):
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    tx = _clippers()[name]()
    update = jax.jit(tx.update, donate_argnums=1)
    state = tx.init(params)
    for _ in range(2):
        _, state = update(params, state, params)
    assert gradclip_jax.stats(state)


@pytest.mark.parametrize(
    "factory",
    [
        gradclip_jax.clip_by_global_norm,
        gradclip_jax.clip_by_value,
        gradclip_jax.clip_by_leaf_norm,
        gradclip_jax.clip_by_block_rms,
        rules.constant,
    ],
)
@pytest.mark.parametrize("threshold", [jnp.array([1.0]), np.array([1.0, 2.0])])
def test_a_threshold_is_a_scalar(factory, threshold):
    with pytest.raises(ValueError, match="must be a scalar"):
        factory(threshold)


def test_rule_classes_validate_and_a_class_is_not_a_rule():
    with pytest.raises(ValueError, match=r"rules.ZScore: `z_thresh`"):
        rules.ZScore(z_thresh=-2.0)
    with pytest.raises(TypeError, match="not the class ZScore"):
        gradclip_jax.adaptive_clip(rules.ZScore)
    with pytest.raises(ValueError, match=r"adagc: `relative` must lie in \[1.0, inf\)"):
        gradclip_jax.adagc(relative=0.5)
    with pytest.raises(ValueError, match=r"`warmup_steps` must be an integer in \[1, "):
        rules.zscore(warmup_steps=2**31)
    with pytest.raises(ValueError, match="`learning_rate`"):
        gradclip_jax.quantile_clip(learning_rate=math.inf)
    with pytest.raises(ValueError, match="`z_thresh`"):
        rules.ZScore(z_thresh=math.inf, eps=0.0)
    with pytest.raises(ValueError, match="`ord`"):
        gradclip_jax.clip_by_global_norm(1.0, ord=True)


def test_a_constant_rule_in_adaptive_clip_is_clip_by_global_norm():
    grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([12.0])}
    adaptive = gradclip_jax.adaptive_clip(rules.constant(2.0))
    ours, _ = adaptive.update(grads, adaptive.init(grads))
    fixed_tx = gradclip_jax.clip_by_global_norm(2.0)
    fixed, _ = fixed_tx.update(grads, fixed_tx.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), ours, fixed)


def test_skip_on_spike_takes_any_rule():
    tx = gradclip_jax.skip_on_spike(optax.sgd(1.0), rules.zscore(warmup_steps=4, max_norm=None))
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 40.0]:
        updates, state = update({"w": jnp.array([scale, 0.0])}, state, params)
    assert int(gradclip_jax.stats(state)["skip_on_spike/skip_count"]) == 1
    assert not np.any(updates["w"])
    with pytest.raises(ValueError, match="with `rule` given"):
        gradclip_jax.skip_on_spike(optax.sgd(1.0), rules.ema(), window=8)


def test_agc_pairs_parameters_by_structure_and_explains_bad_ones():
    grads = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    tx = gradclip_jax.agc(0.1)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update(grads, tx.init(grads), {"w": jnp.ones((2, 3))})
    params = {"w": jnp.ones((2, 3), jnp.int8), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"parameter at \['w'\] is int8"):
        tx.update(grads, tx.init(grads), params)


@pytest.mark.slow
def test_agc_axis_applies_to_matrices_only():
    grads = {"w": jnp.ones((2, 3, 4, 5)), "b": jnp.ones(5), "s": jnp.ones(())}
    tx = gradclip_jax.agc(0.01, axis=(0, 1, 2))
    updates, _ = tx.update(grads, tx.init(grads), grads)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, grads)


def test_agc_axis_is_structural_under_inject_hyperparams():
    grads = {"w": jnp.ones((2, 3))}
    tx = optax.inject_hyperparams(gradclip_jax.agc)(clipping=0.01, axis=0)
    with pytest.raises(ValueError, match=r"static_args=\('axis',\)"):
        tx.update(grads, tx.init(grads), grads)
    tx = optax.inject_hyperparams(gradclip_jax.agc, static_args=("axis",))(clipping=0.01, axis=0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(grads), grads)
    assert updates["w"].shape == (2, 3)


def test_x64_constant_thresholds_stay_exact_for_float64_leaves():
    with jax.enable_x64(True):
        grads = {"w": jnp.array([0.5, -0.3, 0.05], jnp.float64)}
        tx = gradclip_jax.clip_by_value(0.1)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        np.testing.assert_array_equal(updates["w"], [0.1, -0.1, 0.05])
        tx = gradclip_jax.clip_by_global_norm(0.1)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(0.1, rel=1e-15)
        assert state.stats.norm.dtype == jnp.float32  # statistics are float32 always


def test_x64_float32_leaves_beside_float64_ones_beyond_float64_range():
    """A float64 norm whose sum of squares overflows float64 (~1e154 and above) is
    given in units of 2^-996: float32 and complex64 leaves of the same tree are scaled
    in float64, not by factors that float32 cannot hold (2^-996 -> 0 times 2^996 ->
    inf was NaN)."""
    with jax.enable_x64(True):
        grads = {
            "a": jnp.array([3e200, -4e200], jnp.float64),
            "b": jnp.array([1.0, -2.0], jnp.float32),
            "c": jnp.array([1e38 + 1e38j], jnp.complex64),
        }
        tx = gradclip_jax.clip_by_global_norm(1.0)
        updates, state = jax.jit(tx.update)(grads, tx.init(grads))
        np.testing.assert_allclose(updates["a"], [0.6, -0.8], rtol=1e-12)
        for k in ("b", "c"):  # scaled by ~2e-201: zero, with the right dtype and no NaN
            assert updates[k].dtype == grads[k].dtype
            np.testing.assert_array_equal(updates[k], np.zeros_like(grads[k]))
        assert float(state.stats.clipped_norm) == pytest.approx(1.0)


BIG = {"w": jnp.full((10_000,), 1e37, jnp.float32), "b": jnp.array([3e37, -4e37])}


@pytest.mark.parametrize("name", ["clip_by_global_norm", "zclip", "adaptive_clip"])
def test_finite_entries_whose_norm_exceeds_float32_max_are_clipped_not_zeroed(name):
    tx = {"clip_by_global_norm": lambda: gradclip_jax.clip_by_global_norm(1.0)}.get(
        name, getattr(gradclip_jax, name)
    )()
    updates, state = jax.jit(tx.update)(BIG, tx.init(BIG))
    flat = np.concatenate([np.asarray(updates[k], np.float64) for k in ("w", "b")])
    original = np.concatenate([np.asarray(BIG[k], np.float64) for k in ("w", "b")])
    threshold = float(gradclip_jax.stats(state)[f"{name}/threshold"])
    assert np.linalg.norm(flat) == pytest.approx(threshold, rel=1e-5)
    cosine = flat @ original / (np.linalg.norm(flat) * np.linalg.norm(original))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    assert float(gradclip_jax.stats(state)[f"{name}/clipped_norm"]) == pytest.approx(threshold)


@pytest.mark.parametrize("name", ["clip_by_leaf_norm", "clip_by_block_rms"])
def test_per_leaf_norms_beyond_float32_max_are_clipped_in_their_direction(name):
    tx = getattr(gradclip_jax, name)(1.0)
    updates, _ = jax.jit(tx.update)(BIG, tx.init(BIG))
    for key in ("w", "b"):
        out = np.asarray(updates[key], np.float64)
        x = np.asarray(BIG[key], np.float64)
        assert np.all(np.isfinite(out)) and np.linalg.norm(out) > 0
        cosine = out @ x / (np.linalg.norm(out) * np.linalg.norm(x))
        assert cosine == pytest.approx(1.0, abs=1e-6)


def test_adagc_warm_up_gives_a_leaf_beyond_float32_max_the_whole_budget():
    # The warm-up shares abs_max by each leaf's part of the global norm, which is inf
    # here: the huge leaf gets abs_max, the others 0 (docs/numerics.md), never NaN; the
    # step is not absorbed into the rule's state.
    tx = gradclip_jax.adagc()
    state0 = tx.init(BIG)
    updates, state = jax.jit(tx.update)(BIG, state0)
    w = np.asarray(updates["w"], np.float64)
    assert np.linalg.norm(w) == pytest.approx(1.0, rel=1e-5) and np.all(w > 0)
    assert not np.asarray(updates["b"]).any()
    chex.assert_trees_all_equal(state.rule_state, state0.rule_state)


def test_agc_clips_units_whose_norm_exceeds_float32_max():
    params = {"k": jnp.ones((100, 4))}
    grads = {"k": jnp.full((100, 4), 1e37, jnp.float32).at[:, 0].set(1e-3)}
    updates, state = gradclip_jax.agc(0.01).update(
        grads, gradclip_jax.agc(0.01).init(params), params
    )
    norms = np.linalg.norm(np.asarray(updates["k"], np.float64), axis=0)
    # each unit limited to 0.01 x its parameter norm (10); the small unit untouched
    np.testing.assert_allclose(norms[1:], 0.1, rtol=1e-5)
    np.testing.assert_allclose(norms[0], np.linalg.norm(np.full(100, 1e-3)), rtol=1e-5)


def test_clip_by_value_keeps_the_phase_of_complex_entries_beyond_the_range():
    x = jnp.array([3e38 + 3e38j, 0.5 - 0.5j], jnp.complex64)
    tx = gradclip_jax.clip_by_value(1.0)
    out, _ = tx.update(x, tx.init(x))
    np.testing.assert_allclose(np.asarray(out), [np.sqrt(0.5) * (1 + 1j), 0.5 - 0.5j], rtol=1e-6)
