"""How things are measured: fresh compiles, interleaved run times, per-round ratios, memory."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

ONCE_ABOVE_S = 5.0  # a compile slower than this is measured once, not once per round
Maker = Callable[[], tuple[Callable[..., Any], tuple]]


def rotated(names: list[str], round_: int) -> list[str]:
    """``names`` starting at position ``round_``, so that no function always runs first."""
    k = round_ % len(names)
    return names[k:] + names[:k]


def compile_interleaved(makers: dict[str, Maker], rounds: int) -> tuple[dict, dict]:
    """Times ``jax.jit(fn).lower(*abstract_args).compile()``, ``rounds`` times, rotating.

    Each ``maker()`` builds a fresh function (and transformation) and its abstract
    arguments, so that nothing is reused. Returns the last executables and the times.
    """
    compiled: dict[str, Any] = {}
    seconds: dict[str, list[float]] = {name: [] for name in makers}
    for r in range(rounds):
        for name in rotated(list(makers), r):
            if seconds[name] and seconds[name][0] > ONCE_ABOVE_S:
                continue
            fn, abstract_args = makers[name]()
            start = time.perf_counter()
            compiled[name] = jax.jit(fn).lower(*abstract_args).compile()
            seconds[name].append(time.perf_counter() - start)
    return compiled, seconds


def _sample(call: Callable[[], Any], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(call())
    return (time.perf_counter() - start) / n


def time_interleaved(calls: dict[str, Callable], rounds: int, min_sample_s: float) -> tuple:
    """Seconds per call of each function, one sample per round, and the calls per sample.

    A warm-up call of each is excluded. Every round runs each function once, in an
    order rotating between rounds, so load from other processes hits them alike. A
    sample repeats a call until it lasts about ``min_sample_s``, blocking on every result.
    """
    per_sample: dict[str, int] = {}
    for name, call in calls.items():
        jax.block_until_ready(call())
        once = _sample(call, 1)
        per_sample[name] = max(1, min(10_000, math.ceil(min_sample_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in rotated(list(calls), r):
                samples[name].append(_sample(calls[name], per_sample[name]))
    finally:
        gc.enable()
    return samples, per_sample


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float | None]:
    """Median and quartiles of the per-round ratios ``num[i] / den[i]``."""
    ratios = sorted(a / b for a, b in zip(num, den) if b > 0)
    if not ratios:
        return {"ratio": None, "q1": None, "q3": None}
    q1, q3 = ratios[0], ratios[-1]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"ratio": statistics.median(ratios), "q1": q1, "q3": q3}


def memory(compiled: Any) -> dict[str, int | None]:
    """``peak_bytes``: temp + output + argument bytes of XLA's memory analysis (None when
    the backend gives none); ``xla_peak_bytes``: XLA's own peak estimate, if it has one."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        stats = None
    fields = ("temp_size_in_bytes", "output_size_in_bytes", "argument_size_in_bytes")
    if stats is None or not all(hasattr(stats, f) for f in fields):
        return {"peak_bytes": None, "xla_peak_bytes": None}
    peak = sum(int(getattr(stats, f)) for f in fields)
    return {"peak_bytes": peak, "xla_peak_bytes": getattr(stats, "peak_memory_in_bytes", None)}


def random_tree(n_leaves: int, shape: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """``n_leaves`` standard-normal float32 arrays on the host (every clipper clips them)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(n_leaves)]
