"""Scenarios for the defaults of the adaptive strategies (``docs/adaptive_defaults.md``).

Every named adaptive strategy, with its default arguments, is driven through synthetic
sequences of gradient norms (one-element updates, whose norm is the value itself; two
leaves for the per-leaf scenarios), and scored against the targets of the page:

    python docs/adaptive_scenarios.py           # prints the table, writes the plots
    python docs/adaptive_scenarios.py --table   # the table only

``tests/test_scenarios.py`` imports this module and asserts the targets.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import gradclip_jax

STEPS = 3000
NOISE = 0.05  # relative standard deviation of the base norm
CHANGE = 1000  # step of the step changes
SETTLE = 300  # a lasting change this many steps old must look ordinary again
DRIFT = (500, 2500)  # the slow x10 drift runs over these steps
SPIKES = (10, 300, 700, 1100, 1500, 1900, 2300, 2700)  # isolated spikes
SPIKE_SIZES = (20.0, 50.0, 1000.0, 20.0, 100.0, 20.0, 1e4, 30.0)
NAN_STEPS = (150, 151, 800, 2000)
PLOTS = Path(__file__).parent / "_static" / "adaptive"


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A sequence of norms (``(STEPS,)``, or ``(STEPS, 2)`` for two leaves) and what to
    check on it."""

    norms: np.ndarray
    description: str
    spikes: tuple[int, ...] = ()  # steps that must be clipped (in leaf `spike_leaf`)
    spike_leaf: int = 0
    change: int | None = None  # a lasting change starts here
    window: tuple[int, int] | None = None  # drift: compare the share here with stationary


