"""What a clipper did, kept in its state, and a lookup that finds it for a logger."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ClipStats", "stats"]


class ClipStats(NamedTuple):
    """Statistics of the last step of a clipper, stored in its state.

    All fields are scalars, so the record has a fixed size, jits, checkpoints and
    logs as it is.

    Attributes:
      norm: the measured norm of the incoming updates, before clipping (float32). For
        per-leaf / per-unit clippers, the global norm of the incoming updates.
      threshold: the threshold in force at this step (float32). Per-leaf adaptive
        clippers report the largest leaf threshold; AGC reports its ratio.
      clipped_norm: the global norm of the outgoing updates (float32).
      clipped: the fraction of the clipper's blocks (the tree, leaves, units or
        elements) that were scaled down at this step, in [0, 1] (float32). For a
        global clipper it is 0 or 1.
      clip_count: running number of steps at which anything was clipped (int32).
    """

    norm: jax.Array
    threshold: jax.Array
    clipped_norm: jax.Array
    clipped: jax.Array
    clip_count: jax.Array

    @classmethod
    def initial(cls) -> ClipStats:
        """The record before the first step: zeros, with the dtypes of every later step."""
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, zero, zero, jnp.zeros((), jnp.int32))

    def advance(self, norm, threshold, clipped_norm, clipped) -> ClipStats:
        """The record for a new step; ``clip_count`` grows when ``clipped > 0``."""
        as32 = lambda v: jnp.asarray(v, jnp.float32)
        clipped = as32(clipped)
        count = jnp.where(clipped > 0, optax.safe_increment(self.clip_count), self.clip_count)
        return ClipStats(as32(norm), as32(threshold), as32(clipped_norm), clipped, count)


def owner_name(state: Any) -> str:
    """``ClipByGlobalNormState`` -> ``clip_by_global_norm`` (``AGCState`` -> ``agc``)."""
    name = type(state).__name__
    name = name[: -len("State")] if name.endswith("State") else name
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name)
    return name.lower()


def _is_record(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def _children(node: Any) -> list[Any]:
    """The immediate pytree children of ``node`` (works for any registered node)."""
    leaves = jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node)
    return [] if len(leaves) == 1 and leaves[0] is node else leaves


def _as_array(value: Any) -> jax.Array:
    # nnx.Optimizer wraps state arrays in Variables, which are pytrees of one array.
    leaves = jax.tree_util.tree_leaves(value)
    return leaves[0] if len(leaves) == 1 else value


def stats(opt_state: Any) -> dict[str, jax.Array]:
    """Every clipper's statistics found in an optimizer state, flat, ready for a logger.

    Searches the whole state: ``optax.chain`` tuples, ``inject_hyperparams``,
    ``MultiSteps``, ``masked`` / ``partition`` states, ``nnx.Optimizer.opt_state`` and
    any other pytree. A clipper reports through a ``stats`` field of its state (a
    :class:`ClipStats`, or the record of a guard). Keys are ``"<owner>/<field>"``, the
    owner being the clipper's factory name derived from its state class; a second
    clipper of the same kind gets ``"<owner>_1/..."`` and so on, in tree order.

    Args:
      opt_state: any optax state, or a pytree containing some.

    Returns:
      A dict from name to array; empty when the state holds no clipper.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import gradclip_jax
      >>> tx = optax.chain(gradclip_jax.clip_by_global_norm(1.0), optax.sgd(0.1))
      >>> params = {"w": jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
      >>> logs = gradclip_jax.stats(state)
      >>> print(f"{logs['clip_by_global_norm/norm']:.1f}", logs["clip_by_global_norm/clip_count"])
      5.0 1
    """
    found: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}

    def visit(node: Any) -> None:
        if _is_record(node) and "stats" in node._fields:
            record = node.stats
            base = owner_name(node)
            index = seen.get(base, 0)
            seen[base] = index + 1
            key = base if index == 0 else f"{base}_{index}"
            for field, value in zip(record._fields, record):
                found[f"{key}/{field}"] = _as_array(value)
            for field, child in zip(node._fields, node):
                if field != "stats":
                    visit(child)
            return
        for child in _children(node):
            visit(child)

    visit(opt_state)
    return found
