"""Per-leaf and unit-wise clippers measure stacked leaves: same numbers as leaf by leaf.

Small leaves of one shape are stacked and reduced once, and each leaf reads its own
scale back from a vector (per-leaf) or from a stack of unit scales (AGC). These tests pin
that the stacking never changes what a leaf gets: order, odd shapes, dtypes, overflow,
non-finite values, and leaves that stay alone.
"""

import collections
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
from gradclip_jax import _norms
from gradclip_jax._norms import chunks, entries, leaf_norm_pairs, shape_groups
from gradclip_jax._per_example import _cheap_to_split


def _mixed_leaves(seed=0):
    """Shapes interleaved so that stacks, lone leaves and large leaves alternate."""
    rng = np.random.default_rng(seed)

    def leaf(shape, dtype=jnp.float32, scale=1.0):
        values = rng.normal(size=shape) * scale
        if jnp.issubdtype(dtype, jnp.complexfloating):
            values = values + 1j * rng.normal(size=shape) * scale
        return jnp.asarray(values, dtype)

    return [
        leaf((8, 4)),
        leaf((3,)),
        leaf((7, 5), scale=3.0),  # a shape of its own: alone
        leaf((5000,)),  # large: alone
        leaf((8, 4), scale=0.1),
        leaf((2, 3), jnp.float16),
        leaf((8, 8)),
        leaf((3,), scale=5.0),
        leaf((3, 2), jnp.complex64),
        leaf((0, 3)),  # zero-size
        leaf(()),
        leaf((8, 4), scale=1e30),  # its sum of squares overflows float32
        leaf((4,), jnp.bfloat16),
        leaf((2, 3), jnp.float16, scale=10.0),
    ]


@pytest.mark.parametrize("ord", tiered([1, 2, math.inf], [2]))
def test_leaf_norm_pairs_equal_each_leaf_measured_alone(ord):
    leaves = _mixed_leaves()
    mantissa, inverse = jax.jit(lambda xs: leaf_norm_pairs(xs, ord))(leaves)
    alone = [gradclip_jax.global_norm(x, ord) for x in leaves]
    np.testing.assert_allclose(mantissa / inverse, np.array(alone, np.float32), rtol=2e-6)
    assert mantissa.shape == inverse.shape == (len(leaves),)


@pytest.mark.slow
def test_per_leaf_clipping_equals_one_global_clipper_per_leaf():
    leaves = _mixed_leaves(1)
    for tx, alone in [
        (gradclip_jax.clip_by_leaf_norm(2.0), lambda x: gradclip_jax.clip_by_global_norm(2.0)),
        (
            gradclip_jax.clip_by_block_rms(0.5),
            lambda x: gradclip_jax.clip_by_global_norm(0.5 * math.sqrt(x.size)),
        ),
    ]:
        out, _ = jax.jit(tx.update)(leaves, tx.init(leaves))
        for x, y in zip(leaves, out):
            one = alone(x)
            expected, _ = one.update(x, one.init(x))
            assert y.dtype == x.dtype and y.shape == x.shape
            tol = 1e-2 if x.dtype in (jnp.float16, jnp.bfloat16) else 2e-6
            np.testing.assert_allclose(
                np.asarray(y, np.complex128), np.asarray(expected, np.complex128), rtol=tol
            )


def test_a_nan_in_one_stacked_leaf_stays_in_that_leaf():
    leaves = [jnp.full((8, 4), 3.0) for _ in range(5)]
    leaves[2] = leaves[2].at[1, 1].set(jnp.nan)
    tx = gradclip_jax.clip_by_leaf_norm(1.0)
    out, state = jax.jit(tx.update)(leaves, tx.init(leaves))
    for i, y in enumerate(out):
        if i == 2:
            assert jnp.isnan(y[1, 1]) and jnp.all(jnp.isfinite(y.at[1, 1].set(0)))
        else:
            np.testing.assert_allclose(gradclip_jax.global_norm(y), 1.0, rtol=1e-6)
    assert jnp.isnan(gradclip_jax.stats(state)["clip_by_leaf_norm/norm"])


