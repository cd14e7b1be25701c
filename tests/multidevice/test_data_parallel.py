"""Data parallel training: ``dp_aggregate`` on a split batch, and examples/data_parallel.py."""

from __future__ import annotations

import runpy
from pathlib import Path

import jax
import numpy as np
import pytest
from _cases import DEVICES, Makers, assert_trees_close, scan_all
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gradclip_jax as gc
from gradclip_jax import rules

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "data_parallel.py"
AXIS = "d"


def _aggregators(axis: str | None) -> Makers:
    # Adaptive, per leaf: sums, counts, noise and the quantile update all cross devices.
    return {
        "adaptive_leaf": lambda: gc.dp_aggregate(
            rules.quantile(initial=0.5),
            noise_multiplier=1.0,
            seed=11,
            granularity="leaf",
            axis_name=axis,
        )
    }


@pytest.fixture(scope="module")
def per_example_steps() -> dict[str, np.ndarray]:
    """Per-example gradients ``(steps, batch, ...)`` whose norms spread over 100x."""
    steps, batch = 4, 64
    rng = np.random.default_rng(3)
    spread = 10.0 ** rng.uniform(-1, 1, size=(steps, batch))
    return {
        "w": (rng.normal(size=(steps, batch, 6, 3)) * spread[..., None, None]).astype(np.float32),
        "b": (rng.normal(size=(steps, batch, 3)) * spread[..., None]).astype(np.float32),
    }


@pytest.mark.parametrize("mode", list(_aggregators(None)))
def test_dp_aggregate_on_a_split_batch_equals_the_whole_batch(per_example_steps, mode):
    """With ``axis_name``, a batch split over the devices gives the single-device
    aggregate of the whole batch, noise included."""
    grads = per_example_steps
    expected = jax.jit(scan_all({mode: _aggregators(None)[mode]}))(grads, None)[mode]
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Explicit,))
    batch_split = P(None, AXIS)

    run = scan_all({mode: _aggregators(AXIS)[mode]})
    program = jax.shard_map(lambda g: run(g, None), mesh=mesh, in_specs=batch_split, out_specs=P())
    sharded = jax.device_put(grads, NamedSharding(mesh, batch_split))
    assert_trees_close(jax.jit(program)(sharded)[mode], expected)


def test_data_parallel_example_patterns_agree(capsys):
    """The example trains with all-reduce and with reduce-scatter; it raises SystemExit
    when their parameters disagree."""
    runpy.run_path(str(EXAMPLE))["main"](steps=40)
    out = capsys.readouterr().out
    assert f"devices: {DEVICES}" in out
    assert "max |parameter difference| between the two patterns" in out
