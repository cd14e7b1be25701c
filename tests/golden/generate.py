"""Golden results of every public transformation, to hold refactors to the same numbers.

Runs each transformation (jitted) for a fixed sequence of gradient steps on fixed
trees (float32, bfloat16, complex64, many small leaves, entries near the float32
maximum, and leaves sharded over 8 CPU devices) and records every step's updates and
``gradclip_jax.stats``. The numbers are those of the commit that wrote the file; a
change of semantics must regenerate it in its own commit, saying why.

    python tests/golden/generate.py            # rewrites tests/golden/golden.npz
    python tests/golden/generate.py --compare  # compares against it (exit 1 on mismatch)

It sets 8 CPU devices before importing jax, so it runs as its own process
(``tests/test_golden.py`` starts it).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # imported (pytest's doctest collection), it leaves the env alone
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import gradclip_jax as gc  # noqa: E402
from gradclip_jax import rules  # noqa: E402

PATH = Path(__file__).with_name("golden.npz")
STEPS = 40
# Step scales: a noisy base with a zero step, spikes, and (for the "nan" trees) a NaN step.
SCALES = 1.0 + 0.2 * np.sin(np.arange(STEPS) * 1.7)
SCALES[10] = 0.0
SCALES[[28, 33]] = [60.0, 25.0]
RECORDED = (0, 1, 5, 10, 11, 20, 21, 27, 28, 29, 33, STEPS - 1)


def _tree(dtype, seed=0, n_small=0, big=False):
    rng = np.random.default_rng(seed)
    if n_small:
        return {
            f"l{i:03d}": jnp.asarray(rng.normal(size=(3 + i % 4,)), dtype) for i in range(n_small)
        }
    tree = {
        "kernel": rng.normal(size=(4, 3)),
        "bias": rng.normal(size=(5,)),
        "conv": rng.normal(size=(2, 2, 3, 4)),
        "scalar": rng.normal(size=()),
    }
    if dtype == np.complex64:
        tree = {k: v + 1j * rng.normal(size=v.shape) for k, v in tree.items()}
    if big:
        tree["kernel"] = tree["kernel"] * 3e37
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}


def trees():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("d", None))
    base = {"w": np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)}
    sharded = {
        "w": jax.device_put(jnp.asarray(base["w"]), rows),
        "b": jax.device_put(jnp.ones((8,), jnp.float32), NamedSharding(mesh, P())),
    }
    return {
        "f32": _tree(np.float32),
        "bf16": _tree(jnp.bfloat16),
        "c64": _tree(np.complex64),
        "many": _tree(np.float32, n_small=60),
        "big": _tree(np.float32, big=True),
        "sharded": sharded,
    }


def transformations():
    sgd = optax.sgd(0.1)
    return {
        "clip_by_value": lambda: gc.clip_by_value(0.5),
        "clip_by_global_norm": lambda: gc.clip_by_global_norm(1.0),
        "clip_by_global_norm_l1": lambda: gc.clip_by_global_norm(2.0, ord=1),
        "clip_by_global_norm_inf": lambda: gc.clip_by_global_norm(0.5, ord=np.inf),
        "clip_by_leaf_norm": lambda: gc.clip_by_leaf_norm(0.7),
        "clip_by_leaf_norm_l1": lambda: gc.clip_by_leaf_norm(0.7, ord=1),
        "clip_by_leaf_norm_inf": lambda: gc.clip_by_leaf_norm(0.7, ord=np.inf),
        "clip_by_block_rms": lambda: gc.clip_by_block_rms(0.3),
        "agc": lambda: gc.agc(0.05),
        "adaptive_clip": lambda: gc.adaptive_clip(),
        "adaptive_clip_zscore5": lambda: gc.adaptive_clip(rules.zscore(warmup_steps=5)),
        "adaptive_clip_leaf": lambda: gc.adaptive_clip(
            rules.zscore(warmup_steps=5, max_norm=None), granularity="leaf"
        ),
        "adaptive_clip_ema": lambda: gc.adaptive_clip(rules.ema(warmup_steps=5)),
        "adaptive_clip_percentile": lambda: gc.adaptive_clip(rules.percentile(50.0, 8)),
        "adaptive_clip_quantile": lambda: gc.adaptive_clip(rules.quantile()),
        "autoclip": lambda: gc.autoclip(),
        "zclip": lambda: gc.zclip(),
        "zclip_w5": lambda: gc.zclip(warmup_steps=5, max_norm=None),
        "adagc": lambda: gc.adagc(),
        "adagc_w5": lambda: gc.adagc(warmup_steps=5),
        "quantile_clip": lambda: gc.quantile_clip(),
        "skip_on_spike": lambda: gc.skip_on_spike(sgd, window=8, min_history=4),
        "on_nonfinite_skip": lambda: gc.on_nonfinite(sgd),
        "on_nonfinite_zero": lambda: gc.on_nonfinite(sgd, policy="zero"),
        "on_nonfinite_propagate": lambda: gc.on_nonfinite(sgd, policy="propagate"),
        "guards_around_clip": lambda: gc.on_nonfinite(
            gc.skip_on_spike(optax.chain(gc.clip_by_global_norm(1.0), sgd), window=8)
        ),
    }


def _record(out, key, updates, state):
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        out[f"{key}/u{jax.tree_util.keystr(path)}"] = np.asarray(leaf.astype(jnp.float32))
    for name, value in gc.stats(state).items():
        out[f"{key}/s:{name}"] = np.asarray(value)


def _steps(tree_name, grads0):
    """The gradients of every step: ``grads0`` scaled, a NaN entry per leaf at step 20
    of the "nan" trees."""
    steps = []
    for step in range(STEPS):
        grads = jax.tree.map(lambda x, s=SCALES[step]: x * s, grads0)
        if step == 20 and tree_name in ("f32", "many"):
            grads = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads)
        steps.append(grads)
    return steps


def run_transformations(out):
    # One jitted update per transformation for all the trees: trees of the same layout
    # ("f32" and "big") share its compilation.
    updates_of = {
        name: (tx := factory(), jax.jit(tx.update)) for name, factory in transformations().items()
    }
    for tree_name, grads0 in trees().items():
        params = jax.tree.map(lambda x: x * 0.5 + 0.1, grads0)
        steps = _steps(tree_name, grads0)
        for tx_name, (tx, update) in updates_of.items():
            if tree_name == "c64" and tx_name in ("agc",):
                continue
            state = tx.init(params)
            for step, grads in enumerate(steps):
                updates, state = update(grads, state, params)
                if step in RECORDED:
                    _record(out, f"{tree_name}/{tx_name}/{step:02d}", updates, state)


def run_functions(out):
    for tree_name, tree in trees().items():
        for ord_ in (1, 2, np.inf):
            out[f"{tree_name}/global_norm/{ord_}"] = np.asarray(gc.global_norm(tree, ord_))
            norms = gc.leaf_norms(tree, ord_)
            for path, leaf in jax.tree_util.tree_flatten_with_path(norms)[0]:
                key = f"{tree_name}/leaf_norms/{ord_}{jax.tree_util.keystr(path)}"
                out[key] = np.asarray(leaf)
        if tree_name != "c64":
            for path, leaf in jax.tree_util.tree_flatten_with_path(gc.unitwise_norms(tree))[0]:
                out[f"{tree_name}/unitwise{jax.tree_util.keystr(path)}"] = np.asarray(leaf)


def run_per_example(out):
    rng = np.random.default_rng(7)
    grads = {
        "w": jnp.asarray(rng.normal(size=(6, 4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
    }
    grads = jax.tree.map(lambda x: x * jnp.arange(1.0, 7.0).reshape(-1, *[1] * (x.ndim - 1)), grads)
    for gran in ("global", "leaf"):
        for uniform in (True, False):
            summed, _ = gc.per_example_clip(grads, 2.0, granularity=gran, uniform=uniform)
            for k, v in summed.items():
                out[f"pe/clip/{gran}/{uniform}/{k}"] = np.asarray(v)
    params = jax.tree.map(lambda x: x[0], grads)
    for name, tx in {
        "dp_const": gc.dp_aggregate(2.0, noise_multiplier=0.5, seed=1),
        "dp_adaptive": gc.dp_aggregate(None, noise_multiplier=0.5, seed=1),
        "dp_leaf": gc.dp_aggregate(2.0, noise_multiplier=0.5, seed=1, granularity="leaf"),
    }.items():
        state = tx.init(params)
        update = jax.jit(tx.update)
        for step in range(6):
            updates, state = update(jax.tree.map(lambda x, s=step: x * (s + 1), grads), state)
            _record(out, f"pe/{name}/{step}", updates, state)


def generate():
    out: dict[str, np.ndarray] = {}
    run_functions(out)
    run_per_example(out)
    run_transformations(out)
    return out


def compare(expected, actual, rtol=2e-6):
    problems = []
    for key in sorted(set(expected) | set(actual)):
        if key not in actual or key not in expected:
            problems.append(f"{key}: only in {'golden' if key in expected else 'this run'}")
            continue
        e, a = expected[key], actual[key]
        tol = 1e-2 if "bf16" in key else rtol
        # Rounding errors scale with the array's largest entry (sums with cancellation).
        finite = np.abs(e[np.isfinite(e)]) if e.size else np.zeros(1)
        atol = tol * max(float(finite.max(initial=0.0)), 1e-30)
        if e.shape != a.shape or not np.allclose(a, e, rtol=tol, atol=atol, equal_nan=True):
            problems.append(f"{key}: golden {e!r}, now {a!r}")
    return problems


def save(arrays):
    """One packed file: the keys, each array's shape and dtype, and the values in float64."""
    keys = sorted(arrays)
    np.savez_compressed(
        PATH,
        keys=np.array(keys),
        shapes=np.array([",".join(map(str, arrays[k].shape)) for k in keys]),
        dtypes=np.array([arrays[k].dtype.str for k in keys]),
        values=np.concatenate([arrays[k].astype(np.float64).ravel() for k in keys]),
    )


def load():
    with np.load(PATH) as data:
        keys, shapes, dtypes, values = (data[k] for k in ("keys", "shapes", "dtypes", "values"))
    out, start = {}, 0
    for key, shape, dtype in zip(keys, shapes, dtypes):
        shape = tuple(int(d) for d in shape.split(",") if d)
        size = int(np.prod(shape))
        out[str(key)] = values[start : start + size].reshape(shape).astype(dtype)
        start += size
    return out


def main(argv):
    actual = generate()
    if "--compare" not in argv:
        save(actual)
        print(f"wrote {len(actual)} arrays to {PATH}")
        return 0
    expected = load()
    problems = compare(expected, actual)
    for line in problems[:50]:
        print(line)
    print(f"golden: {len(expected)} arrays, {len(problems)} mismatches")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
