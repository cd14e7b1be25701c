"""Adversarial invariants of every public transformation.

Every transformation of ``tests/_invariant_cases.py`` (``CASES``: the clippers, the
adaptive rules, the guards with each policy, ``dp_aggregate``; ``per_example_clip``
at the end) meets the matrix

* dtypes: float16, bfloat16, float32, float64 (x64), complex64, float8 (e4m3fn, e5m2),
  int and bool leaves;
* trees: empty, ``None`` leaves, scalars, zero-size arrays, mixed dtypes, sharded
  leaves (with more than one device); 1,000 leaves and drawn layouts are in
  ``tests/test_invariants_scale.py``;
* execution: eager, jit, vmap over states, ``lax.scan``, donation of a fresh state,
  ``optax.inject_hyperparams`` of every numeric hyperparameter, ``optax.MultiSteps``,
  ``optax.masked``, Orbax save / restore (slow);
* values: zeros, subnormals, huge entries, NaN, Inf, -0.0;

and every update is checked by ``check_step``: layout of updates and state, no
non-finite value that the input does not explain, bounds (global, per leaf, per unit,
per entry) measured in float64 with the direction kept, non-finite steps handled as
documented (docs/numerics.md, the guards' docstrings); and no retracing across steps.

Design: every value kind meets every transformation on the mixed-dtype tree under jit
(``test_values_under_jit``), in the fast tier. Each other axis is a test over every
transformation; the fast tier runs the transformations that ``FAST`` lists for it,
chosen so that each transformation meets at least one execution mode and the dangerous
pairs are there (float8 x jit, x64 x scan, NaN x vmap, zero-size x donation);
``-m slow`` runs the whole matrix. A known library defect would be a strict xfail (the
``xfail`` argument of ``over``) whose reason is a minimal reproduction; none is open. The
defects this suite found are regression cases now, with comments saying what they were.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _invariant_cases import (
    BATCH,
    CASES,
    NAMES,
    RAISED,
    SPECS,
    Case,
    Jitted,
    assert_bitwise_equal,
    assert_same_layout,
    assert_trees_close,
    check_step,
    clipped_sum,
    drawn_tree,
    fill,
    finite_tree,
    inexact,
    norm64,
    params_like,
    row,
    run,
    sequence,
    spec_for,
    stack,
    step,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import gradclip_jax

# --------------------------------------------------------------------------- tiers

LEAF_GRANULARITY = ["clip_by_leaf_norm", "clip_by_block_rms", "adaptive_clip_leaf", "adagc"]
ON_NONFINITE = [n for n in NAMES if n.startswith("on_nonfinite")]
DP = ["dp_aggregate", "dp_aggregate_adaptive"]
NOT_DP = [n for n in NAMES if n not in DP]

# The transformations each axis runs in the fast tier; the slow tier runs them all.
FAST = {
    # one per granularity and kind of rule or guard (dp_aggregate compiles slowly on the
    # mixed tree: its fast sweeps are the float8 ones)
    "values": [
        "clip_by_value",
        "clip_by_global_norm",
        "clip_by_block_rms",
        "agc",
        "adaptive_clip_leaf",
        "autoclip",
        "zclip",
        "skip_on_spike",
        "on_nonfinite_skip",
    ],
    "float8_e4m3fn": ["clip_by_value", "adagc"],
    "float8_e5m2": ["clip_by_global_norm", "dp_aggregate"],
    "eager": ["clip_by_global_norm", "quantile_clip"],
    "vmap": ["on_nonfinite_raise", "zclip"],
    "scan": ["autoclip", "on_nonfinite_skip"],
    "x64_scan": ["clip_by_block_rms", "zclip"],
    # the fresh states that donation once broke, on a tree with zero-size leaves
    "donate": [
        "zclip",
        "adaptive_clip",
        "autoclip",
        "skip_on_spike",
        "on_nonfinite_skip",
    ],
    "inject": ["agc", "skip_on_spike"],
    "multisteps": ["quantile_clip", "on_nonfinite_zero"],
    "masked": ["clip_by_leaf_norm", "adagc"],
    "near_max": {  # (tree, mode): names
        ("f32", "jit"): ["clip_by_global_norm"],
        ("mixed", "jit"): ["clip_by_value"],
    },
    # trees holding only zero-size leaves or only scalars (the mixed tree has both kinds
    # of leaf beside others for every transformation in the fast tier)
    "zero_size": [
        "clip_by_global_norm",
        "adagc",
        *(f"on_nonfinite_{p}" for p in ("skip", "zero", "propagate", "raise")),
        "dp_aggregate",
    ],
    "scalars": ["clip_by_block_rms", "agc", "skip_on_spike"],
    # trees of None leaves only or integer leaves only (an empty tree: all fast)
    "no_floats": ["clip_by_block_rms", "adagc"],
}


def over(fast, names=NAMES, xfail: dict[str, str] | None = None, prefix=()) -> list:
    """``names`` as parameters (after ``prefix``): slow unless in ``fast`` (``None``: all
    fast); a strict xfail for the known defects in ``xfail``."""
    params = []
    for name in names:
        marks = []
        if fast is not None and name not in fast:
            marks.append(pytest.mark.slow)
        if xfail and name in xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=xfail[name]))
        params.append(pytest.param(*prefix, name, marks=marks, id="-".join([*prefix, name])))
    return params


def test_the_fast_tier_names_real_transformations():
    """A misspelt name in FAST would silently move its test to the slow tier."""
    for axis, names in FAST.items():
        for group in names.values() if isinstance(names, dict) else [names]:
            assert set(group) <= set(NAMES), f"FAST[{axis!r}]: {set(group) - set(NAMES)}"


# --------------------------------------------------------------------------- running


_SHARED: dict[str, tuple[Any, Jitted]] = {}


def shared(name: str) -> tuple[Any, Jitted]:
    """One transformation and its jitted update per case for the whole session, so that
    each tree layout compiles once however many tests use it."""
    if name not in _SHARED:
        tx = CASES[name].make()
        _SHARED[name] = (tx, Jitted(tx.update))
    return _SHARED[name]


SWEEP = (
    "clean",
    "small",
    "zeros",
    "clean",
    "subnormal",
    "clean",
    "huge",
    "clean",
    "nan",
    "clean",
    "inf",
    "clean",
    "neg_zero",
    "clean",
)
# A shorter sequence for the execution modes: clipped, huge, NaN, recovery, unclipped.
STEPS = ("clean", "huge", "nan", "clean", "small")


def _sweep(case: Case, tx, update, spec_name: str) -> None:
    """Every value kind one after the other (each meets a state that has seen the
    others): for policy="raise" the non-finite steps must raise, and are not applied."""
    spec = spec_for(case, SPECS[spec_name])
    grads_seq = [fill(spec, kind, seed=i) for i, kind in enumerate(SWEEP)]
    run(case, tx, update, grads_seq, params_like(grads_seq[0], case))


# -------------------------------------------------------- values x dtypes x jit


@pytest.mark.parametrize("name", over(FAST["values"]))
def test_values_under_jit(name):
    """Every value kind through one jitted update of the mixed-dtype tree (float16,
    bfloat16, float32, complex64, int, bool, None, a scalar, a zero-size leaf)."""
    case = CASES[name]
    tx, update = shared(name)
    _sweep(case, tx, update, "mixed")


@pytest.mark.parametrize(
    ("spec", "name"),
    [p for f8 in ("float8_e4m3fn", "float8_e5m2") for p in over(FAST[f8], prefix=(f8,))],
)
def test_float8_values_under_jit(spec, name):
    """float8 x jit: the value sweep on float8 trees (float8_e4m3fn has no infinities:
    its "inf" step puts none in)."""
    case = CASES[name]
    tx = case.make()
    _sweep(case, tx, Jitted(tx.update), spec)


# -------------------------------------------------------------------------- trees

# Once failures, now regression cases: leaf clippers on a tree without float leaves
# ("Need at least one array to concatenate"; optax.masked with an all-False mask hands
# the inner transformation exactly this), and on_nonfinite on a tree whose float leaves
# are all zero-size ("Need at least one array to stack").


def _tree_params():
    params = []
    params += over(None, NOT_DP, prefix=("empty_tree",))
    for spec in ("none_leaves", "int_bool_only"):
        params += over(FAST["no_floats"], NOT_DP, prefix=(spec,))
    params += over(FAST["zero_size"], NAMES, prefix=("zero_size",))
    params += over(FAST["scalars"], NAMES, prefix=("scalars",))
    return params


@pytest.mark.parametrize(("spec", "name"), _tree_params())
def test_trees_without_ordinary_leaves(spec, name):
    """Degenerate trees (nothing, ``None`` only, integers only, zero-size leaves only,
    scalars only) pass through every transformation, with a NaN step too."""
    case = CASES[name]
    tx = case.make()
    grads_seq, params = sequence(case, spec, ("clean", "nan", "clean"))
    run(case, tx, Jitted(tx.update), grads_seq, params)


@pytest.mark.parametrize("name", DP)
@pytest.mark.parametrize("spec", ["empty_tree", "none_leaves", "int_bool_only"])
def test_dp_aggregate_rejects_trees_without_examples(name, spec):
    """dp_aggregate needs per-example float leaves: a tree without any is an error
    that says so, not a crash (its documented contract)."""
    tx = CASES[name].make()
    tree = fill(SPECS[spec], "clean")
    with pytest.raises(ValueError, match="dp_aggregate: (expects per-example|no floating)"):
        tx.update(tree, tx.init(tree))


# ------------------------------------------------------------------ execution modes


@pytest.mark.parametrize("name", over(FAST["eager"]))
def test_eager_equals_jit(name):
    """The same steps eagerly and under jit (mixed-dtype tree): the same updates and
    states, each step checked."""
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "mixed", STEPS)
    _, jit_outs, jit_states = run(case, tx, update, grads_seq, params)
    _, outs, states = run(case, tx, tx.update, grads_seq, params)
    for i, (a, b, sa, sb) in enumerate(zip(outs, jit_outs, states, jit_states)):
        assert_trees_close(a, b, f"{name}: eager vs jit, update {i}", rtol=1e-5)
        assert_trees_close(sa, sb, f"{name}: eager vs jit, state {i}", rtol=1e-5)


@pytest.mark.parametrize("name", over(FAST["vmap"]))
def test_vmap_over_states_equals_each_run(name):
    """A batch of states (vmapped init) updated by a vmapped update: each row equals its
    unbatched run; one row meets NaN at step 2 (except for policy="raise") and the
    other rows must not notice."""
    case = CASES[name]
    tx, update = shared(name)
    runs = []
    for b in range(3):
        kinds = list(STEPS)
        if b != 1 or case.policy == "raise":
            kinds[2] = "clean"
        runs.append(sequence(case, "mixed", kinds, seed=10 * b))
    params = runs[0][1]
    batched_params = stack([params] * 3)
    states = jax.vmap(tx.init)(batched_params)
    assert_bitwise_equal(states, stack([tx.init(params)] * 3), f"{name}: vmapped init")
    vupdate = Jitted(jax.vmap(tx.update))
    steps = len(runs[0][0])
    batched = []
    for i in range(steps):
        out, states = vupdate(stack([r[0][i] for r in runs]), states, batched_params)
        batched.append((out, states))
        assert vupdate.traces == 1, f"{name}: vmapped update retraced"
    for b, (grads_seq, _) in enumerate(runs):
        _, outs, run_states = run(case, tx, update, grads_seq, params)
        for i in range(steps):
            assert_trees_close(row(batched[i][0], b), outs[i], f"{name}: row {b}, update {i}")
            assert_trees_close(row(batched[i][1], b), run_states[i], f"{name}: row {b}, state {i}")


def _scan(case: Case, tx, grads_seq, params):
    """``lax.scan`` over the steps; every step's update and state come out."""

    def body(state, grads):
        out, new = tx.update(grads, state, params)
        return new, (out, new)

    init = tx.init(params)
    _, (outs, states) = jax.jit(lambda s, g: jax.lax.scan(body, s, g))(init, stack(grads_seq))
    for i, grads in enumerate(grads_seq):
        before = init if i == 0 else row(states, i - 1)
        check_step(case, grads, params, before, row(outs, i), row(states, i), init, f"[{i}]")
    return outs, states


