"""gradclip_jax: gradient clipping for JAX and Optax.

Every strategy is an ``optax.GradientTransformation`` that composes with
``optax.chain``, runs under ``jax.jit``, keeps its statistics in its state (read them
with :func:`stats`) and never corrupts a step with bad numerics.
"""

from gradclip_jax import rules
from gradclip_jax._adaptive import (
    AdagcState,
    AdaptiveClipState,
    AutoclipState,
    QuantileClipState,
    ZclipState,
    adagc,
    adaptive_clip,
    autoclip,
    quantile_clip,
    zclip,
)
from gradclip_jax._clip import ClipState
from gradclip_jax._diagnostics import (
    GradientHealth,
    gradient_health,
    health_report,
    hidden_state_gradient_norms,
)
from gradclip_jax._guards import (
    OnNonfiniteState,
    OnNonfiniteStats,
    SkipOnSpikeState,
    SkipOnSpikeStats,
    on_nonfinite,
    skip_on_spike,
)
from gradclip_jax._norms import global_norm, leaf_norms, unit_axes, unitwise_norms
from gradclip_jax._per_example import DPAggregateState, dp_aggregate, per_example_clip
from gradclip_jax._probe import NormProbe, probe_norms
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
from gradclip_jax._stats import ClipStats, NamedStats, stats
from gradclip_jax._unitwise import AGCState, agc

__version__ = "0.1.0"

__all__ = [
    "AGCState",
    "AdagcState",
    "AdaptiveClipState",
    "AutoclipState",
    "ClipByBlockRMSState",
    "ClipByGlobalNormState",
    "ClipByLeafNormState",
    "ClipByValueState",
    "ClipState",
    "ClipStats",
    "DPAggregateState",
    "GradientHealth",
    "NamedStats",
    "NormProbe",
    "OnNonfiniteState",
    "OnNonfiniteStats",
    "QuantileClipState",
    "SkipOnSpikeState",
    "SkipOnSpikeStats",
    "ZclipState",
    "adagc",
    "adaptive_clip",
    "agc",
    "autoclip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_leaf_norm",
    "clip_by_value",
    "dp_aggregate",
    "global_norm",
    "gradient_health",
    "health_report",
    "hidden_state_gradient_norms",
    "leaf_norms",
    "on_nonfinite",
    "per_example_clip",
    "probe_norms",
    "quantile_clip",
    "rules",
    "skip_on_spike",
    "stats",
    "unit_axes",
    "unitwise_norms",
    "zclip",
]
