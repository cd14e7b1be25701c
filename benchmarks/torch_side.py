"""Optional: ``torch.nn.utils.clip_grad_norm_(foreach=True)`` vs our jitted clip.

PyTorch clips in place. Our update returns a new tree, as an optax update does; with
``jax.jit(update, donate_argnums=0)`` XLA writes into the gradients' buffers instead.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.measure import random_tree, time_interleaved
from benchmarks.suite import CLIP, DONATED, MAX_NORM, TORCH, Config, Tree, clip


def skip_reason() -> str | None:
    """Why the PyTorch figure cannot run here, or None when it can."""
    try:
        import torch
    except ImportError as error:
        return f"torch is not installed ({error})"
    if jax.default_backend() != "cpu" and not torch.cuda.is_available():
        return f"torch has no CUDA device to match JAX's {jax.default_backend()}"
    return None


def _torch_call(host: list[Any]):
    import torch

    device = "cpu" if jax.default_backend() == "cpu" else "cuda"
    params = [torch.empty(x.shape, device=device) for x in host]
    for p, x in zip(params, host):
        p.grad = torch.tensor(x, device=device)

    def call() -> None:
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def measure_tree(tree: Tree, cfg: Config) -> dict[str, dict[str, Any]]:
    """Run times of torch, our clip and our clip on donated gradients, interleaved."""
    host = random_tree(tree.n_leaves, tree.shape, seed=0)
    grads = [jax.device_put(x) for x in host]
    tx = clip()
    state = tx.init(grads)
    update = jax.jit(lambda g, s: tx.update(g, s)[0])
    donated = jax.jit(lambda g, s: tx.update(g, s)[0], donate_argnums=0)
    carry = [[jnp.array(x, copy=True) for x in grads]]

    def donated_call() -> Any:  # the input is consumed: feed each result back in
        carry[0] = donated(carry[0], state)
        return carry[0]

    calls = {CLIP: lambda: update(grads, state), DONATED: donated_call, TORCH: _torch_call(host)}
    run_s, per_sample = time_interleaved(calls, cfg.rounds, cfg.min_sample_s)
    return {k: {"run_s": run_s[k], "calls_per_sample": per_sample[k]} for k in calls}
