"""Tests for gradclip_jax._diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradclip_jax._diagnostics import (
    EXPLODING_RATIO,
    VANISHING_RATIO,
    gradient_health,
    health_report,
    hidden_state_gradient_norms,
)


def test_flags_synthetic_exploding_and_vanishing_leaves():
    params = {
        "healthy": jnp.full((8, 8), 0.1),
        "exploding": jnp.full((8, 8), 0.1),
        "vanishing": jnp.full((8,), 0.5),
        "zero_bias": jnp.zeros((8,)),
    }
    grads = {
        "healthy": jnp.full((8, 8), 0.01),
        "exploding": jnp.full((8, 8), 0.1 * EXPLODING_RATIO * 10),
        "vanishing": jnp.full((8,), 0.5 * VANISHING_RATIO / 10),
        "zero_bias": jnp.full((8,), 0.05),
    }
    rows = {row["path"]: row for row in health_report(gradient_health(grads, params))}
    assert {path: row["status"] for path, row in rows.items()} == {
        "healthy": "ok",
        "exploding": "exploding",
        "vanishing": "vanishing",
        "zero_bias": "ok",  # measured against the RMS floor, not against zero
    }
    np.testing.assert_allclose(rows["healthy"]["ratio"], 0.1, rtol=1e-5)
    np.testing.assert_allclose(rows["exploding"]["grad_norm"], 8 * 0.1 * EXPLODING_RATIO * 10)
    np.testing.assert_allclose(rows["zero_bias"]["ratio"], 5.0, rtol=1e-5)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_gradient_is_exploding(bad):
    health = gradient_health({"w": jnp.ones(3).at[1].set(bad)}, {"w": jnp.ones(3)})
    assert bool(health.exploding["w"])


def test_thresholds_are_arguments():
    health = gradient_health(
        {"w": jnp.ones(4)}, {"w": jnp.ones(4)}, exploding_ratio=0.5, vanishing_ratio=2.0
    )
    assert bool(health.exploding["w"]) and bool(health.vanishing["w"])


def test_gradient_health_jits_and_keeps_structure():
    params = {"a": jnp.ones((2, 3)), "b": [jnp.ones(4), jnp.zeros(())]}
    health = jax.jit(gradient_health)(params, params)
    assert jax.tree.structure(health.ratio) == jax.tree.structure(params)


def _linear_recurrence_loss(gain: float):
    def loss(delta):  # delta: (time, batch, hidden)
        def step(h, d):
            h = gain * h + d
            return h, h

        _, states = jax.lax.scan(step, jnp.ones(delta.shape[1:]), delta)
        return jnp.sum(states[-1])

    return loss


@pytest.mark.parametrize("gain", [0.5, 1.0, 3.0])
def test_hidden_state_gradient_norms_follow_the_recurrence_gain(gain):
    norms = hidden_state_gradient_norms(_linear_recurrence_loss(gain), jnp.zeros((6, 2, 3)))
    assert norms.shape == (6,)
    np.testing.assert_allclose(norms / norms[-1], gain ** jnp.arange(5, -1, -1.0), rtol=1e-5)


@pytest.mark.slow
def test_hidden_state_gradient_norms_keep_axes_and_time_axis():
    loss = _linear_recurrence_loss(2.0)
    per_layer = hidden_state_gradient_norms(
        lambda d: loss(d[0]) + 10 * loss(d[1]), jnp.zeros((2, 4, 1, 3)), time_axis=1, keep_axes=(0,)
    )
    assert per_layer.shape == (2, 4)
    np.testing.assert_allclose(per_layer[1] / per_layer[0], 10.0, rtol=1e-5)
    batch_major = hidden_state_gradient_norms(
        lambda d: loss(jnp.swapaxes(d, 0, 1)), jnp.zeros((1, 4, 3)), time_axis=1
    )
    np.testing.assert_allclose(batch_major, per_layer[0], rtol=1e-5)


def test_hidden_state_gradient_norms_do_not_overflow():
    norms = hidden_state_gradient_norms(_linear_recurrence_loss(1e7), jnp.zeros((6, 1, 4)))
    assert bool(jnp.all(jnp.isfinite(norms)))
    np.testing.assert_allclose(norms[0], 2 * 1e7**5, rtol=1e-4)