def _scan_equals_loop(case: Case, tx, update, spec_name: str) -> None:
    grads_seq, params = sequence(case, spec_name, STEPS)
    outs, states = _scan(case, tx, grads_seq, params)
    _, loop_outs, loop_states = run(case, tx, update, grads_seq, params)
    for i in range(len(grads_seq)):
        assert_trees_close(row(outs, i), loop_outs[i], f"{case.name}: scan, update {i}", 1e-5)
        assert_trees_close(row(states, i), loop_states[i], f"{case.name}: scan, state {i}", 1e-5)


@pytest.mark.parametrize("name", over(FAST["scan"]))
def test_scan_over_steps_equals_the_loop(name):
    """The state is a valid scan carry (its layout is fixed) and scan == the jitted loop,
    on the mixed-dtype tree."""
    tx, update = shared(name)
    _scan_equals_loop(CASES[name], tx, update, "mixed")


@pytest.mark.parametrize("name", over(FAST["x64_scan"]))
def test_x64_scan_over_float64_leaves(name):
    """x64 x scan: float64 leaves (beside a float32 one) under jax_enable_x64, through
    scan and through the jitted loop; the state keeps its layout (its statistics stay
    float32) and the bounds hold in float64."""
    with jax.enable_x64(True):
        case = CASES[name]
        tx = case.make()
        _scan_equals_loop(case, tx, Jitted(tx.update), "f64")


