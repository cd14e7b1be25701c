"""Tests of the guards: skip_on_spike and on_nonfinite."""

import math
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tiers import tiered

import gradclip_jax
from gradclip_jax import on_nonfinite, skip_on_spike

# Errors raised from the host callback reach the caller as FloatingPointError (eager
# dispatch of the callback itself) or as jax's runtime error (a RuntimeError) under jit.
CALLBACK_ERRORS = (FloatingPointError, RuntimeError)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(np.array_equal(x, y, equal_nan=True) for x, y in zip(la, lb))


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# ----------------------------------------------------------------- a small model


def _mlp_loss(params, x, y):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean((hidden @ params["w2"] - y) ** 2)


def _init_mlp(seed):
    rng = np.random.default_rng(seed)
    return {
        "w1": (0.5 * rng.standard_normal((4, 16))).astype(np.float32),
        "b1": np.zeros(16, np.float32),
        "w2": (0.25 * rng.standard_normal((16, 1))).astype(np.float32),
    }


def _data(seed, steps, batch=16):
    """Batches of a regression task the model can fit; NumPy, so nothing compiles."""
    xs = np.random.default_rng(seed).standard_normal((steps, batch, 4)).astype(np.float32)
    direction = np.array([[0.5], [-0.3], [0.2], [0.4]], np.float32)
    return xs, np.tanh(xs @ direction)


def _train(tx, params, xs, ys, x_eval, y_eval):
    """Runs ``tx`` over the batches with ``lax.scan`` (one compilation).

    Returns the final parameters and state, the training losses, and the loss on the
    evaluation batch before and after training.
    """

    @jax.jit
    def run(params, xs, ys):
        def step(carry, batch):
            params, state = carry
            loss, grads = jax.value_and_grad(_mlp_loss)(params, *batch)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        init = (params, tx.init(params))
        (final, state), losses = jax.lax.scan(step, init, (xs, ys))
        evals = _mlp_loss(params, x_eval, y_eval), _mlp_loss(final, x_eval, y_eval)
        return final, state, losses, evals

    return run(params, xs, ys)


