"""Contracts every transformation keeps: chain, jit, inject_hyperparams, MultiSteps,
masked, nnx.Optimizer, pickling, stable state, and ``stats()`` finding the records.

New transformations join by adding a line to ``FACTORIES``.
"""

import pickle
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered

import gradclip_jax
from gradclip_jax import ClipStats

# name -> (factory, the threshold-like argument to inject and vary, two values of it)
FACTORIES = {
    "clip_by_value": (gradclip_jax.clip_by_value, "max_abs", (0.1, 10.0)),
    "clip_by_global_norm": (gradclip_jax.clip_by_global_norm, "max_norm", (0.1, 10.0)),
    "clip_by_leaf_norm": (gradclip_jax.clip_by_leaf_norm, "max_norm", (0.1, 10.0)),
    "clip_by_block_rms": (gradclip_jax.clip_by_block_rms, "threshold", (0.1, 10.0)),
    "agc": (gradclip_jax.agc, "clipping", (0.001, 10.0)),
}
# The fast tier's representatives, one per granularity (see tests/_tiers.py).
FAST = ["clip_by_value", "clip_by_leaf_norm", "agc"]
FAST_INJECTABLE = ["adaptive_clip", "adagc"]

PARAMS = {
    "dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
    "scale": jnp.ones(()),
}


def _grads(step):
    return jax.tree.map(lambda p: jnp.full(p.shape, 2.0 + step, p.dtype), PARAMS)


def _run(tx, steps=3, params=PARAMS):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        updates, state = update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", tiered(FACTORIES, FAST))
def test_chained_with_adam_under_jit(name):
    factory, arg, (low, _) = FACTORIES[name]
    tx = optax.chain(factory(**{arg: low}), optax.adam(1e-2))
    params, state = _run(tx)
    chex.assert_tree_all_finite(params)
    logs = gradclip_jax.stats(state)
    assert set(logs) == {
        f"{name}/{field}"
        for field in ("norm", "threshold", "clipped_norm", "clipped", "clip_count")
    }
    assert int(logs[f"{name}/clip_count"]) == 3
    assert logs[f"{name}/clip_count"].dtype == jnp.int32


@pytest.mark.parametrize("name", tiered(FACTORIES, FAST))
def test_inject_hyperparams_threshold_changes_between_jitted_steps(name):
    factory, arg, (low, high) = FACTORIES[name]
    # The exact usage people copy from optax: every numeric default arrives traced.
    tx = optax.inject_hyperparams(factory)(**{arg: low})
    state = tx.init(PARAMS)
    update = jax.jit(tx.update)
    tight, state = update(_grads(0), state, PARAMS)
    state.hyperparams[arg] = jnp.asarray(high)
    loose, state = update(_grads(0), state, PARAMS)
    assert gradclip_jax.global_norm(loose) > gradclip_jax.global_norm(tight)
    logs = gradclip_jax.stats(state)
    np.testing.assert_allclose(logs[f"{name}/threshold"], high, rtol=1e-6)
    assert int(logs[f"{name}/clip_count"]) >= 1


# Every factory whose numeric arguments optax.inject_hyperparams can inject.
INJECTABLE = {
    **{name: (factory, {arg: low}) for name, (factory, arg, (low, _)) in FACTORIES.items()},
    "adaptive_clip": (gradclip_jax.adaptive_clip, {}),
    "autoclip": (gradclip_jax.autoclip, {}),
    "zclip": (gradclip_jax.zclip, {}),
    "adagc": (gradclip_jax.adagc, {}),
    "quantile_clip": (gradclip_jax.quantile_clip, {}),
}


def _cast_run(tx, dtype, steps=2):
    params = jax.tree.map(lambda p: (p + 1).astype(dtype), PARAMS)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(steps):
        grads = jax.tree.map(lambda p, s=3.0 + step: p * s, params)
        updates, state = update(grads, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        chex.assert_tree_all_finite(updates)
    return state


@pytest.mark.parametrize("name", tiered(INJECTABLE, FAST_INJECTABLE))
def test_inject_hyperparams_with_bfloat16_parameters(name):
    # inject_hyperparams casts float hyperparameters to the parameters' dtype.
    factory, kwargs = INJECTABLE[name]
    state = _cast_run(optax.inject_hyperparams(factory)(**kwargs), jnp.bfloat16)
    assert all(v.dtype in (jnp.bfloat16, jnp.int32) for v in jax.tree.leaves(state.hyperparams))


@pytest.mark.parametrize("name", tiered(INJECTABLE, FAST_INJECTABLE))
def test_inject_hyperparams_with_complex_parameters_asks_for_a_real_dtype(name):
    factory, kwargs = INJECTABLE[name]
    if name != "adaptive_clip":  # it has no numeric argument to inject
        with pytest.raises(ValueError, match=r"real.*hyperparam_dtype=jnp.float32"):
            _cast_run(optax.inject_hyperparams(factory)(**kwargs), jnp.complex64)
    tx = optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(**kwargs)
    _cast_run(tx, jnp.complex64)


@pytest.mark.parametrize("name", tiered(FACTORIES, FAST))
def test_inside_multisteps_state_is_stable(name):
    factory, arg, (low, _) = FACTORIES[name]
    tx = optax.MultiSteps(optax.chain(factory(**{arg: low}), optax.adam(1e-2)), every_k_schedule=2)
    initial = tx.init(PARAMS)
    _, state = _run(tx, steps=4)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    # Four mini-steps of two: the inner clipper ran twice.
    assert int(gradclip_jax.stats(state)[f"{name}/clip_count"]) == 2


@pytest.mark.parametrize("name", tiered(FACTORIES, FAST))
def test_state_survives_pickle_and_keeps_shapes(name):
    factory, arg, (low, _) = FACTORIES[name]
    tx = factory(**{arg: low})
    initial = tx.init(PARAMS)
    _, state = _run(tx, steps=2)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    restored = pickle.loads(pickle.dumps(jax.device_get(state)))
    chex.assert_trees_all_equal(restored, jax.device_get(state))
    assert type(restored) is type(state)


@pytest.mark.parametrize("name", tiered(FACTORIES, FAST))
def test_keeps_dtypes_and_shapes(name):
    factory, arg, (low, _) = FACTORIES[name]
    params = {
        "f32": jnp.ones((3, 2), jnp.float32),
        "f16": jnp.ones((3, 2), jnp.float16),
        "bf16": jnp.ones((2,), jnp.bfloat16),
        "c64": jnp.ones((2, 2), jnp.complex64),
    }
    grads = jax.tree.map(lambda p: (p * 7).astype(p.dtype), params)
    tx = factory(**{arg: low})
    out, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, grads)