@given(
    n=st.integers(1, 70),
    trailing=st.sampled_from([(), (1,), (2, 3), (1, 80)]),  # (1, 80): blocks over 4,096
    specials=st.lists(st.sampled_from([np.inf, -np.inf, np.nan, 0.0, -1e38]), max_size=4),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.int32]),
    seed=st.integers(0, 2**16),
)
def test_entries_read_back_every_row_exactly(n, trailing, specials, dtype, seed):
    """Float32 scales, bfloat16 clipped sums and int32 counts (per_example_clip) are
    split into rows by masked sums: every row exact, non-finite values included."""
    rng = np.random.default_rng(seed)
    array = (rng.normal(size=(n, *trailing)) * 1e3).astype(np.float32)
    flat = array.reshape(-1)
    for value in specials:
        flat[rng.integers(flat.size)] = value
    if dtype == jnp.int32:
        array = np.clip(np.nan_to_num(array, posinf=7, neginf=-7), -1e9, 1e9).astype(np.int32)
    array = jnp.asarray(array, dtype)
    rows = jax.jit(entries)(array)
    assert len(rows) == n
    for i, row in enumerate(rows):
        assert row.shape == trailing and row.dtype == dtype
        wide = np.float64 if dtype == jnp.int32 else np.float32  # NaN == NaN for bfloat16 too
        np.testing.assert_array_equal(np.asarray(row, wide), np.asarray(array[i], wide))


@pytest.mark.slow
@pytest.mark.parametrize("n", [1025, 1500])
def test_entries_beyond_a_square_grid_are_exact_and_sum_short_axes(n):
    """Past PICK_WIDTH^2 entries the grid gets a third level, so that no masked sum runs
    over more than PICK_WIDTH values (XLA on CPU splits longer ones into 3 kernels); the
    last level is read by one static slice per entry."""
    array = jnp.asarray(np.random.default_rng(n).normal(size=n), jnp.float32)
    array = array.at[7].set(jnp.nan).at[n - 1].set(-jnp.inf)
    rows = jax.jit(entries)(array)
    np.testing.assert_array_equal(np.stack(rows), array)
    jaxpr = jax.make_jaxpr(entries)(array).jaxpr
    summed = [e.invars[0].aval.shape[0] for e in jaxpr.eqns if e.primitive.name == "reduce_sum"]
    assert summed and max(summed) <= _norms.PICK_WIDTH
    assert sum(e.primitive.name == "slice" for e in jaxpr.eqns) == n


@given(count=st.integers(0, 700), most=st.integers(1, 200))
def test_chunks_are_the_fewest_near_equal_runs_in_order(count, most):
    runs = chunks(list(range(count)), most)
    assert [i for run in runs for i in run] == list(range(count))
    assert len(runs) == -(-count // most)
    assert all(run and len(run) <= most for run in runs)
    assert max(map(len, runs), default=0) - min(map(len, runs), default=0) <= 1


def test_large_groups_are_stacked_in_runs_of_at_most_chunk_leaves():
    """A concatenation of thousands of operands compiles slowly on CPU: a group of 300
    leaves of one shape becomes 3 stacks of 100, each exactly its leaves."""
    leaves = [jnp.full((2, 3), float(i)) for i in range(300)] + [jnp.ones((4,))] * 3
    groups = shape_groups(leaves)
    stacked = sorted((p for p, _, s in groups if s), key=lambda p: p[0])
    assert [len(p) for p in stacked] == [100, 100, 100, 3]
    assert sorted(i for p, _, _ in groups for i in p) == list(range(len(leaves)))
    for positions, (array,), _ in groups:
        assert array.shape[0] <= _norms.CHUNK_LEAVES
        np.testing.assert_array_equal(array, jnp.stack([leaves[i] for i in positions]))


def _numpy_agc(g, p, clipping, eps):
    """AGC in float64 NumPy, with optax's unit axes."""
    g, p = np.asarray(g, np.float64), np.asarray(p, np.float64)
    axes = gradclip_jax.unit_axes(jnp.asarray(g))
    g_norm = np.sqrt(np.sum(g * g, axis=axes, keepdims=True))
    limit = clipping * np.maximum(np.sqrt(np.sum(p * p, axis=axes, keepdims=True)), eps)
    return g * np.where(g_norm > limit, limit / np.where(g_norm > 0, g_norm, 1), 1)


def test_agc_on_stacked_and_lone_leaves_matches_optax():
    rng = np.random.default_rng(2)
    shapes = [(6, 4), (3,), (6, 4), (2, 2, 3, 4), (5000, 2), (6, 4), (3,), (4, 6), ()]
    grads = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    params = [jnp.asarray(rng.normal(size=s) * 0.1, jnp.float32) for s in shapes]
    params[2] = jnp.zeros((6, 4))  # eps floor on every unit of one stacked leaf
    ours = gradclip_jax.agc(0.05, eps=1e-3)
    got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    theirs = optax.adaptive_grad_clip(0.05, eps=1e-3)
    want, _ = jax.jit(theirs.update)(grads, None, params)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=0)
    # An overflowing unit sum inside a stack (optax's float32 sums give inf there).
    grads[5] = grads[5] * 1e30
    got, _ = jax.jit(ours.update)(grads, ours.init(params), params)
    for g, x, p in zip(got, grads, params):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, _numpy_agc(x, p, 0.05, 1e-3), rtol=2e-6, atol=0)