def test_skip_nonfinite_batches_matches_run_without_them():
    steps = 300
    xs, ys = _data(0, steps)
    poisoned = np.arange(steps) % 50 == 49  # 6 batches whose gradients are NaN
    xs_bad = xs.copy()
    xs_bad[poisoned, 0, 0] = np.nan
    x_eval, y_eval = _data(2, 1, batch=256)
    params = _init_mlp(1)
    adam = optax.adam(1e-2)

    guarded = on_nonfinite(adam, policy="skip")
    guarded_params, state, losses, (_, guarded_loss) = _train(
        guarded, params, xs_bad, ys, x_eval[0], y_eval[0]
    )
    clean_params, clean_state, _, (initial_loss, clean_loss) = _train(
        adam, params, xs[~poisoned], ys[~poisoned], x_eval[0], y_eval[0]
    )

    assert np.isnan(losses[poisoned]).all()  # the poison really reached the gradients
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(guarded_params))
    # Skipped steps leave Adam's state as it was, so Adam counted only the clean steps.
    assert int(state.inner_state[0].count) == int(clean_state[0].count) == steps - 6
    logs = gradclip_jax.stats(state)
    assert int(logs["on_nonfinite/nonfinite_count"]) == 6
    # Same arithmetic on every accepted step: the two programs differ only in XLA's
    # fusion choices, so only float32 round-off separates them (observed: 4e-7 relative
    # on the loss, 6e-7 on the weights). Adam normalises each update, so an ulp-level
    # difference moves a weight by about lr * 1e-7 per step: ~1e-5 bounds 294 steps.
    np.testing.assert_allclose(guarded_loss, clean_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(guarded_params), jax.tree.leaves(clean_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert clean_loss < 0.1 * initial_loss  # the model did learn


@pytest.fixture(scope="module")
def skip_adam():
    """A jitted on_nonfinite(adam, "skip") update and a state after two clean steps."""
    tx = on_nonfinite(optax.adam(1e-2), policy="skip")
    update = jax.jit(tx.update)
    params = _init_mlp(3)
    state = tx.init(params)
    for scale in (1.0, -0.5):
        grads = jax.tree.map(lambda p, s=scale: np.full_like(p, s), params)
        _, state = update(grads, state, params)
    return update, params, state


def test_skipped_step_keeps_adam_moments_bit_for_bit(skip_adam):
    update, params, state = skip_adam
    grads = jax.tree.map(np.ones_like, params)
    grads["w1"][1, 2] = np.nan
    updates, new_state = update(grads, state, params)

    assert _leaves_equal(new_state.inner_state, state.inner_state)
    assert all(not np.any(leaf) for leaf in jax.tree.leaves(updates))
    assert _avals(updates) == _avals(params)
    stats = new_state.stats
    assert (int(stats.nonfinite), int(stats.nonfinite_count), int(stats.consecutive)) == (1, 1, 1)

    # A finite step afterwards resets the consecutive count and moves Adam again.
    updates, after = update(jax.tree.map(np.ones_like, params), new_state, params)
    assert int(after.inner_state[0].count) == int(state.inner_state[0].count) + 1
    assert (int(after.stats.consecutive), int(after.stats.nonfinite_count)) == (0, 1)
    assert all(np.any(leaf) for leaf in jax.tree.leaves(updates))


GUARD_DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64"]


@pytest.mark.parametrize("dtype", tiered(GUARD_DTYPES, fast=["float16", "complex64"]))
def test_nonfinite_check_finds_one_bad_entry_in_any_leaf_and_dtype(dtype):
    """The check is a float sum of x - x: one NaN or inf anywhere, in a stacked small
    leaf or a large one, makes it NaN, and the largest finite values do not overflow it."""
    dtype = jnp.dtype(dtype)
    largest = float(jnp.finfo(dtype).max)
    tree = {  # two small leaves of one shape (stacked), a large one, zero-size, scalar
        "a": np.full((3, 4), largest, np.float32),
        "b": np.full((3, 4), -largest, np.float32),
        "big": np.full((80, 80), largest, np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "s": np.float32(1.0),
    }
    tx = on_nonfinite(optax.identity(), policy="propagate")
    update = jax.jit(tx.update)
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), t)
    state = tx.init(cast(tree))
    _, state = update(cast(tree), state)
    assert int(state.stats.record.nonfinite) == 0
    bad_values = [np.nan] if dtype == jnp.float8_e4m3fn else [np.nan, np.inf, -np.inf]
    complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
    host = np.complex64 if complex_ else np.float32
    for key, index in [("a", (1, 2)), ("b", (0, 0)), ("big", (79, 3)), ("s", ())]:
        for bad in bad_values:
            grads = {k: np.array(v, host) for k, v in tree.items()}
            grads[key][index] = complex(0.0, bad) if complex_ else bad  # complex: imaginary part
            _, after = update(cast(grads), state)
            assert int(after.stats.record.nonfinite) == 1, (key, bad)


def test_skip_branch_traced_first_takes_its_zeros_from_eval_shape(monkeypatch):
    """The zeros of a skipped step reuse the types recorded when lax.cond traces the
    inner update; if jax traced the skip branch first, they come from eval_shape."""
    from gradclip_jax import _guards

    cond = jax.lax.cond
    swapped = lambda pred, true_fun, false_fun: cond(~pred, false_fun, true_fun)
    monkeypatch.setattr(_guards.lax, "cond", swapped)
    tx = on_nonfinite(optax.adam(0.1, mu_dtype=jnp.float32), policy="skip")
    params = {"w": jnp.zeros(3, jnp.bfloat16)}
    state = tx.init(params)
    bad = {"w": jnp.array([1.0, jnp.nan, 2.0], jnp.bfloat16)}
    updates, after = jax.jit(tx.update)(bad, state, params)
    assert int(after.inner_state[0].count) == 0 and not np.any(np.asarray(updates["w"]))
    good, after = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    assert int(after.inner_state[0].count) == 1 and np.all(np.asarray(good["w"]) != 0)
    # Adam with mu_dtype=float32 turns bfloat16 gradients into float32 updates.
    assert updates["w"].dtype == good["w"].dtype == jnp.float32


def test_zero_policy_zeroes_nonfinite_entries_before_inner():
    inner = optax.adam(0.1)
    tx = on_nonfinite(inner, policy="zero")
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    grads = {
        "a": jnp.array([1.0, jnp.nan, -2.0]),
        "b": jnp.array([[jnp.inf, 3.0], [-jnp.inf, 1.0]]),
    }
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    cleaned = {"a": jnp.array([1.0, 0.0, -2.0]), "b": jnp.array([[0.0, 3.0], [0.0, 1.0]])}
    expected, expected_state = jax.jit(inner.update)(cleaned, inner.init(params), params)
    assert _leaves_equal(updates, expected)
    assert _leaves_equal(state.inner_state, expected_state)
    assert int(gradclip_jax.stats(state)["on_nonfinite/nonfinite_count"]) == 1


def test_propagate_passes_gradients_through_and_counts():
    tx = on_nonfinite(optax.sgd(1.0), policy="propagate")
    grads = {"w": jnp.array([1.0, jnp.nan])}
    updates, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert np.isnan(updates["w"][1]) and updates["w"][0] == -1.0
    assert int(gradclip_jax.stats(state)["on_nonfinite/consecutive"]) == 1


def test_raise_under_jit_names_the_offending_leaf():
    tx = on_nonfinite(optax.adam(0.1), policy="raise")
    params = {"encoder": {"kernel": jnp.zeros((2, 2))}, "head": {"bias": jnp.zeros(3)}}
    update = jax.jit(tx.update)
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    updates, _ = update(good, state, params)  # finite steps pass through
    assert all(np.all(leaf != 0) for leaf in jax.tree.leaves(updates))

    bad = {"encoder": good["encoder"], "head": {"bias": jnp.array([0.0, jnp.inf, 1.0])}}
    with pytest.raises(
        CALLBACK_ERRORS, match=r"non-finite .* in 1 of 2 leaves: \['head'\]\['bias'\]\."
    ):
        jax.block_until_ready(update(bad, state, params))


@pytest.mark.parametrize("batched", [False, True], ids=["one state", "vmap over states"])
def test_raise_names_the_bad_leaves_among_many_of_one_shape(batched):
    """The per-leaf flags are computed per stack of leaves of one shape (and dtype) and
    put back in leaf order on the host: the message names exactly the bad leaves, here
    inside and at the ends of stacks of 40 and 12 leaves, beside lone ones; under vmap
    over states, those of the one row that has them."""
    params = {f"a{i:02d}": jnp.zeros((2, 3)) for i in range(40)}
    params |= {f"b{i:02d}": jnp.zeros(5, jnp.bfloat16) for i in range(12)}
    params |= {"c": jnp.zeros(7), "d": jnp.zeros((), jnp.complex64)}
    bad = {"a00": (0, 1), "a17": (1, 2), "b11": (4,), "d": ()}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = on_nonfinite(optax.sgd(0.1), policy="raise")
    if batched:  # row 1 has the bad leaves; rows 0 and 2 are clean
        grads = jax.tree.map(lambda x: jnp.stack([x] * 3), grads)
        grads = {k: v.at[(1, *bad[k])].set(jnp.nan) if k in bad else v for k, v in grads.items()}
        states = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
        update = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None)))
    else:
        grads = {k: v.at[bad[k]].set(jnp.nan) if k in bad else v for k, v in grads.items()}
        states, update = tx.init(params), jax.jit(tx.update)
    listed = re.escape("['a00'], ['a17'], ['b11'], ['d']")
    with pytest.raises(CALLBACK_ERRORS, match=rf"in 4 of 54 leaves: {listed}\."):
        jax.block_until_ready(update(grads, states, params))


