"""adaptive_clip and the named strategies: the transformation contract, end to end."""

import functools
import math
import pickle
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered

import gradclip_jax
from gradclip_jax import rules

# name -> (factory with its defaults, stats key)
STRATEGIES = {
    "adaptive_clip": (lambda **kw: gradclip_jax.adaptive_clip(**kw), "adaptive_clip"),
    "adaptive_clip_leaf": (
        lambda: gradclip_jax.adaptive_clip(rules.ema(warmup_steps=2), granularity="leaf"),
        "adaptive_clip",
    ),
    "autoclip": (gradclip_jax.autoclip, "autoclip"),
    "zclip": (gradclip_jax.zclip, "zclip"),
    "adagc": (gradclip_jax.adagc, "adagc"),
    "quantile_clip": (gradclip_jax.quantile_clip, "quantile_clip"),
}
NAMES = sorted(STRATEGIES)
FAST = ["zclip", "adagc"]  # the fast tier's representatives (tests/_tiers.py)


def _mixed_tree():
    return {
        "f32": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4),
        "bf16": jnp.full((5,), 0.5, jnp.bfloat16),
        "f16": jnp.full((2, 2), 30.0, jnp.float16),  # x1000 spikes stay below f16's max
        "c64": jnp.array([1 + 2j, -0.5j, 3.0], jnp.complex64),
    }


def _grads(step, tree):
    """Gradients that wobble with the step and spike (x1000) at step 60, after warm-ups."""
    factor = (1.0 + 0.2 * jnp.sin(step)) * jnp.where(step == 60, 1000.0, 1.0)
    return jax.tree.map(lambda x: (x * factor).astype(x.dtype), tree)


def _loop(tx, params):
    """A jitted ``run(state, start, steps, bad_step, bad)`` of ``tx`` on ``_grads``.

    At step ``bad_step`` one entry of the gradient is replaced by ``bad`` (NaN, inf).
    Step bounds are traced, so every test of a strategy shares one compilation.
    """

    @jax.jit
    def run(state, start, steps, bad_step=-1, bad=0.0):
        def body(i, carry):
            _, state = carry
            grads = _grads(i, params)
            leaf = jax.tree.leaves(grads)[0]
            poisoned = jnp.where(
                i == bad_step, leaf.ravel().at[0].set(bad).reshape(leaf.shape), leaf
            )
            grads = jax.tree.unflatten(
                jax.tree.structure(grads), [poisoned, *jax.tree.leaves(grads)[1:]]
            )
            return tx.update(grads, state, params)

        out = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(start, start + steps, body, (out, state))

    return run


@functools.cache
def _strategy_loop(name):
    tx = STRATEGIES[name][0]()
    params = {"b": jnp.ones(()), "w": jnp.arange(3.0)}
    return tx, params, _loop(tx, params)


def _layout(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", tiered(NAMES, FAST))
def test_chain_with_adam_under_jit_keeps_dtypes_shapes_and_reports(name):
    make, key = STRATEGIES[name]
    params = _mixed_tree()
    tx = optax.chain(make(), optax.adam(1e-3))
    updates, state = _loop(tx, params)(tx.init(params), 0, 64)
    assert _layout(updates) == _layout(params)
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))
    assert _layout(state) == _layout(tx.init(params))
    logs = gradclip_jax.stats(state)
    assert {f"{key}/{f}" for f in gradclip_jax.ClipStats._fields} <= set(logs)
    assert logs[f"{key}/clip_count"].dtype == jnp.int32
    assert int(logs[f"{key}/clip_count"]) >= 1  # at least the x1000 spike at step 60
    assert float(logs[f"{key}/norm"]) > 0
    assert 0 <= float(logs[f"{key}/clipped"]) <= 1
    assert float(logs[f"{key}/clipped_norm"]) <= float(logs[f"{key}/norm"]) * (1 + 1e-6)


@pytest.mark.parametrize("name", tiered(NAMES, FAST))
def test_works_inside_multisteps(name):
    make, key = STRATEGIES[name]
    params = {"b": jnp.ones(()), "w": jnp.arange(3.0)}
    tx = optax.MultiSteps(make(), every_k_schedule=2)
    _, state = _loop(tx, params)(tx.init(params), 0, 64)
    assert _layout(state) == _layout(tx.init(params))
    assert int(state.gradient_step) == 32
    assert int(gradclip_jax.stats(state)[f"{key}/clip_count"]) >= 1  # the spike at 60


@pytest.mark.parametrize("name", tiered(NAMES, FAST))
def test_state_is_fixed_size_after_10k_steps(name):
    tx, params, run = _strategy_loop(name)
    initial = tx.init(params)
    _, one = run(initial, 0, 1)
    _, many = run(initial, 0, 10_000)
    assert _layout(initial) == _layout(one) == _layout(many)
    assert all(not np.any(np.isnan(np.asarray(x))) for x in jax.tree.leaves(many))


