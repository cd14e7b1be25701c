"""Per-example clipping and DP aggregation: agreement with optax, numerics, noise, and the
adaptive clip norm's convergence to its target quantile."""

import math
import os
import pickle
import statistics
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered

import gradclip_jax
from gradclip_jax import _per_example, dp_aggregate, per_example_clip, rules

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"kernel": (5, 3), "bias": (3,), "scalar": ()}

# Jitted once per tree layout and option: thresholds are traced arguments.
_clip = jax.jit(per_example_clip, static_argnames=("granularity", "uniform"))
_optax_global = jax.jit(optax.per_example_global_norm_clip)
_optax_layer = jax.jit(optax.per_example_layer_norm_clip, static_argnames=("uniform",))


def _batch(seed, batch=16, dtype=jnp.float32):
    """Per-example gradients whose norms spread over two decades."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-1, 1, size=batch)
    return {
        k: jnp.asarray(rng.normal(size=(batch, *s)) * spread.reshape((-1,) + (1,) * len(s)), dtype)
        for k, s in SHAPES.items()
    }


def _norms64(grads):
    """Float64 per-example global norms."""
    squares = [
        np.sum(np.abs(np.asarray(x, np.complex128)) ** 2, axis=tuple(range(1, x.ndim)))
        for x in jax.tree.leaves(grads)
    ]
    return np.sqrt(np.sum(squares, axis=0))


def _norm64(tree):
    """Float64 global norm of a tree."""
    return math.sqrt(sum(np.sum(np.abs(np.asarray(x, np.float64)) ** 2) for x in tree.values()))


# ------------------------------------------------------------------ per_example_clip


# Sums of terms up to ~30 in float32: absolute errors ~1e-5 where they cancel.
CLOSE = {"rtol": 2e-6, "atol": 2e-5}


def test_global_matches_optax():
    for max_norm in (0.0, 0.5, 2.0, math.inf):
        for seed in range(2):
            grads = _batch(seed)
            ours, count = _clip(grads, max_norm)
            theirs, their_count = _optax_global(grads, max_norm)
            chex.assert_trees_all_close(ours, theirs, **CLOSE)
            assert int(count) == int(their_count)
            assert count.dtype == jnp.int32


@pytest.mark.parametrize("uniform", [True, False])
def test_leaf_matches_optax(uniform):
    for max_norm in (0.3, 3.0):
        for seed in range(2):
            grads = _batch(seed)
            ours, counts = _clip(grads, max_norm, granularity="leaf", uniform=uniform)
            theirs, their_counts = _optax_layer(grads, max_norm, uniform=uniform)
            chex.assert_trees_all_close(ours, theirs, **CLOSE)
            assert jax.tree.map(int, counts) == jax.tree.map(int, their_counts)


def _grouped_batch(seed, batch=6):
    """Leaves that are clipped as stacks (several small leaves of one shape and dtype,
    in two dtypes), beside lone ones: a unique shape, a scalar, and a large leaf."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-1, 1, size=batch)
    shapes = [(4, 3), (2,), (4, 3), (), (4, 3), (2,), (5, 7), (), (70, 70), (2,)]
    grads = {}
    for i, shape in enumerate(shapes):
        x = rng.normal(size=(batch, *shape)) * spread.reshape((-1,) + (1,) * len(shape))
        grads[f"l{i}"] = jnp.asarray(x, jnp.bfloat16 if i in (5, 9) else jnp.float32)
    grads["l1"] = grads["l1"] * 40  # one leaf of a stack far above its share
    return grads


@pytest.mark.parametrize(
    "variant", tiered(["global", "leaf-uniform", "leaf-by-size"], fast=["global"])
)
def test_stacked_leaves_match_optax(variant):
    """Small leaves of one shape are clipped as one stack (one kernel per shape): every
    leaf, its count and its noise are still optax's, in leaf order."""
    granularity, uniform = variant.split("-")[0], variant != "leaf-by-size"
    for max_norm in (0.2, 2.0):
        grads = _grouped_batch(int(max_norm * 10))
        ours, counts = _clip(grads, max_norm, granularity=granularity, uniform=uniform)
        if granularity == "global":
            theirs, their_counts = _optax_global(grads, max_norm)
        else:
            theirs, their_counts = _optax_layer(grads, max_norm, uniform=uniform)
        chex.assert_trees_all_close(ours, theirs, rtol=1e-2, atol=1e-2 * max_norm)  # bfloat16
        f32 = [k for k, x in grads.items() if x.dtype == jnp.float32]
        chex.assert_trees_all_close({k: ours[k] for k in f32}, {k: theirs[k] for k in f32}, **CLOSE)
        assert jax.tree.map(int, counts) == jax.tree.map(int, their_counts)
    key = jax.random.key(11)
    tx = dp_aggregate(1.0, noise_multiplier=0.8, seed=key, granularity=granularity)
    out, _ = jax.jit(tx.update)(grads, tx.init(None))
    if granularity == "global":
        theirs = optax.contrib.differentially_private_aggregate(1.0, 0.8, key=key)
        expected, _ = jax.jit(theirs.update)(grads, theirs.init(None))  # eager: 2x slower
        chex.assert_trees_all_close(out, expected, rtol=1e-2, atol=1e-3)
    # Each leaf's noise comes from its own key: no two leaves of a stack share it.
    assert not np.allclose(out["l0"], out["l2"]) and not np.allclose(out["l2"], out["l4"])