@pytest.mark.parametrize("name", over(FAST["donate"]))
def test_a_fresh_state_can_be_donated(name):
    """jit(update, donate_argnums=1) on the state fresh from init (whose arrays must be
    distinct buffers), on the mixed tree (zero-size and scalar leaves included); equal
    to the plain jit run."""
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "mixed", STEPS)
    _, outs, states = run(case, tx, Jitted(tx.update, donate_argnums=1), grads_seq, params)
    _, ref_outs, ref_states = run(case, tx, update, grads_seq, params)
    for i in range(len(grads_seq)):
        assert_trees_close(outs[i], ref_outs[i], f"{name}: donated, update {i}")
        assert_trees_close(states[i], ref_states[i], f"{name}: donated, state {i}")


def _fresh(value: jax.Array) -> jax.Array:
    """A new array of the same value, dtype and weak type (as a user would put back)."""
    return value * 1


@pytest.mark.parametrize("name", over(FAST["inject"]))
def test_inject_hyperparams_of_every_numeric_argument(name):
    """optax.inject_hyperparams with every numeric hyperparameter injected (traced)
    equals the plain transformation; hyperparameters put back into the state as new
    arrays do not retrace."""
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "f32", STEPS)
    _, ref_outs, ref_states = run(case, tx, update, grads_seq, params)
    injected = case.inject()
    state = injected.init(params)
    assert set(state.hyperparams) == set(case.hyper), f"{name}: injected {state.hyperparams}"
    init = state
    inject_update = Jitted(injected.update)
    for i, grads in enumerate(grads_seq):  # no NaN for policy="raise": see sequence()
        out, state = inject_update(grads, state, params)
        assert_same_layout(state, init, f"{name}: injected state {i}")
        assert_trees_close(out, ref_outs[i], f"{name}: injected, update {i}", 1e-5)
        assert_trees_close(state.inner_state, ref_states[i], f"{name}: injected, state {i}", 1e-5)
        state.hyperparams.update({k: _fresh(v) for k, v in state.hyperparams.items()})
    assert inject_update.traces == 1, f"{name}: injected update retraced"