@pytest.mark.parametrize("name", tiered(NAMES, FAST))
def test_state_survives_pickle_and_resumes_identically(name):
    tx, params, run = _strategy_loop(name)
    _, state = run(tx.init(params), 0, 5)
    restored = pickle.loads(pickle.dumps(state))
    _assert_trees_equal(restored, state)
    _assert_trees_equal(run(restored, 5, 5), run(state, 5, 5))


# ---------------------------------------------------------------------------------------
# optax.inject_hyperparams


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (gradclip_jax.zclip, {"z_thresh": 2.0}),
        (gradclip_jax.zclip, {"max_norm": 1.0, "mode": "mean", "warmup_steps": 3}),
        (gradclip_jax.zclip, {"max_norm": 1.0, "warmup_steps": 3, "reference": True}),
        (gradclip_jax.autoclip, {}),
        (gradclip_jax.autoclip, {"reference": True}),
        (gradclip_jax.adagc, {"warmup_steps": 3}),
        (gradclip_jax.quantile_clip, {"target": 0.8}),
    ],
)
def test_inject_hyperparams_matches_the_plain_transformation(factory, kwargs):
    params = {"b": jnp.ones(2), "w": jnp.arange(3.0)}
    injected = optax.inject_hyperparams(factory)(**kwargs)
    plain = factory(**kwargs)
    state = injected.init(params)
    # Every numeric argument, defaults included, is an array in the state and arrives
    # traced inside the jitted update (structural sizes come from the rule's state).
    assert {"warmup_steps", "history", "learning_rate", "p"} & set(state.hyperparams)
    assert "max_norm" not in state.hyperparams or kwargs.get("max_norm") is not None

    @jax.jit
    def run(state, plain_state):
        def body(i, carry):
            state, plain_state, _ = carry
            grads = _grads(i, params)
            out, state = injected.update(grads, state, params)
            expected, plain_state = plain.update(grads, plain_state, params)
            return state, plain_state, (out, expected)

        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.fori_loop(0, 12, body, (state, plain_state, (zeros, zeros)))

    state, plain_state, (out, expected) = run(state, plain.init(params))
    for x, y in zip(
        jax.tree.leaves((out, state.inner_state)), jax.tree.leaves((expected, plain_state))
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)


def test_injected_hyperparameters_take_effect_when_changed():
    params = jnp.zeros(2)
    tx = optax.inject_hyperparams(gradclip_jax.zclip)(z_thresh=2.0, max_norm=1.0)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(jnp.array([3.0, 4.0]), state, params)
    assert float(state.inner_state.stats.clipped_norm) == pytest.approx(1.0)
    state.hyperparams["max_norm"] = jnp.asarray(0.5)
    _, state = update(jnp.array([3.0, 4.0]), state, params)
    assert float(state.inner_state.stats.clipped_norm) == pytest.approx(0.5)
    # The cold start's first threshold is injected too.
    tx = optax.inject_hyperparams(gradclip_jax.zclip)()
    state = tx.init(params)
    state.hyperparams["initial_threshold"] = jnp.asarray(0.25)
    _, state = jax.jit(tx.update)(jnp.array([3.0, 4.0]), state, params)
    assert float(state.inner_state.stats.clipped_norm) == pytest.approx(0.25)


def test_state_size_under_a_jitted_injected_init():
    params = jnp.zeros(2)
    injected = optax.inject_hyperparams(gradclip_jax.autoclip)(history=16)
    with pytest.raises(ValueError, match=r"`history`.*static_args"):
        jax.jit(injected.init)(params)
    injected = optax.inject_hyperparams(gradclip_jax.autoclip, static_args=("history",))
    with pytest.raises(ValueError, match=r"`level_window`.*static_args"):
        jax.jit(injected(history=16).init)(params)
    sizes = ("history", "level_window")
    static = optax.inject_hyperparams(gradclip_jax.autoclip, static_args=sizes)(history=16)
    state = jax.jit(static.init)(params)
    assert state.inner_state.rule_state.norms.shape == (16,)
    assert state.inner_state.rule_state.recent.shape == (32,)


# ---------------------------------------------------------------------------------------
# Non-finite steps


@pytest.mark.parametrize("name", tiered(NAMES, FAST))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_steps_are_not_absorbed(name, bad):
    tx, params, run = _strategy_loop(name)
    _, state = run(tx.init(params), 0, 4)
    out, after = run(state, 4, 1, 4, bad)
    _assert_trees_equal(after.rule_state, state.rule_state)  # nothing absorbed
    assert not all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))
    assert not np.isnan(float(after.stats.threshold))
    # The next finite step continues as if the bad step had not happened.
    _, resumed = run(after, 5, 3)
    _, clean = run(state, 5, 3)
    _assert_trees_equal(resumed.rule_state, clean.rule_state)