def test_global_against_definition_float64():
    grads = _batch(7)
    norms = _norms64(grads)
    scales = np.minimum(1.0, 1.0 / norms)
    ours, count = _clip(grads, 1.0)
    for k, x in grads.items():
        expected = np.tensordot(scales, np.asarray(x, np.float64), axes=1)
        np.testing.assert_allclose(ours[k], expected, **CLOSE)
    assert int(count) == int(np.sum(norms > 1.0))


def test_leaf_sensitivity_is_max_norm():
    # One example (the others zero), far above the bound: whatever the leaves' sizes, its
    # clipped gradient's norm is max_norm.
    alone = jnp.zeros(16).at[0].set(1e3)
    grads = jax.tree.map(lambda x: x * alone.reshape((-1,) + (1,) * (x.ndim - 1)), _batch(3))
    for uniform in (True, False):
        total, _ = _clip(grads, 2.0, granularity="leaf", uniform=uniform)
        np.testing.assert_allclose(_norm64(total), 2.0, rtol=1e-6)


def test_dtypes_kept_and_low_precision_norms_exact():
    base = _batch(1)["kernel"]
    grads = {
        "f16": base.astype(jnp.float16),
        "bf16": base[:, :2].astype(jnp.bfloat16),
        "c64": (base + 1j * base[::-1]).astype(jnp.complex64),
    }
    total, count = _clip(grads, 1.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(total, jax.tree.map(lambda x: x[0], grads))
    norms = _norms64(grads)
    scales = np.minimum(1.0, 1.0 / norms)
    for k, x in grads.items():
        expected = np.tensordot(scales, np.asarray(x, np.complex128), axes=1)
        tol = {"f16": 2e-3, "bf16": 1.6e-2, "c64": 2e-6}[k]
        np.testing.assert_allclose(
            np.asarray(total[k], np.complex128), expected, rtol=tol, atol=tol * 30
        )
    assert int(count) == int(np.sum(norms > 1.0))


def test_float16_magnitude_300_clips():
    # 300^2 overflows float16: optax's per-example norm is inf and the sum becomes 0.
    grads = {"w": jnp.full((2, 4), 300.0, jnp.float16)}
    total, count = _clip(grads, 1.0)
    np.testing.assert_allclose(np.asarray(total["w"], np.float32), 2 * 0.5, rtol=1e-3)
    assert int(count) == 2


def test_overflowing_example_keeps_direction_and_others_exact():
    grads = {"w": jnp.array([[3e30, 4e30], [0.3, 0.4], [1e-20, 0.0]], jnp.float32)}
    total, count = _clip(grads, 1.0)
    np.testing.assert_allclose(total["w"], [0.6 + 0.3 + 1e-20, 0.8 + 0.4], rtol=1e-6)
    assert int(count) == 1
    total, counts = _clip(grads, 1.0, granularity="leaf")
    np.testing.assert_allclose(total["w"], [0.9, 1.2], rtol=1e-6)
    assert int(counts["w"]) == 1


def test_zero_examples_give_zeros_and_finite_gradients():
    @jax.jit
    def run(grads):
        out = {}
        for granularity in ("global", "leaf"):

            def loss(g, granularity=granularity):
                return jnp.sum(per_example_clip(g, 1.0, granularity=granularity)[0]["w"])

            zero_threshold, _ = per_example_clip(grads, 0.0, granularity=granularity)
            out[granularity] = (zero_threshold, jax.grad(loss)(grads))
        return out

    for total, gradient in run({"w": jnp.zeros((4, 3))}).values():
        np.testing.assert_array_equal(total["w"], 0.0)
        chex.assert_tree_all_finite(gradient)


def test_nan_example_propagates():
    grads = {"w": jnp.array([[jnp.nan, 0.0], [1.0, 0.0]])}
    total, _ = _clip(grads, 1.0)
    assert np.isnan(total["w"][0])


def test_other_leaves_pass_through():
    grads = {"w": jnp.ones((3, 2)), "step": jnp.arange(3), "none": None}
    total, counts = _clip(grads, 1.0, granularity="leaf")
    np.testing.assert_array_equal(total["step"], jnp.arange(3))
    assert total["none"] is None and counts["step"] is None and int(counts["w"]) == 3


@pytest.mark.parametrize(
    "grads",
    [{"w": jnp.ones(())}, {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}],
    ids=["scalar", "two-batch-sizes"],
)
def test_needs_a_batch_axis(grads):
    with pytest.raises(ValueError, match=r"per_example_clip: expects per-example gradients"):
        per_example_clip(grads, 1.0)


def test_bad_arguments():
    grads = _batch(0)
    with pytest.raises(ValueError, match=r"per_example_clip: `max_norm` must lie in \[0"):
        per_example_clip(grads, -1.0)
    with pytest.raises(ValueError, match=r"`granularity` must be one of"):
        per_example_clip(grads, 1.0, granularity="unit")
    with pytest.raises(ValueError, match=r"dp_aggregate: `noise_multiplier` must lie in"):
        dp_aggregate(1.0, noise_multiplier=-0.5)
    with pytest.raises(ValueError, match=r"dp_aggregate: an adaptive clip norm must be"):
        dp_aggregate(rules.zscore(), noise_multiplier=1.0)


# ---------------------------------------------------------------------- dp_aggregate


def test_fixed_norm_matches_optax_with_the_same_key():
    key = jax.random.key(42)
    ours = dp_aggregate(1.0, noise_multiplier=1.3, seed=key)
    theirs = optax.contrib.differentially_private_aggregate(1.0, 1.3, key=key)
    our_state, their_state = ours.init(None), theirs.init(None)
    update, their_update = jax.jit(ours.update), jax.jit(theirs.update)
    for seed in range(3):
        grads = _batch(seed)
        out, our_state = update(grads, our_state)
        expected, their_state = their_update(grads, their_state)
        chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_leaves_of_one_shape_share_a_draw_and_keep_optax_noise():
    """Leaves of one shape are drawn in one vmapped kernel: the noise is still optax's
    (one key per leaf, so no two leaves repeat each other), has the std z * C / batch,
    and the next step's key gives new noise."""
    z, clip, batch = 1.3, 1.0, 16
    grads = {f"w{i}": jnp.zeros((batch, 40, 30)) for i in range(5)}
    grads["b"] = jnp.zeros((batch, 7))
    key = jax.random.key(7)
    ours = dp_aggregate(clip, noise_multiplier=z, seed=key)
    theirs = optax.contrib.differentially_private_aggregate(clip, z, key=key)
    out, state = jax.jit(ours.update)(grads, ours.init(None))
    expected, _ = jax.jit(theirs.update)(grads, theirs.init(None))
    chex.assert_trees_all_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out["w0"], out["w1"])
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(out)])
    sigma = z * clip / batch
    assert abs(flat.std() / sigma - 1) < 0.03 and abs(flat.mean()) < 0.03 * sigma
    nxt, _ = jax.jit(ours.update)(grads, state)
    assert abs(np.corrcoef(np.ravel(out["w0"]), np.ravel(nxt["w0"]))[0, 1]) < 0.05


