"""Figure 4: global-norm throughput against a read-bandwidth roof measured in the same run.

The roof is a NumPy dot of one contiguous float32 array of the same size (a BLAS read
at memory bandwidth). On an accelerator, where host memory is not the limit, the roof
is a jitted ``jnp.vdot`` of one contiguous device array. ``xla_floor`` is XLA's own
``sum(x * x)`` of that contiguous array: what the compiler reaches without any tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax
from benchmarks._config import Config
from benchmarks._hlo import hlo_facts
from benchmarks._measure import device_tree, log, paired_ratio, time_interleaved
from benchmarks._names import OPTAX_NORM as OPTAX
from benchmarks._names import OURS_NORM as OURS
from benchmarks._names import ROOF
from benchmarks._names import XLA_FLOOR as FLOOR


def _measure(total: int, n_leaves: int, cfg: Config) -> dict[str, Any]:
    tree = device_tree(n_leaves, total // n_leaves, seed=0)
    nbytes = total * 4
    flat_host = np.random.default_rng(1).standard_normal(total, dtype=np.float32)
    flat = jax.device_put(flat_host)
    on_cpu = jax.devices()[0].platform == "cpu"
    jitted = {
        OURS: (jax.jit(lambda t: gradclip_jax.global_norm(t)), tree),
        OPTAX: (jax.jit(lambda t: optax.global_norm(t)), tree),
        FLOOR: (jax.jit(lambda x: jnp.sum(x * x)), flat),
    }
    if not on_cpu:
        jitted[ROOF] = (jax.jit(lambda x: jnp.vdot(x, x)), flat)
    calls, hlo = {}, {}
    for name, (fn, arg) in jitted.items():
        exe = fn.lower(arg).compile()
        hlo[name] = hlo_facts(exe)
        calls[name] = lambda exe=exe, arg=arg: exe(arg)
    if on_cpu:
        calls[ROOF] = lambda: np.dot(flat_host, flat_host)
    timings = time_interleaved(calls, cfg.repeats_for(total), cfg.min_sample_s)
    series = {
        name: {**t, "gb_per_s": nbytes / t["median_s"] / 1e9, "hlo": hlo.get(name)}
        for name, t in timings.items()
    }
    # Fraction of the roof: roof time / our time, paired round by round.
    fractions = {name: paired_ratio(timings, ROOF, name) for name in timings if name != ROOF}
    log(f"throughput {total}: " + ", ".join(f"{k} {v:.2f} of roof" for k, v in fractions.items()))
    return {
        "total_size": total,
        "n_leaves": n_leaves,
        "bytes": nbytes,
        "series": series,
        "fraction_of_roof": fractions,
    }


def run(cfg: Config) -> dict[str, Any]:
    on_cpu = jax.devices()[0].platform == "cpu"
    return {
        "sizes": {"totals": list(cfg.size_totals), "n_leaves": cfg.size_leaves},
        "roof": "numpy.dot (host BLAS)" if on_cpu else "jax.numpy.vdot on the device",
        "records": [_measure(total, cfg.size_leaves, cfg) for total in cfg.size_totals],
    }