def test_derivatives_through_clipping_and_state_are_finite_at_zero():
    # Meta-learning differentiates through the optimizer, its state included. The
    # initial states hold zero variances, zero histories and an infinite gamma; the
    # gradients are zero. Untaken jnp.where branches must not leak NaN derivatives.
    params = {"b": jnp.ones(()), "w": jnp.arange(3.0)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    transformations = [STRATEGIES[name][0]() for name in NAMES]

    def loss(scale, floats, tx):
        state = tx.init(params)
        leaves, treedef = jax.tree.flatten(state.rule_state)
        it = iter(floats)
        leaves = [next(it) if x.dtype == jnp.float32 else x for x in leaves]
        state = state._replace(rule_state=jax.tree.unflatten(treedef, leaves))
        grads = jax.tree.map(lambda g, p: g + scale * p, zeros, params)
        out, state = tx.update(jax.tree.map(lambda g: g * 0, grads), state, params)
        new_floats = [x for x in jax.tree.leaves(state.rule_state) if x.dtype == jnp.float32]
        finite = [jnp.where(jnp.isfinite(x), x, 0) for x in new_floats]
        return sum(jnp.sum(x) for x in jax.tree.leaves(out) + finite)

    @jax.jit
    def derivatives():
        out = []
        for tx in transformations:
            floats = [
                x for x in jax.tree.leaves(tx.init(params).rule_state) if x.dtype == jnp.float32
            ]
            out.append(jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.0), floats, tx))
        return out

    for name, value in zip(NAMES, derivatives()):
        for leaf in jax.tree.leaves(value):
            assert np.all(np.isfinite(np.asarray(leaf))), name


# ---------------------------------------------------------------------------------------
# Granularity


def test_leaf_granularity_equals_one_global_clipper_per_leaf():
    rule = rules.percentile(30.0, 4)
    tree = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5, 0.1], [3.0, 0.0]])}
    leafwise = gradclip_jax.adaptive_clip(rule, granularity="leaf")
    single = gradclip_jax.adaptive_clip(rule)

    @jax.jit
    def run():
        def step(carry, i):
            leaf_state, a_state, b_state = carry
            grads = _grads(i, tree)
            out, leaf_state = leafwise.update(grads, leaf_state)
            a, a_state = single.update(grads["a"], a_state)
            b, b_state = single.update(grads["b"], b_state)
            return (leaf_state, a_state, b_state), (out, {"a": a, "b": b})

        init = (leafwise.init(tree), single.init(tree["a"]), single.init(tree["b"]))
        return jax.lax.scan(step, init, jnp.arange(9))

    (leaf_state, a_state, b_state), (out_leaf, out_single) = run()
    assert leaf_state.rule_state.norms.shape == (2, 4)  # a leading leaf axis
    for x, y in zip(jax.tree.leaves(out_leaf), jax.tree.leaves(out_single)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
    for i, state in enumerate([a_state, b_state]):
        np.testing.assert_allclose(leaf_state.rule_state.norms[i], state.rule_state.norms, 1e-6)


def test_leaf_granularity_statistics():
    # Quantile rule with initial threshold 1: leaf "a" (norm 5) is clipped, "b" is not.
    tx = gradclip_jax.adaptive_clip(rules.quantile(initial=1.0), granularity="leaf")
    grads = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5]), "i": jnp.array([7], jnp.int32)}
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert out["i"].dtype == jnp.int32 and int(out["i"][0]) == 7
    np.testing.assert_allclose(np.asarray(out["a"]), [0.6, 0.8], rtol=1e-6)
    stats = state.stats
    assert float(stats.norm) == pytest.approx(math.hypot(5.0, 0.5))
    assert float(stats.clipped_norm) == pytest.approx(math.hypot(1.0, 0.5))
    assert float(stats.clipped) == pytest.approx(0.5)
    assert float(stats.threshold) == pytest.approx(1.0)
    assert int(stats.clip_count) == 1


