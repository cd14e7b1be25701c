"""One comparison of result trees for the multi-device and multi-process tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

RTOL = 1e-6


def assert_trees_close(actual: Any, expected: Any, what: str = "", rtol: float = RTOL) -> None:
    """Equal tree structures; inexact leaves equal to ``rtol`` (NaN where expected), others
    exactly.

    Sums taken in another order differ by ~1e-7 relative on each value, and entries much
    smaller than their neighbours (Adam updates) inherit that absolutely: the absolute
    tolerance scales with the array's largest finite entry.
    """
    a_leaves, a_def = jax.tree.flatten(actual)
    e_leaves, e_def = jax.tree.flatten(expected)
    assert a_def == e_def, f"{what}: structures differ: {a_def} vs {e_def}"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]]
    for path, a, e in zip(paths, a_leaves, e_leaves):
        a, e = np.asarray(a), np.asarray(e)
        if a.dtype.kind in "fc":
            atol = rtol * float(np.abs(e[np.isfinite(e)]).max(initial=0))
            np.testing.assert_allclose(
                a, e, rtol=rtol, atol=atol, equal_nan=True, err_msg=f"{what}{path}"
            )
        else:
            np.testing.assert_array_equal(a, e, err_msg=f"{what}{path}")