@pytest.mark.parametrize("policy", ["skip", "zero", "propagate"])
def test_max_consecutive_raises_after_the_limit(policy):
    tx = on_nonfinite(optax.sgd(1.0), policy=policy, max_consecutive=2)
    update = jax.jit(tx.update)
    good, bad = {"w": jnp.ones(2)}, {"w": jnp.array([jnp.nan, 1.0])}
    state = tx.init(good)
    for grads in (bad, bad, good, bad, bad):  # a finite step restarts the count
        updates, state = update(grads, state)
    assert int(state.stats.consecutive) == 2 and int(state.stats.nonfinite_count) == 4
    with pytest.raises(CALLBACK_ERRORS, match=r"3 consecutive .* max_consecutive=2.*\['w'\]"):
        jax.block_until_ready(update(bad, state))


# ------------------------------------------------------------------------- spikes


def _norm_sequence_run(tx, norms, seed=0):
    """Feeds gradients of the given global norms (random directions) through ``tx``.

    Returns the per-step ``skipped`` flags, the updates' norms and the final state.
    """
    directions = np.random.default_rng(seed).standard_normal((len(norms), 8))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    grads = (directions * np.asarray(norms)[:, None]).astype(np.float32)

    @jax.jit
    def run(grads):
        def step(state, g):
            updates, state = tx.update({"g": g}, state)
            return state, (state.stats.skipped, jnp.linalg.norm(updates["g"]))

        return jax.lax.scan(step, tx.init({"g": grads[0]}), grads)

    state, (skipped, update_norms) = run(grads)
    return np.asarray(skipped), np.asarray(update_norms), state


