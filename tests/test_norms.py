"""Robust norms: accumulation precision, overflow, zeros, complex, odd leaves, compile size."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered
from hypothesis import given
from hypothesis import strategies as st

import gradclip_jax

ORDS = [1, 2, math.inf]


def _numpy_norm(tree, ord):
    flat = np.concatenate(
        [np.abs(np.asarray(x, np.complex128)).ravel() for x in jax.tree.leaves(tree)]
    )
    return float(np.linalg.norm(flat, ord)) if flat.size else 0.0


def _random_tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "kernel": jnp.asarray(rng.normal(size=(7, 5)) * scale, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(5,)) * scale, jnp.float32),
        "big": jnp.asarray(rng.normal(size=(5000,)) * scale, jnp.float32),
        "scalar": jnp.asarray(rng.normal() * scale, jnp.float32),
    }


@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_matches_numpy(ord):
    tree = _random_tree(0)
    np.testing.assert_allclose(gradclip_jax.global_norm(tree, ord), _numpy_norm(tree, ord), 1e-6)


@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_match_numpy(ord):
    tree = _random_tree(1)
    norms = gradclip_jax.leaf_norms(tree, ord)
    for key, leaf in tree.items():
        np.testing.assert_allclose(norms[key], _numpy_norm(leaf, ord), 1e-6)


@pytest.mark.slow
@given(exponent=st.integers(-15, 35), seed=st.integers(0, 3))
def test_global_norm_is_accurate_over_magnitudes(exponent, seed):
    tree = _random_tree(seed, scale=10.0**exponent)
    expected = _numpy_norm(tree, 2)
    np.testing.assert_allclose(gradclip_jax.global_norm(tree), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    # 300^2 * 1000 overflows float16 (max 65504); the norm must not.
    tree = {"w": jnp.full((1000,), 300.0, dtype)}
    norm = gradclip_jax.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(norm, 300.0 * math.sqrt(1000), rtol=1e-3)
    np.testing.assert_allclose(
        gradclip_jax.leaf_norms(tree)["w"], 300.0 * math.sqrt(1000), rtol=1e-3
    )


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e38])
@pytest.mark.parametrize("ord", ORDS)
def test_float32_overflow_is_avoided(magnitude, ord):
    tree = {"a": jnp.array([magnitude, -magnitude], jnp.float32), "b": jnp.zeros(3)}
    expected = _numpy_norm(tree, ord)
    norm = gradclip_jax.global_norm(tree, ord)
    assert np.isfinite(norm)
    np.testing.assert_allclose(norm, expected, rtol=1e-6)
    leaf = gradclip_jax.leaf_norms(tree, ord)["a"]
    np.testing.assert_allclose(leaf, _numpy_norm(tree["a"], ord), rtol=1e-6)


def test_unitwise_norms_overflow_safe():
    kernel = jnp.array([[1e30, 1.0], [1e30, 2.0]], jnp.float32)
    norms = gradclip_jax.unitwise_norms(kernel)
    np.testing.assert_allclose(norms, [[math.sqrt(2) * 1e30, math.sqrt(5)]], rtol=1e-6)


@pytest.mark.parametrize("ord", tiered(ORDS, [2]))
def test_zero_tree_norm_and_gradient_are_finite(ord):
    zeros = {"a": jnp.zeros((3, 2)), "b": jnp.zeros(4)}
    assert float(gradclip_jax.global_norm(zeros, ord)) == 0.0
    grads = jax.grad(lambda t: gradclip_jax.global_norm(t, ord))(zeros)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g))


def test_gradient_of_norm_is_finite_when_rescaled():
    x = jnp.array([1e30, 2e30], jnp.float32)
    grad = jax.grad(gradclip_jax.global_norm)(x)
    np.testing.assert_allclose(grad, np.array([1, 2]) / math.sqrt(5), rtol=1e-6)


def test_complex_leaves_use_modulus():
    tree = {"z": jnp.array([3 + 4j, 0 - 12j], jnp.complex64)}
    np.testing.assert_allclose(gradclip_jax.global_norm(tree), 13.0, rtol=1e-6)
    np.testing.assert_allclose(gradclip_jax.global_norm(tree, 1), 17.0, rtol=1e-6)
    np.testing.assert_allclose(gradclip_jax.global_norm(tree, math.inf), 12.0, rtol=1e-6)
    huge = {"z": jnp.array([3e30 + 4e30j], jnp.complex64)}
    np.testing.assert_allclose(gradclip_jax.global_norm(huge), 5e30, rtol=1e-6)


def test_integer_boolean_and_none_leaves_are_skipped():
    tree = {
        "f": jnp.array([3.0, 4.0]),
        "i": jnp.array([100, 100]),
        "b": jnp.array([True]),
        "n": None,
    }
    assert float(gradclip_jax.global_norm(tree)) == 5.0
    norms = gradclip_jax.leaf_norms(tree)
    assert norms["i"] is None and norms["b"] is None and norms["n"] is None


@pytest.mark.parametrize("tree", [{}, [], None, {"a": jnp.zeros((0, 3))}])
def test_empty_tree_has_zero_norm(tree):
    assert float(gradclip_jax.global_norm(tree)) == 0.0


def test_non_finite_entries_are_reported():
    assert np.isnan(gradclip_jax.global_norm(jnp.array([1.0, jnp.nan])))
    assert np.isinf(gradclip_jax.global_norm(jnp.array([1.0, jnp.inf])))
    assert np.isnan(gradclip_jax.global_norm(jnp.array([jnp.inf, jnp.nan])))


@pytest.mark.parametrize("size", [10, 100_000])  # XLA's CPU max drops NaN from 10,000 on
@pytest.mark.parametrize("ord", tiered(ORDS, [math.inf]))
@pytest.mark.parametrize(
    ("bad", "expected"),
    [([jnp.nan], np.nan), ([jnp.inf], np.inf), ([-jnp.inf], np.inf), ([jnp.inf, jnp.nan], np.nan)],
)
def test_non_finite_entries_of_large_leaves_are_reported(size, ord, bad, expected):
    leaf = jnp.ones(size).at[size // 2 : size // 2 + len(bad)].set(jnp.array(bad))
    tree = {"leaf": leaf, "other": jnp.ones(3)}
    norm = jax.jit(lambda t: gradclip_jax.global_norm(t, ord))(tree)
    per_leaf = jax.jit(lambda t: gradclip_jax.leaf_norms(t, ord))(tree)
    np.testing.assert_equal(float(norm), expected)
    np.testing.assert_equal(float(per_leaf["leaf"]), expected)
    np.testing.assert_allclose(per_leaf["other"], np.linalg.norm(np.ones(3), ord))
    if ord == math.inf:  # clip_by_value reports the largest magnitude
        tx = gradclip_jax.clip_by_value(0.5)
        _, state = jax.jit(tx.update)(tree, tx.init(tree))
        np.testing.assert_equal(float(state.stats.norm), expected)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float8_e5m2])
def test_largest_magnitude_of_large_narrow_leaves(dtype):
    """The L-inf norm of half-precision and float8 leaves (widened to float32 for the
    maximum and the NaN test) is their largest magnitude exactly, inf for an infinite
    entry and NaN for a NaN one, also where XLA's CPU max drops NaN (100,000 entries)."""
    leaf = jnp.full(100_000, 0.25, dtype).at[777].set(-3.5)
    norm = jax.jit(lambda t: gradclip_jax.global_norm(t, math.inf))
    assert float(norm({"x": leaf, "y": jnp.ones(3)})) == 3.5
    for bad, expected in [(jnp.inf, np.inf), (jnp.nan, np.nan)]:
        tree = {"x": leaf.at[50_000].set(bad), "y": jnp.ones(3)}
        np.testing.assert_equal(float(norm(tree)), expected)
        np.testing.assert_equal(float(gradclip_jax.leaf_norms(tree, math.inf)["x"]), expected)


