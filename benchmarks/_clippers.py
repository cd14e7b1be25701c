"""The clippers under test: ours, their optax twins, and our adaptive clippers if present."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optax

import gradclip_jax
from benchmarks._names import ADAPTIVE_NAMES, GLOBAL, OPTAX_GLOBAL
from benchmarks._names import PAIRS as PAIR_KEYS

# Thresholds are low enough that random-normal gradients are clipped at every size.
MAX_NORM = 1.0
MAX_ABS = 0.5
BLOCK_RMS = 0.5
AGC_RATIO = 0.01


@dataclass(frozen=True)
class Clipper:
    """A named factory of one clipping transformation (called afresh per measurement)."""

    key: str
    factory: Callable[[], optax.GradientTransformation]
    needs_params: bool = False
    # Headline clippers are measured at every size, whatever the compile cap says.
    headline: bool = False


PAIRS: tuple[tuple[Clipper, Clipper], ...] = (
    (
        Clipper("ours:clip_by_value", lambda: gradclip_jax.clip_by_value(MAX_ABS)),
        Clipper("optax:clip", lambda: optax.clip(MAX_ABS)),
    ),
    (
        Clipper(GLOBAL, lambda: gradclip_jax.clip_by_global_norm(MAX_NORM), headline=True),
        Clipper(OPTAX_GLOBAL, lambda: optax.clip_by_global_norm(MAX_NORM), headline=True),
    ),
    (
        Clipper("ours:clip_by_block_rms", lambda: gradclip_jax.clip_by_block_rms(BLOCK_RMS)),
        Clipper("optax:clip_by_block_rms", lambda: optax.clip_by_block_rms(BLOCK_RMS)),
    ),
    (
        Clipper("ours:agc", lambda: gradclip_jax.agc(AGC_RATIO), needs_params=True),
        Clipper(
            "optax:adaptive_grad_clip",
            lambda: optax.adaptive_grad_clip(AGC_RATIO),
            needs_params=True,
        ),
    ),
)

BY_KEY = {c.key: c for pair in PAIRS for c in pair}
assert [(a.key, b.key) for a, b in PAIRS] == list(PAIR_KEYS)


def global_pair() -> tuple[Clipper, Clipper]:
    return BY_KEY[GLOBAL], BY_KEY[OPTAX_GLOBAL]


def twinned(subset: tuple[str, ...] = ()) -> list[Clipper]:
    """The clippers with an optax twin, in pair order (only ``subset`` when given)."""
    return [c for pair in PAIRS for c in pair if not subset or c.key in subset]


def adaptive(limit: int | None = None) -> tuple[list[Clipper], dict[str, str]]:
    """Our adaptive clippers that exist and build with their defaults.

    Returns the clippers and, for each name left out, why (absent from the package,
    or its factory needs arguments, as ``adaptive_clip`` does for its rule).
    """
    found: list[Clipper] = []
    left_out: dict[str, str] = {}
    for name in ADAPTIVE_NAMES:
        factory = getattr(gradclip_jax, name, None)
        if factory is None:
            left_out[name] = "not in gradclip_jax yet"
            continue
        try:
            factory()
        except TypeError as error:
            left_out[name] = f"needs arguments ({error}); measured through the named strategies"
            continue
        if limit is not None and len(found) >= limit:
            left_out[name] = "left out of this run (--quick measures one adaptive clipper)"
            continue
        found.append(Clipper(f"ours:{name}", factory))
    return found, left_out
