"""Fixed-threshold clippers: properties, equivalence with optax, and the bad-input cases."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered
from hypothesis import given
from hypothesis import strategies as st

import gradclip_jax

SHAPES = {"kernel": (4, 3), "bias": (3,), "scalar": ()}
DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.complex64]


def _tree(seed, exponent, dtype):
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in SHAPES.items():
        values = rng.normal(size=shape) * 10.0**exponent
        if dtype == jnp.complex64:
            values = values + 1j * rng.normal(size=shape) * 10.0**exponent
        out[key] = jnp.asarray(values, dtype)
    return out


def _as64(tree):
    return {k: np.asarray(v, np.complex128) for k, v in tree.items()}


def _reference(name, tree, threshold):
    """Float64 NumPy transcription of each clipper's definition."""
    x = _as64(tree)
    if name == "clip_by_value":
        return {
            k: v * np.minimum(1.0, threshold / np.maximum(np.abs(v), 1e-300)) for k, v in x.items()
        }
    if name == "clip_by_global_norm":
        norm = math.sqrt(sum(np.sum(np.abs(v) ** 2) for v in x.values()))
        return {k: v * min(1.0, threshold / norm) if norm else v for k, v in x.items()}
    out = {}
    for k, v in x.items():
        norm = math.sqrt(np.sum(np.abs(v) ** 2))
        limit = threshold * math.sqrt(v.size) if name == "clip_by_block_rms" else threshold
        out[k] = v * min(1.0, limit / norm) if norm else v
    return out


CLIPPERS = ["clip_by_value", "clip_by_global_norm", "clip_by_leaf_norm", "clip_by_block_rms"]
_JITTED = {}


def _clip(name, tree, threshold):
    """Jitted update with the threshold injected, so each (name, dtype) compiles once."""
    dtype = tree["kernel"].dtype
    if (name, dtype) not in _JITTED:
        tx = optax.inject_hyperparams(getattr(gradclip_jax, name))(1.0)

        def run(tree, threshold):
            state = tx.init(tree)
            state.hyperparams[next(iter(state.hyperparams))] = threshold
            return tx.update(tree, state)

        _JITTED[name, dtype] = jax.jit(run)
    return _JITTED[name, dtype](tree, jnp.float32(threshold))


def _tolerance(dtype):
    return {jnp.float16: 2e-3, jnp.bfloat16: 1.6e-2}.get(dtype, 2e-6)


@pytest.mark.parametrize(
    "dtype", tiered(DTYPES, [jnp.float32, jnp.bfloat16]), ids=lambda d: jnp.dtype(d).name
)
@pytest.mark.parametrize("name", tiered(CLIPPERS, ["clip_by_value", "clip_by_block_rms"]))
@given(
    seed=st.integers(0, 2**16),
    exponent=st.integers(-3, 3),
    threshold=st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0, 1e3, math.inf]),
)
def test_matches_float64_reference(name, dtype, seed, exponent, threshold):
    """Covers: norm <= threshold, direction kept, unchanged below, dtypes and shapes."""
    tree = _tree(seed, exponent, dtype)
    out, state = _clip(name, tree, threshold)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, tree)
    expected = _reference(name, tree, threshold)
    tol = _tolerance(dtype)
    # Results below the dtype's normal range are subnormals spaced by the smallest
    # subnormal (6e-8 for float16): rounding to them is exact only to that spacing.
    spacing = float(jnp.finfo(dtype).smallest_subnormal)
    for key in tree:
        got = np.asarray(out[key], np.complex128)
        scale = max(np.max(np.abs(expected[key]), initial=0), 1e-30)
        atol = max(tol * scale, spacing)
        np.testing.assert_allclose(got, expected[key], rtol=tol, atol=atol)
    assert np.isfinite(state.inner_state.stats.norm)


_jit_global_norm = jax.jit(gradclip_jax.global_norm)
_jit_leaf_norms = jax.jit(lambda t: jax.tree.leaves(gradclip_jax.leaf_norms(t)))


@pytest.mark.parametrize("name", ["clip_by_global_norm", "clip_by_leaf_norm"])
@given(seed=st.integers(0, 2**16), exponent=st.integers(-3, 30))
def test_clipped_norm_is_at_most_threshold_and_idempotent(name, seed, exponent):
    tree = _tree(seed, exponent, jnp.float32)
    threshold = 1.0
    once, _ = _clip(name, tree, threshold)
    norms = [_jit_global_norm(once)] if name == "clip_by_global_norm" else _jit_leaf_norms(once)
    for norm in norms:
        assert float(norm) <= threshold * (1 + 1e-6)
    twice, _ = _clip(name, once, threshold)
    chex.assert_trees_all_close(twice, once, rtol=1e-6)


