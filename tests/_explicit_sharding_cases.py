"""Every public transformation on one tree whose leaves are sharded differently, under
``jax.jit`` on a mesh with explicit axes and on one with automatic axes.

These are pytest tests that need 8 devices, so ``tests/test_explicit_sharding.py`` runs
them in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. Run
them by hand the same way:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest \\
        tests/_explicit_sharding_cases.py

The tree mixes every layout a large run has: a kernel split along its rows (inside each
unit), one split along its columns (across units, as AGC sees them), a large kernel
split along its columns, a vector split, a replicated kernel and a replicated scalar.
Each case runs a few jitted steps (a spike and a NaN among them) and checks that each
step's updates and statistics, and the final state, equal the unsharded single-device
run's (1e-6 relative), and that every update keeps its gradient's sharding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
import pytest
from _trees import assert_trees_close
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gradclip_jax as gc
from gradclip_jax import rules

DEVICES = 8
# Leaf shapes (every split dimension divides by 8) and layouts on the 1-D mesh "d".
# "large" is above the norms' small-leaf size, so it is reduced alone; the others are
# small, so the norms would like to group them.
LAYOUTS: dict[str, tuple[tuple[int, ...], P]] = {
    "rows": ((64, 8), P("d", None)),
    "columns": ((8, 64), P(None, "d")),
    "large": ((64, 128), P(None, "d")),
    "vector": ((64,), P("d")),
    "replicated": ((8, 16), P()),
    "scalar": ((), P()),
}
# Gradient scales of the steps: ordinary, a NaN entry (step 2, on the "columns" leaf),
# a spike.
SCALES = (1.0, 1.2, 0.9, 1.1, 40.0)
NAN_STEP = 2
BATCH = 8  # dp_aggregate: examples per step

_zscore = rules.zscore(warmup_steps=2, max_norm=None)
# Settings that clip and move their state within the steps.
TRANSFORMS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "clip_by_value": lambda: gc.clip_by_value(0.05),
    "clip_by_global_norm": lambda: gc.clip_by_global_norm(5.0),
    "clip_by_leaf_norm": lambda: gc.clip_by_leaf_norm(3.0),
    "clip_by_block_rms": lambda: gc.clip_by_block_rms(0.05),
    "agc": lambda: gc.agc(0.01),
    "adaptive_clip": lambda: gc.adaptive_clip(_zscore),
    "adaptive_clip_leaf": lambda: gc.adaptive_clip(_zscore, granularity="leaf"),
    "autoclip": lambda: gc.autoclip(p=50.0, history=4),
    "zclip": lambda: gc.zclip(warmup_steps=2, max_norm=10.0),
    "adagc": lambda: gc.adagc(warmup_steps=1),
    "quantile_clip": lambda: gc.quantile_clip(initial=1.0),
    "skip_on_spike": lambda: gc.skip_on_spike(
        optax.sgd(0.1, momentum=0.9), window=4, min_history=2
    ),
    "on_nonfinite": lambda: gc.on_nonfinite(optax.sgd(0.1, momentum=0.9)),
    "dp_aggregate": lambda: gc.dp_aggregate(1.0, noise_multiplier=0.5, seed=3),
    "dp_aggregate_quantile": lambda: gc.dp_aggregate(
        rules.quantile(initial=1.0), noise_multiplier=0.5, seed=3, clipped_count_stddev=1.0
    ),
    # The same, on per-example gradients split along the batch (data parallel).
    "dp_aggregate_batch_split": lambda: gc.dp_aggregate(1.0, noise_multiplier=0.5, seed=3),
}
PER_EXAMPLE = {"dp_aggregate", "dp_aggregate_quantile", "dp_aggregate_batch_split"}
BATCH_SPLIT = {"dp_aggregate_batch_split"}
# Mesh axis types; explicit axes traced both with and without `jax.set_mesh`.
MESHES = {
    "explicit": (AxisType.Explicit, False),
    "explicit-set_mesh": (AxisType.Explicit, True),
    "auto": (AxisType.Auto, False),
}


def _tree(seed: int, scale: float = 1.0, batch: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        key: (scale * rng.normal(size=batch + shape)).astype(np.float32)
        for key, (shape, _) in LAYOUTS.items()
    }


def _steps(per_example: bool) -> list[dict[str, np.ndarray]]:
    batch = (BATCH,) if per_example else ()
    steps = [_tree(100 + i, scale, batch) for i, scale in enumerate(SCALES)]
    if not per_example:  # dp_aggregate has no NaN policy to test here
        steps[NAN_STEP]["columns"][1, 3] = np.nan
    return steps


def _run(tx: optax.GradientTransformation, params: Any, steps: list[Any]):
    """Each step's updates and statistics, and the final state, of jitted updates."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    outputs = []
    for grads in steps:
        updates, state = update(grads, state, params)
        outputs.append((updates, gc.stats(state)))
    return outputs, state


@pytest.fixture(scope="module", params=list(MESHES))
def mesh(request):
    assert jax.device_count() == DEVICES, "run with --xla_force_host_platform_device_count=8"
    axis_type, set_mesh = MESHES[request.param]
    mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(axis_type,))
    return mesh, set_mesh


_REFERENCE: dict[str, Any] = {}


def _reference(name: str):
    """The transformation's run on one device, unsharded (computed once per name)."""
    if name not in _REFERENCE:
        params, steps = _tree(0), _steps(name in PER_EXAMPLE)
        _REFERENCE[name] = _run(TRANSFORMS[name](), jax.device_put(params), steps)
    return _REFERENCE[name]


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_matches_single_device_and_keeps_shardings(mesh, name):
    mesh, set_mesh = mesh
    per_example = name in PER_EXAMPLE
    shardings = {key: NamedSharding(mesh, spec) for key, (_, spec) in LAYOUTS.items()}
    # Per-example gradients: a leading batch axis, each example laid out like the
    # parameters, or the batch split over the devices.
    grad_shardings = {
        key: NamedSharding(
            mesh, P("d") if name in BATCH_SPLIT else P(None, *spec) if per_example else spec
        )
        for key, (_, spec) in LAYOUTS.items()
    }
    params, steps = _tree(0), _steps(per_example)

    expected, expected_state = _reference(name)
    # jax.set_mesh sets the mesh when called: call it only where it is used.
    with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
        actual, actual_state = _run(
            TRANSFORMS[name](),
            jax.device_put(params, shardings),
            [jax.device_put(grads, grad_shardings) for grads in steps],
        )

    for step, ((updates, stats), (expected_updates, expected_stats)) in enumerate(
        zip(actual, expected)
    ):
        assert_trees_close(updates, expected_updates, f"step {step} updates")
        assert_trees_close(stats, expected_stats, f"step {step} stats")
        # An update has no batch axis: with the batch split there is no layout to keep.
        for key, leaf in ({} if name in BATCH_SPLIT else updates).items():
            kept = leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim)
            assert kept, (
                f"step {step}: update {key!r} has sharding {leaf.sharding.spec}; "
                f"its parameter has {shardings[key].spec}"
            )
    assert_trees_close(actual_state, expected_state, "final state ")
