"""Figure 5: our global-norm clip against ``torch.nn.utils.clip_grad_norm_(foreach=True)``.

Optional: skipped (with the reason recorded) when torch cannot be imported. Both sides
get the same arrays with the same leaf shapes. PyTorch clips in place; our update returns
new arrays as an optax update does (the goal's series), and a second series donates the
gradients so that XLA writes in place too.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import _clippers
from benchmarks._config import Config
from benchmarks._hlo import hlo_facts
from benchmarks._measure import (
    compile_fresh,
    host_tree,
    leaf_shape,
    log,
    paired_ratio,
    ratio_stats,
    time_interleaved,
)
from benchmarks._names import DONATED, TORCH, ratio_key


def _torch_device(torch: Any) -> str | None:
    platform = jax.devices()[0].platform
    if platform == "cpu":
        return "cpu"
    if platform in ("gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    return None


def _donated_call(tx: Any, grads: list[jax.Array]):
    """Our update writing into the gradients' own buffers, in place like PyTorch.

    The gradients are donated, so each call feeds the previous result back in.
    """
    state = tx.init(grads)
    update = jax.jit(lambda g, s: tx.update(g, s)[0], donate_argnums=0)
    carry = [[jnp.array(x, copy=True) for x in grads]]

    def call() -> Any:
        carry[0] = update(carry[0], state)
        return carry[0]

    return call


def _measure(n_leaves: int, leaf_size: int, cfg: Config, torch: Any, device: str):
    host = host_tree(n_leaves, leaf_size, seed=0)
    grads = [jax.device_put(x) for x in host]
    params = []
    for x in host:
        p = torch.empty(x.shape, device=device)  # never touched: its pages are never mapped
        p.grad = torch.tensor(x, device=device)
        params.append(p)
    del host
    calls, compile_times, hlo = {}, {}, {}
    for c in _clippers.global_pair():
        tx = c.factory()
        state = tx.init(grads)
        exe, compile_times[c.key] = compile_fresh(
            lambda g, s, tx=tx: tx.update(g, s), (grads, state)
        )
        hlo[c.key] = hlo_facts(exe)
        calls[c.key] = lambda exe=exe, state=state: exe(grads, state)
    calls[DONATED] = _donated_call(_clippers.global_pair()[0].factory(), grads)

    def torch_clip() -> None:
        torch.nn.utils.clip_grad_norm_(params, _clippers.MAX_NORM, foreach=True)
        if device == "cuda":
            torch.cuda.synchronize()

    calls[TORCH] = torch_clip
    total = n_leaves * leaf_size
    timings = time_interleaved(calls, cfg.repeats_for(total), cfg.min_sample_s)
    ratio = paired_ratio(timings, _clippers.GLOBAL, TORCH)
    log(f"torch {n_leaves} x {leaf_size}: ours / torch = {ratio:.2f}")
    ratios = {
        ratio_key(_clippers.GLOBAL, TORCH): ratio,
        ratio_key(DONATED, TORCH): paired_ratio(timings, DONATED, TORCH),
        ratio_key(_clippers.OPTAX_GLOBAL, TORCH): paired_ratio(
            timings, _clippers.OPTAX_GLOBAL, TORCH
        ),
    }
    return {
        "n_leaves": n_leaves,
        "leaf_size": leaf_size,
        "leaf_shape": list(leaf_shape(leaf_size)),
        "total_size": total,
        "compile": compile_times,
        "hlo": hlo,
        "runs": timings,
        "ratios": ratios,
        "ratio_stats": ratio_stats(timings, ratios),
    }


def run(cfg: Config) -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"skipped": "torch is not installed in this interpreter (see --torch-python)"}
    import torch

    device = _torch_device(torch)
    if device is None:
        return {"skipped": f"torch has no device matching {jax.devices()[0].platform}"}
    shapes = [(cfg.size_leaves, total // cfg.size_leaves) for total in cfg.torch_totals]
    shapes += [(n, cfg.leaf_size) for n in cfg.torch_leaf_counts]
    return {
        "sizes": {"trees": [list(s) for s in shapes]},
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": device,
        },
        "records": [_measure(n, size, cfg, torch, device) for n, size in shapes],
    }