def _drifting_norms(steps=400, seed=1):
    """Norms growing 20-fold over the run, with 5% noise."""
    noise = 1 + 0.05 * np.random.default_rng(seed).standard_normal(steps)
    return np.geomspace(1.0, 20.0, steps) * noise


def test_x1000_spike_is_skipped_and_gradual_drift_is_not():
    tx = skip_on_spike(optax.sgd(1.0), window=32)
    norms = _drifting_norms()
    skipped, _, state = _norm_sequence_run(tx, norms)
    assert skipped.sum() == 0
    assert int(state.stats.last_spike_step) == -1

    spiky = norms.copy()
    spiky[300] *= 1000
    spiky[310] *= 100  # a second spike soon after the first is still caught
    skipped, update_norms, state = _norm_sequence_run(tx, spiky)
    assert np.flatnonzero(skipped).tolist() == [300, 310]
    assert update_norms[300] == 0 and update_norms[310] == 0 and update_norms[301] > 0
    logs = gradclip_jax.stats(state)
    assert int(logs["skip_on_spike/skip_count"]) == 2
    assert int(logs["skip_on_spike/last_spike_step"]) == 310
    np.testing.assert_allclose(logs["skip_on_spike/last_spike_value"], spiky[310], rtol=1e-5)


def test_lasting_change_of_scale_is_adopted_after_a_few_skips():
    # Skipped values enter the window clamped to the threshold: a lasting x10 jump is
    # skipped for a while, then becomes the new baseline (it is not skipped forever).
    norms = np.concatenate([np.ones(64), 10 * np.ones(200)])
    norms *= 1 + 0.05 * np.random.default_rng(2).standard_normal(norms.size)
    skipped, _, _ = _norm_sequence_run(skip_on_spike(optax.sgd(1.0), window=32), norms)
    assert skipped[:64].sum() == 0
    assert 3 <= skipped[64:].sum() <= 60
    assert skipped[-100:].sum() == 0


def test_nonfinite_norm_is_skipped_even_in_warm_up_and_kept_out_of_the_window():
    tx = skip_on_spike(optax.sgd(1.0), window=4)
    update = jax.jit(tx.update)
    state = tx.init({"g": jnp.zeros(2)})
    _, state = update({"g": jnp.array([1.0, 0.0])}, state)
    updates, new_state = update({"g": jnp.array([jnp.nan, 0.0])}, state)
    assert not np.any(updates["g"])
    assert int(new_state.stats.skipped) == 1
    assert int(new_state.norm_rule.count) == int(state.norm_rule.count) == 1
    assert np.isfinite(new_state.norm_rule.values).all()


