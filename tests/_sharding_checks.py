"""Multi-device checks on 8 simulated CPU devices, run in a subprocess by test_sharding.py.

The device count must be set before jax is imported, which pytest's process has already
done, hence the subprocess. Run it by hand too:

    python tests/_sharding_checks.py                        # every suite
    python tests/_sharding_checks.py jit_tensor shard_map_dp  # suites matching a word

It prints one line per check and, last, a JSON object ``{check: "ok" | failure}``; the
exit status is 1 when a check failed. A suite compiles all its clippers into one program
(each scanned over the steps), so the run is a handful of compilations; a clipper that
fails to trace is reported alone and left out of its suite's program.

Every suite compares with one single-device reference: every clipper run over the same
five gradient steps (one with a NaN entry, one a x40 spike), from the same parameters.
What is checked (docs/multi_device.md explains the patterns):

* ``jit_fsdp/<clipper>``, ``jit_tensor/<clipper>``: under ``jax.jit`` with parameters and
  gradients sharded FSDP-style over a 1-D mesh (explicit axes, the ``jax.make_mesh``
  default) or tensor-parallel over a 2-D data x model mesh (auto axes), every clipper's
  updates and whole final state (rule states, ClipStats, the guards' inner momentum) equal
  the reference (1e-6 relative), and the updates keep their gradients' shardings.
  ``jit_<mesh>/no_large_all_gather``: the compiled program all-gathers nothing larger
  than the small leaves together (no whole or partial large parameter).
* ``shard_map_pmean/<clipper>``: pattern (b1), data parallel with explicit collectives:
  each device averages the devices' gradients with ``pmean`` and clips the whole
  average without ``axis_name``; every device's updates and state equal the reference.
  ``shard_map_pmean/axis_name_on_whole_gradients``: the documented misuse measures
  ``sqrt(devices)`` times the norm.
* ``shard_map_scatter/<clipper>``, ``pmap_scatter/<clipper>``: pattern (b2): each device
  holds a slice of the averaged gradient (``psum_scatter``) and clips with
  ``axis_name``; the slices of the updates, put together, equal the reference, and the
  statistics agree on every device.
* ``shard_map_dp/<mode>``: ``dp_aggregate(axis_name=...)`` on a batch split over the
  devices equals the single-device aggregate of the whole batch, noise included.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # 8 simulated devices, set before jax is imported. LLVM optimisations off: compiling
    # is most of this script's time, and the sharded programs and their single-device
    # references are compiled alike. (Imported as a module, by pytest's doctest
    # collection, it leaves the environment alone.)
    for flag in ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"):
        if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradclip_jax as gc  # noqa: E402
from gradclip_jax import rules  # noqa: E402

DEVICES = 8
RTOL = 1e-6
# Gradient scales of the steps: ordinary steps, one with a NaN entry, then a spike.
SCALES = (1.0, 1.3, 0.8, 1.1, 40.0)
NAN_STEP = 3

# Two large leaves (8,192 elements, above the norms' small-leaf size) and small ones;
# every leaf's first axis divides by 8, so shard_map can split each along it.
SHAPES = {"k1": (64, 128), "b1": (128,), "k2": (128, 64), "b2": (64,)}
LARGE = ("k1", "k2")
# FSDP: leaves split along their first axis, except a small one kept replicated.
FSDP = {"k1": P("fsdp"), "b1": P("fsdp"), "k2": P("fsdp"), "b2": P()}
# Column- then row-parallel kernels; b2 replicated.
TENSOR = {"k1": P("data", "model"), "b1": P("model"), "k2": P("model", "data"), "b2": P()}

Makers = dict[str, Callable[[], optax.GradientTransformation]]


def clippers(axis: Any = None, *, with_params: bool = True) -> Makers:
    """Every clipper, with settings that clip and move their state within five steps.

    Every clipper with an ``axis_name`` gets ``axis`` (pattern (b2)). ``agc`` has
    none (see docs/multi_device.md); it joins only when ``axis`` is ``None`` and
    ``with_params``.
    """
    zscore = rules.zscore(warmup_steps=2, max_norm=None)
    named = {
        "clip_by_value": lambda **a: gc.clip_by_value(0.05, **a),
        "clip_by_global_norm": lambda **a: gc.clip_by_global_norm(5.0, **a),
        "clip_by_leaf_norm": lambda **a: gc.clip_by_leaf_norm(3.0, **a),
        "clip_by_block_rms": lambda **a: gc.clip_by_block_rms(0.05, **a),
        "adaptive_clip": lambda **a: gc.adaptive_clip(zscore, **a),
        "adaptive_clip_leaf": lambda **a: gc.adaptive_clip(zscore, granularity="leaf", **a),
        "adagc": lambda **a: gc.adagc(warmup_steps=1, **a),
        "autoclip": lambda **a: gc.autoclip(p=50.0, history=4, **a),
        "zclip": lambda **a: gc.zclip(warmup_steps=2, max_norm=10.0, **a),
        "quantile_clip": lambda **a: gc.quantile_clip(initial=1.0, **a),
        "skip_on_spike": lambda **a: gc.skip_on_spike(
            optax.sgd(0.1, momentum=0.9), window=4, min_history=2, **a
        ),
        "on_nonfinite": lambda **a: gc.on_nonfinite(optax.sgd(0.1, momentum=0.9), **a),
    }
    extra = {} if axis is None else {"axis_name": axis}
    makers: Makers = {name: (lambda f=f: f(**extra)) for name, f in named.items()}
    if axis is None and with_params:
        makers["agc"] = lambda: gc.agc(0.01)
    return makers


def tree_of(seed: int, scale: float = 1.0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in shapes.items()}


def stacked_steps(shapes=SHAPES) -> dict[str, np.ndarray]:
    """The gradients of every step, stacked along a leading step axis."""
    steps = [tree_of(100 + i, scale, shapes) for i, scale in enumerate(SCALES)]
    steps[NAN_STEP]["b1"][3] = np.nan
    return {k: np.stack([s[k] for s in steps]) for k in shapes}


def scan_all(makers: Makers, prepare=lambda grads: grads):
    """``f(steps, params) -> {name: (updates per step, final state)}`` for every clipper.

    Each clipper is initialised from ``params`` and scanned over the leading axis of
    ``steps``; ``prepare`` turns a step's gradients into what the clipper sees (a
    collective, under shard_map). Each clipper runs in a named scope, so compiled ops
    carry its name.
    """
    transforms = {name: make() for name, make in makers.items()}

    def run(steps, params):
        results = {}
        for name, tx in transforms.items():
            with jax.named_scope(name):

                def body(state, grads, tx=tx):
                    updates, state = tx.update(prepare(grads), state, params)
                    return state, updates

                state, updates = lax.scan(body, tx.init(params), steps)
            results[name] = (updates, state)
        return results

    return run


def assert_close(actual: Any, expected: Any, what: str) -> None:
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    if a_def != e_def:
        raise AssertionError(f"{what}: structures differ: {a_def} vs {e_def}")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for path, a, e in zip(paths, a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        if a.dtype.kind in "fc":
            # Sums in another order: ~1e-7 relative error on each value, and entries
            # much smaller than their neighbours (Adam updates) inherit it absolutely.
            finite = np.abs(e[np.isfinite(e)])
            atol = RTOL * float(finite.max(initial=0))
            np.testing.assert_allclose(
                a, e, rtol=RTOL, atol=atol, equal_nan=True, err_msg=f"{what}{path}"
            )
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"{what}{path}")


def large_all_gathers(compiled_text: str, limit: int) -> list[str]:
    """The all-gathers of a compiled HLO module whose result has more than ``limit``
    elements, with the op name (and so the clipper's scope) that produced them."""
    found = []
    for line in compiled_text.splitlines():
        match = re.search(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", line)
        if match:
            size = int(np.prod([int(d) for d in match.group(1).split(",") if d], dtype=np.int64))
            if size > limit:
                op = re.search(r'op_name="([^"]*)"', line)
                found.append(f"{match.group(0)[2:-1]} from {op.group(1) if op else line[:200]}")
    return found


def _device_leading(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)


def _compare_devices(stacked: Any, expected: Any, what: str, split_axis: int = 0) -> None:
    """Per-device results (leading device axis) against the single-device ones.

    A leaf with the expected shape on each device (replicated) must match on every
    device; other leaves (a device's slice) are concatenated along ``split_axis``.
    """

    def whole(per_device, full):
        per_device = np.asarray(per_device)
        if per_device.shape[1:] == np.shape(full):
            for d in range(DEVICES):
                assert_close(per_device[d], full, f"{what} (device {d})")
            return per_device[0]
        return np.concatenate(list(per_device), axis=split_axis)

    assert_close(jax.tree.map(whole, stacked, expected), expected, what)


def _record(results: dict[str, str], name: str, check: Callable[[], None]) -> None:
    try:
        check()
        results[name] = "ok"
    except Exception as error:  # noqa: BLE001 - reported, with its traceback
        results[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-2)}"


def traceable(results: dict[str, str], prefix: str, makers: Makers, build, *args) -> Makers:
    """The clippers whose program ``build({name: maker})(*args)`` traces; the others are
    recorded as failed, so one clipper that cannot run here does not hide the rest."""
    try:
        jax.eval_shape(build(makers), *args)
        return makers
    except Exception:  # noqa: BLE001 - find which clippers fail, one by one
        pass
    good: Makers = {}
    for name, make in makers.items():
        try:
            jax.eval_shape(build({name: make}), *args)
            good[name] = make
        except Exception as error:  # noqa: BLE001 - reported, with its traceback
            trace = traceback.format_exc(limit=-4)
            results[f"{prefix}/{name}"] = (
                f"does not trace: {type(error).__name__}: {error}\n{trace}"
            )
    return good


# ----------------------------------------------------------------------- suites


_REFERENCE: dict[str, Any] = {}


def reference() -> dict[str, Any]:
    """Every clipper run on one device over the steps: what every suite must reproduce."""
    if not _REFERENCE:
        steps = jax.device_put(stacked_steps())
        _REFERENCE.update(jax.jit(scan_all(clippers()))(steps, tree_of(0)))
    return _REFERENCE


def suite_jit(mesh_name: str, results: dict[str, str]) -> None:
    if mesh_name == "fsdp":
        mesh = jax.make_mesh((DEVICES,), ("fsdp",), axis_types=(AxisType.Explicit,))
        specs = FSDP
    else:
        mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        specs = TENSOR
    makers = clippers()
    shardings = {k: NamedSharding(mesh, specs[k]) for k in SHAPES}
    step_shardings = {k: NamedSharding(mesh, P(None, *specs[k])) for k in SHAPES}
    steps = jax.device_put(stacked_steps(), step_shardings)
    params = jax.device_put(tree_of(0), shardings)
    with jax.set_mesh(mesh):
        makers = traceable(results, f"jit_{mesh_name}", makers, scan_all, steps, params)
        compiled = jax.jit(scan_all(makers)).lower(steps, params).compile()
        outputs = compiled(steps, params)

    for name in makers:

        def check(name=name):
            updates, state = outputs[name]
            expected_updates, expected_state = reference()[name]
            assert_close(updates, expected_updates, "updates ")
            assert_close(state, expected_state, "final state ")
            for key, leaf in updates.items():
                if not leaf.sharding.is_equivalent_to(step_shardings[key], leaf.ndim):
                    raise AssertionError(
                        f"update {key!r} has sharding {leaf.sharding.spec}; its gradient "
                        f"had {step_shardings[key].spec}"
                    )

        _record(results, f"jit_{mesh_name}/{name}", check)

    small_total = sum(int(np.prod(s, dtype=np.int64)) for k, s in SHAPES.items() if k not in LARGE)

    def no_large_all_gather():
        gathered = large_all_gathers(compiled.as_text(), small_total)
        if gathered:
            raise AssertionError("large arrays all-gathered:\n" + "\n".join(gathered))

    _record(results, f"jit_{mesh_name}/no_large_all_gather", no_large_all_gather)


def _local_steps() -> dict[str, np.ndarray]:
    """Each device's gradients at each step, ``(devices, steps, ...)``: the reference's
    gradients plus per-device deviations that cancel in the mean."""
    rng = np.random.default_rng(7)
    local = {}
    for key, steps in stacked_steps().items():
        noise = rng.normal(size=(DEVICES, *steps.shape)).astype(np.float32)
        local[key] = steps[None] + 0.5 * (noise - noise.mean(axis=0))
    return local


def _scatter(x: jax.Array) -> jax.Array:
    """This device's slice (along axis 0) of the mean over devices."""
    return lax.psum_scatter(x, "d", scatter_dimension=0, tiled=True) / DEVICES


def suite_shard_map(pattern: str, results: dict[str, str]) -> None:
    mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
    local = _local_steps()
    params = tree_of(0)
    if pattern == "pmean":
        makers = {n: clippers()[n] for n in ("clip_by_global_norm", "skip_on_spike")}
        prepare = lambda grads: lax.pmean(grads, "d")  # noqa: E731
        param_spec = P()
    else:
        makers = clippers("d")
        prepare = lambda grads: jax.tree.map(_scatter, grads)  # noqa: E731
        param_spec = P("d")

    def build(makers):
        run = scan_all(makers, prepare)

        def per_device(local, params):
            outputs = run(jax.tree.map(lambda x: x[0], local), params)
            if pattern == "pmean":
                # The misuse: axis_name on gradients that every device holds whole.
                whole = lax.pmean(jax.tree.map(lambda x: x[0, 0], local), "d")
                outputs["misuse"] = (gc.global_norm(whole), gc.global_norm(whole, axis_name="d"))
            return _device_leading(outputs)

        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"), param_spec), out_specs=P("d"))

    put = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(local, P("d")), put(params, param_spec))
    makers = traceable(results, f"shard_map_{pattern}", makers, build, *args)
    outputs = jax.jit(build(makers))(*args)

    for name in makers:

        def check(name=name):
            updates, state = outputs[name]
            expected_updates, expected_state = reference()[name]
            # Updates are (devices, steps, ...): slices split along the leaf's axis 0.
            _compare_devices(updates, expected_updates, "updates ", split_axis=1)
            _compare_devices(state, expected_state, "final state ")

        _record(results, f"shard_map_{pattern}/{name}", check)

    if pattern == "pmean":

        def misuse():
            norm, misused = (np.asarray(v) for v in outputs["misuse"])
            np.testing.assert_allclose(misused, np.sqrt(DEVICES) * norm, rtol=RTOL)

        _record(results, "shard_map_pmean/axis_name_on_whole_gradients", misuse)


