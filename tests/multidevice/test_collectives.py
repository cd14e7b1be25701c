"""Pattern (b): explicit collectives under ``shard_map`` and ``pmap``.

(b1) Each device averages the devices' gradients with ``pmean`` and clips the whole
average without ``axis_name``: every device's updates and state equal the single-device
ones; with ``axis_name`` (the documented misuse) the norm is ``sqrt(devices)`` times
too large. (b2) Each device holds a slice of the averaged gradient (``psum_scatter``)
and clips with ``axis_name``: the slices of the updates, put together, equal the
single-device updates, and the statistics agree on every device.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _cases import (
    DEVICES,
    WITH_AXIS_NAME,
    Outcomes,
    assert_devices_agree,
    clippers,
    device_leading,
    local_steps,
    run_together,
    scan_all,
    scatter,
    tree_of,
)
from _trees import RTOL
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import gradclip_jax as gc

AXIS = "d"
# (b1) needs no axis_name, so any clipper shows it: a plain one and a guard.
PMEAN_CLIPPERS = ("clip_by_global_norm", "skip_on_spike")
PMAP_CLIPPERS = ("clip_by_global_norm",)


def _shard_map_run(pattern: str) -> Outcomes:
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Explicit,))
    if pattern == "pmean":
        makers = {name: clippers()[name] for name in PMEAN_CLIPPERS}
        prepare = lambda grads: lax.pmean(grads, AXIS)  # noqa: E731
        param_spec = P()
    else:
        makers = clippers(AXIS)
        prepare = lambda grads: jax.tree.map(lambda g: scatter(g, AXIS), grads)  # noqa: E731
        param_spec = P(AXIS)

    def build(makers):
        run = scan_all(makers, prepare)

        def per_device(local, params):
            return device_leading(run(jax.tree.map(lambda x: x[0], local), params))

        return jax.shard_map(
            per_device, mesh=mesh, in_specs=(P(AXIS), param_spec), out_specs=P(AXIS)
        )

    local = jax.device_put(local_steps(), NamedSharding(mesh, P(AXIS)))
    params = jax.device_put(tree_of(0), NamedSharding(mesh, param_spec))
    return run_together(makers, build, lambda f: jax.jit(f)(local, params), local, params)


@pytest.fixture(scope="module")
def pmean() -> Outcomes:
    return _shard_map_run("pmean")


@pytest.fixture(scope="module")
def shard_map_scatter() -> Outcomes:
    return _shard_map_run("scatter")


@pytest.fixture(scope="module")
def pmap_scatter() -> Outcomes:
    local, params = local_steps(), tree_of(0)
    sliced = {k: v.reshape(DEVICES, -1, *v.shape[1:]) for k, v in params.items()}

    def build(makers):
        prepare = lambda grads: jax.tree.map(lambda g: scatter(g, AXIS), grads)  # noqa: E731
        return jax.pmap(scan_all(makers, prepare), axis_name=AXIS)

    makers = {name: clippers(AXIS)[name] for name in PMAP_CLIPPERS}
    return run_together(makers, build, lambda f: f(local, sliced), local, sliced)


def _assert_matches_one_device(outcomes: Outcomes, reference: Outcomes, clipper: str) -> None:
    updates, state = outcomes[clipper]
    expected_updates, expected_state = reference[clipper]
    # Updates are (devices, steps, ...): slices split along the leaf's axis 0.
    assert_devices_agree(updates, expected_updates, "updates ", split_axis=1)
    assert_devices_agree(state, expected_state, "final state ")


@pytest.mark.parametrize("clipper", PMEAN_CLIPPERS)
def test_shard_map_pmean_whole_gradient_without_axis_name(pmean, reference, clipper):
    _assert_matches_one_device(pmean, reference, clipper)


@pytest.mark.parametrize("clipper", WITH_AXIS_NAME)
def test_shard_map_scattered_gradient_with_axis_name(shard_map_scatter, reference, clipper):
    _assert_matches_one_device(shard_map_scatter, reference, clipper)


@pytest.mark.parametrize("clipper", PMAP_CLIPPERS)
def test_pmap_scattered_gradient_with_axis_name(pmap_scatter, reference, clipper):
    _assert_matches_one_device(pmap_scatter, reference, clipper)


def test_axis_name_on_whole_gradients_counts_every_copy():
    """The documented misuse: with the whole gradient on every device, ``axis_name``
    adds up every device's copy: ``sqrt(devices)`` times the norm."""
    mesh = jax.make_mesh((DEVICES,), (AXIS,), axis_types=(AxisType.Explicit,))

    def per_device(local):
        whole = lax.pmean(jax.tree.map(lambda x: x[0, 0], local), AXIS)
        return device_leading((gc.global_norm(whole), gc.global_norm(whole, axis_name=AXIS)))

    local = jax.device_put(local_steps(), NamedSharding(mesh, P(AXIS)))
    program = jax.shard_map(per_device, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS))
    norm, misused = (np.asarray(v) for v in jax.jit(program)(local))
    np.testing.assert_allclose(misused, np.sqrt(DEVICES) * norm, rtol=RTOL)