def test_watch_loss_skips_a_loss_spike_and_passes_the_loss_on():
    seen = []

    def recording_sgd():
        sgd = optax.sgd(1.0)

        def update(updates, state, params=None, **extra):
            seen.append(sorted(extra))
            return sgd.update(updates, state, params)

        return optax.GradientTransformationExtraArgs(sgd.init, update)

    tx = skip_on_spike(recording_sgd(), window=8, min_history=4, watch="loss")
    update = jax.jit(tx.update)
    state = tx.init({"g": jnp.zeros(2)})
    grads = {"g": jnp.array([1.0, 1.0])}  # constant norm: only the loss can spike
    for loss in [2.0, 2.1, 1.9, 2.0, 2.05]:
        _, state = update(grads, state, loss=jnp.asarray(loss))
    updates, state = update(grads, state, loss=jnp.asarray(50.0))
    assert not np.any(updates["g"])
    assert int(state.stats.skip_count) == 1
    assert float(state.stats.last_spike_value) == 50.0
    assert np.isinf(state.stats.norm_threshold) and np.isfinite(state.stats.loss_threshold)
    assert state.norm_rule == () and state.loss_rule.values.shape == (8,)
    assert seen and seen[0] == ["loss"]

    with pytest.raises(ValueError, match=r"skip_on_spike\(watch='loss'\) needs the loss"):
        tx.update(grads, state)
    with pytest.raises(ValueError, match=r"`loss` must be a scalar; .* shape \(3,\)"):
        tx.update(grads, state, loss=jnp.ones(3))


def test_watch_both_skips_on_either():
    tx = skip_on_spike(optax.sgd(1.0), window=8, min_history=4, watch="both")
    update = jax.jit(tx.update)
    state = tx.init({"g": jnp.zeros(2)})
    base = np.array([1.0, 1.1, 0.9, 1.0, 1.05])
    for value in base:
        _, state = update({"g": jnp.array([value, 0.0])}, state, loss=jnp.asarray(value))
    _, norm_spike = update({"g": jnp.array([100.0, 0.0])}, state, loss=jnp.asarray(1.0))
    _, loss_spike = update({"g": jnp.array([1.0, 0.0])}, state, loss=jnp.asarray(100.0))
    _, calm = update({"g": jnp.array([1.0, 0.0])}, state, loss=jnp.asarray(1.0))
    assert [int(s.stats.skipped) for s in (norm_spike, loss_spike, calm)] == [1, 1, 0]


# ------------------------------------------------------------ composition contracts


def _guard_cases():
    return {
        "skip_on_spike": lambda inner: skip_on_spike(inner, window=8, min_history=2),
        "on_nonfinite": lambda inner: on_nonfinite(inner, max_consecutive=3),
    }


@pytest.mark.parametrize("guard", sorted(_guard_cases()))
def test_state_is_stable_through_multisteps_and_chain(guard):
    wrap = _guard_cases()[guard]
    inner = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.adam(1e-2))
    tx = optax.MultiSteps(wrap(inner), every_k_schedule=2)
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in 1.0 + 0.1 * np.arange(5):
        grads = jax.tree.map(lambda p, s=scale: np.full(p.shape, s, np.float32), params)
        _, new_state = update(grads, state, params)
        assert _avals(new_state) == _avals(state)
        state = new_state
    assert _leaves_equal(pickle.loads(pickle.dumps(state)), state)
    guard_state = state.inner_opt_state
    for leaf in jax.tree.leaves(guard_state._replace(inner_state=())):
        assert leaf.dtype in (jnp.int32, jnp.float32)  # never bool
    logs = gradclip_jax.stats(state)
    assert f"{guard}/" + ("skip_count" if guard == "skip_on_spike" else "nonfinite_count") in logs
    assert int(logs["clip_by_global_norm/clip_count"]) == 2  # two emitted steps, both clipped