def _mean(a: Any, b: Any) -> Any:
    def mean(x, y):
        if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)):
            return y
        return ((x.astype(jnp.float32) + y.astype(jnp.float32)) / 2).astype(x.dtype)

    return jax.tree.map(mean, a, b)


@pytest.mark.parametrize("name", over(FAST["multisteps"], NOT_DP))
def test_multisteps_applies_it_to_the_mean_every_k_steps(name):
    """optax.MultiSteps(tx, 2): the state keeps its layout, the mini-steps give zeros and
    every second step equals tx applied to the mean of the two gradients. (dp_aggregate
    is excluded: its documentation puts it first, never inside MultiSteps.)"""
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "f32", ("clean", "huge", "small", "zeros", "clean", "clean"))
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    init = multi.init(params)
    state, ref_state = init, tx.init(params)
    multi_update = Jitted(multi.update)
    for i, grads in enumerate(grads_seq):
        out, state = multi_update(grads, state, params)
        assert_same_layout(state, init, f"{name}: MultiSteps state {i}")
        if i % 2 == 0:
            assert not any(np.any(x) for x in inexact(out)), f"{name}: a mini-step moved"
            continue
        ref_out, ref_state = update(_mean(grads_seq[i - 1], grads), ref_state, params)
        assert_trees_close(out, ref_out, f"{name}: MultiSteps, update {i}", 1e-5)
    assert multi_update.traces == 1, f"{name}: MultiSteps update retraced"


