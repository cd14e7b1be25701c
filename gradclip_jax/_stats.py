"""What a clipper did, kept in its state under its name, and a lookup for loggers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ClipStats", "NamedStats", "stats"]


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
      clip_count: number of steps at which anything was clipped (int32; it stops at
        the int32 maximum instead of wrapping).
    """

    norm: jax.Array
    threshold: jax.Array
    clipped_norm: jax.Array
    clipped: jax.Array
    clip_count: jax.Array

    @classmethod
    def initial(cls) -> ClipStats:
        """The record before the first step: zeros (each its own buffer, so a fresh
        state can be donated), with the dtypes of every later step."""
        return cls(*(jnp.zeros((), jnp.float32) for _ in range(4)), jnp.zeros((), jnp.int32))

    def advance(self, norm, threshold, clipped_norm, clipped) -> ClipStats:
        """The record for a new step; ``clip_count`` grows when ``clipped > 0``."""
        as32 = lambda v: jnp.asarray(v, jnp.float32)
        clipped = as32(clipped)
        count = jnp.where(clipped > 0, optax.safe_increment(self.clip_count), self.clip_count)
        return ClipStats(as32(norm), as32(threshold), as32(clipped_norm), clipped, count)


@jax.tree_util.register_pytree_with_keys_class
class NamedStats:
    """A statistics record under the name it is logged with.

    The name is static (part of the tree structure, not an array) and is the key of
    the record's one child, so a checkpoint restored without a target, or
    ``nnx.state`` of an optimizer, holds ``{name: {field: value}}``. The record's fields
    read through: ``state.stats.norm``.
    """

    __slots__ = ("name", "record")

    def __init__(self, name: str, record: Any):
        self.name = name
        self.record = record

    def __getattr__(self, field: str) -> Any:
        if field in NamedStats.__slots__:
            raise AttributeError(field)
        return getattr(self.record, field)

    def __repr__(self) -> str:
        return f"NamedStats({self.name!r}, {self.record!r})"

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, NamedStats):
            return NotImplemented
        return self.name == other.name and self.record == other.record

    __hash__ = None  # mutable-looking containers of arrays are not hashed

    def replace(self, record: Any) -> NamedStats:
        return NamedStats(self.name, record)

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.DictKey(self.name), self.record),), self.name

    def tree_flatten(self):
        return (self.record,), self.name

    @classmethod
    def tree_unflatten(cls, name, children):
        return cls(name, children[0])


def check_name(fn: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(
            f"{fn}: `name` must be a non-empty string without '/', used as the prefix of "
            f"the statistics' keys; got {name!r}."
        )
    return name


def _as_array(value: Any) -> Any:
    # nnx wraps state arrays in Variables, which are pytrees of one array.
    leaves = jax.tree_util.tree_leaves(value)
    return leaves[0] if len(leaves) == 1 else value


def _fields(record: Any) -> list[tuple[str, Any]] | None:
    """The (field, value) pairs of a statistics record, NamedTuple or restored dict."""
    if isinstance(record, tuple) and hasattr(record, "_fields"):
        return list(zip(record._fields, record))
    if isinstance(record, Mapping) and record and all(isinstance(k, str) for k in record):
        if all(not isinstance(v, Mapping) for v in record.values()):
            return list(record.items())
    return None


def _named_record(node: Any) -> tuple[str, Any] | None:
    """``(name, record)`` when ``node`` is the ``stats`` entry of a state, else ``None``."""
    if isinstance(node, NamedStats):
        return node.name, node.record
    # A restored checkpoint or nnx.state: {name: {field: value}}.
    if isinstance(node, Mapping) and len(node) == 1:
        ((name, record),) = node.items()
        if isinstance(name, str) and _fields(record) is not None:
            return name, record
    return None


def _children(node: Any) -> list[Any]:
    """The immediate children of ``node``: mappings and sequences by value, and any
    other registered pytree node through JAX."""
    if isinstance(node, Mapping):
        return list(node.values())
    if isinstance(node, (list, tuple)):
        return list(node)
    leaves = jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node)
    return [] if len(leaves) == 1 and leaves[0] is node else leaves


def _stats_entry(node: Any) -> Any:
    """The ``stats`` child of a state record (NamedTuple or mapping), if it has one."""
    if isinstance(node, tuple) and "stats" in getattr(node, "_fields", ()):
        return node.stats
    if isinstance(node, Mapping) and "stats" in node:
        return node["stats"]
    return None


def stats(opt_state: Any, *, missing: str = "warn") -> dict[str, jax.Array]:
    """Every clipper's statistics found in an optimizer state, flat, ready for a logger.

    Searches the whole state: ``optax.chain`` tuples, ``inject_hyperparams``,
    ``MultiSteps``, ``masked`` / ``partition`` states, ``nnx.Optimizer.opt_state``,
    ``nnx.state(optimizer)``, the state of ``nnx.split``, a checkpoint restored without a
    target (plain dicts and lists) and any other pytree. Keys are ``"<name>/<field>"``,
    ``name`` being the transformation's ``name=`` argument (by default its factory's
    name). Two clippers with the same name get ``"<name>_1/..."`` and so on, in tree
    order: give them names to tell them apart.

    Args:
      opt_state: any optax state, or a pytree containing some.
      missing: what happens when the state holds no statistics (usually the wrong
        object was passed): ``"warn"`` (default) warns with a ``UserWarning`` and
        returns ``{}``, ``"raise"`` raises a ``ValueError``, ``"ignore"`` returns ``{}``
        silently (for code that logs clipped and unclipped runs alike).

    Returns:
      A dict from ``"<name>/<field>"`` to array.

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
    if missing not in ("warn", "raise", "ignore"):
        raise ValueError(f"stats: `missing` must be 'warn', 'raise' or 'ignore'; got {missing!r}.")
    found: dict[str, jax.Array] = {}
    seen: dict[str, int] = {}

    def visit(node: Any) -> None:
        entry = _stats_entry(node)
        named = None if entry is None else _named_record(entry)
        if named is None:
            named = _named_record(node) if isinstance(node, NamedStats) else None
        if named is not None:
            name, record = named
            index = seen.get(name, 0)
            seen[name] = index + 1
            key = name if index == 0 else f"{name}_{index}"
            for field, value in _fields(record) or []:
                found[f"{key}/{field}"] = _as_array(value)
            if entry is not None:
                for child in _children(node):
                    if child is not entry:
                        visit(child)
            return
        for child in _children(node):
            visit(child)

    visit(opt_state)
    if not found and missing != "ignore":
        message = (
            "gradclip_jax.stats: no clipper statistics in this state. Pass the optimizer "
            "state (e.g. opt_state, nnx_optimizer.opt_state or nnx.state(optimizer)) of a "
            "chain that contains a gradclip_jax transformation."
        )
        if missing == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return found
