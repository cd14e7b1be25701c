"""Data-parallel training across devices with ``shard_map``, clipping by the true global norm.

Each device gets a slice of every batch. The gradient to clip is that of the loss of the
whole batch, the average of the devices' gradients, and there are two correct ways to
hold and clip it (``docs/multi_device.md`` has the details):

* **all-reduce** (pattern b1): the parameters are replicated and every device ends up
  with the whole averaged gradient. Each clips it identically, *without* ``axis_name``
  (with it, the norm would count every device's identical copy: ``sqrt(devices)``
  times too large).
* **reduce-scatter** (pattern b2, ZeRO-style): each device keeps a slice of the
  parameters, of the gradient and of the optimizer state: an eighth of the memory on 8
  devices. A slice's norm is not the gradient's, so the clipper gets ``axis_name`` and
  adds up the devices' sums of squares with ``psum``.

Both steps differentiate the *averaged* loss (``lax.pmean`` of the devices' losses), and
``shard_map`` (with its default ``check_vma=True``) inserts the collectives: an
all-reduce for replicated parameters, a reduce-scatter for parameters gathered with
``lax.all_gather``. Beware: the gradient of a device's *own* loss with respect to
replicated parameters is then already the *sum* over devices, so a further
``lax.pmean`` would leave it ``devices`` times too large. Under ``jax.pmap`` or
``check_vma=False``, gradients are per device: average them with ``lax.pmean`` (b1) or
``lax.psum_scatter(g, axis, tiled=True) / devices`` (b2) yourself.

The script trains the same Flax NNX model (targets with rare huge outliers: gradient
spikes) both ways from the same start, checks that the parameters agree,
and prints the clipping statistics. On a CPU it simulates 8 devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set below before jax is
imported); on GPUs / TPUs it uses the devices there are.

Run it with ``python examples/data_parallel.py`` (about 10 s on a laptop CPU).
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradclip_jax  # noqa: E402

AXIS = "data"


class MLP(nnx.Module):
    def __init__(self, features: int, hidden: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))[:, 0]


def make_data(steps: int, batch: int, features: int, seed: int = 0):
    """A regression task whose targets have rare huge outliers: gradient spikes."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    x = rng.normal(size=(steps, batch, features)).astype(np.float32)
    y = np.sin(x @ w) + 0.05 * rng.normal(size=(steps, batch))
    outliers = rng.random(size=(steps, batch)) < 0.0005  # in ~1 batch of 8
    y = np.where(outliers, 200.0, y).astype(np.float32)
    return x, y


def main(steps: int = 150, batch: int = 256, max_norm: float = 1.0) -> dict[str, object]:
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), (AXIS,))
    model = MLP(features=8, hidden=64, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    # ZeRO-style slicing works on one flat vector, padded to a multiple of the devices.
    flat, unravel = ravel_pytree(params)
    padding = -flat.size % devices

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    def mean_loss(flat_params, x, y):
        """The loss of the whole batch: the devices' losses on their slices, averaged."""
        return lax.pmean(loss_fn(unravel(flat_params[: flat.size]), x, y), AXIS)

    # Pattern (b1): parameters replicated. The gradient of the averaged loss is the
    # averaged gradient, whole on every device (JAX inserts the all-reduce): clip it
    # as it is, without axis_name.
    all_reduce_tx = optax.chain(
        gradclip_jax.clip_by_global_norm(max_norm), optax.sgd(0.02, momentum=0.9)
    )

    def all_reduce_step(flat_params, opt_state, x, y):
        loss, grads = jax.value_and_grad(mean_loss)(flat_params, x, y)
        updates, opt_state = all_reduce_tx.update(grads, opt_state, flat_params)
        return optax.apply_updates(flat_params, updates), opt_state, loss

    # Pattern (b2): each device holds a slice of the parameters, of the gradient and of
    # the momentum (ZeRO-3); whole parameters exist only for the forward pass. The
    # gradient of a slice, through all_gather, is that slice of the averaged gradient
    # (JAX inserts the reduce-scatter): its norm needs axis_name.
    scatter_tx = optax.chain(
        gradclip_jax.clip_by_global_norm(max_norm, axis_name=AXIS),
        optax.sgd(0.02, momentum=0.9),
    )

    def scatter_step(param_slice, opt_state, x, y):
        def sliced_loss(param_slice):
            return mean_loss(lax.all_gather(param_slice, AXIS, tiled=True), x, y)

        loss, grads = jax.value_and_grad(sliced_loss)(param_slice)
        updates, opt_state = scatter_tx.update(grads, opt_state, param_slice)
        return optax.apply_updates(param_slice, updates), opt_state, loss

    def run(step, tx, param_spec, state_spec):
        start = jax.device_put(jnp.pad(flat, (0, padding)), NamedSharding(mesh, param_spec))
        init = jax.shard_map(tx.init, mesh=mesh, in_specs=param_spec, out_specs=state_spec)
        sharded_step = jax.jit(
            jax.shard_map(
                step,
                mesh=mesh,
                in_specs=(param_spec, state_spec, P(AXIS), P(AXIS)),
                out_specs=(param_spec, state_spec, P()),
            )
        )
        flat_params, opt_state = start, jax.jit(init)(start)
        batch_sharding = NamedSharding(mesh, P(AXIS))
        losses = []
        for x, y in zip(*make_data(steps, batch, features=8)):
            x, y = jax.device_put((x, y), batch_sharding)
            flat_params, opt_state, loss = sharded_step(flat_params, opt_state, x, y)
            losses.append(float(loss))
        return np.asarray(flat_params), opt_state, losses

    # The momentum is sliced like the gradient; the counts and ClipStats are scalars,
    # the same on every device (they come from psum-ed norms).
    sliced_state = jax.tree.map(
        lambda x: P(AXIS) if jnp.ndim(x) else P(), scatter_tx.init(jnp.zeros(devices))
    )
    ref_params, _, ref_losses = run(all_reduce_step, all_reduce_tx, P(), P())
    zero_params, zero_state, zero_losses = run(scatter_step, scatter_tx, P(AXIS), sliced_state)

    difference = float(np.max(np.abs(ref_params - zero_params)))
    scale = float(np.max(np.abs(ref_params)))
    logs = gradclip_jax.stats(zero_state)
    print(f"devices: {devices}, batch {batch} ({batch // devices} per device), {steps} steps")
    # Medians over windows of steps: a batch with an outlier has a loss of ~150.
    print(f"{'steps':>9} {'median loss, all-reduce':>24} {'median loss, reduce-scatter':>28}")
    window = max(1, steps // 5)
    for i in range(0, steps, window):
        ref, zero = np.median(ref_losses[i : i + window]), np.median(zero_losses[i : i + window])
        print(f"{i:>4}-{min(i + window, steps) - 1:<4} {ref:>24.4f} {zero:>28.4f}")
    print(
        f"max |parameter difference| between the two patterns: {difference:.2e} "
        f"(parameters up to {scale:.2f})"
    )
    print(
        f"steps clipped: {int(logs['clip_by_global_norm/clip_count'])} of {steps}; last "
        f"global norm {float(logs['clip_by_global_norm/norm']):.3f}, threshold {max_norm}"
    )
    if not difference <= 1e-4 * max(scale, 1.0):
        raise SystemExit("the two data-parallel patterns disagree")
    return {"difference": difference, "losses": zero_losses}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    main(args.steps, args.batch)