def test_without_noise_is_the_clipped_mean():
    grads = _batch(5)
    batch = grads["kernel"].shape[0]
    # Global granularity: see the comparison with optax above (noise included).
    tx = dp_aggregate(0.7, noise_multiplier=0.0, granularity="leaf", uniform=False)
    out, _ = jax.jit(tx.update)(grads, tx.init(None))
    total, _ = _clip(grads, 0.7, granularity="leaf", uniform=False)
    chex.assert_trees_all_close(out, jax.tree.map(lambda s: s / batch, total), rtol=1e-6)


def test_stats_report_the_step():
    grads = {"w": jnp.array([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0], [30.0, 40.0]])}
    tx = optax.chain(dp_aggregate(1.0, noise_multiplier=0.0), optax.sgd(1.0))
    params = {"w": jnp.zeros(2)}
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    logs = gradclip_jax.stats(state)
    np.testing.assert_allclose(logs["dp_aggregate/norm"], (5 + 1 + 0 + 50) / 4, rtol=1e-6)
    np.testing.assert_allclose(logs["dp_aggregate/threshold"], 1.0)
    np.testing.assert_allclose(logs["dp_aggregate/clipped"], 0.5)
    np.testing.assert_allclose(logs["dp_aggregate/clipped_norm"], 3.0 / 4, rtol=1e-6)
    assert int(logs["dp_aggregate/clip_count"]) == 1


