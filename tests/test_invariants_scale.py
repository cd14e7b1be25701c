"""The invariants of ``tests/test_invariants.py`` at scale: 1,000 leaves (each
transformation compiles its many-leaf paths, within a time and memory budget where it
once did not), and drawn tree layouts (one compile per example).

Both compile afresh for every case rather than sharing ``test_invariants.py``'s jitted
updates, so they live in their own file: pytest-xdist gives each file to one process,
and as one file with ``test_invariants.py`` they kept one of CI's two processes busy
for 14 minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import pytest
from _invariant_cases import (
    CASES,
    NAMES,
    Jitted,
    drawn_tree,
    params_like,
    run,
    sequence,
    spec_for,
    step,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# Once compile time and memory grew far faster than the leaves where every leaf is
# reduced over its own axes, or draws its own noise (on 2 CPU cores: agc 400 leaves 70 s
# and 7.7 GB; dp_aggregate 400 leaves 149 s and 7.9 GB). Now agc compiles 400 leaves in
# about 7 s, and dp_aggregate, which clips, sums and draws noise for small leaves of one
# shape as one stack, 1,000 leaves in about 17 s (72 s when it did so per leaf; optax's
# differentially_private_aggregate: 63 s at 400). dp_aggregate still runs in a child
# process with a time and memory limit, so that a regression fails, not hangs.
_SLOW_TO_COMPILE = {"dp_aggregate"}
_CHILD_SECONDS, _CHILD_BYTES = 120, 6 * 2**30

_THOUSAND_CHILD = f"""
import resource
import sys
resource.setrlimit(resource.RLIMIT_AS, ({_CHILD_BYTES}, {_CHILD_BYTES}))
import jax
jax.config.update("jax_numpy_rank_promotion", "raise")
from _invariant_cases import CASES, SPECS, check_step, fill, params_like, spec_for
case = CASES[sys.argv[1]]
spec = spec_for(case, SPECS["thousand"])
grads = fill(spec, "clean")
params = params_like(grads, case)
tx = case.make()
init = tx.init(params)
out, state = jax.jit(tx.update)(grads, init, params)
check_step(case, grads, params, init, out, state, init)
"""


class CompileBudgetExceeded(Exception):
    """The child process ran out of time or memory (and not into another error)."""


def _compile_in_child(name: str) -> None:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    try:
        child = subprocess.run(
            [sys.executable, "-c", _THOUSAND_CHILD, name],
            env=env,
            capture_output=True,
            text=True,
            timeout=_CHILD_SECONDS,
        )
    except subprocess.TimeoutExpired as e:
        raise CompileBudgetExceeded(f"{name}: not compiled within {_CHILD_SECONDS} s") from e
    if child.returncode and any(
        sign in child.stderr for sign in ("bad_alloc", "MemoryError", "RESOURCE_EXHAUSTED")
    ):
        raise CompileBudgetExceeded(f"{name}: out of memory: {child.stderr[-500:]}")
    assert child.returncode == 0, child.stderr[-3000:]


# What differs at 1,000 leaves is how a transformation reaches them: stacks of leaves of
# one shape, per-leaf scales read back, one NaN test, a guard's cond or its zeroing or
# its report. A threshold rule only ever sees one scalar, so the global clippers with
# another rule (adaptive_clip, autoclip, zclip, quantile_clip: clipper(..., "global")
# like clip_by_global_norm) and dp_aggregate_adaptive (dp_aggregate's clipping and
# noise, a quantile rule) reach the leaves by the same code as the case kept for them;
# so does on_nonfinite's "propagate" (the NaN test of "skip" without its cond). They
# meet every other tree and mode; here they took 50 s of CI's time.
_SAME_PATH_AS_ANOTHER = {
    "adaptive_clip",
    "autoclip",
    "zclip",
    "quantile_clip",
    "dp_aggregate_adaptive",
    "on_nonfinite_propagate",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n not in _SAME_PATH_AS_ANOTHER])
def test_a_thousand_leaves(name):
    """1,000 small float32 and bfloat16 leaves: invariants and no retracing. (The
    transformations that compile slowest run in a child process that must finish
    within two minutes and 6 GiB.)"""
    case = CASES[name]
    if name in _SLOW_TO_COMPILE:
        _compile_in_child(name)
        return
    tx = case.make()
    grads_seq, params = sequence(case, "thousand", ("clean", "nan", "huge"))
    run(case, tx, Jitted(tx.update), grads_seq, params)


@pytest.mark.slow
def test_the_child_process_passes_a_thousand_leaves_of_a_global_clipper():
    """The control of the child process above: it passes where compiling is quick."""
    _compile_in_child("clip_by_global_norm")


# --------------------------------------------------------------------- drawn layouts


_DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.complex64, jnp.int32, jnp.bool_]
_FLOAT8 = [jnp.dtype(ml_dtypes.float8_e4m3fn), jnp.dtype(ml_dtypes.float8_e5m2)]
_SHAPES = [(), (1,), (3,), (2, 3), (0, 2), (2, 2, 2)]


@st.composite
def _drawn_spec(draw):
    """A drawn transformation and tree layout: 1-4 leaves of drawn shapes and dtypes (a
    float8 tree has one float8 dtype beside the others), and a None leaf."""
    name = draw(st.sampled_from(NAMES))
    float8 = draw(st.sampled_from([None, None, *_FLOAT8]))
    dtypes = [float8, *_DTYPES] if float8 is not None else _DTYPES
    spec = {
        f"l{i}": (draw(st.sampled_from(_SHAPES)), jnp.dtype(draw(st.sampled_from(dtypes))))
        for i in range(draw(st.integers(1, 4)))
    }
    spec["none"] = None
    # A non-empty float leaf: trees without one are their own tests (and known defects).
    spec["w"] = ((3,), float8 or jnp.dtype(jnp.float32))
    return name, spec_for(CASES[name], spec)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(_drawn_spec(), st.data())
def test_drawn_trees_keep_the_invariants(drawn, data):
    """Drawn tree layouts and values through a drawn transformation under jit (one
    compile per example)."""
    name, spec = drawn
    case = CASES[name]
    grads_seq = [drawn_tree(data.draw, spec) for _ in range(2)]
    tx = case.make()
    params = params_like(grads_seq[0], case)
    init = tx.init(params)
    state = init
    update = Jitted(tx.update)
    for i, grads in enumerate(grads_seq):
        _, state = step(case, update, grads, params, state, init, f"[drawn {i}: {spec}]")
