"""The few tree helpers every layer uses: which leaves are clipped, and putting them back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def is_inexact(x: Any) -> bool:
    """A floating-point or complex array: the leaves that are measured and clipped."""
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def inexact_leaves(tree: Any) -> list[jax.Array]:
    """The inexact array leaves of ``tree``, in tree order (``None`` leaves are skipped)."""
    return [x for x in jax.tree.leaves(tree) if is_inexact(x)]


def refill(tree: Any, values: Sequence[Any]) -> Any:
    """``tree`` with its inexact leaves replaced by ``values``, in order; others kept."""
    leaves, treedef = jax.tree.flatten(tree)
    it = iter(values)
    return jax.tree.unflatten(treedef, [next(it) if is_inexact(x) else x for x in leaves])


def map_inexact(fn: Callable[..., Any], tree: Any, *rest: Sequence[Any]) -> Any:
    """``fn(leaf, *items)`` on each inexact leaf of ``tree``, with the matching items of
    the sequences in ``rest`` (one item per inexact leaf); other leaves pass through."""
    leaves = inexact_leaves(tree)
    return refill(tree, [fn(x, *items) for x, *items in zip(leaves, *rest, strict=True)])
