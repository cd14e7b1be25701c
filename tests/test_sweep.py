"""Threshold sweep: the vmapped program equals sequential runs with the same seed."""

import json
import math

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

from gradclip_jax.demo import sweep as sweep_module  # noqa: E402

# A learning rate at which the unclipped copy diverges and the clipped ones do not.
TINY = sweep_module.SweepConfig(length=10, hidden=8, steps=20, batch_size=8, learning_rate=20.0)


@pytest.mark.slow
def test_vmapped_sweep_equals_sequential_runs_and_flags_divergence(tmp_path):
    thresholds = [1e-3, 1e-2, math.inf]
    # main_sweep: the demo mode, which runs `sweep` and writes its outputs.
    vmapped = sweep_module.main_sweep(tmp_path, thresholds, TINY)
    sequential = sweep_module.sequential_sweep(thresholds, TINY)
    assert vmapped.losses.shape == (3, TINY.steps)
    np.testing.assert_allclose(vmapped.losses, sequential.losses, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(vmapped.diverged, sequential.diverged)
    np.testing.assert_array_equal(vmapped.divergence_step, sequential.divergence_step)
    # Same initialisation and batches: the first loss is shared, later ones depend on the
    # threshold.
    np.testing.assert_allclose(vmapped.losses[:, 0], vmapped.losses[0, 0], rtol=1e-6)
    assert not np.allclose(vmapped.losses[0, -5:], vmapped.losses[1, -5:])
    # The unclipped copy diverges; the loss is NaN after that step and updates stop.
    assert vmapped.diverged.tolist() == [False, False, True]
    step = vmapped.divergence_step[2]
    assert 0 <= step < TINY.steps
    assert np.all(np.isnan(vmapped.losses[2, step + 1 :]))
    assert np.isnan(vmapped.final_loss[2]) and np.all(np.isfinite(vmapped.final_loss[:2]))
    assert np.all(np.isfinite(vmapped.losses[:2]))
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["divergence_step"] == vmapped.divergence_step.tolist()
    assert record["final_loss"][2] is None
