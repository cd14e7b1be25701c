"""Figure 3: one ``chain(clipper, adam)`` step against one ``adam`` step, same parameters."""

from __future__ import annotations

from typing import Any

import optax

from benchmarks import _clippers
from benchmarks._config import Config
from benchmarks._hlo import hlo_facts
from benchmarks._measure import (
    compile_fresh,
    device_tree,
    log,
    paired_ratio,
    ratio_stats,
    time_interleaved,
)
from benchmarks._names import ADAM, ratio_key

LEARNING_RATE = 1e-3


def _step_fn(tx: optax.GradientTransformation):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def run(cfg: Config) -> dict[str, Any]:
    n_leaves = 10
    leaf_size = cfg.chain_total // n_leaves
    ours, theirs = _clippers.global_pair()
    adaptive, left_out = _clippers.adaptive(cfg.max_adaptive)
    optimizers = {ADAM: lambda: optax.adam(LEARNING_RATE)}
    for c in [ours, theirs, *adaptive]:
        optimizers[f"{c.key} + adam"] = lambda c=c: optax.chain(
            c.factory(), optax.adam(LEARNING_RATE)
        )
    grads = device_tree(n_leaves, leaf_size, seed=0)
    params = device_tree(n_leaves, leaf_size, seed=1)
    calls, entries = {}, {}
    for name, make in optimizers.items():
        tx = make()
        state = tx.init(params)
        exe, times = compile_fresh(_step_fn(tx), (grads, state, params))
        entries[name] = {"compile": times, "hlo": hlo_facts(exe)}
        calls[name] = lambda exe=exe, state=state: exe(grads, state, params)
    timings = time_interleaved(calls, cfg.repeats_for(cfg.chain_total), cfg.min_sample_s)
    ratios = {}
    for name, timing in timings.items():
        entries[name]["run"] = timing
        if name != ADAM:
            ratios[ratio_key(name, ADAM)] = paired_ratio(timings, name, ADAM)
    log("chain: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()))
    return {
        "sizes": {"n_leaves": n_leaves, "leaf_size": leaf_size, "total_size": cfg.chain_total},
        "adaptive_left_out": left_out,
        "optimizers": entries,
        "ratios": ratios,
        "ratio_stats": ratio_stats(timings, ratios),
    }