def test_guards_in_nnx_optimizer_get_the_loss_and_skip():
    nnx = pytest.importorskip("flax.nnx")

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    guard = skip_on_spike(optax.adam(1e-2), window=8, min_history=2, watch="both")
    optimizer = nnx.Optimizer(model, on_nonfinite(guard), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads, loss=loss)

    x = np.ones((5, 3), np.float32)
    for scale in (1.0, 1.1, 0.9):
        step(model, optimizer, scale * x)
    kernel = np.array(model.kernel[...])
    step(model, optimizer, np.full((5, 3), np.nan, np.float32))
    np.testing.assert_array_equal(model.kernel[...], kernel)
    logs = gradclip_jax.stats(optimizer.opt_state)
    assert int(logs["on_nonfinite/nonfinite_count"]) == 1
    assert int(logs["skip_on_spike/skip_count"]) == 0  # the NaN step never reached it
    assert np.isfinite(logs["skip_on_spike/loss_threshold"])


def test_guard_around_multisteps_rejects_a_bad_micro_batch():
    multi = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    tx = on_nonfinite(multi.gradient_transformation())
    params = {"w": jnp.zeros(2)}
    update = jax.jit(tx.update)
    _, state = update({"w": jnp.ones(2)}, tx.init(params), params)
    _, bad_state = update({"w": jnp.array([jnp.nan, 1.0])}, state, params)
    assert _leaves_equal(bad_state.inner_state, state.inner_state)
    updates, state = update({"w": jnp.full(2, 3.0)}, bad_state, params)
    assert int(state.inner_state.gradient_step) == 1
    assert np.isfinite(updates["w"]).all() and np.all(updates["w"] != 0)


def test_stats_of_guard_and_inner_clipper_are_both_found():
    tx = on_nonfinite(
        skip_on_spike(optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.adam(1e-3)))
    )
    params = {"w": jnp.zeros(2)}
    _, state = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    logs = gradclip_jax.stats(state)
    assert float(logs["skip_on_spike/norm"]) == pytest.approx(5.0)
    assert float(logs["clip_by_global_norm/norm"]) == pytest.approx(5.0)
    assert int(logs["on_nonfinite/nonfinite"]) == 0
    assert int(logs["skip_on_spike/last_spike_step"]) == -1