@pytest.mark.parametrize("name", over(FAST["masked"]))
def test_masked_clips_the_masked_leaves_only(name):
    """optax.masked(tx, {"w": True, "b": False}): "b" passes through bit for bit, "w"
    gets what tx gives the tree {"w": ...}; the state keeps its layout."""
    case = CASES[name]
    tx = case.make()
    grads_seq, params = sequence(case, "f32", STEPS)
    masked = optax.masked(tx, {"w": True, "b": False})
    init = masked.init(params)
    state = init
    masked_update = Jitted(masked.update)
    only_w = lambda tree: {"w": tree["w"]}
    ref_update = Jitted(tx.update)
    ref_state = tx.init(only_w(params))
    for i, grads in enumerate(grads_seq):
        out, state = masked_update(grads, state, params)
        assert_same_layout(state, init, f"{name}: masked state {i}")
        assert_bitwise_equal(out["b"], grads["b"], f"{name}: the masked-out leaf, update {i}")
        ref_out, ref_state = step(
            case, ref_update, only_w(grads), only_w(params), ref_state, tx.init(only_w(params)), ""
        )
        assert_trees_close(only_w(out), ref_out, f"{name}: the masked leaf, update {i}", 1e-5)
    assert masked_update.traces == 1, f"{name}: masked update retraced"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_orbax_save_and_restore_resumes_bit_for_bit(name, tmp_path):
    """The state after two steps (mixed-dtype tree) through StandardCheckpointer, with
    the initial state as target: the same arrays, and the next step the same."""
    ocp = pytest.importorskip("orbax.checkpoint")
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "mixed", ("clean", "huge", "clean"))
    init = tx.init(params)
    state = init
    for grads in grads_seq[:2]:
        _, state = update(grads, state, params)
    restored = _save_and_restore(ocp, state, init, tmp_path)
    assert_bitwise_equal(restored, state, f"{name}: restored state")
    resumed = update(grads_seq[2], restored, params)
    assert_bitwise_equal(resumed, update(grads_seq[2], state, params), f"{name}: resumed")


def _save_and_restore(ocp, state, target, path):
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path / "state", state)
        checkpointer.wait_until_finished()
        return checkpointer.restore(path / "state", target)
    finally:
        checkpointer.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: gradclip_jax.skip_on_spike(optax.adam(1e-3)), id="skip_on_spike(adam)"
        ),
        pytest.param(
            lambda: gradclip_jax.adaptive_clip(granularity="leaf"), id="adaptive_clip_leaf"
        ),
    ],
)
def test_orbax_round_trip_of_a_fresh_state(make, tmp_path):
    """Once "Cannot save arrays with zero size": the fresh states of these two."""
    ocp = pytest.importorskip("orbax.checkpoint")
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = make()
    init = tx.init(params)
    restored = _save_and_restore(ocp, init, tx.init(params), tmp_path)
    assert_bitwise_equal(restored, init, "restored fresh state")
    _, state = jax.jit(tx.update)(params, restored, params)
    assert_same_layout(state, init, "state after a step from the restored one")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adaptive_clip_leaf", "adagc"])
def test_orbax_round_trip_of_a_leaf_state_for_a_tree_without_floats(name, tmp_path):
    """Once "Cannot save arrays with zero size: rule_state.count": one row per float
    leaf, none here; such a state now keeps one unused row."""
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = CASES[name].make()
    init = tx.init({})
    assert_bitwise_equal(_save_and_restore(ocp, init, tx.init({}), tmp_path), init, name)


# ----------------------------------------------------------------- sharding, scale