def suite_pmap(results: dict[str, str]) -> None:
    local, params = _local_steps(), tree_of(0)
    names = ("clip_by_global_norm",)
    sliced = {k: v.reshape(DEVICES, -1, *v.shape[1:]) for k, v in params.items()}

    def build(makers):
        return jax.pmap(scan_all(makers, lambda g: jax.tree.map(_scatter, g)), axis_name="d")

    makers = {n: clippers("d")[n] for n in names}
    makers = traceable(results, "pmap_scatter", makers, build, local, sliced)
    outputs = build(makers)(local, sliced)
    for name in makers:

        def check(name=name):
            updates, state = outputs[name]
            _compare_devices(updates, reference()[name][0], "updates ", split_axis=1)
            _compare_devices(state, reference()[name][1], "final state ")

        _record(results, f"pmap_scatter/{name}", check)


def suite_dp(results: dict[str, str]) -> None:
    mesh = jax.make_mesh((DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
    batch, steps = 64, 4
    rng = np.random.default_rng(3)
    spread = 10.0 ** rng.uniform(-1, 1, size=(steps, batch))
    grads = {
        "w": (rng.normal(size=(steps, batch, 6, 3)) * spread[..., None, None]).astype(np.float32),
        "b": (rng.normal(size=(steps, batch, 3)) * spread[..., None]).astype(np.float32),
    }

    def makers(axis: Any) -> Makers:
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

    expected = jax.jit(scan_all(makers(None)))(grads, None)
    batch_split = P(None, "d")

    def build(makers):
        return jax.shard_map(
            lambda g: scan_all(makers)(g, None), mesh=mesh, in_specs=batch_split, out_specs=P()
        )

    sharded_grads = jax.device_put(grads, NamedSharding(mesh, batch_split))
    good = traceable(results, "shard_map_dp", makers("d"), build, sharded_grads)
    outputs = jax.jit(build(good))(sharded_grads)
    for name in good:

        def check(name=name):
            assert_close(outputs[name], expected[name], "")

        _record(results, f"shard_map_dp/{name}", check)


def suites() -> dict[str, Callable[[dict[str, str]], None]]:
    return {
        "jit_fsdp": lambda r: suite_jit("fsdp", r),
        "jit_tensor": lambda r: suite_jit("tensor", r),
        "shard_map_pmean": lambda r: suite_shard_map("pmean", r),
        "shard_map_scatter": lambda r: suite_shard_map("scatter", r),
        "pmap_scatter": suite_pmap,
        "shard_map_dp": suite_dp,
    }


def main(words: list[str]) -> int:
    jax.config.update("jax_numpy_rank_promotion", "raise")  # as tests/conftest.py
    if jax.device_count() != DEVICES:
        print(json.dumps({"setup": f"expected {DEVICES} devices, got {jax.devices()}"}))
        return 1
    results: dict[str, str] = {}
    for suite, run in suites().items():
        if words and not any(w in suite for w in words):
            continue
        before = set(results)
        try:
            run(results)
        except Exception as error:  # noqa: BLE001 - the whole suite failed to run
            results[suite] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"
        for name in sorted(set(results) - before):
            print(f"{name}: {results[name].splitlines()[0][:300]}", flush=True)
    print(json.dumps(results))
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
