"""One of the two processes of ``tests/test_multihost.py``: 4 CPU devices each, one
global mesh of 8 over both, JAX's multi-controller runtime on the loopback address.

    python tests/_multihost_worker.py PROCESS_ID PORT OUT_DIR

Process 0 runs the coordinator on ``127.0.0.1:PORT``. Each process builds the same global
arrays (``jax.make_array_from_callback`` for parameters and gradients,
``jax.make_array_from_process_local_data`` for a batch split between the processes),
runs every clipper, guard and ``dp_aggregate`` for a few jitted training steps (a spike
among them), then a few transformations with ``axis_name`` under a ``shard_map`` whose
axis spans both processes, and writes ``OUT_DIR/process_<id>.pkl``:
``{case: {"updates": [...], "stats": [...], "params": ...} | {"error": message}}``.
Updates and parameters are whole NumPy arrays (gathered from both processes);
statistics are this process's own copies, so the test can check that they are the
same on both. A case that fails is recorded with its error and the others still run
(both processes fail alike: they run the same program).

The test imports this module for the cases and :func:`train`, and runs them on one
device for the reference.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ["JAX_PLATFORMS"] = "cpu"

import pickle  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradclip_jax as gc  # noqa: E402
from gradclip_jax import rules  # noqa: E402

PROCESSES = 2
LOCAL_DEVICES = 4
# Seconds: how long a process waits for the other to connect, and to shut down.
TIMEOUT = 60
SCALES = (1.0, 1.2, 0.9, 40.0)  # gradient scale of each step: the last one spikes
BATCH = 16  # dp_aggregate: examples per step, half on each process
# Leaves on the (hosts=2, local=4) mesh: split across both processes in both
# dimensions, split over all 8 devices along columns or (large) rows, split within each
# process and replicated across them, replicated, a scalar.
LAYOUTS: dict[str, tuple[tuple[int, ...], P]] = {
    "grid": ((16, 32), P("hosts", "local")),
    "columns": ((8, 32), P(None, ("hosts", "local"))),
    "large": ((128, 64), P(("hosts", "local"), None)),
    "local": ((32,), P("local")),
    "replicated": ((8, 8), P()),
    "scalar": ((), P()),
}
# shard_map with axis_name: every leaf split along its first axis over all 8 devices.
SPLIT_SHAPES = {"w": (16, 8), "v": (32,)}

_zscore = rules.zscore(warmup_steps=2, max_norm=None)
_dp_quantile = rules.quantile(initial=1.0)
# name -> (transformation, gradients per example). Settings that clip and move their
# state within the steps.
CASES: dict[str, tuple[Callable[[], optax.GradientTransformation], bool]] = {
    "clip_by_value": (lambda: gc.clip_by_value(0.05), False),
    "clip_by_global_norm": (lambda: gc.clip_by_global_norm(5.0), False),
    "clip_by_leaf_norm": (lambda: gc.clip_by_leaf_norm(3.0), False),
    "clip_by_block_rms": (lambda: gc.clip_by_block_rms(0.05), False),
    "agc": (lambda: gc.agc(0.01), False),
    "adaptive_clip": (lambda: gc.adaptive_clip(_zscore), False),
    "adaptive_clip_leaf": (lambda: gc.adaptive_clip(_zscore, granularity="leaf"), False),
    "autoclip": (lambda: gc.autoclip(p=50.0, history=4), False),
    "zclip": (lambda: gc.zclip(warmup_steps=2, max_norm=10.0), False),
    "adagc": (lambda: gc.adagc(warmup_steps=1), False),
    "quantile_clip": (lambda: gc.quantile_clip(initial=1.0), False),
    "skip_on_spike": (
        lambda: gc.skip_on_spike(optax.sgd(0.1, momentum=0.9), window=4, min_history=2),
        False,
    ),
    "on_nonfinite": (lambda: gc.on_nonfinite(optax.sgd(0.1, momentum=0.9)), False),
    "dp_aggregate": (lambda: gc.dp_aggregate(1.0, noise_multiplier=0.5, seed=3), True),
    "dp_aggregate_quantile": (
        lambda: gc.dp_aggregate(_dp_quantile, noise_multiplier=0.5, seed=3),
        True,
    ),
}
# name -> (with axis_name "d", the same without: the reference, gradients per example).
SHARD_MAP_CASES: dict[str, tuple[Callable[..., optax.GradientTransformation], bool]] = {
    "clip_by_global_norm": (lambda **a: gc.clip_by_global_norm(5.0, **a), False),
    "zclip": (lambda **a: gc.zclip(warmup_steps=2, max_norm=10.0, **a), False),
    "dp_aggregate": (lambda **a: gc.dp_aggregate(1.0, noise_multiplier=0.5, seed=3, **a), True),
}


def shapes(split: bool = False) -> dict[str, tuple[int, ...]]:
    return dict(SPLIT_SHAPES) if split else {k: shape for k, (shape, _) in LAYOUTS.items()}


def initial_params(split: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes(split).items()}


def gradient_steps(per_example: bool, split: bool = False) -> list[dict[str, np.ndarray]]:
    """The gradients of each step (before the parameters' part, see :func:`train`)."""
    batch = (BATCH,) if per_example else ()
    steps = []
    for i, scale in enumerate(SCALES):
        rng = np.random.default_rng(100 + i)
        steps.append(
            {
                k: (scale * rng.normal(size=batch + s)).astype(np.float32)
                for k, s in shapes(split).items()
            }
        )
    return steps


def train(
    tx: optax.GradientTransformation,
    params: Any,
    steps: list[Any],
    *,
    wrap: Callable[..., Callable] = lambda fn, init=False: fn,
    fetch: Callable[[Any], Any] = lambda tree: jax.tree.map(np.asarray, tree),
    local: Callable[[Any], Any] = lambda tree: jax.tree.map(np.asarray, tree),
    check: Callable[[Any, Any], None] = lambda updates, grads: None,
    per_example: bool = False,
) -> dict[str, Any]:
    """Jitted training steps of ``tx`` then SGD: each step's updates and statistics, and
    the final parameters.

    The gradient of a step is the step's gradients plus a tenth of the parameters, so
    the parameters feed back (``per_example`` gradients, whose batch axis is laid out
    unlike the parameters, are taken as they are). ``wrap`` maps the init and step
    functions (a ``shard_map``); ``fetch`` makes whole NumPy arrays of global ones;
    ``local`` makes NumPy arrays of this process's copies of the (replicated)
    statistics; ``check(updates, grads)`` raises when the updates are laid out wrong.
    """

    def step(params, state, grads):
        if not per_example:
            grads = jax.tree.map(lambda g, p: g + 0.1 * p, grads, params)
        updates, state = tx.update(grads, state, params)
        sgd = jax.tree.map(lambda u: -0.1 * u, updates)
        return optax.apply_updates(params, sgd), state, updates

    init = jax.jit(wrap(tx.init, init=True))
    step = jax.jit(wrap(step))
    state = init(params)
    record: dict[str, Any] = {"updates": [], "stats": []}
    for grads in steps:
        params, state, updates = step(params, state, grads)
        check(updates, grads)
        record["updates"].append(fetch(updates))
        record["stats"].append(local(gc.stats(state)))
    record["params"] = fetch(params)
    return record


def _mesh_cases(mesh) -> dict[str, Any]:
    from jax.experimental import multihost_utils

    pid = jax.process_index()
    shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in LAYOUTS.items()}
    # A batch split between the processes: each one passes its own half.
    batch_sharding = {k: NamedSharding(mesh, P("hosts")) for k in LAYOUTS}

    def global_array(x, sharding):
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def local_half(x, sharding):
        half = x.shape[0] // PROCESSES
        return jax.make_array_from_process_local_data(sharding, x[pid * half : (pid + 1) * half])

    def fetch(tree):
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

    def local(tree):
        for leaf in jax.tree.leaves(tree):
            assert leaf.is_fully_replicated, f"statistic not replicated: {leaf.sharding}"
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    def keeps_shardings(updates, grads):
        for key, update in updates.items():
            if not update.sharding.is_equivalent_to(grads[key].sharding, update.ndim):
                raise AssertionError(
                    f"update {key!r} has sharding {update.sharding.spec}; its gradient "
                    f"had {grads[key].sharding.spec}"
                )

    params = jax.tree.map(global_array, initial_params(), shardings)
    results = {}
    for name, (make, per_example) in CASES.items():
        try:
            put = local_half if per_example else global_array
            where = batch_sharding if per_example else shardings
            steps = [jax.tree.map(put, g, where) for g in gradient_steps(per_example)]
            # Per-example gradients are split along the batch, the update is not.
            check = (lambda u, g: None) if per_example else keeps_shardings
            # Traced under the mesh, as explicit axes want: jit of an init whose outputs
            # do not depend on the parameters' values (optax's momentum) fails without.
            with jax.set_mesh(mesh):
                results[name] = train(
                    make(),
                    params,
                    steps,
                    fetch=fetch,
                    local=local,
                    check=check,
                    per_example=per_example,
                )
        except Exception as error:  # noqa: BLE001 - reported, with its traceback
            results[name] = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
    return results


