"""Measurement primitives: environment, trees, interleaved timing, compile time, HLO facts."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np
import optax

Tree = list[jax.Array]


def environment() -> dict[str, Any]:
    """What the figures were measured on: device, CPU count and library versions."""
    import gradclip_jax

    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": metadata.version("jaxlib"),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "gradclip_jax": gradclip_jax.__version__,
    }


def leaf_shape(size: int) -> tuple[int, int]:
    """A 2-D (in, out) kernel shape of ``size`` elements, as square as divisors allow."""
    rows = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return rows, size // rows


def host_tree(n_leaves: int, leaf_size: int, seed: int) -> list[np.ndarray]:
    """``n_leaves`` standard-normal float32 kernels of ``leaf_size`` elements, on the host."""
    rng = np.random.default_rng(seed)
    shape = leaf_shape(leaf_size)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n_leaves)]


def device_tree(n_leaves: int, leaf_size: int, seed: int) -> Tree:
    """Like :func:`host_tree`, placed on the default device one leaf at a time."""
    rng = np.random.default_rng(seed)
    shape = leaf_shape(leaf_size)
    return [jax.device_put(rng.standard_normal(shape, dtype=np.float32)) for _ in range(n_leaves)]


def shape_tree(n_leaves: int, leaf_size: int) -> list[jax.ShapeDtypeStruct]:
    """Abstract float32 leaves for lowering without allocating anything."""
    return [jax.ShapeDtypeStruct(leaf_shape(leaf_size), np.float32)] * n_leaves


def tree_bytes(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _sample(call: Callable[[], Any], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / inner


def time_interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, min_sample_s: float
) -> dict[str, dict[str, Any]]:
    """Seconds per call of each function, measured side by side.

    Each call is warmed up (compiled, first-touch) and excluded. Then ``repeats``
    rounds run every function once per round, the order rotating between rounds, so
    that load from other processes hits all of them alike. A sample repeats a cheap
    call until it lasts ``min_sample_s``. ``paired`` keeps the per-round samples so
    that ratios can be taken round by round.
    """
    inner: dict[str, int] = {}
    for name, call in calls.items():
        jax.block_until_ready(call())
        once = _sample(call, 1)
        inner[name] = max(1, min(10_000, math.ceil(min_sample_s / max(once, 1e-7))))
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name].append(_sample(calls[name], inner[name]))
    finally:
        gc.enable()
    return {
        name: {
            "median_s": statistics.median(s),
            "min_s": min(s),
            "samples_s": s,
            "calls_per_sample": inner[name],
        }
        for name, s in samples.items()
    }


def paired_ratio(timings: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` (interleaved rounds share the machine's load)."""
    pairs = zip(timings[num]["samples_s"], timings[den]["samples_s"])
    return statistics.median(a / b for a, b in pairs)


def ratio_stats(timings: dict[str, dict[str, Any]], keys: Any) -> dict[str, dict[str, float]]:
    """For each ``"num / den"`` key: median and quartiles of the per-round ratios, and the
    ratio of the fastest samples (least disturbed by other processes)."""
    stats = {}
    for key in keys:
        num, den = key.split(" / ")
        pairs = zip(timings[num]["samples_s"], timings[den]["samples_s"])
        per_round = sorted(a / b for a, b in pairs)
        q1, q3 = per_round[0], per_round[-1]
        if len(per_round) > 1:
            q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive")
        stats[key] = {
            "median": statistics.median(per_round),
            "q1": q1,
            "q3": q3,
            "of_minima": timings[num]["min_s"] / timings[den]["min_s"],
            "rounds": len(per_round),
        }
    return stats


def compile_fresh(fn: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, dict[str, float]]:
    """Lowers and compiles ``fn`` (a function object never jitted before), timing both."""
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    times = {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}
    return compiled, times


_MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
    "peak_memory_in_bytes",
)


def memory_facts(compiled: Any) -> dict[str, int]:
    """XLA's memory analysis; ``peak_bytes`` is temp + output + argument sizes."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if stats is None:
        return {}
    facts = {f: int(getattr(stats, f)) for f in _MEMORY_FIELDS if hasattr(stats, f)}
    parts = ("temp_size_in_bytes", "output_size_in_bytes", "argument_size_in_bytes")
    facts["peak_bytes"] = sum(facts.get(p, 0) for p in parts)
    return facts


def state_bytes(tx: optax.GradientTransformation, params: Any) -> int:
    """Bytes of ``tx.init(params)``, computed abstractly (nothing is allocated)."""
    return tree_bytes(jax.eval_shape(tx.init, params))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
