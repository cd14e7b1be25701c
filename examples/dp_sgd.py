"""DP-SGD with an adaptive clip norm: no clipping threshold to tune.

Differentially private SGD clips every example's gradient to a norm ``C`` and adds
Gaussian noise of standard deviation ``noise_multiplier * C`` to their sum. Choosing ``C``
is the usual pain: too small and every gradient is shrunk to noise-sized steps, too large
and the noise drowns the signal. ``gradclip_jax.dp_aggregate`` with no ``max_norm``
tracks the median per-example norm online instead (Andrew et al., 2021): after each
step ``C <- C * exp(-0.2 * (b - 0.5))``, where ``b`` is the noised fraction of examples
that were not clipped. Releasing ``b`` costs privacy too, so the noise on the gradient
sum is raised a little to keep the whole step at the cost of one Gaussian query with
``noise_multiplier``: account for privacy with that multiplier as usual.

The script trains a small Flax NNX classifier on synthetic data from ``C = 0.1`` and
prints how ``C`` follows the median per-example norm (the median is computed here, not
privately, only to show it; the training loop never sees it), then the test accuracy.

Run it with ``python examples/dp_sgd.py`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gradclip_jax


class Classifier(nnx.Module):
    def __init__(self, features: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def make_data(examples: int, features: int, classes: int, seed: int = 0):
    """Gaussian clusters, one per class, with some label noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, features)) * 1.5
    labels = rng.integers(classes, size=examples)
    x = centers[labels] + rng.normal(size=(examples, features))
    flipped = rng.random(examples) < 0.05
    labels = np.where(flipped, rng.integers(classes, size=examples), labels)
    return x.astype(np.float32), labels.astype(np.int32)


def main(steps: int = 300, batch: int = 256, noise_multiplier: float = 1.1) -> dict[str, float]:
    features, classes = 20, 4
    x, y = make_data(8192 + 2048, features, classes)
    (x_train, x_test), (y_train, y_test) = np.split(x, [8192]), np.split(y, [8192])
    graphdef, params = nnx.split(Classifier(features, 64, classes, rngs=nnx.Rngs(0)))

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # One gradient per example: the clipping bounds each example's influence.
    per_example_grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))

    tx = optax.chain(
        gradclip_jax.dp_aggregate(None, noise_multiplier=noise_multiplier, seed=42),
        optax.adam(2e-3),
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = per_example_grads(params, x[:, None], y[:, None])
        updates, opt_state = tx.update(grads, opt_state, params)
        # For display only (not private): the median of the examples' gradient norms.
        norms = jax.vmap(gradclip_jax.global_norm)(grads)
        return optax.apply_updates(params, updates), opt_state, jnp.median(norms)

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1) == y)

    rng = np.random.default_rng(0)
    print(f"DP-SGD, noise multiplier {noise_multiplier}, batch {batch}, {steps} steps")
    print(f"{'step':>6} {'clip norm':>10} {'median norm':>12} {'clipped':>8} {'accuracy':>9}")
    for step in range(steps):
        chosen = rng.choice(len(x_train), size=batch, replace=False)
        params, opt_state, median = train_step(params, opt_state, x_train[chosen], y_train[chosen])
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            logs = gradclip_jax.stats(opt_state)
            print(
                f"{step:>6} {float(logs['dp_aggregate/threshold']):>10.4f} "
                f"{float(median):>12.4f} {float(logs['dp_aggregate/clipped']):>8.2f} "
                f"{float(accuracy(params, x_test, y_test)):>9.3f}"
            )
    logs = gradclip_jax.stats(opt_state)
    final = {
        "clip_norm": float(logs["dp_aggregate/threshold"]),
        "median_norm": float(median),
        "accuracy": float(accuracy(params, x_test, y_test)),
    }
    print(
        f"final clip norm {final['clip_norm']:.4f} vs median per-example norm "
        f"{final['median_norm']:.4f}; test accuracy {final['accuracy']:.3f}"
    )
    return final


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--noise-multiplier", type=float, default=1.1)
    args = parser.parse_args()
    main(args.steps, args.batch, args.noise_multiplier)
