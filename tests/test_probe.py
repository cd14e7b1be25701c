"""probe_norms: recorded norm distribution and suggested thresholds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradclip_jax._probe import DEFAULT_QUANTILES, probe_norms


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _batches(count, seed=0):
    key = jax.random.key(seed)
    out = []
    for k in jax.random.split(key, count):
        kx, ky = jax.random.split(k)
        scale = jnp.exp(jax.random.normal(kx, ()))  # varied norms across batches
        out.append((scale * jax.random.normal(kx, (8, 3)), jax.random.normal(ky, (8,))))
    return out


PARAMS = {"w": jnp.ones(3), "b": jnp.zeros(())}


@pytest.mark.slow
def test_quantiles_match_numpy_and_norms_match_direct_computation():
    batches = _batches(12)
    probe = probe_norms(jax.grad(_loss), PARAMS, batches, percentile=20.0)
    expected = []
    for batch in batches:
        g = jax.grad(_loss)(PARAMS, batch)
        expected.append(np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g))))
    np.testing.assert_allclose(probe.global_norms, expected, rtol=1e-5)
    for q in DEFAULT_QUANTILES:
        assert probe.quantiles[q] == pytest.approx(np.percentile(probe.global_norms, q))
    assert probe.suggested_autoclip == pytest.approx(np.percentile(probe.global_norms, 20.0))
    assert probe.mean == pytest.approx(np.mean(expected), rel=1e-5)
    assert probe.std == pytest.approx(np.std(expected), rel=1e-4)
    assert probe.pascanu_range == pytest.approx((0.5 * probe.mean, 10 * probe.mean))
    # Per-leaf norms compose to the global norm.
    leaf_sq = probe.leaf_norms["w"] ** 2 + probe.leaf_norms["b"] ** 2
    np.testing.assert_allclose(np.sqrt(leaf_sq), probe.global_norms, rtol=1e-5)
    assert probe.spike_steps.size == 0 and probe.nonfinite_steps.size == 0
    assert "AutoClip p20" in probe.summary()


def test_fixed_params_by_default_and_optimizer_advances_them():
    batch = _batches(1)
    fixed = probe_norms(jax.grad(_loss), PARAMS, batch, steps=5)
    assert fixed.global_norms.shape == (5,)
    np.testing.assert_allclose(fixed.global_norms, fixed.global_norms[0], rtol=1e-6)
    trained = probe_norms(jax.grad(_loss), PARAMS, batch, steps=5, optimizer=optax.sgd(0.05))
    np.testing.assert_allclose(trained.global_norms[0], fixed.global_norms[0], rtol=1e-6)
    # Gradient descent on one batch of a convex loss shrinks the gradient.
    assert np.all(np.diff(trained.global_norms) < 0)


def test_spikes_and_nonfinite_steps_are_reported():
    norms = np.ones(60)
    norms[[17, 41]] = [1e3, np.inf]
    grads_fn = lambda params, scale: {"g": params["g"] * scale}
    probe = probe_norms(grads_fn, {"g": jnp.ones(())}, [jnp.float32(s) for s in norms])
    assert probe.nonfinite_steps.tolist() == [41]
    assert probe.spike_steps.tolist() == [17, 41]
    assert probe.quantiles[50.0] == pytest.approx(1.0)  # statistics ignore the inf step
    assert probe.global_norms[41] == np.inf


@pytest.mark.parametrize(
    "kwargs, match",
    [({"percentile": 101.0}, "percentile"), ({"steps": 0}, "steps"), ({"quantiles": (-1,)}, "")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"probe_norms.*{match}"):
        probe_norms(jax.grad(_loss), PARAMS, _batches(1), **kwargs)


def test_empty_batches():
    with pytest.raises(ValueError, match="empty"):
        probe_norms(jax.grad(_loss), PARAMS, [])