def _random_tree(seed):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
    }


@pytest.mark.parametrize("threshold", tiered([0.1, 1.0, 5.0, 100.0], [1.0]))
@pytest.mark.parametrize(
    "ours, theirs",
    [
        (gradclip_jax.clip_by_value, optax.clip),
        (gradclip_jax.clip_by_global_norm, optax.clip_by_global_norm),
        (gradclip_jax.clip_by_block_rms, optax.clip_by_block_rms),
    ],
    ids=["value", "global_norm", "block_rms"],
)
def test_equals_optax_where_semantics_coincide(ours, theirs, threshold):
    ours_tx, theirs_tx = ours(threshold), theirs(threshold)
    ours_fn = jax.jit(lambda t: ours_tx.update(t, ours_tx.init(t))[0])
    theirs_fn = jax.jit(lambda t: theirs_tx.update(t, theirs_tx.init(t))[0])
    for seed in range(3):
        tree = _random_tree(seed)
        chex.assert_trees_all_close(ours_fn(tree), theirs_fn(tree), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_agc_equals_optax_adaptive_grad_clip(clipping):
    theirs, ours = optax.adaptive_grad_clip(clipping), gradclip_jax.agc(clipping)
    theirs_fn = jax.jit(lambda g, p: theirs.update(g, theirs.init(p), p)[0])
    ours_fn = jax.jit(lambda g, p: ours.update(g, ours.init(p), p)[0])
    for seed in range(3):
        grads, params = _random_tree(seed), _random_tree(seed + 100)
        chex.assert_trees_all_close(ours_fn(grads, params), theirs_fn(grads, params), rtol=1e-6)


# --- the cases where optax fails and we must not -------------------------------------


def test_float16_gradients_of_300_clip_to_threshold():
    grads = {"w": jnp.full((1000,), 300.0, jnp.float16)}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    assert out["w"].dtype == jnp.float16
    np.testing.assert_allclose(gradclip_jax.global_norm(out), 1.0, rtol=2e-3)
    np.testing.assert_allclose(state.stats.norm, 300.0 * math.sqrt(1000), rtol=1e-3)
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert not np.any(np.asarray(optax_out["w"], np.float32))  # what optax does: zeros


@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_float32_gradients_clip_with_direction_kept(magnitude):
    direction = np.array([3.0, -4.0, 0.0, 12.0])
    grads = {"w": jnp.asarray(direction * magnitude, jnp.float32)}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(out["w"], direction / 13.0, rtol=1e-6)
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert not np.any(np.asarray(optax_out["w"]))  # what optax does: zeros


@pytest.mark.parametrize("name", tiered(CLIPPERS + ["agc"], ["clip_by_global_norm", "agc"]))
def test_zero_threshold_on_zero_gradients_gives_zeros(name):
    grads = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = getattr(gradclip_jax, name)(0.0)
    out, state = tx.update(grads, tx.init(grads), grads)
    chex.assert_trees_all_equal(out, grads)
    for value in state.stats.record:
        assert np.all(np.isfinite(value))
    if name == "clip_by_global_norm":
        optax_out, _ = optax.clip_by_global_norm(0.0).update(grads, None)
        assert np.all(np.isnan(optax_out["w"]))  # what optax does: NaN


@pytest.mark.parametrize(
    "name",
    tiered(
        ["clip_by_global_norm", "clip_by_leaf_norm", "clip_by_block_rms"], ["clip_by_leaf_norm"]
    ),
)
def test_clipping_is_differentiable_at_zero(name):
    """Meta-learning users differentiate through the clipper."""
    tx = getattr(gradclip_jax, name)(0.0)

    def loss(x):
        out, _ = tx.update({"w": x}, tx.init({"w": x}))
        return jnp.sum(out["w"] ** 2)

    assert np.all(np.isfinite(jax.grad(loss)(jnp.zeros(3))))


@pytest.mark.parametrize("name", CLIPPERS + ["agc"])
@pytest.mark.parametrize("bad", [-1.0, -1e-9, math.nan, -math.inf])
def test_negative_or_nan_threshold_is_rejected(name, bad):
    with pytest.raises(ValueError, match=rf"{name}: `\w+` must lie in \[0"):
        getattr(gradclip_jax, name)(bad)


def test_optax_silently_flips_sign_where_we_raise():
    grads = {"w": jnp.array([3.0, 4.0])}
    flipped, _ = optax.clip_by_global_norm(-1.0).update(grads, None)
    assert float(flipped["w"][0]) < 0  # optax's behaviour, which we refuse
    with pytest.raises(ValueError, match="max_norm"):
        gradclip_jax.clip_by_global_norm(-1.0)


def test_infinite_threshold_never_clips():
    grads = {"w": jnp.array([3e30, 4e30], jnp.float32)}
    for name in CLIPPERS:
        tx = getattr(gradclip_jax, name)(math.inf)
        out, state = tx.update(grads, tx.init(grads))
        chex.assert_trees_all_equal(out, grads)
        assert int(state.stats.clip_count) == 0


def test_nan_gradients_propagate_by_default():
    grads = {"w": jnp.array([jnp.nan, 1.0]), "b": jnp.array([1.0])}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    assert np.isnan(state.stats.norm)
    chex.assert_trees_all_equal(out, grads)  # the NaN stays in place, nothing else changes
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert all(np.isnan(leaf).all() for leaf in optax_out.values())  # optax: every leaf NaN


def test_inf_entry_gives_nan_there_and_zeros_elsewhere_like_optax():
    grads = {"w": jnp.array([jnp.inf, 1.0]), "b": jnp.array([1.0])}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    assert np.isinf(state.stats.norm)
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    for leaves in (out, optax_out):
        np.testing.assert_array_equal(leaves["w"], [np.nan, 0.0])
        np.testing.assert_array_equal(leaves["b"], [0.0])


def test_float16_norm_beyond_float16_range_clips():
    grads = {"w": jnp.full((1000,), 3000.0, jnp.float16)}  # norm 94868 > 65504
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(state.stats.norm, 3000.0 * math.sqrt(1000), rtol=1e-3)
    np.testing.assert_allclose(gradclip_jax.global_norm(out), 1.0, rtol=2e-3)
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    assert not np.any(np.asarray(optax_out["w"], np.float32))  # what optax does: zeros


def test_complex_leaves_equal_optax():
    grads = {"w": jnp.array([3 + 4j, 1 - 2j, 0j], jnp.complex64)}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(state.stats.norm, math.sqrt(30), rtol=1e-6)
    optax_out, _ = optax.clip_by_global_norm(1.0).update(grads, None)
    np.testing.assert_allclose(out["w"], optax_out["w"], rtol=1e-6)


def test_integer_and_none_leaves_pass_through():
    grads = {"f": jnp.array([30.0, 40.0]), "i": jnp.array([7, 8]), "n": None}
    for name in CLIPPERS:
        tx = getattr(gradclip_jax, name)(1.0)
        out, _ = tx.update(grads, tx.init(grads))
        assert out["n"] is None
        chex.assert_trees_all_equal(out["i"], grads["i"])
    with pytest.raises(TypeError):  # optax's clip_by_global_norm cannot take them
        optax.clip_by_global_norm(1.0).update({"f": grads["f"], "i": grads["i"]}, None)


def test_clip_by_value_keeps_complex_phase():
    grads = jnp.array([3 + 4j, 0.1j], jnp.complex64)
    tx = gradclip_jax.clip_by_value(1.0)
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(out, [0.6 + 0.8j, 0.1j], rtol=1e-6)


def test_agc_needs_params():
    tx = gradclip_jax.agc()
    with pytest.raises(ValueError, match="agc: the update needs the parameters"):
        tx.update({"w": jnp.ones(2)}, tx.init(None))


@pytest.mark.slow
def test_agc_axis_supports_pytorch_layout():
    # PyTorch kernels are (out, in): units are rows.
    params = jnp.ones((2, 4))
    grads = jnp.full((2, 4), 10.0)
    tx = gradclip_jax.agc(0.5, axis=1)
    out, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), [1.0, 1.0], rtol=1e-6)
    assert float(state.stats.clipped) == 1.0


def test_bad_ord_is_rejected_at_construction():
    with pytest.raises(ValueError, match="clip_by_global_norm: `ord`"):
        gradclip_jax.clip_by_global_norm(1.0, ord=3)


@pytest.mark.parametrize("ord", [1, 2, math.inf])
def test_global_norm_clip_in_other_orders(ord):
    grads = {"w": jnp.array([3.0, -4.0])}
    tx = gradclip_jax.clip_by_global_norm(1.0, ord=ord)
    out, state = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(gradclip_jax.global_norm(out, ord), 1.0, rtol=1e-6)
    np.testing.assert_allclose(state.stats.clipped_norm, 1.0, rtol=1e-6)