@pytest.mark.skipif(jax.device_count() < 2, reason="needs more than one device")
@pytest.mark.parametrize("name", NOT_DP)
def test_sharded_leaves_give_the_unsharded_result(name):
    """A leaf split across two devices (the 8-device tests live elsewhere)."""
    case = CASES[name]
    tx, update = shared(name)
    grads_seq, params = sequence(case, "f32", ("clean", "huge"))
    mesh = jax.make_mesh((2,), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    put = lambda t: {"w": jax.device_put(t["w"], sharding), "b": t["b"]}
    _, ref_outs, _ = run(case, tx, update, grads_seq, params)
    _, outs, _ = run(case, tx, Jitted(tx.update), [put(g) for g in grads_seq], put(params))
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert_trees_close(a, b, f"{name}: sharded, update {i}", 1e-5)


# ------------------------------------------------------------------ the known items


def test_raise_policy_under_vmap_over_states_is_quiet_on_clean_steps():
    """Once fixed: under vmap the cond around the error callback becomes a select, so
    the callback runs on every step; it must raise only where some state is bad, and
    name the bad leaf."""
    tx = gradclip_jax.on_nonfinite(optax.sgd(0.1), policy="raise")
    params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
    states = jax.vmap(lambda _: tx.init(params))(jnp.arange(4))
    update = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None)))
    clean = {"w": jnp.ones((4, 3)), "b": jnp.ones((4, 2))}
    for _ in range(3):
        _, states = update(clean, states, params)
    jax.block_until_ready(states)
    assert not np.any(gradclip_jax.stats(states)["on_nonfinite/nonfinite_count"])
    bad = {"w": clean["w"].at[2, 1].set(jnp.nan), "b": clean["b"]}
    with pytest.raises(Exception, match=RAISED + r" in 1 of 2 leaves: \['w'\]"):
        jax.block_until_ready(update(bad, states, params))


def test_a_float32_norm_beyond_float32_max_is_clipped_to_the_threshold():
    """Finite entries whose norm (1e39) exceeds float32's maximum: a nonzero update of
    norm 1 in the original direction."""
    grads = {"w": jnp.full((10_000,), 1e37, jnp.float32)}
    tx = gradclip_jax.clip_by_global_norm(1.0)
    out, _ = jax.jit(tx.update)(grads, tx.init(grads))
    w = np.asarray(out["w"], np.float64)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(np.linalg.norm(w), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w, np.full(10_000, 1e-2), rtol=1e-6)  # the direction


# A finite norm above 2**126 (~8.5e37) has a subnormal reciprocal, which XLA on CPU
# flushes to zero: once the update came out zero (threshold / norm flushed), or unclipped
# where norms of parts were combined (norm_of_norms divided by the largest, eagerly), and
# adagc's warm-up share, per_example_clip's scale and dp_aggregate's mean norm too.


def _near_max_params() -> list:
    """(tree, mode, name): one block or several (the mixed tree), jit or eager."""
    params = []
    for tree in ("f32", "mixed"):
        for mode in ("jit", "eager"):
            fast = FAST["near_max"].get((tree, mode), ())
            params += over(fast, NAMES, prefix=(tree, mode))
    return params


@pytest.mark.parametrize(("tree", "mode", "name"), _near_max_params())
def test_a_finite_norm_near_float32_max_is_clipped_to_the_threshold(tree, mode, name):
    """Entries of 2e38 and -1e38 in the float32 leaf: the norm (2.2e38) is finite, so
    the update is clipped *to* the threshold in the original direction: neither zero
    (which check_step calls clipped below the threshold) nor unclipped."""
    case = CASES[name]
    tx, update = shared(name)
    grads, params = sequence(case, tree, ("small",))
    key = "w" if tree == "f32" else "f32"
    big = np.array(grads[0][key])
    big[..., 0, 0], big[..., 1, 1] = 2e38, -1e38
    grads = {**grads[0], key: jnp.asarray(big)}
    _, (out,), _ = run(case, tx, update if mode == "jit" else tx.update, [grads], params)
    assert np.any(np.asarray(out[key], np.float32)), f"{name}: the huge leaf was zeroed"


@pytest.mark.parametrize(
    "mode",
    ["eager", "jit"],
)
def test_global_norm_of_several_blocks_near_float32_max(mode):
    tree = {"a": jnp.array([2e38, 0.0], jnp.float32), "b": jnp.ones(1, jnp.bfloat16)}
    norm = gradclip_jax.global_norm if mode == "eager" else jax.jit(gradclip_jax.global_norm)
    np.testing.assert_allclose(float(norm(tree)), 2e38, rtol=1e-6)