@pytest.mark.parametrize("size", [10, 100_000])
@pytest.mark.parametrize(
    ("bad", "expected"),
    [(complex(0, np.inf), np.inf), (complex(0, np.nan), np.nan), (complex(np.inf, np.nan), np.nan)],
)
def test_inf_norm_of_complex_leaves_beside_float8_sees_the_imaginary_part(size, bad, expected):
    """The largest magnitude of a tree mixing dtypes that do not promote (float8,
    complex64, float32) is NaN or inf as the entries say, whichever part holds them."""
    z = jnp.ones(size, jnp.complex64).at[size // 2].set(bad)
    tree = {"z": z, "f8": jnp.ones(4, jnp.float8_e4m3fn), "x": jnp.full(3, 2.0)}
    norm = jax.jit(lambda t: gradclip_jax.global_norm(t, math.inf))(tree)
    np.testing.assert_equal(float(norm), expected)
    clean = jax.jit(lambda t: gradclip_jax.global_norm(t, math.inf))(dict(tree, z=jnp.ones(size)))
    assert float(clean) == 2.0


def test_float64_leaves_accumulate_in_float64():
    with jax.enable_x64(True):
        x = jnp.array([1e200, 1.0], jnp.float64)
        norm = gradclip_jax.global_norm(x)
        assert norm.dtype == jnp.float64
        np.testing.assert_allclose(norm, 1e200)


def test_ord_is_structural_a_traced_ord_says_to_make_it_static():
    x = jnp.array([3.0, -4.0])
    assert [float(gradclip_jax.global_norm(x, o)) for o in (1, 2, jnp.inf, None)] == [
        7.0,
        5.0,
        4.0,
        5.0,
    ]
    with pytest.raises(ValueError, match=r"`ord` chooses .* static_args=\('ord',\)"):
        jax.jit(lambda o: gradclip_jax.global_norm(x, o))(2)
    # inject_hyperparams binds defaults too: the default ord (None) is not injected.
    tx = optax.inject_hyperparams(gradclip_jax.clip_by_global_norm)(max_norm=1.0)
    updates, state = jax.jit(tx.update)(x, tx.init(x))
    assert set(state.hyperparams) == {"max_norm"}
    np.testing.assert_allclose(updates, [0.6, -0.8], rtol=1e-6)


@pytest.mark.parametrize("ord", [0, 3, -1, "fro", True])
def test_bad_ord_is_rejected(ord):
    with pytest.raises(ValueError, match="global_norm: `ord`"):
        gradclip_jax.global_norm(jnp.ones(2), ord)


def test_unit_axes_follow_flax_layouts():
    assert gradclip_jax.unit_axes(jnp.zeros(5)) == (0,)
    assert gradclip_jax.unit_axes(jnp.zeros((1, 5))) == (0, 1)
    assert gradclip_jax.unit_axes(jnp.zeros((3, 5))) == (0,)
    assert gradclip_jax.unit_axes(jnp.zeros((2, 3, 5))) == (0,)
    assert gradclip_jax.unit_axes(jnp.zeros((3, 3, 4, 8))) == (0, 1, 2)
    assert gradclip_jax.unit_axes(jnp.zeros((2, 3, 3, 4, 8))) == (0, 1, 2, 3)
    assert gradclip_jax.unit_axes(jnp.zeros((3, 5)), axis=-1) == (1,)
    with pytest.raises(ValueError, match="pass `axis`"):
        gradclip_jax.unit_axes(jnp.zeros((2,) * 6))


@pytest.mark.parametrize(
    "shape",
    tiered([(5,), (3, 4), (2, 3, 4), (2, 2, 3, 4), (2, 2, 2, 3, 4)], [(3, 4), (2, 2, 3, 4)]),
)
def test_unitwise_norms_match_optax(shape):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    ours = jnp.broadcast_to(gradclip_jax.unitwise_norms(x), shape)
    np.testing.assert_allclose(ours, optax.transforms.unitwise_norm(x), rtol=1e-6)


def _count_reductions(fn, tree):
    hlo = jax.jit(fn).lower(tree).as_text()
    return hlo.count("stablehlo.reduce")


def test_small_leaves_share_one_reduction():
    """Compile time must not grow with one reduction per leaf (optax's 45 s at 2,000 leaves)."""
    small = {f"leaf{i}": jnp.ones((10,)) for i in range(200)}
    many = {f"leaf{i}": jnp.ones((10,)) for i in range(400)}
    ours = _count_reductions(gradclip_jax.global_norm, small)
    assert ours == _count_reductions(gradclip_jax.global_norm, many)
    assert ours <= 6
    assert _count_reductions(optax.tree.norm, small) >= 200