def test_guards_around_adaptive_clip_keep_its_history_clean():
    # A skipped step must not reach the adaptive rule either: its EMA of norms stays as
    # it was, so a spike or a NaN batch does not distort later thresholds.
    inner = optax.chain(gradclip_jax.adaptive_clip(), optax.adam(1e-2))
    tx = on_nonfinite(skip_on_spike(inner, window=16, min_history=4))
    params = {"w": np.zeros(3, np.float32)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(8):
        grads = {"w": np.full(3, 1.0 + 0.05 * (step % 3), np.float32)}
        _, state = update(grads, state, params)
    inner_before = state.inner_state.inner_state
    for poison in (np.nan, 1e4):  # a non-finite step, then a x10^4 spike
        updates, new_state = update({"w": np.full(3, poison, np.float32)}, state, params)
        assert not np.any(updates["w"])
        assert _leaves_equal(new_state.inner_state.inner_state, inner_before)
        state = new_state
    logs = gradclip_jax.stats(state)
    assert int(logs["on_nonfinite/nonfinite_count"]) == 1
    assert int(logs["skip_on_spike/skip_count"]) == 1
    assert "adaptive_clip/threshold" in logs


def test_inject_hyperparams_traces_every_numeric_argument():
    factory = optax.inject_hyperparams(skip_on_spike)
    tx = factory(inner=optax.adam(0.1), sigma=6.0, window=16)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    assert set(state.hyperparams) == {"window", "sigma"}
    update = jax.jit(tx.update)
    for value in [1.0, 1.1, 0.9, 1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 1000.0]:
        _, state = update({"w": jnp.array([value, 0.0])}, state, params)
    assert int(gradclip_jax.stats(state)["skip_on_spike/skip_count"]) == 1
    assert state.inner_state.norm_rule.values.shape == (16,)

    # A jitted init traces `window` too: a clear error, and static_args fixes it.
    with pytest.raises(ValueError, match=r"`window` sets the size .*static_args=\('window',\)"):
        jax.jit(tx.init)(params)
    fixed = optax.inject_hyperparams(skip_on_spike, static_args=("window",))(
        inner=optax.adam(0.1), window=16
    )
    assert jax.jit(fixed.init)(params).inner_state.norm_rule.values.shape == (16,)

    nonfinite = optax.inject_hyperparams(on_nonfinite)(inner=optax.sgd(1.0), max_consecutive=1)
    state = nonfinite.init(params)
    update = jax.jit(nonfinite.update)
    _, state = update({"w": jnp.array([jnp.nan, 0.0])}, state, params)
    with pytest.raises(CALLBACK_ERRORS, match="max_consecutive=1"):
        jax.block_until_ready(update({"w": jnp.array([jnp.nan, 0.0])}, state, params))


def test_guard_around_an_injected_optimizer():
    inner = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    tx = on_nonfinite(inner)
    params = {"w": jnp.zeros(2)}
    update = jax.jit(tx.update)
    _, state = update({"w": jnp.ones(2)}, tx.init(params), params)
    _, skipped = update({"w": jnp.array([jnp.inf, 0.0])}, state, params)
    assert _leaves_equal(skipped.inner_state, state.inner_state)


def test_skip_zeros_match_the_inner_output_dtypes():
    # Adam with a float32 first moment turns bfloat16 gradients into float32 updates;
    # the zeros of a skipped step must have the same dtype for lax.cond.
    tx = on_nonfinite(optax.adam(0.1, mu_dtype=jnp.float32))
    params = {"w": jnp.zeros(2, jnp.bfloat16)}
    update = jax.jit(tx.update)
    good, _ = update({"w": jnp.ones(2, jnp.bfloat16)}, tx.init(params), params)
    bad = {"w": jnp.array([jnp.nan, 1.0], jnp.bfloat16)}
    skipped, _ = update(bad, tx.init(params), params)
    assert _avals(skipped) == _avals(good)


def test_axis_name_makes_every_shard_take_the_same_decision():
    # vmap with an axis name stands in for shard_map: each row is one device's shard.
    spike = skip_on_spike(optax.sgd(1.0), window=4, axis_name="devices")
    nonfinite = on_nonfinite(optax.sgd(1.0), axis_name="devices")
    shards = jnp.array([[3.0, 0.0], [0.0, 4.0]])

    def per_device(tx):
        def step(g):
            updates, state = tx.update({"g": g}, tx.init({"g": g}))
            return updates["g"], state.stats

        return jax.jit(jax.vmap(step, axis_name="devices"))

    _, stats = per_device(spike)(shards)
    np.testing.assert_allclose(stats.norm, [5.0, 5.0])

    poisoned = np.array([[3.0, 0.0], [np.nan, 4.0]], np.float32)
    updates, stats = per_device(nonfinite)(poisoned)
    assert stats.nonfinite.tolist() == [1, 1]
    assert not np.any(updates)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: skip_on_spike(optax.sgd(1.0), window=1),
            r"skip_on_spike: `window` must be an integer in \[2, .*; got 1",
        ),
        (lambda: skip_on_spike(optax.sgd(1.0), window=8.5), r"`window` .* got 8.5"),
        (
            lambda: skip_on_spike(optax.sgd(1.0), sigma=0.0),
            r"skip_on_spike: `sigma` .*\(0.0, inf\]",
        ),
        (lambda: skip_on_spike(optax.sgd(1.0), sigma=-1), r"`sigma` .* got -1"),
        (lambda: skip_on_spike(optax.sgd(1.0), sigma=math.nan), r"`sigma` .* got nan"),
        (
            lambda: skip_on_spike(optax.sgd(1.0), min_history=1),
            r"`min_history` must be an integer in \[2, .*; got 1",
        ),
        (
            lambda: skip_on_spike(optax.sgd(1.0), window=8, min_history=9),
            r"`min_history` must lie in \[2, window=8\]; got 9",
        ),
        (lambda: skip_on_spike(optax.sgd(1.0), watch="grad"), r"`watch` .* got 'grad'"),
        (lambda: skip_on_spike(optax.adam), r"`inner` .* call it, e.g. `optax.adam\(1e-3\)`"),
        (lambda: on_nonfinite(optax.sgd(1.0), policy="nan"), r"on_nonfinite: `policy` .* 'nan'"),
        (
            lambda: on_nonfinite(optax.sgd(1.0), max_consecutive=-1),
            r"on_nonfinite: `max_consecutive` must be an integer in \[0, .*; got -1",
        ),
        (
            lambda: on_nonfinite(optax.sgd(1.0), policy="raise", max_consecutive=3),
            r"`max_consecutive` has no effect with policy='raise'",
        ),
        (lambda: on_nonfinite(None), r"on_nonfinite: `inner` must be an optax transformation"),
    ],
)
def test_invalid_hyperparameters_are_rejected_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_sigma_inf_skips_only_nonfinite_values():
    norms = np.ones(40)
    norms[30] = 1e6
    skipped, _, _ = _norm_sequence_run(
        skip_on_spike(optax.sgd(1.0), window=8, sigma=math.inf), norms
    )
    assert skipped.sum() == 0


