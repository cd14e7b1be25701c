"""What the multi-device tests run, and how they compare it with one device.

Every clipper runs over the same five gradient steps (one with a NaN entry, one a x40
spike) from the same parameters, on one device (the reference) and sharded or split
over 8. A suite compiles all its clippers into one program (each scanned over the
steps), so a test run is a handful of compilations; each clipper's comparison is then
its own test.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _trees import assert_trees_close
from jax import lax

import gradclip_jax as gc
from gradclip_jax import rules

DEVICES = 8
# Gradient scales of the steps: ordinary steps, one with a NaN entry, then a spike.
SCALES = (1.0, 1.3, 0.8, 1.1, 40.0)
NAN_STEP = 3

# Two large leaves (8,192 elements, above the norms' small-leaf size) and small ones;
# every leaf's first axis divides by 8, so shard_map can split each along it.
SHAPES = {"k1": (64, 128), "b1": (128,), "k2": (128, 64), "b2": (64,)}
LARGE = ("k1", "k2")

Makers = dict[str, Callable[[], optax.GradientTransformation]]


def _named_clippers() -> dict[str, Callable[..., optax.GradientTransformation]]:
    """Every clipper with an ``axis_name``, with settings that clip and move their state
    within five steps; each takes ``axis_name=`` as keyword arguments."""
    zscore = rules.zscore(warmup_steps=2, max_norm=None)
    return {
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


# The clippers that take an axis_name: every one but agc, which has none (see
# docs/multi_device.md).
WITH_AXIS_NAME = tuple(_named_clippers())
CLIPPERS = (*WITH_AXIS_NAME, "agc")


def clippers(axis: Any = None) -> Makers:
    """Every clipper; given ``axis``, those with an ``axis_name`` get it (pattern (b2))."""
    if axis is not None:
        return {name: (lambda f=f: f(axis_name=axis)) for name, f in _named_clippers().items()}
    makers: Makers = {name: (lambda f=f: f()) for name, f in _named_clippers().items()}
    makers["agc"] = lambda: gc.agc(0.01)
    return makers


def tree_of(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def stacked_steps() -> dict[str, np.ndarray]:
    """The gradients of every step, stacked along a leading step axis."""
    steps = [tree_of(100 + i, scale) for i, scale in enumerate(SCALES)]
    steps[NAN_STEP]["b1"][3] = np.nan
    return {k: np.stack([s[k] for s in steps]) for k in SHAPES}


def local_steps() -> dict[str, np.ndarray]:
    """Each device's gradients at each step, ``(devices, steps, ...)``: the reference's
    gradients plus per-device deviations that cancel in the mean."""
    rng = np.random.default_rng(7)
    local = {}
    for key, steps in stacked_steps().items():
        noise = rng.normal(size=(DEVICES, *steps.shape)).astype(np.float32)
        local[key] = steps[None] + 0.5 * (noise - noise.mean(axis=0))
    return local


def scatter(x: jax.Array, axis: str) -> jax.Array:
    """This device's slice (along axis 0) of the mean over devices."""
    return lax.psum_scatter(x, axis, scatter_dimension=0, tiled=True) / DEVICES


def scan_all(makers: Makers, prepare: Callable[[Any], Any] = lambda grads: grads):
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


@dataclasses.dataclass
class Outcomes:
    """Each clipper's outputs from one program, or why it could not join the program."""

    outputs: dict[str, Any] = dataclasses.field(repr=False)
    errors: dict[str, Exception]

    def __getitem__(self, name: str) -> Any:
        if name in self.errors:
            raise self.errors[name]
        return self.outputs[name]


def run_together(makers: Makers, build: Callable[[Makers], Callable], run, *args) -> Outcomes:
    """``run(build(makers))``: every clipper in one program, the ones that do not trace
    left out, so that one clipper that cannot run there does not hide the others.

    ``build(makers)`` must be a function of ``args``; ``run`` compiles and calls it.
    """
    errors: dict[str, Exception] = {}
    try:
        jax.eval_shape(build(makers), *args)
    except Exception:  # noqa: BLE001 - find which clippers fail, one by one
        for name, make in makers.items():
            try:
                jax.eval_shape(build({name: make}), *args)
            except Exception as error:  # noqa: BLE001 - raised by that clipper's test
                errors[name] = error
    good = {name: make for name, make in makers.items() if name not in errors}
    return Outcomes(run(build(good)) if good else {}, errors)


def assert_devices_agree(stacked: Any, expected: Any, what: str, split_axis: int = 0) -> None:
    """Per-device results (leading device axis) against the single-device ones.

    A leaf with the expected shape on each device (replicated: statistics, counters)
    must match on every device; other leaves (a device's slice) are concatenated along
    ``split_axis`` and the whole compared.
    """

    def whole(per_device, full):
        per_device = np.asarray(per_device)
        if per_device.shape[1:] == np.shape(full):
            for device in range(DEVICES):
                assert_trees_close(per_device[device], full, f"{what} (device {device})")
            return per_device[0]
        return np.concatenate(list(per_device), axis=split_axis)

    assert_trees_close(jax.tree.map(whole, stacked, expected), expected, what)


def device_leading(tree: Any) -> Any:
    """Each leaf with a leading axis of one, to stack the devices' results along."""
    return jax.tree.map(lambda x: jnp.asarray(x)[None], tree)


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