@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_per_example_clip_clips_an_example_near_float32_max(mode):
    """Else one example moves the sum without bound (DP's sensitivity is gone), or is
    flushed to zero instead of clipped."""
    grads = {
        "a": jnp.array([[2e38, 0.0], [1.0, 0.0]], jnp.float32),
        "b": jnp.array([[0.5], [0.5]], jnp.float32),
    }
    clip = lambda g: gradclip_jax.per_example_clip(g, 1.0)
    total, count = (clip if mode == "eager" else jax.jit(clip))(grads)
    assert int(count) == 2
    assert norm64(inexact(total)) <= 2 * (1 + 1e-6)
    # Clipped *to* 1 in its own direction (not flushed to zero), plus the other example.
    np.testing.assert_allclose(total["a"], [1 + 1 / 1.25**0.5, 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: gradclip_jax.clip_by_value(0.5), id="clip_by_value"),
        pytest.param(lambda: gradclip_jax.clip_by_global_norm(0.5, ord=math.inf), id="global"),
        pytest.param(lambda: gradclip_jax.clip_by_leaf_norm(0.5, ord=math.inf), id="leaf"),
    ],
)
def test_linf_clipping_of_float8_beside_other_floats(make):
    """Once TypePromotionError: maxima() stacked each leaf's sum(a - a) in the leaf's
    own dtype, and float8 does not promote with float32."""
    tree = fill(SPECS["float8_mixed"], "clean")
    tx = make()
    out, state = jax.jit(tx.update)(tree, tx.init(tree))
    for x, o in zip(jax.tree.leaves(tree), jax.tree.leaves(out)):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert np.all(np.abs(np.asarray(o, np.float64)) <= 0.5 * (1 + 2**-3))
    assert float(state.stats.norm) == max(
        float(np.abs(np.asarray(x, np.float64)).max()) for x in jax.tree.leaves(tree)
    )


# --------------------------------------------------------------------- hypothesis


@st.composite
def _drawn_values(draw):
    name = draw(st.sampled_from(FAST["values"]))
    spec = spec_for(CASES[name], SPECS["mixed"])
    return name, [drawn_tree(draw, spec) for _ in range(2)]


@settings(max_examples=15, deadline=None)
@given(_drawn_values())
def test_drawn_values_keep_the_invariants(drawn):
    """Two steps of drawn values through a drawn transformation on the mixed-dtype tree
    (whose update test_values_under_jit compiled already)."""
    name, grads_seq = drawn
    case = CASES[name]
    tx, update = shared(name)
    params = params_like(grads_seq[0], case)
    init = tx.init(params)
    state = init
    for i, grads in enumerate(grads_seq):
        _, state = step(case, update, grads, params, state, init, f"[drawn {i}]")


# ------------------------------------------------------------------ per_example_clip


@pytest.mark.parametrize(
    ("granularity", "eager"),
    [("global", False), pytest.param("global", True, marks=pytest.mark.slow)]
    + [pytest.param("leaf", eager, marks=pytest.mark.slow) for eager in (False, True)],
)
def test_per_example_clip_bounds_every_example(granularity, eager):
    """per_example_clip on a batch of mixed-dtype examples, every value kind: dtypes and
    shapes of one example, counts in [0, batch], the sum at most batch * max_norm, NaN
    only where an example had one, the float64 reference (global); eager and jit."""
    spec = spec_for(CASES["dp_aggregate"], SPECS["mixed"])
    clip = lambda g: gradclip_jax.per_example_clip(g, 1.0, granularity=granularity)
    run_clip = clip if eager else jax.jit(clip)
    for kind in ("clean", "huge", "zeros", "subnormal", "nan", "inf"):
        grads = fill(spec, kind)
        total, count = run_clip(grads)
        what = f"per_example_clip({granularity}, eager={eager}) of {kind}"
        for g, t in zip(jax.tree.leaves(grads), jax.tree.leaves(total)):
            shape = g.shape[1:] if jnp.issubdtype(g.dtype, jnp.inexact) else g.shape
            assert t.dtype == g.dtype and t.shape == shape, what
            if not jnp.issubdtype(g.dtype, jnp.inexact):
                np.testing.assert_array_equal(t, g, err_msg=what)
        for c in jax.tree.leaves(count):
            assert c.dtype == jnp.int32 and 0 <= int(c) <= BATCH, what
        if not finite_tree(grads):
            for g, t in zip(inexact(grads), inexact(total)):
                poisoned = ~np.isfinite(g).all(axis=0)
                assert np.isfinite(t[~poisoned]).all(), f"{what}: NaN spread"
            continue
        assert finite_tree(total), what
        slack = 1e-5 + 2**-9  # the bfloat16 leaf's rounding
        assert norm64(inexact(total)) <= BATCH * (1 + slack), what
        if granularity == "global" and kind != "subnormal":  # subnormals: flushed
            for got, want in zip(inexact(total), clipped_sum(inexact(grads), 1.0)):
                np.testing.assert_allclose(got, want, rtol=slack, atol=slack, err_msg=what)


