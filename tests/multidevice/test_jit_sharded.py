"""Pattern (a): ``jax.jit`` on sharded parameters and gradients, no ``axis_name``.

FSDP-style over a 1-D mesh (explicit axes, the ``jax.make_mesh`` default) and tensor
parallel over a 2-D data x model mesh (automatic axes): every clipper's updates and
whole final state (rule states, ClipStats, the guards' inner momentum) equal the
single-device ones (1e-6 relative), the updates keep their gradients' shardings, and
the compiled program all-gathers no large parameter.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _cases import (
    CLIPPERS,
    DEVICES,
    LARGE,
    SHAPES,
    Outcomes,
    assert_trees_close,
    clippers,
    large_all_gathers,
    run_together,
    scan_all,
    stacked_steps,
    tree_of,
)
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESHES = {
    # Leaves split along their first axis, except a small one kept replicated.
    "fsdp": (
        ((DEVICES,), ("fsdp",), (AxisType.Explicit,)),
        {"k1": P("fsdp"), "b1": P("fsdp"), "k2": P("fsdp"), "b2": P()},
    ),
    # Column- then row-parallel kernels; b2 replicated.
    "tensor": (
        ((2, DEVICES // 2), ("data", "model"), (AxisType.Auto,) * 2),
        {"k1": P("data", "model"), "b1": P("model"), "k2": P("model", "data"), "b2": P()},
    ),
}


@pytest.fixture(scope="module", params=list(MESHES))
def sharded(request):
    """Every clipper compiled into one program on the mesh and run: ``(outcomes, the
    gradients' shardings, the compiled program)``."""
    (shape, axes, types), specs = MESHES[request.param]
    mesh = jax.make_mesh(shape, axes, axis_types=types)
    step_shardings = {k: NamedSharding(mesh, P(None, *specs[k])) for k in SHAPES}
    steps = jax.device_put(stacked_steps(), step_shardings)
    params = jax.device_put(tree_of(0), {k: NamedSharding(mesh, specs[k]) for k in SHAPES})
    compiled = []

    def run(program):
        compiled.append(jax.jit(program).lower(steps, params).compile())
        return compiled[0](steps, params)

    with jax.set_mesh(mesh):
        outcomes = run_together(clippers(), scan_all, run, steps, params)
    return outcomes, step_shardings, compiled[0] if compiled else None


@pytest.mark.parametrize("clipper", CLIPPERS)
def test_matches_one_device_and_keeps_shardings(sharded, reference: Outcomes, clipper):
    outcomes, step_shardings, _ = sharded
    updates, state = outcomes[clipper]
    expected_updates, expected_state = reference[clipper]
    assert_trees_close(updates, expected_updates, "updates ")
    assert_trees_close(state, expected_state, "final state ")
    for key, leaf in updates.items():
        assert leaf.sharding.is_equivalent_to(step_shardings[key], leaf.ndim), (
            f"update {key!r} has sharding {leaf.sharding.spec}; its gradient had "
            f"{step_shardings[key].spec}"
        )


def test_no_large_all_gather(sharded):
    """Norms reduce each sharded leaf in its own shape: nothing larger than the small
    leaves together is gathered (no whole or partial large parameter)."""
    _, _, compiled = sharded
    assert compiled is not None, "no clipper traced on this mesh"
    small_total = sum(int(np.prod(s, dtype=np.int64)) for k, s in SHAPES.items() if k not in LARGE)
    gathered = large_all_gathers(compiled.as_text(), small_total)
    assert not gathered, "large arrays all-gathered:\n" + "\n".join(gathered)