def _shard_map_cases() -> dict[str, Any]:
    from jax.experimental import multihost_utils

    mesh = jax.make_mesh((PROCESSES * LOCAL_DEVICES,), ("d",))
    split = NamedSharding(mesh, P("d"))
    replicated = NamedSharding(mesh, P())

    def fetch(tree):
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))

    def local(tree):
        return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)

    results = {}
    for name, (make, per_example) in SHARD_MAP_CASES.items():
        try:
            # Split gradients and parameters clip with axis_name; dp_aggregate splits the
            # batch and keeps the parameters replicated.
            param_spec = P() if per_example else P("d")

            def wrap(fn, init=False, param_spec=param_spec):
                state_spec = P()  # these states are replicated scalars, keys and buffers
                if init:
                    return jax.shard_map(fn, mesh=mesh, in_specs=param_spec, out_specs=state_spec)
                return jax.shard_map(
                    fn,
                    mesh=mesh,
                    in_specs=(param_spec, state_spec, P("d")),
                    out_specs=(param_spec, state_spec, param_spec),
                )

            def put(x, sharding):
                return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

            where = replicated if per_example else split
            params = jax.tree.map(lambda x, where=where: put(x, where), initial_params(True))
            steps = [
                jax.tree.map(lambda x: put(x, split), g)
                for g in gradient_steps(per_example, split=True)
            ]
            results[f"shard_map/{name}"] = train(
                make(axis_name="d"),
                params,
                steps,
                wrap=wrap,
                fetch=fetch,
                local=local,
                per_example=per_example,
            )
        except Exception as error:  # noqa: BLE001 - reported, with its traceback
            results[f"shard_map/{name}"] = {
                "error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
            }
    return results


def main(process_id: int, port: int, out_dir: str) -> int:
    jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
    address = f"127.0.0.1:{port}"
    jax.distributed.initialize(
        coordinator_address=address,
        coordinator_bind_address=address,
        num_processes=PROCESSES,
        process_id=process_id,
        cluster_detection_method="deactivate",
        initialization_timeout=TIMEOUT,
        heartbeat_timeout_seconds=TIMEOUT,
        shutdown_timeout_seconds=TIMEOUT,
    )
    assert jax.process_count() == PROCESSES, jax.process_count()
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == PROCESSES * LOCAL_DEVICES, jax.devices()
    mesh = jax.make_mesh((PROCESSES, LOCAL_DEVICES), ("hosts", "local"))
    results = _mesh_cases(mesh)
    results.update(_shard_map_cases())
    with open(os.path.join(out_dir, f"process_{process_id}.pkl"), "wb") as file:
        pickle.dump(results, file)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