def test_global_norm_across_a_mapped_axis():
    tree = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # two "devices", each half of the tree
    tx = gradclip_jax.zclip(axis_name="devices")

    @jax.jit
    def run(tree):
        state = jax.vmap(tx.init)(tree)
        return jax.vmap(tx.update, axis_name="devices")(tree, state)

    out, state = run(tree)
    np.testing.assert_allclose(np.asarray(state.stats.norm), [5.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(tree) / 5.0, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Validation and helpful errors


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        (gradclip_jax.zclip, {"z_thresh": -1.0}, "zclip: `z_thresh` must lie in [0.0, inf)"),
        (gradclip_jax.zclip, {"mode": "median"}, "zclip: `mode` must be one of"),
        (gradclip_jax.autoclip, {"p": 120.0}, "autoclip: `p` must lie in [0.0, 100.0]"),
        (gradclip_jax.autoclip, {"history": 0}, "autoclip: `history` must be an integer in [1,"),
        (gradclip_jax.adagc, {"relative": 0.5}, "adagc: `relative` must lie in [1.0, inf)"),
        (gradclip_jax.quantile_clip, {"target": 2.0}, "quantile_clip: `target` must lie in"),
        (gradclip_jax.adaptive_clip, {"granularity": "unit"}, "adaptive_clip: `granularity`"),
    ],
)
def test_invalid_arguments_raise_with_the_function_name(factory, kwargs, message):
    with pytest.raises(ValueError) as info:
        factory(**kwargs)
    assert str(info.value).startswith(message)


def test_an_object_that_is_not_a_rule_is_rejected():
    with pytest.raises(TypeError, match=r"adaptive_clip: `rule` must have methods .* lacks"):
        gradclip_jax.adaptive_clip(rule=object())


class _GrowingState(NamedTuple):
    norms: jax.Array


class _GrowingRule:
    """A broken rule whose state grows: adaptive_clip must say so."""

    def init(self):
        return _GrowingState(jnp.zeros((1,)))

    def step(self, state, norm, global_norm):
        return jnp.inf, _GrowingState(jnp.append(state.norms, norm))


def test_a_rule_whose_state_changes_shape_is_rejected():
    tx = gradclip_jax.adaptive_clip(_GrowingRule())
    with pytest.raises(ValueError, match="changed the layout of the rule's state"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))


def test_leaf_count_mismatch_is_explained():
    tx = gradclip_jax.adagc()
    state = tx.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="2 inexact leaves but the state was built for 1"):
        tx.update({"a": jnp.ones(2), "b": jnp.ones(2)}, state)


def test_a_leaf_state_for_floats_meets_a_tree_without_them_and_says_so():
    tx = gradclip_jax.adagc()
    state = tx.init({"a": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="0 inexact leaves but the state was built for 2"):
        tx.update({"a": None, "b": jnp.arange(2)}, state)
    # A state built for a tree without float leaves (one unused row) takes one again.
    empty = tx.init({"i": jnp.arange(2)})
    out, after = jax.jit(tx.update)({"i": jnp.arange(2)}, empty)
    assert jax.tree.map(lambda x: x.shape, after) == jax.tree.map(lambda x: x.shape, empty)
    assert out["i"].dtype == jnp.arange(2).dtype


# ---------------------------------------------------------------------------------------
# Training with rare gradient spikes


def test_zclip_tames_injected_gradient_spikes_in_training():
    rng = np.random.default_rng(0)  # NumPy data: no compilation before the training
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = np.sin(x @ rng.standard_normal(4)) + 0.05 * rng.standard_normal(64)
    y = y.astype(np.float32)
    params = {
        "w1": jnp.asarray(0.5 * rng.standard_normal((4, 16)), jnp.float32),
        "b1": jnp.zeros(16),
        "w2": jnp.asarray(0.5 * rng.standard_normal(16), jnp.float32),
        "b2": jnp.zeros(()),
    }
    spike_steps = np.array([60, 110, 160])
    multiplier = np.ones(200, np.float32)
    multiplier[spike_steps] = 1000.0  # rare corrupted batches: gradients x1000

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

    def train(clipper):
        tx = optax.chain(clipper, optax.sgd(0.1))

        @jax.jit
        def run(params):
            def step(carry, m):
                params, state = carry
                grads = jax.grad(lambda p: m * loss_fn(p))(params)
                updates, state = tx.update(grads, state, params)
                logs = gradclip_jax.stats(state, missing="ignore")
                clipped = logs.get("zclip/clipped", jnp.zeros(()))
                return (optax.apply_updates(params, updates), state), clipped

            init = (params, tx.init(params))
            (params, state), clipped = jax.lax.scan(step, init, jnp.asarray(multiplier))
            return loss_fn(params), state, clipped

        return run(params)

    initial_loss = float(loss_fn(params))
    loss_plain, _, _ = train(optax.identity())
    loss_zclip, state, clipped = train(gradclip_jax.zclip(max_norm=None))
    assert float(loss_zclip) < 0.5 * initial_loss
    assert float(loss_zclip) < 0.5 * float(loss_plain)  # 4x to 3000x across seeds
    # The spikes, and during warm-up at most the cold start's first step (clipped to
    # initial_threshold=1 when its norm exceeds it).
    clipped_steps = np.flatnonzero(np.asarray(clipped))
    np.testing.assert_array_equal(clipped_steps[clipped_steps >= 25], spike_steps)
    assert set(clipped_steps[clipped_steps < 25]) <= {0}
