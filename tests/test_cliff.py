"""The Pascanu et al. loss cliff: a steep wall, and clipping that survives it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from gradclip_jax.demo import cliff  # noqa: E402


def _rnn_reference(w, b):
    x = 0.5
    for _ in range(cliff.STEPS_IN_TIME):
        x = w / (1.0 + np.exp(-x)) + b
    return (1.0 / (1.0 + np.exp(-x)) - 0.7) ** 2


def test_loss_matches_a_python_loop():
    loss = jax.jit(cliff.cliff_loss)
    for w, b in [(0.0, 0.0), (3.0, -1.5), (6.0, -3.0), (8.0, -4.0)]:
        value = loss(jnp.array([w, b], jnp.float32))
        assert float(value) == pytest.approx(_rnn_reference(w, b), rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_run_cliff_shows_a_wall_and_clipping_wins(tmp_path):
    summary = cliff.run_cliff(tmp_path, resolution=120)
    # A steep wall: the largest gradient on the grid is orders above the typical one.
    assert summary["max_gradient_norm"] > 1e3 * summary["median_gradient_norm"]
    # Some start where plain descent is thrown off the wall and ends higher.
    unclipped = np.array(summary["final_loss_unclipped"])
    clipped = np.array(summary["final_loss_clipped"])
    assert summary["starts_where_clipping_wins"] == int(np.sum(unclipped > clipped)) >= 1
    assert np.any(unclipped > clipped + 0.05)
    # Clipped steps are bounded by lr * max_norm; unclipped ones jump far.
    assert summary["largest_step_clipped"] <= cliff.LEARNING_RATE * cliff.MAX_NORM * (1 + 1e-5)
    assert summary["largest_step_unclipped"] > 3.0
    png = tmp_path / "cliff.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
