"""Names of the measured series, shared by the measuring and the reporting side.

Kept free of JAX imports: the parent process reports without ever starting a backend
(on a GPU, a started backend would reserve memory the child processes need).
"""

from __future__ import annotations

GLOBAL = "ours:clip_by_global_norm"
OPTAX_GLOBAL = "optax:clip_by_global_norm"
# (ours, optax twin), in the order they are reported.
PAIRS: tuple[tuple[str, str], ...] = (
    ("ours:clip_by_value", "optax:clip"),
    (GLOBAL, OPTAX_GLOBAL),
    ("ours:clip_by_block_rms", "optax:clip_by_block_rms"),
    ("ours:agc", "optax:adaptive_grad_clip"),
)
ADAPTIVE_NAMES = ("adaptive_clip", "autoclip", "zclip", "adagc", "quantile_clip")
ADAM = "optax:adam"
TORCH = "torch:clip_grad_norm_"
# Our global clip jitted with the gradients donated: it writes in place, as PyTorch does.
DONATED = f"{GLOBAL} (donated)"
OURS_NORM = "ours:global_norm"
OPTAX_NORM = "optax:global_norm"
XLA_FLOOR = "xla_floor"
ROOF = "roof"


def ratio_key(numerator: str, denominator: str) -> str:
    return f"{numerator} / {denominator}"


def is_adaptive(key: str) -> bool:
    return key.removeprefix("ours:") in ADAPTIVE_NAMES


def label(key: str) -> str:
    """``ours:agc`` -> ``agc (ours)``; other names are returned as they are."""
    if ":" not in key:
        return key
    owner, name = key.split(":", 1)
    return f"{name} ({owner})"