# ------------------------------------------------------------ the checks can fail


def _broken() -> dict[str, tuple[str, Any, str, str]]:
    """Broken transformations: (the case whose promises they claim, the transformation,
    the value kind that exposes them, what check_step must say)."""
    real = CASES["clip_by_global_norm"].make()

    def global_clipper(update):
        return optax.GradientTransformation(real.init, update)

    def scaled(factor):
        def update(updates, state, params=None):
            out, state = real.update(updates, state, params)
            return jax.tree.map(lambda x: (x * factor).astype(x.dtype), out), state

        return global_clipper(update)

    def identity(updates, state, params=None):
        return updates, real.update(updates, state, params)[1]

    def nan_on_zero(updates, state, params=None):
        out, state = real.update(updates, state, params)
        return jax.tree.map(lambda x: x / x * x, out), state

    def drifting_state(updates, state, params=None):
        out, state = real.update(updates, state, params)
        record = state.stats.record._replace(clip_count=state.stats.clip_count.astype(jnp.int16))
        return out, state._replace(stats=state.stats.replace(record))

    def nan_everywhere(updates, state, params=None):
        out, state = real.update(updates, state, params)
        bad = jnp.any(jnp.stack([jnp.any(jnp.isnan(x)) for x in jax.tree.leaves(updates)]))
        return jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x).astype(x.dtype), out), state

    zclip = CASES["zclip"].make()

    def absorbing(updates, state, params=None):  # the rule sees the NaN step's finite part
        out, _ = zclip.update(updates, state, params)
        finite = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0).astype(x.dtype), updates)
        return out, zclip.update(finite, state, params)[1]

    propagate = CASES["on_nonfinite_propagate"].make()
    g = "clip_by_global_norm"
    return {
        "no clipping": (g, global_clipper(identity), "clean", "> threshold"),
        "clipped below the threshold": (g, scaled(0.5), "clean", "below the threshold"),
        "clipped to zero": (g, scaled(0.0), "clean", "below the threshold"),
        "sign flipped": (g, scaled(-1.0), "clean", "sign flipped"),
        "NaN from zeros": (g, global_clipper(nan_on_zero), "zeros", "non-finite update"),
        "NaN spreads to every entry": (g, global_clipper(nan_everywhere), "nan", "spread"),
        "state layout drifts": (g, global_clipper(drifting_state), "clean", "state leaf"),
        "a rule absorbs a NaN step": (
            "zclip",
            optax.GradientTransformation(zclip.init, absorbing),
            "nan",
            "absorbed",
        ),
        "policy='skip' applies a NaN step": ("on_nonfinite_skip", propagate, "nan", "moved"),
    }


@pytest.mark.parametrize("broken", list(_broken()))
def test_the_checks_reject_a_broken_transformation(broken):
    """check_step is not a tautology: each breakage fails it for its reason, while the
    transformation it imitates passes the same step."""
    name, tx, kind, message = _broken()[broken]
    case = CASES[name]
    grads = fill(SPECS["f32"], kind)
    real = case.make()
    init = real.init(grads)
    check_step(case, grads, grads, init, *real.update(grads, init, grads), init, " (control)")
    init = tx.init(grads)
    out, after = tx.update(grads, init, grads)
    with pytest.raises(AssertionError, match=message):
        check_step(case, grads, grads, init, out, after, init)