def test_raise_policy_under_vmap_over_states_is_quiet_on_clean_steps():
    tx = on_nonfinite(optax.sgd(0.1), policy="raise")
    params = {"w": jnp.zeros(3)}
    states = jax.vmap(lambda _: tx.init(params))(jnp.arange(4))
    update = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
    for _ in range(3):
        _, states = update({"w": jnp.ones(3)}, states, params)
    assert np.all(np.asarray(gradclip_jax.stats(states)["on_nonfinite/nonfinite_count"]) == 0)
    batched = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None)))
    grads = {"w": jnp.ones((4, 3)).at[2, 1].set(jnp.nan)}
    with pytest.raises(Exception, match=r"FloatingPointError.*\['w'\]"):
        jax.block_until_ready(batched(grads, states, params))


def test_skip_with_max_consecutive_under_vmap_raises_only_past_the_limit():
    tx = on_nonfinite(optax.sgd(0.1), max_consecutive=2)
    params = {"w": jnp.zeros(2)}
    states = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
    update = jax.jit(jax.vmap(tx.update, in_axes=(None, 0, None)))
    for _ in range(3):
        _, states = update({"w": jnp.ones(2)}, states, params)
    for _ in range(2):
        _, states = update({"w": jnp.full(2, jnp.nan)}, states, params)
    with pytest.raises(Exception, match="3 consecutive steps"):
        jax.block_until_ready(update({"w": jnp.full(2, jnp.nan)}, states, params))


@pytest.mark.slow
def test_extra_arguments_reach_a_multisteps_inner_transformation():
    inner = optax.MultiSteps(
        skip_on_spike(optax.sgd(1.0), watch="both", window=4, min_history=2), every_k_schedule=2
    ).gradient_transformation()
    tx = on_nonfinite(inner)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    for step in range(4):
        _, state = tx.update({"w": jnp.ones(2)}, state, params, loss=jnp.asarray(1.0 + step))
    assert int(gradclip_jax.stats(state)["skip_on_spike/skip_count"]) == 0


def test_raise_policy_error_types_eager_and_under_jit_are_as_documented():
    # docs/numerics.md: jax.errors.JaxRuntimeError eagerly and under jit, carrying the
    # FloatingPointError text and the leaf path; FloatingPointError under disable_jit.
    guard = gradclip_jax.on_nonfinite(optax.sgd(0.1), policy="raise")
    bad = {"w": jnp.array([1.0, jnp.nan])}
    state = guard.init(bad)
    for update in (guard.update, jax.jit(guard.update)):
        with pytest.raises(jax.errors.JaxRuntimeError, match=r"FloatingPointError.*\['w'\]"):
            jax.block_until_ready(update(bad, state))
    with jax.disable_jit(), pytest.raises(FloatingPointError, match=r"\['w'\]"):
        jax.block_until_ready(guard.update(bad, state))
