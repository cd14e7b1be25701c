"""What is measured: the transformations, the tree shapes, and the figures that pair them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import optax

import gradclip_jax as gj
from benchmarks import measure
from gradclip_jax._norms import shape_groups

# Low enough that standard-normal gradients are clipped at every size.
MAX_NORM, MAX_ABS, BLOCK_RMS, AGC_CLIPPING = 1.0, 0.5, 0.5, 0.01
CLIP, DONATED = "clip_by_global_norm", "clip_by_global_norm (donated)"
TORCH = "torch clip_grad_norm_"


adam = lambda: optax.adam(1e-3)
clip = lambda: gj.clip_by_global_norm(MAX_NORM)
optax_clip = lambda: optax.clip_by_global_norm(MAX_NORM)

# Every transformation measured, by name. Each call builds a fresh one.
ENTRIES: dict[str, Callable[[], optax.GradientTransformation]] = {
    CLIP: clip,
    "optax.clip_by_global_norm": optax_clip,
    "agc": lambda: gj.agc(AGC_CLIPPING),
    "optax.adaptive_grad_clip": lambda: optax.adaptive_grad_clip(AGC_CLIPPING),
    "clip_by_block_rms": lambda: gj.clip_by_block_rms(BLOCK_RMS),
    "optax.clip_by_block_rms": lambda: optax.clip_by_block_rms(BLOCK_RMS),
    "clip_by_value": lambda: gj.clip_by_value(MAX_ABS),
    "optax.clip": lambda: optax.clip(MAX_ABS),
    "clip_by_leaf_norm": lambda: gj.clip_by_leaf_norm(MAX_NORM),
    "adaptive_clip(leaf)": lambda: gj.adaptive_clip(granularity="leaf"),
    "adagc": gj.adagc,
    "adaptive_clip": gj.adaptive_clip,
    "zclip": gj.zclip,
    "autoclip": gj.autoclip,
    "quantile_clip": gj.quantile_clip,
    "adam": adam,
    "on_nonfinite(adam)": lambda: gj.on_nonfinite(adam()),
    "skip_on_spike(adam)": lambda: gj.skip_on_spike(adam()),
    f"on_nonfinite({CLIP})": lambda: gj.on_nonfinite(clip()),
    f"skip_on_spike({CLIP})": lambda: gj.skip_on_spike(clip()),
    f"chain({CLIP}, adam)": lambda: optax.chain(clip(), adam()),
    "chain(optax.clip_by_global_norm, adam)": lambda: optax.chain(optax_clip(), adam()),
    "floor": lambda: optax.scale(0.5),  # one multiply per leaf: tree.map(lambda g: 0.5 * g)
    # Parts of our work, each alone (they return what they compute, not updates).
    "L-inf norm alone": lambda: optax.stateless(lambda g, p: gj.global_norm(g, ord=math.inf)),
    "stacking alone": lambda: optax.stateless(_stacks),
    "per-unit multiply alone": lambda: optax.stateless(_unit_multiply),
}


def _stacks(grads, params):
    """What agc's stacking writes: gradclip_jax's own stacks of the small updates and
    parameters (``shape_groups``, as agc calls it), and nothing else."""
    groups = shape_groups(jax.tree.leaves(grads), jax.tree.leaves(params))
    return [arrays for _, arrays, stacked in groups if stacked]


def _unit_multiply(grads, params):
    """Each leaf times a vector of its last axis: the least a unit-wise clipper writes."""
    return jax.tree.map(lambda g, p: g * p[0], grads, params)


@dataclass(frozen=True)
class Tree:
    """``n_leaves`` float32 arrays of ``shape``; ``many_small``: the compile-bound case."""

    n_leaves: int
    shape: tuple[int, ...]
    many_small: bool

    @property
    def name(self) -> str:
        return f"{self.n_leaves} x {self.shape}"


@dataclass(frozen=True)
class Config:
    trees: tuple[Tree, ...]
    rounds: int = 11  # interleaved run-time rounds
    compile_rounds: int = 3
    min_sample_s: float = 0.02


SMALL = tuple(Tree(n, (32, 32), True) for n in (100, 500, 1000, 2000))
FULL = Config((Tree(10, (1000, 2000), False), *SMALL))
QUICK = Config((Tree(3, (25, 40), False), Tree(20, (8, 8), True)), 2, 1, 0.002)

Target = Callable[[Tree], "float | None"]


@dataclass(frozen=True)
class Pair:
    """One row per tree: ``ours`` / ``ref`` on ``metric`` (run, compile or memory)."""

    ours: str
    ref: str
    metric: str
    target: Target
    small_only: bool = False  # only on the trees of many small leaves


def _pairs(pairs: list[tuple[str, str]], metric: str, target: Target = lambda t: None, **kw):
    return [Pair(ours, ref, metric, target, **kw) for ours, ref in pairs]


SCALING = [(CLIP, "optax.clip_by_global_norm"), ("agc", "optax.adaptive_grad_clip")]
SCALING += [("clip_by_block_rms", "optax.clip_by_block_rms")]
VALUE = [("clip_by_value", "optax.clip")]  # run target of its own: _value_run
TWINS = SCALING + VALUE
PER_LEAF = [(r, CLIP) for r in ("clip_by_leaf_norm", "adaptive_clip(leaf)", "adagc")]
GLOBAL = [(r, CLIP) for r in ("adaptive_clip", "zclip", "autoclip", "quantile_clip")]
GUARDS = [(f"{g}({i})", i) for i in ("adam", CLIP) for g in ("on_nonfinite", "skip_on_spike")]
CHAINS = [(f"chain({CLIP}, adam)", "adam")]
OPTAX_CHAIN = [("chain(optax.clip_by_global_norm, adam)", "adam")]
BOUNDS = [
    ("L-inf norm alone", "optax.clip"),
    ("per-unit multiply alone", "optax.adaptive_grad_clip"),
]
STACKING = [("stacking alone", "optax.adaptive_grad_clip")]  # large leaves are never stacked


def _optax_run(tree: Tree) -> float | None:
    return 1.0 if not tree.many_small else 0.9 if tree.n_leaves >= 500 else None


def _value_run(tree: Tree) -> float | None:
    """clip_by_value's own target: within 1.1x of optax.clip, where the others have one."""
    return 1.1 if _optax_run(tree) else None