def _noise_std(tx, batch, size=20_000):
    """Sample std of one update on zero gradients: pure noise (sum / batch)."""
    out, state = jax.jit(tx.update)({"w": jnp.zeros((batch, size))}, tx.init(None))
    return float(np.std(out["w"])), state


def test_fixed_noise_std():
    std, _ = _noise_std(dp_aggregate(2.0, noise_multiplier=1.5, seed=3), batch=10)
    # 20,000 samples: the sample std is within 1% of the true one with overwhelming odds.
    assert std == pytest.approx(1.5 * 2.0 / 10, rel=0.03)


def test_adaptive_record_noise_keeps_the_total_privacy_cost():
    # batch 20 -> sigma_b = 1, so the clipped sum needs z_r = (1 - 1/4)^-1/2 = 1.1547.
    rule = rules.quantile(initial=2.0)
    std, state = _noise_std(dp_aggregate(rule, noise_multiplier=1.0, seed=1), batch=20)
    assert std == pytest.approx(1 / math.sqrt(0.75) * 2.0 / 20, rel=0.02)
    assert std != pytest.approx(1.0 * 2.0 / 20, rel=0.05)  # the unadjusted multiplier
    z_r = float(_per_example.record_noise_multiplier(1.0, 1.0))
    assert z_r == pytest.approx(1 / math.sqrt(0.75), rel=1e-6)
    # Andrew et al.'s composition: the two Gaussian queries together cost z.
    for z, sigma_b in ((0.5, 3.2), (1.1, 12.8), (2.0, 1.5)):
        z_r = float(_per_example.record_noise_multiplier(z, sigma_b))
        assert (z_r**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-5)
    assert float(_per_example.record_noise_multiplier(0.0, 5.0)) == 0.0
    assert np.isnan(_per_example.record_noise_multiplier(1.0, 0.5))


def test_too_little_count_noise_is_an_error():
    tx = dp_aggregate(None, noise_multiplier=1.0, seed=0)
    with pytest.raises(ValueError, match=r"clipped_count_stddev = 0.5 .* must exceed"):
        jax.jit(tx.update)({"w": jnp.ones((10, 2))}, tx.init(None))  # sigma_b = 10 / 20


@pytest.mark.slow
def test_adaptive_clip_norm_converges_to_the_target_quantile():
    """Log-normal per-example norms (median 2, log-std 0.5), batch 256, noise z = 1,
    targets 0.5 and 0.8 (the quantile rule's target may be traced: one compilation).

    Tolerance: near the fixed point log C moves by -0.2 (b - target) per step, where b's
    error has std sqrt(q(1-q)/256) ~ 0.03 (sampling) and 1/20 = 0.05 (count noise),
    ~0.06 together, and b's slope in log C is phi(z_q) / 0.5 ~ 0.6-0.8. log C is then an
    AR(1) process with stationary std ~0.2 * 0.06 / sqrt(1 - (1 - 0.2 * 0.7)^2) ~ 0.023:
    C stays within ~2.3% of the quantile (1 sigma). The mean over the last 100 steps
    (correlation time ~7 steps) has std ~0.6%. A 10% band is > 10 sigma, so the test is
    not flaky, yet it fails for any systematic error (a wrong sign, scale or target)
    larger than 10%. Starting at 0.1, C needs ~30 steps to rise the factor ~20.
    """
    batch, steps, mu, sigma = 256, 400, math.log(2.0), 0.5
    targets = (0.5, 0.8)

    def run(target):
        rule = rules.quantile(target=target, initial=0.1)
        tx = dp_aggregate(rule, noise_multiplier=1.0, seed=0)

        def step(state, key):
            k_norm, k_dir = jax.random.split(key)
            norms = jnp.exp(mu + sigma * jax.random.normal(k_norm, (batch,)))
            directions = jax.random.normal(k_dir, (batch, 4))
            directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
            _, state = tx.update({"w": directions * norms[:, None]}, state)
            return state, (state.rule_state.threshold, state.stats.clipped)

        keys = jax.random.split(jax.random.key(1), steps)
        return jax.lax.scan(step, tx.init(None), keys)[1]

    thresholds, clipped = jax.jit(jax.vmap(run))(jnp.asarray(targets))
    for i, target in enumerate(targets):
        true_quantile = math.exp(mu + sigma * statistics.NormalDist().inv_cdf(target))
        estimate = math.exp(float(np.mean(np.log(thresholds[i, -100:]))))
        assert estimate == pytest.approx(true_quantile, rel=0.10), target
        assert float(np.mean(clipped[i, -100:])) == pytest.approx(1 - target, abs=0.05)


