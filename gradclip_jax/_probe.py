"""Choosing a threshold: record the gradient-norm distribution of a training run.

:func:`probe_norms` runs a gradient function over a few batches (optionally advancing
the parameters with an optimizer, unclipped, so the distribution is that of training)
and summarises the global and per-leaf norms with suggested clipping thresholds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from gradclip_jax._norms import global_norm, leaf_norms
from gradclip_jax._validate import check_range

__all__ = ["NormProbe", "probe_norms"]

DEFAULT_QUANTILES: tuple[float, ...] = (5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)


class NormProbe(NamedTuple):
    """Gradient-norm distribution recorded by :func:`probe_norms`, with suggestions.

    Statistics (quantiles, mean, std, suggestions) are over the *finite* global norms;
    non-finite steps are listed in ``nonfinite_steps`` (and counted as spikes).

    Attributes:
      global_norms: ``(steps,)`` float64 global L2 norm of the gradients at each step.
      leaf_norms: a tree with the structure of the gradients whose inexact leaves are
        ``(steps,)`` float64 arrays of that leaf's L2 norm (other leaves ``None``).
      quantiles: percentile (in [0, 100]) -> value of the global norm, as
        ``numpy.percentile`` (linear interpolation) computes it.
      mean: mean global norm.
      std: standard deviation of the global norm (population, ``ddof=0``).
      spike_steps: ``(k,)`` int indices of steps whose norm is non-finite or above
        ``mean + spike_zscore * std``. With ``n`` steps no sample can exceed
        ``(n - 1) / sqrt(n)`` standard deviations, so a 6-sigma spike needs ``n >= 38``.
      nonfinite_steps: ``(k,)`` int indices of steps whose norm is NaN or infinite.
      percentile: the percentile used for ``suggested_autoclip``.
      suggested_autoclip: the ``percentile``-th percentile of the recorded norms, the
        threshold AutoClip (Seetharaman et al., 2020) would use after these steps.
      pascanu_range: ``(0.5 * mean, 10 * mean)``, the range Pascanu et al. (2013)
        report as working well for a constant threshold.
    """

    global_norms: np.ndarray
    leaf_norms: Any
    quantiles: dict[float, float]
    mean: float
    std: float
    spike_steps: np.ndarray
    nonfinite_steps: np.ndarray
    percentile: float
    suggested_autoclip: float
    pascanu_range: tuple[float, float]

    def summary(self) -> str:
        """A few human-readable lines: the distribution and the suggested thresholds."""
        quantiles = ", ".join(f"p{p:g}={v:.4g}" for p, v in self.quantiles.items())
        low, high = self.pascanu_range
        return "\n".join(
            [
                f"global gradient norm over {self.global_norms.size} steps: "
                f"mean={self.mean:.4g} std={self.std:.4g}",
                f"quantiles: {quantiles}",
                f"spikes: {self.spike_steps.size} (non-finite: {self.nonfinite_steps.size})",
                f"suggested constant threshold (AutoClip p{self.percentile:g}): "
                f"{self.suggested_autoclip:.4g}",
                f"Pascanu et al. range (0.5x..10x mean): {low:.4g} .. {high:.4g}",
            ]
        )


def probe_norms(
    grads_fn: Callable[[Any, Any], Any],
    params: Any,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    percentile: float = 10.0,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    spike_zscore: float = 6.0,
) -> NormProbe:
    """Records the gradient-norm distribution over a few steps and suggests thresholds.

    Each step computes ``grads_fn(params, batch)`` and its global and per-leaf norms in
    one jitted function (compiled once). Without ``optimizer`` the parameters stay fixed,
    so the distribution is over batches at one point; with it they advance by the
    *unclipped* optimizer updates, so it is the distribution an unclipped run sees
    (probing does not change training: clipping comes after, with the threshold chosen).
    Norms stay on the device until the end: the loop never waits for the host.

    How to use the suggestion:

    * a constant threshold: ``gradclip_jax.clip_by_global_norm(probe.suggested_autoclip)``
      (or any value in ``probe.pascanu_range``; Pascanu et al. found 0.5x to 10x the
      average norm all work, so the choice is not sensitive within it);
    * an adaptive rule that keeps tracking the same statistic as training moves on:
      ``gradclip_jax.autoclip(p=probe.percentile)``.

    Args:
      grads_fn: ``(params, batch) -> grads``, jittable (e.g. ``jax.grad(loss)``).
      params: the initial parameters, a pytree.
      batches: an iterable of batches (anything ``grads_fn`` accepts as ``batch``).
      steps: the number of steps to record; batches are reused in order if there are
        fewer. ``None`` records one step per batch (``batches`` must then be finite).
      optimizer: an optional ``optax.GradientTransformation`` advancing ``params`` with
        the raw gradients between steps.
      percentile: the percentile of the recorded norms suggested as threshold, in
        [0, 100] (AutoClip's default is 10).
      quantiles: the percentiles reported in ``NormProbe.quantiles``.
      spike_zscore: a step is a spike when its norm exceeds ``mean + spike_zscore * std``.

    Returns:
      A :class:`NormProbe`.

    References:
      Pascanu et al., `On the difficulty of training recurrent neural networks
      <https://arxiv.org/abs/1211.5063>`_, 2013

      Seetharaman et al., `AutoClip: Adaptive gradient clipping for source separation
      networks <https://arxiv.org/abs/2007.14469>`_, 2020

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import gradclip_jax
      >>> loss = lambda p, x: jnp.sum((p["w"] - x) ** 2)
      >>> batches = [jnp.full(2, float(k)) for k in range(1, 5)]
      >>> probe = gradclip_jax.probe_norms(jax.grad(loss), {"w": jnp.zeros(2)}, batches)
      >>> print(f"{probe.mean:.3f} {probe.quantiles[50.0]:.3f} {probe.pascanu_range[1]:.2f}")
      7.071 7.071 70.71
      >>> tx = gradclip_jax.clip_by_global_norm(probe.suggested_autoclip)
    """
    check_range("probe_norms", "percentile", percentile, 0.0, 100.0)
    for q in quantiles:
        check_range("probe_norms", "quantiles", q, 0.0, 100.0)
    if steps is not None and steps < 1:
        raise ValueError(f"probe_norms: `steps` must be a positive integer or None; got {steps}.")
    stream = iter(batches) if steps is None else itertools.islice(itertools.cycle(batches), steps)

    def step(params, opt_state, batch):
        grads = grads_fn(params, batch)
        measured = (global_norm(grads), leaf_norms(grads))
        if optimizer is not None:
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return measured, params, opt_state

    step = jax.jit(step)
    opt_state = optimizer.init(params) if optimizer is not None else None
    records = []
    for batch in stream:
        measured, params, opt_state = step(params, opt_state, batch)
        records.append(measured)
    if not records:
        raise ValueError("probe_norms: `batches` is empty; give at least one batch.")

    norms = np.asarray(jax.device_get([r[0] for r in records]), np.float64)
    per_leaf = jax.tree.map(
        lambda *xs: np.asarray(xs, np.float64), *jax.device_get([r[1] for r in records])
    )
    finite = np.isfinite(norms)
    nonfinite_steps = np.flatnonzero(~finite)
    values = norms[finite]
    if values.size:
        mean, std = float(values.mean()), float(values.std())
        table = {float(q): float(np.percentile(values, q)) for q in quantiles}
        suggested = float(np.percentile(values, percentile))
    else:
        mean = std = suggested = math.nan
        table = {float(q): math.nan for q in quantiles}
    spiking = ~finite | (np.nan_to_num(norms, nan=0.0) > mean + spike_zscore * std)
    return NormProbe(
        global_norms=norms,
        leaf_norms=per_leaf,
        quantiles=table,
        mean=mean,
        std=std,
        spike_steps=np.flatnonzero(spiking),
        nonfinite_steps=nonfinite_steps,
        percentile=float(percentile),
        suggested_autoclip=suggested,
        pascanu_range=(0.5 * mean, 10.0 * mean),
    )