# name -> (title, pairs). A target is an upper bound on the ratio ours / ref.
FIGURES: dict[str, tuple[str, list[Pair]]] = {
    "optax": (
        "Ours / optax: run time, compile time and peak memory of one jitted update",
        _pairs(SCALING, "run", _optax_run)
        + _pairs(VALUE, "run", _value_run)
        + _pairs(TWINS, "compile", lambda t: 1.0 if t.many_small else None)
        + _pairs(TWINS, "memory"),
    ),
    "rules": (
        "Per-leaf and adaptive rules / our clip_by_global_norm",
        _pairs(PER_LEAF + GLOBAL, "run", lambda t: 1.1)
        + _pairs(PER_LEAF, "compile", lambda t: 1.2)
        + _pairs(GLOBAL, "compile"),
    ),
    "guards": (
        "Guards / the transformation they wrap",
        _pairs(GUARDS, "run", lambda t: 1.1) + _pairs(GUARDS, "compile", lambda t: 1.2),
    ),
    "chain_adam": (
        "chain(clip, adam) / adam alone (one update, no apply_updates)",
        _pairs(CHAINS, "run", lambda t: 1.12) + _pairs(OPTAX_CHAIN, "run"),
    ),
    "floor": (
        "clip_by_global_norm / a jitted per-leaf multiply of the same tree",
        _pairs([(CLIP, "floor")], "compile", lambda t: 2.0) + _pairs([(CLIP, "floor")], "run"),
    ),
    "bounds": (
        "Parts of our work, each alone / the optax counterpart",
        _pairs(BOUNDS, "run") + _pairs(STACKING, "run", small_only=True),
    ),
    "torch": (
        "Our clip_by_global_norm / torch.nn.utils.clip_grad_norm_(foreach=True)",
        _pairs([(CLIP, TORCH), (DONATED, TORCH)], "run"),
    ),
}


def measure_tree(tree: Tree, names: list[str], cfg: Config) -> dict[str, dict[str, Any]]:
    """Compile times, memory and interleaved run times of ``update(grads, state, params)``."""
    structs = [jax.ShapeDtypeStruct(tree.shape, np.float32)] * tree.n_leaves

    def maker(name: str):
        def make():  # a fresh transformation and a fresh function object
            tx = ENTRIES[name]()
            fn = lambda g, s, p: tx.update(g, s, p)
            return fn, (structs, jax.eval_shape(tx.init, structs), structs)

        return make

    makers = {n: maker(n) for n in names}
    compiled, compile_s = measure.compile_interleaved(makers, cfg.compile_rounds)
    grads = [jax.device_put(x) for x in measure.random_tree(tree.n_leaves, tree.shape, 0)]
    params = [jax.device_put(x) for x in measure.random_tree(tree.n_leaves, tree.shape, 1)]
    calls = {}
    for n in names:
        state = ENTRIES[n]().init(params)
        calls[n] = lambda exe=compiled[n], s=state: exe(grads, s, params)
    run_s, per_sample = measure.time_interleaved(calls, cfg.rounds, cfg.min_sample_s)
    out = {n: {"compile_s": compile_s[n], "run_s": run_s[n]} for n in names}
    for n in names:
        out[n].update(calls_per_sample=per_sample[n], **measure.memory(compiled[n]))
    return out


def _row(pair: Pair, tree: Tree, a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Both values, the ratio ours / ref with its quartiles, the target and the status."""
    if pair.metric == "memory":
        ours, ref = a["peak_bytes"], b["peak_bytes"]
        stats = {"ratio": ours / ref if ours and ref else None, "q1": None, "q3": None}
    else:
        key = f"{pair.metric}_s"
        ours, ref = statistics.median(a[key]), statistics.median(b[key])
        stats = measure.ratio_stats(a[key], b[key])
    target, ratio = pair.target(tree), stats["ratio"]
    status = "no target" if target is None else "not measured" if ratio is None else None
    row = dict(tree=tree.name, ours=pair.ours, ref=pair.ref, metric=pair.metric)
    row.update(ours_value=ours, ref_value=ref, **stats, target=target)
    row["status"] = status or ("met" if ratio <= target else "missed")
    return row


def figure_rows(pairs: list[Pair], trees: tuple[Tree, ...], measured: dict) -> list[dict]:
    """One row per pair and tree where both sides were measured, pair by pair."""
    return [
        _row(p, t, measured[t.name][p.ours], measured[t.name][p.ref])
        for p in pairs
        for t in trees
        if {p.ours, p.ref} <= measured.get(t.name, {}).keys() and (t.many_small or not p.small_only)
    ]
