"""Write your own threshold rule for ``gradclip_jax.adaptive_clip``.

A rule is a small pure object with two methods (see ``gradclip_jax.rules``):

* ``init()`` -> its state, a pytree of fixed-size arrays;
* ``step(state, norm, global_norm)`` -> the threshold for the norm measured now, and
  the state for the next step.

``adaptive_clip`` measures the norm, clips, advances the state, records statistics,
keeps non-finite steps out of the state and, with ``granularity="leaf"``, runs the
rule once per leaf with ``jax.vmap``. The rule below limits how fast the gradient norm
may grow: at most ``growth`` times the previous step's (clipped) norm.

Run it with ``python examples/custom_rule.py``: it trains a small tanh network whose
gradients spike (x1000) on three corrupted batches, without clipping and with the rule.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradclip_jax


class GrowthLimitState(NamedTuple):
    previous: jax.Array  # () float32, the last clipped norm; inf before the first step


@dataclasses.dataclass(frozen=True)
class GrowthLimit:
    """Clip the norm to ``growth`` times the previous step's clipped norm."""

    growth: float = 2.0

    def init(self) -> GrowthLimitState:
        return GrowthLimitState(previous=jnp.array(jnp.inf, jnp.float32))

    def step(self, state: GrowthLimitState, norm, global_norm):
        threshold = self.growth * state.previous
        clipped = jnp.minimum(norm, threshold)
        # A zero norm (an unused parameter) says nothing about the scale; absorbing it
        # would make the threshold 0 for good.
        return threshold, GrowthLimitState(jnp.where(clipped > 0, clipped, state.previous))


SPIKES = (60, 110, 160)  # steps whose batch is corrupted: gradients x1000


def train(clipper: optax.GradientTransformation, steps: int = 200, seed: int = 0):
    """Full-batch SGD on a small tanh network; returns the final loss and the state."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    y = (np.sin(x @ rng.standard_normal(4)) + 0.05 * rng.standard_normal(64)).astype(np.float32)
    params = {
        "w1": jnp.asarray(0.5 * rng.standard_normal((4, 16)), jnp.float32),
        "b1": jnp.zeros(16),
        "w2": jnp.asarray(0.5 * rng.standard_normal(16), jnp.float32),
        "b2": jnp.zeros(()),
    }
    multiplier = np.ones(steps, np.float32)
    multiplier[[s for s in SPIKES if s < steps]] = 1000.0
    tx = optax.chain(clipper, optax.sgd(0.1))

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

    @jax.jit
    def run(params):
        def step(carry, m):
            params, state = carry
            grads = jax.grad(lambda p: m * loss_fn(p))(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), multiplier)
        return loss_fn(params), state

    return run(params)


def main(steps: int = 200) -> None:
    runs = {
        "no clipping": optax.identity(),
        "GrowthLimit, global": gradclip_jax.adaptive_clip(GrowthLimit(2.0)),
        "GrowthLimit, per leaf": gradclip_jax.adaptive_clip(GrowthLimit(2.0), granularity="leaf"),
    }
    print(f"{'clipping':<24}{'final loss':>12}{'steps clipped':>15}")
    for name, clipper in runs.items():
        loss, state = train(clipper, steps)
        logs = gradclip_jax.stats(state, missing="ignore")
        count = int(logs["adaptive_clip/clip_count"]) if logs else 0
        print(f"{name:<24}{float(loss):>12.4f}{count:>15d}")


if __name__ == "__main__":
    main()
