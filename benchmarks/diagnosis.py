"""Why a goal was missed, in one line of concrete numbers, from what XLA compiled."""

from __future__ import annotations

from typing import Any

from benchmarks._names import DONATED, ROOF, label

# Up to this many elements per leaf, launching a kernel costs about as much as running it.
SMALL_LEAF = 10_000


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def _reductions(hlo: dict[str, Any]) -> int:
    return int(hlo.get("reduce", 0) + hlo.get("reduce-window", 0))


def _counts(hlo: dict[str, Any]) -> str:
    return (
        f"{hlo.get('fusion', 0):.0f} fusions, {_reductions(hlo)} reductions, "
        f"{hlo.get('conditional', 0):.0f} conditionals, {hlo.get('instructions', 0):.0f} "
        "instructions"
    )


def _passes(hlo: dict[str, Any], nbytes: int) -> float | None:
    """Bytes the entry's kernels move, in units of the gradients' size."""
    moved = hlo.get("entry_bytes") or hlo.get("bytes_accessed")
    return moved / nbytes if moved and nbytes else None


def _contrast(ours: str, theirs: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    return f"optimized HLO: {label(ours)} {_counts(a)}; {label(theirs)} {_counts(b)}"


def compile_gap(record: dict[str, Any], ours: str, theirs: str) -> str:
    """Compile time: where the extra instructions come from."""
    n = record["n_leaves"]
    a, b = record["clippers"][ours], record["clippers"][theirs]
    ca, cb = a["compile"], b["compile"]
    parts = [
        f"{label(ours)} {ca['total_s']:.2f} s (lower {ca['lower_s']:.2f} + compile "
        f"{ca['compile_s']:.2f}) vs {label(theirs)} {cb['total_s']:.2f} s (lower "
        f"{cb['lower_s']:.2f} + compile {cb['compile_s']:.2f}) at {n} leaves",
        _contrast(ours, theirs, a["hlo"], b["hlo"]),
    ]
    red_a, red_b = _reductions(a["hlo"]), _reductions(b["hlo"])
    if red_a >= n:
        parts.append(
            f"XLA reduces ours leaf by leaf ({red_a / n:.1f} reductions per leaf vs "
            f"{red_b / n:.1f}): it rewrites reduce(concatenate(leaves)) into one reduction "
            "per operand, so concatenating small leaves does not bound compile time"
        )
    if a["hlo"].get("conditional", 0) > b["hlo"].get("conditional", 0) and red_a > 1.5 * red_b:
        parts.append(
            "both branches of the overflow-rescue lax.cond are compiled, and the rescue "
            "branch repeats the per-leaf reductions (max, then scaled sum of squares)"
        )
    fa, fb = a["hlo"].get("fusion", 0), b["hlo"].get("fusion", 0)
    if fa and fb:
        per_a, per_b = ca["compile_s"] / fa * 1e3, cb["compile_s"] / fb * 1e3
        parts.append(
            f"compile time per fusion {per_a:.1f} vs {per_b:.1f} ms; ours keeps "
            f"{fa / n:.2f} fusions per leaf (optax {fb / n:.2f})"
        )
        if fa >= n:
            parts.append(
                "at least one per leaf remains: each output leaf is its own kernel (the "
                f"scaling multiply), so at equal cost per fusion ours stays above "
                f"{n / fb:.2f}x optax's compile time however the norm is packed"
            )
    if ca["lower_s"] > 1.5 * cb["lower_s"]:
        parts.append(
            f"lowering (Python tracing) alone is {ca['lower_s'] / cb['lower_s']:.1f}x "
            "optax's: more jnp operations per leaf"
        )
    return "; ".join(parts)


def run_gap(record: dict[str, Any], ours: str, theirs: str) -> str:
    """Run time: extra bytes moved, or extra kernels launched."""
    a, b = record["clippers"][ours], record["clippers"][theirs]
    ta, tb = a["run"]["median_s"], b["run"]["median_s"]
    parts = [
        f"{label(ours)} {_ms(ta)} vs {label(theirs)} {_ms(tb)} per update on "
        f"{record['n_leaves']} leaves x {record['leaf_size']}",
        _contrast(ours, theirs, a["hlo"], b["hlo"]),
    ]
    pa, pb = _passes(a["hlo"], record["tree_bytes"]), _passes(b["hlo"], record["tree_bytes"])
    fa, fb = a["hlo"].get("fusion", 0), b["hlo"].get("fusion", 0)
    if pa and pb:
        parts.append(
            f"kernels outside conditionals move {pa:.2f} vs {pb:.2f} gradient-sized passes"
        )
    if pa and pb and pa > 1.15 * pb:
        parts.append(f"ours moves {pa / pb:.2f}x the bytes: an extra pass over the gradients")
    elif fa > 1.2 * fb and ta > tb and record["leaf_size"] <= SMALL_LEAF:
        parts.append(
            f"same bytes but {fa - fb:.0f} more kernels, ~{(ta - tb) / (fa - fb) * 1e6:.1f} us "
            "each: per-kernel overhead dominates on small leaves"
        )
    n = record["n_leaves"]
    if fb and fa >= n and fb >= n and n >= 100:
        parts.append(
            f"both run at least one kernel per leaf ({fa:.0f} vs {fb:.0f} for {n} leaves) "
            f"and {label(theirs)} spends {tb / fb * 1e6:.1f} us per kernel: with per-leaf "
            "outputs, launch overhead keeps the time ratio near the ratio of kernel counts"
        )
    extra = a["hlo"].get("conditional", 0) - b["hlo"].get("conditional", 0)
    if extra > 0:
        parts.append(
            f"{extra:.0f} more lax.cond (the overflow check) between the norm and the "
            "scaling, a control-flow step XLA runs every update"
        )
    return "; ".join(parts)


def norm_gap(record: dict[str, Any], ours: str, floor: str) -> str:
    """Norm throughput: our tree handling vs XLA's own single-array reduction."""
    series, fraction = record["series"], record["fraction_of_roof"]
    parts = [
        f"{label(ours)} {series[ours]['gb_per_s']:.1f} GB/s vs roof "
        f"{series[ROOF]['gb_per_s']:.1f} GB/s ({fraction[ours]:.2f} of it)"
    ]
    if fraction[ours] >= 1:
        parts.append("the roof is not a bound here: NumPy's dot ran slower than XLA")
    elif floor in fraction:
        share = fraction[ours] / fraction[floor]
        parts.append(
            f"XLA's own sum(x * x) of one contiguous array reaches {fraction[floor]:.2f} "
            f"of the roof and ours {share:.2f} of XLA's"
        )
        if share >= 0.85:
            parts.append(
                "so the gap is XLA's reduction code on this backend (e.g. fewer threads "
                "or no vectorised multi-accumulator loop), not our tree handling"
            )
        else:
            parts.append(f"so our tree handling costs {1 - share:.0%} on top of XLA's")
    passes = _passes(series[ours].get("hlo") or {}, record["bytes"])
    if passes:
        parts.append(f"its kernels move {passes:.2f} passes over the data")
    return "; ".join(parts)


def step_gap(chain: dict[str, Any], name: str, base: str) -> str:
    """Optimizer step: what clipping adds to adam's fused update."""
    a, b = chain["optimizers"][name], chain["optimizers"][base]
    nbytes = chain["sizes"]["total_size"] * 4
    pa, pb = _passes(a["hlo"], nbytes), _passes(b["hlo"], nbytes)
    parts = [
        f"{_ms(a['run']['median_s'])} vs {_ms(b['run']['median_s'])} per step",
        _contrast(name, base, a["hlo"], b["hlo"]),
    ]
    if pa and pb:
        parts.append(
            f"kernels move {pa:.2f} vs {pb:.2f} gradient-sized passes; the norm is a "
            "reduction over all gradients that must finish before adam's elementwise "
            "update can use the scale, so it is at least one extra read"
        )
    return "; ".join(parts)


def torch_gap(record: dict[str, Any], ours: str, torch: str) -> str:
    """PyTorch: kernels launched and out-of-place writes."""
    ta, tb = record["runs"][ours]["median_s"], record["runs"][torch]["median_s"]
    n = record["n_leaves"]
    parts = [f"{label(ours)} {_ms(ta)} vs {label(torch)} {_ms(tb)} on {n} leaves"]
    hlo = (record.get("hlo") or {}).get(ours)
    if hlo and record["leaf_size"] <= SMALL_LEAF:
        fusions = hlo.get("fusion", 0)
        parts.append(
            f"ours runs {fusions:.0f} XLA kernels ({fusions / n:.2f} per leaf, "
            f"{ta / max(fusions, 1) * 1e6:.1f} us each on average)"
        )
    donated = record["runs"].get(DONATED)
    if donated and donated["median_s"] <= tb:
        parts.append(
            f"with the gradients donated (written in place, as torch does) ours takes "
            f"{_ms(donated['median_s'])}, no slower than torch: the gap is writing a new "
            "tree, as an optax update does"
        )
    elif donated and donated["median_s"] < ta and ta > tb:
        share = (ta - donated["median_s"]) / (ta - tb)
        parts.append(
            f"with the gradients donated (written in place, as torch does) ours takes "
            f"{_ms(donated['median_s'])}: {share:.0%} of the gap is writing a new tree, as "
            "an optax update does"
        )
    elif donated:
        parts.append(f"donating the gradients does not help ({_ms(donated['median_s'])})")
    return "; ".join(parts)