def test_agc_groups_leaves_by_the_dtypes_of_gradient_and_parameter():
    grads = [jnp.ones((4, 4), jnp.float32) * 5, jnp.ones((4, 4), jnp.float32) * 5]
    params = [jnp.ones((4, 4), jnp.float32), jnp.ones((4, 4), jnp.bfloat16)]
    tx = gradclip_jax.agc(0.1)
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for g in out:  # unit norm 10 against 0.1 * 2: scaled to 0.2
        np.testing.assert_allclose(jnp.linalg.norm(g, axis=0), 0.2, rtol=1e-6)


def _reductions_of_a_leaf(tx, leaves, params=None):
    """How many reductions read a whole leaf-shaped operand (one per leaf when unstacked)."""
    state = tx.init(leaves if params is None else params)
    text = jax.jit(tx.update).lower(leaves, state, params).as_text()
    return sum(
        1 for line in text.splitlines() if "stablehlo.reduce" in line and "(tensor<8x4xf32>" in line
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: gradclip_jax.clip_by_block_rms(1.0),
        lambda: gradclip_jax.clip_by_leaf_norm(1.0),
        gradclip_jax.adagc,
        lambda: gradclip_jax.agc(0.01),
    ],
)
def test_identical_small_leaves_are_reduced_once_not_per_leaf(make):
    leaves = [jnp.ones((8, 4)) for _ in range(50)]
    assert _reductions_of_a_leaf(make(), leaves, leaves) == 0
    text = jax.jit(make().update).lower(leaves, make().init(leaves), leaves).as_text()
    assert "tensor<50x32xf32>" in text or "tensor<50x8x4xf32>" in text  # the stack


def _operations_per_leaf(make, dtypes=(jnp.float32,), few=4, many=16):
    """The traced update's operations added by each further leaf, by primitive."""
    counts = []
    for n in (few, many):
        leaves = [jnp.ones((8, 4), dtypes[i % len(dtypes)]) for i in range(n)]
        tx = make()
        jaxpr = jax.make_jaxpr(tx.update)(leaves, tx.init(leaves), leaves).jaxpr
        counts.append(collections.Counter(str(e.primitive) for e in jaxpr.eqns))
    added = counts[1] - counts[0]
    return {k: v / (many - few) for k, v in added.items()}


@pytest.mark.parametrize(
    ("make", "most"),
    [
        # a reshape into the norm's block, then the two multiplies of the rescued scale
        (lambda: gradclip_jax.clip_by_global_norm(1.0), {"reshape": 1, "mul": 2}),
        (lambda: gradclip_jax.zclip(), {"reshape": 1, "mul": 2}),
        # a reshape into the statistic's block, then the clamp's maximum and minimum
        (lambda: gradclip_jax.clip_by_value(1.0), {"reshape": 1, "max": 1, "min": 1}),
    ],
)
@pytest.mark.parametrize("dtypes", [(jnp.float32,), (jnp.float32, jnp.bfloat16)])
def test_a_shared_threshold_is_traced_once_not_per_leaf(make, most, dtypes):
    """Once the NaN-safe bound (and a nested ``jit`` of ``jnp.clip``) per leaf, and the
    rescued scale's factors per leaf: twice the tracing time of 500 leaves. The work
    shared by every leaf is traced once per dtype."""
    per_leaf = _operations_per_leaf(make, dtypes)
    # bfloat16 leaves add their conversions to float32 and back
    allowed = dict(most, convert_element_type=2 * (len(dtypes) > 1) / len(dtypes))
    assert all(v <= allowed.get(k, 0) for k, v in per_leaf.items()), per_leaf


def test_a_group_that_is_not_stackable_stays_leaf_by_leaf():
    leaves = [jnp.full((2, 3), float(i)) for i in range(3)] + [jnp.ones((4,))] * 2
    groups = shape_groups(leaves, stackable=lambda x, count: x.shape != (2, 3))
    assert sorted(p for p, _, stacked in groups if not stacked) == [[0], [1], [2]]
    assert [p for p, _, stacked in groups if stacked] == [[3, 4]]
    for positions, (array,), stacked in groups:
        if not stacked:
            np.testing.assert_array_equal(array, leaves[positions[0]])


def test_per_example_sums_are_stacked_only_where_splitting_them_is_cheap():
    """Rows of per-example sums split by masked sums cost sqrt(count) reads each: 1,000
    leaves of 64 entries per example are stacked, 300 of 1,024 (6x the run time of
    one kernel per leaf when stacked) are not."""
    assert _cheap_to_split(jnp.zeros((4, 64)), 1000)
    assert _cheap_to_split(jnp.zeros((4, 256)), 300)
    assert not _cheap_to_split(jnp.zeros((4, 1024)), 300)
    assert not _cheap_to_split(jnp.zeros((4, 256)), 1000)