@pytest.mark.slow
def test_inject_hyperparams_and_pickle():
    grads = _batch(2)
    tx = optax.inject_hyperparams(dp_aggregate)(max_norm=1.0, noise_multiplier=0.5, seed=4)
    state = initial = tx.init(None)
    update = jax.jit(tx.update)
    tight, state = update(grads, state)
    state.hyperparams["max_norm"] = jnp.asarray(100.0)
    loose, state = update(grads, state)
    assert _norm64(loose) > _norm64(tight)
    np.testing.assert_allclose(gradclip_jax.stats(state)["dp_aggregate/threshold"], 100.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    chex.assert_trees_all_equal(restored, jax.device_get(state))


def test_injected_noise_multiplier_sets_the_default_count_noise():
    grads = _batch(2)
    unclipped = float(np.mean(_norms64(grads) <= 0.1))
    exact = 0.1 * math.exp(-0.2 * (unclipped - 0.5))  # Andrew et al.'s defaults
    tx = optax.inject_hyperparams(dp_aggregate)(max_norm=None, noise_multiplier=0.0, seed=0)
    update = jax.jit(tx.update)
    thresholds = {}
    for z in (0.0, 0.1):  # 0.1 < 2 sigma_b = 1.6: valid, with count noise batch / 20
        state = tx.init(None)
        state.hyperparams["noise_multiplier"] = jnp.asarray(z)
        _, state = update(grads, state)
        thresholds[z] = float(state.inner_state.rule_state.threshold)
    assert thresholds[0.0] == pytest.approx(exact, rel=1e-6)
    assert thresholds[0.1] != pytest.approx(exact, rel=1e-4)  # the count was noised


def test_seed_forms_give_the_same_key():
    keys = [
        dp_aggregate(1.0, seed=seed).init(None).rng_key
        for seed in (7, jax.random.key(7), jax.random.PRNGKey(7))
    ]
    chex.assert_trees_all_equal(*keys)
    other = dp_aggregate(1.0, seed=8).init(None).rng_key
    assert not np.array_equal(keys[0], other)


@pytest.mark.slow  # an end-to-end example in a subprocess
def test_dp_sgd_example_runs():
    # LLVM optimisations off: compiling is most of a short run's time.
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dp_sgd.py"), "--steps", "80"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    final = result.stdout.strip().splitlines()[-1].split()
    # "final clip norm C vs median per-example norm M; test accuracy A"
    clip_norm, accuracy = float(final[3]), float(final[-1])
    assert clip_norm != pytest.approx(0.1)  # it adapted
    assert accuracy > 0.8, result.stdout


def test_dp_aggregate_requires_a_seed_with_noise():
    with pytest.raises(ValueError, match="pass `seed`"):
        dp_aggregate(1.0, noise_multiplier=1.0)
    dp_aggregate(1.0, noise_multiplier=0.0)  # no noise, no privacy: no seed needed


def test_dp_aggregate_infinite_clip_norm_only_without_noise_and_never_nan():
    with pytest.raises(ValueError, match="`max_norm`=inf bounds no example"):
        dp_aggregate(math.inf, noise_multiplier=1.0, seed=0)
    tx = dp_aggregate(math.inf, noise_multiplier=0.0)
    grads = {"w": jnp.arange(6.0).reshape(3, 2)}
    updates, _ = tx.update(grads, tx.init(None))
    np.testing.assert_allclose(updates["w"], jnp.mean(grads["w"], axis=0))


def test_dp_aggregate_rejects_an_empty_batch_and_integer_only_trees():
    tx = dp_aggregate(1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="the batch is empty"):
        tx.update({"w": jnp.ones((0, 2))}, tx.init(None))
    with pytest.raises(ValueError, match="no floating-point leaf"):
        per_example_clip({"w": jnp.ones((3, 2), jnp.int32)}, 1.0)


def test_dp_aggregate_state_dtypes_are_fixed_under_x64():
    with jax.enable_x64(True):
        tx = dp_aggregate(None, noise_multiplier=1.0, seed=0)
        state = tx.init(None)
        grads = {"w": jnp.ones((40, 2), jnp.float64)}
        _, new_state = jax.jit(tx.update)(grads, state)
        assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(lambda x: x.dtype, state)
