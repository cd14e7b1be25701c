"""gradclip_jax: gradient clipping for JAX and Optax.

Every strategy is an ``optax.GradientTransformation`` that composes with
``optax.chain``, runs under ``jax.jit``, keeps its statistics in its state (read them
with :func:`stats`) and never corrupts a step with bad numerics.
"""

from gradclip_jax._norms import global_norm, leaf_norms, unit_axes, unitwise_norms
from gradclip_jax._static import (
    ClipByBlockRMSState,
    ClipByGlobalNormState,
    ClipByLeafNormState,
    ClipByValueState,
    clip_by_block_rms,
    clip_by_global_norm,
    clip_by_leaf_norm,
    clip_by_value,
)
from gradclip_jax._stats import ClipStats, stats
from gradclip_jax._unitwise import AGCState, agc

__version__ = "0.1.0"

__all__ = [
    "AGCState",
    "ClipByBlockRMSState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "ClipStats",
    "agc",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "global_norm",
    "leaf_norms",
    "stats",
    "unit_axes",
    "unitwise_norms",
]