def test_stats_found_in_masked_and_named_duplicates():
    mask = {"dense": {"kernel": True, "bias": False}, "scale": False}
    tx = optax.chain(
        optax.masked(gradclip_jax.clip_by_global_norm(0.5), mask),
        gradclip_jax.clip_by_global_norm(100.0),
        optax.sgd(0.1),
    )
    _, state = _run(tx, steps=1)
    logs = gradclip_jax.stats(state)
    # Tree order: the masked one first, then the second of the same kind.
    np.testing.assert_allclose(logs["clip_by_global_norm/threshold"], 0.5)
    np.testing.assert_allclose(logs["clip_by_global_norm_1/threshold"], 100.0)
    np.testing.assert_allclose(logs["clip_by_global_norm/norm"], 2.0 * np.sqrt(12), rtol=1e-6)


def test_stats_without_clipper_warns_raises_or_stays_silent():
    state = optax.adam(1e-3).init(PARAMS)
    with pytest.warns(UserWarning, match="no clipper statistics"):
        assert gradclip_jax.stats(state) == {}
    with pytest.raises(ValueError, match="no clipper statistics"):
        gradclip_jax.stats(state, missing="raise")
    assert gradclip_jax.stats(state, missing="ignore") == {}


def test_stats_found_in_nnx_optimizer():
    nnx = pytest.importorskip("flax.nnx")

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = optax.chain(gradclip_jax.clip_by_global_norm(1e-3), optax.adam(1e-3))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    step(model, optimizer, jnp.ones((5, 3)))
    logs = gradclip_jax.stats(optimizer.opt_state)
    assert int(logs["clip_by_global_norm/clip_count"]) == 1
    assert logs["clip_by_global_norm/norm"].shape == ()
    assert float(logs["clip_by_global_norm/clipped_norm"]) == pytest.approx(1e-3, rel=1e-5)


def _two_clippers_chain():
    return optax.chain(
        gradclip_jax.clip_by_global_norm(1.0, name="outer"),
        gradclip_jax.zclip(name="spikes"),
        gradclip_jax.clip_by_global_norm(0.5),
        optax.sgd(0.1),
    )


def _stepped_state():
    tx = _two_clippers_chain()
    state = tx.init(PARAMS)
    _, state = tx.update(jax.tree.map(lambda x: 10 * jnp.ones_like(x), PARAMS), state, PARAMS)
    return state


def test_stats_keys_come_from_names_not_classes():
    logs = gradclip_jax.stats(_stepped_state())
    prefixes = {key.split("/")[0] for key in logs}
    assert prefixes == {"outer", "spikes", "clip_by_global_norm"}
    assert float(logs["outer/threshold"]) == 1.0
    assert float(logs["clip_by_global_norm/threshold"]) == 0.5


def test_the_same_name_twice_is_numbered_in_tree_order():
    tx = optax.chain(gradclip_jax.clip_by_value(1.0), gradclip_jax.clip_by_value(2.0))
    state = tx.init(PARAMS)
    _, state = tx.update(PARAMS, state, PARAMS)
    logs = gradclip_jax.stats(state)
    assert float(logs["clip_by_value/threshold"]) == 1.0
    assert float(logs["clip_by_value_1/threshold"]) == 2.0


@pytest.mark.parametrize("name", ["", "a/b", 3])
def test_a_bad_name_is_rejected(name):
    with pytest.raises(ValueError, match="`name` must be a non-empty string"):
        gradclip_jax.clip_by_global_norm(1.0, name=name)


def test_stats_found_in_plain_dicts_of_a_restored_checkpoint():
    state = _stepped_state()
    expected = gradclip_jax.stats(state)

    def as_plain(node):  # what a checkpoint restored without a target holds
        leaves = jax.tree_util.tree_flatten_with_path(node)[0]
        plain: dict = {}
        for path, leaf in leaves:
            cursor = plain
            keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
            for key in keys[:-1]:
                cursor = cursor.setdefault(key, {})
            cursor[keys[-1]] = np.asarray(leaf)
        return plain

    restored = gradclip_jax.stats(as_plain(state))
    assert set(restored) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(restored[key], value)


def test_stats_found_in_nnx_state_and_split():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _two_clippers_chain(), wrt=nnx.Param)
    expected = gradclip_jax.stats(optimizer.opt_state)
    assert set(gradclip_jax.stats(nnx.state(optimizer))) == set(expected)
    _, state = nnx.split(optimizer)
    assert set(gradclip_jax.stats(state)) == set(expected)


def test_a_stats_field_that_is_no_record_is_ignored():
    class Odd(NamedTuple):
        stats: jax.Array

    state = (Odd(jnp.zeros(3)), gradclip_jax.clip_by_value(1.0).init(None))
    assert set(gradclip_jax.stats(state)) == {f"clip_by_value/{f}" for f in ClipStats._fields}