def _base(seed: int, shape=(STEPS,)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.abs(1.0 + NOISE * rng.standard_normal(shape))


def _with_spikes(norms: np.ndarray, leaf: int | None = None) -> np.ndarray:
    norms = norms.copy()
    for step, size in zip(SPIKES, SPIKE_SIZES):
        if leaf is None:
            norms[step] *= size
        else:
            norms[step, leaf] *= size
    return norms


def scenarios() -> dict[str, Scenario]:
    stationary = _base(0)
    explosive = _base(1)
    explosive[0] = 1e5
    zeros = _with_spikes(_base(2))
    zeros[:60] = 0.0
    steps = {}
    for name, factor, seed in (("step x1.5", 1.5, 3), ("step x10", 10.0, 4), ("step x0.1", 0.1, 5)):
        norms = _base(seed)
        norms[CHANGE:] *= factor
        steps[name] = Scenario(
            norms, f"a lasting {factor:g}x change of the level at step {CHANGE}", change=CHANGE
        )
    drift = _base(6)
    ramp = np.ones(STEPS)
    ramp[DRIFT[0] : DRIFT[1]] = np.geomspace(1.0, 10.0, DRIFT[1] - DRIFT[0])
    ramp[DRIFT[1] :] = 10.0
    nans = _with_spikes(_base(7))
    nans[list(NAN_STEPS)] = np.nan
    leaves = _base(8, (STEPS, 2))
    leaves[:, 1] *= 0.01  # leaf b's scale is 1/100 of leaf a's
    leaves = _with_spikes(leaves, leaf=1)
    leaves[CHANGE:, 0] *= 10.0
    return {
        "stationary": Scenario(stationary, "noise around 1 (5%), nothing else"),
        "explosive first step": Scenario(
            explosive, "step 0 has norm 1e5, then noise around 1", spikes=(0,)
        ),
        "zeros in warm-up": Scenario(
            zeros, "60 zero norms, then noise around 1 with spikes", spikes=SPIKES[1:]
        ),
        "spikes": Scenario(
            _with_spikes(stationary), "isolated spikes of x20 to x10^4", spikes=SPIKES
        ),
        **steps,
        "drift x10": Scenario(
            drift * ramp,
            f"the level grows x10 geometrically over steps {DRIFT[0]}-{DRIFT[1]}",
            window=DRIFT,
        ),
        "NaN steps": Scenario(
            nans, f"NaN norms at steps {', '.join(map(str, NAN_STEPS))}, spikes", spikes=SPIKES
        ),
        "per-leaf": Scenario(
            leaves,
            f"two leaves, b at 1/100 of a's scale; spikes in b; a x10 at step {CHANGE}",
            spikes=SPIKES,
            spike_leaf=1,
            change=CHANGE,
        ),
    }


# name -> (transformation with its defaults, granularity label)
STRATEGIES: dict[str, Callable[[], object]] = {
    "adaptive_clip": gradclip_jax.adaptive_clip,
    "autoclip": gradclip_jax.autoclip,
    "zclip": gradclip_jax.zclip,
    "quantile_clip": gradclip_jax.quantile_clip,
    "adagc": gradclip_jax.adagc,  # per leaf; one leaf in the global scenarios
    "adaptive_clip leaf": lambda: gradclip_jax.adaptive_clip(granularity="leaf"),
}
# The papers' exact semantics and values, for comparison (not held to the targets).
REFERENCE: dict[str, Callable[[], object]] = {
    "autoclip reference": lambda: gradclip_jax.autoclip(reference=True),
    "zclip paper": lambda: gradclip_jax.zclip(max_norm=1.0, reference=True),
    "zclip reference, no cap": lambda: gradclip_jax.zclip(reference=True),
    "adagc paper": lambda: gradclip_jax.adagc(relative=1.05, decay=0.98, reference=True),
}
STRATEGIES.update(REFERENCE)
DEFAULTS = tuple(s for s in STRATEGIES if s not in REFERENCE)
# The strategies run on the per-leaf scenario (global ones would mix the leaves).
PER_LEAF = ("adagc", "adaptive_clip leaf", "adagc paper")


@functools.cache
def _runner(strategy: str, leaves: int):
    tx = STRATEGIES[strategy]()
    params = {f"l{i}": jnp.zeros(1) for i in range(leaves)}

    @jax.jit
    def run(norms):
        def step(state, row):
            grads = {f"l{i}": row[i : i + 1] for i in range(leaves)}
            out, state = tx.update(grads, state, params)
            out = jnp.stack([jnp.abs(out[f"l{i}"][0]) for i in range(leaves)])
            return state, (state.stats.threshold, out)

        return jax.lax.scan(step, tx.init(params), norms)[1]

    return run


def run(strategy: str, norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step reported threshold ``(STEPS,)`` and per-leaf clipped norms ``(STEPS, leaves)``."""
    rows = norms.reshape(len(norms), -1)
    thresholds, out = _runner(strategy, rows.shape[1])(jnp.asarray(rows, jnp.float32))
    return np.asarray(thresholds, np.float64), np.asarray(out, np.float64)


def _clipped(norms: np.ndarray, out: np.ndarray) -> np.ndarray:
    """(steps, leaves) booleans: the leaf was scaled down (NaN steps: False)."""
    norms = np.asarray(norms, np.float32).astype(np.float64).reshape(out.shape)
    with np.errstate(invalid="ignore"):
        return out < norms * (1 - 1e-5)


@dataclasses.dataclass
class Result:
    """What a strategy did on a scenario, and whether it met the targets."""

    share: float  # share of clipped (steps x leaves) over the whole sequence
    spikes_missed: list[int]  # spike steps not clipped
    before: float | None = None  # share before a lasting change (500 steps)
    after: float | None = None  # share once the change is SETTLE steps old
    window_share: float | None = None  # drift: share over the drift window
    stationary_share: float | None = None  # the same window of the stationary sequence
    bad_thresholds: int = 0  # steps with a finite nonzero norm and threshold 0 or NaN

    @property
    def ok(self) -> bool:
        ok = not self.spikes_missed and self.bad_thresholds == 0
        if self.before is not None:
            ok &= abs(self.after - self.before) <= 0.10
        if self.window_share is not None:
            ok &= self.window_share <= self.stationary_share + 0.10
        return bool(ok)

    def cell(self) -> str:
        parts = []
        if self.before is not None:
            parts.append(f"{100 * self.before:.0f}% -> {100 * self.after:.0f}%")
        elif self.window_share is not None:
            parts.append(
                f"{100 * self.window_share:.0f}% (stat. {100 * self.stationary_share:.0f}%)"
            )
        else:
            parts.append(f"{100 * self.share:.0f}%")
        if self.spikes_missed:
            parts.append(f"missed {self.spikes_missed}")
        if self.bad_thresholds:
            parts.append(f"{self.bad_thresholds} bad thresholds")
        return ("" if self.ok else "**FAIL** ") + ", ".join(parts)


def evaluate(strategy: str, name: str, scenario: Scenario, stationary=None) -> Result:
    thresholds, out = run(strategy, scenario.norms)
    norms = scenario.norms.reshape(out.shape)
    clipped = _clipped(norms, out)
    per_step = clipped.mean(axis=1)
    finite = np.all(np.isfinite(norms), axis=1)
    result = Result(
        share=float(per_step[finite].mean()),
        spikes_missed=[s for s in scenario.spikes if not clipped[s, scenario.spike_leaf]],
    )
    live = finite & np.any(norms > 0, axis=1)
    result.bad_thresholds = int(np.sum(live & ~(thresholds > 0)))  # also NaN
    if scenario.change is not None:
        c = scenario.change
        leaf = clipped[:, 0]  # the leaf that changes
        result.before = float(leaf[c - 500 : c].mean())
        result.after = float(leaf[c + SETTLE :].mean())
    if scenario.window is not None:
        lo, hi = scenario.window
        result.window_share = float(per_step[lo:hi].mean())
        _, stat_out = run(strategy, stationary.norms)
        stat = _clipped(stationary.norms, stat_out).mean(axis=1)
        result.stationary_share = float(stat[lo:hi].mean())
    return result


def applicable(strategy: str, name: str) -> bool:
    """Whether the scenario ``name`` is run for ``strategy``."""
    if name == "per-leaf":
        return strategy in PER_LEAF  # a global norm would mix the leaves
    return strategy != "adaptive_clip leaf"  # on one leaf, the same as adaptive_clip


@functools.cache
def cached_scenarios() -> dict[str, Scenario]:
    return scenarios()


def table(strategies=DEFAULTS) -> tuple[str, dict[tuple[str, str], Result]]:
    """The markdown table (strategy x scenario) and the results behind it."""
    cases = cached_scenarios()
    results = {}
    for strategy in strategies:
        for name, scenario in cases.items():
            if not applicable(strategy, name):
                continue
            results[strategy, name] = evaluate(strategy, name, scenario, cases["stationary"])
    columns = list(strategies)
    lines = ["| scenario | " + " | ".join(f"`{c}`" for c in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for name in cases:
        cells = [results[c, name].cell() if (c, name) in results else "—" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), results


def plot(path: Path = PLOTS) -> None:
    """One PNG per scenario: a panel per strategy with the norm, the clipped norm and
    the threshold (per-leaf: both leaves' norms and clipped norms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.mkdir(parents=True, exist_ok=True)
    for name, scenario in cached_scenarios().items():
        strategies = [s for s in DEFAULTS if applicable(s, name)]
        fig, axes = plt.subplots(
            len(strategies), 1, figsize=(9, 1.5 * len(strategies) + 0.8), sharex=True
        )
        axes = np.atleast_1d(axes)
        norms = scenario.norms.reshape(STEPS, -1)
        for ax, strategy in zip(axes, strategies):
            thresholds, out = run(strategy, scenario.norms)
            for leaf in range(norms.shape[1]):
                label = "norm" if norms.shape[1] == 1 else f"norm of leaf {'ab'[leaf]}"
                ax.plot(norms[:, leaf], color="0.7", lw=0.6, label=label)
                clipped = "clipped norm" if norms.shape[1] == 1 else f"clipped, leaf {'ab'[leaf]}"
                ax.plot(out[:, leaf], color=f"C{leaf}", lw=0.6, label=clipped)
            if norms.shape[1] == 1:
                ax.plot(thresholds, color="k", lw=0.8, ls="--", label="threshold")
            ax.set_yscale("log")
            ax.set_ylabel(strategy, fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7, ncol=4, loc="upper right")
        axes[0].set_title(f"{name}: {scenario.description}", fontsize=9)
        axes[-1].set_xlabel("step")
        fig.tight_layout()
        slug = name.replace(" ", "_").replace(".", "").replace("-", "_").lower()
        fig.savefig(path / f"{slug}.png", dpi=80)
        plt.close(fig)


if __name__ == "__main__":
    markdown, _ = table()
    print(markdown)
    print()
    print(table(tuple(REFERENCE))[0])
    if "--table" not in sys.argv:
        plot()
