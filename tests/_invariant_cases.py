"""The transformations, trees, values and invariants of ``tests/test_invariants.py``
(and ``tests/test_invariants_scale.py``), and the helpers that run and check them.

Every public transformation is a :class:`Case`: how to build it (its numeric
hyperparameters apart, so that ``optax.inject_hyperparams`` can inject every one of
them), what it promises (``kind``) and how to read its state. Trees are described by a
*spec* (leaf path -> shape and dtype) and filled with one *value kind* at a time, so a
jitted update compiled for a spec serves every value kind. The invariants are checked
in float64 NumPy, never with the library's own norms.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import gradclip_jax

# ------------------------------------------------------------------------ the cases

# Relative slack of every bound, on top of the rounding of the output's own dtype.
RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Case:
    """One public transformation under test.

    ``kind`` says which invariant bounds its output:

    * ``"element"``: every entry's magnitude is at most ``threshold``;
    * ``"global"``: the global L2 norm is at most the threshold, direction kept;
    * ``"leaf"``: each leaf's L2 norm (``"rms"``: its RMS) at most the threshold;
    * ``"unit"``: each unit's norm at most ``threshold`` times its parameter's (AGC);
    * ``"guard"``: a guard around ``clip_by_global_norm(1.0)``: global bound 1, or a
      skipped step (zeros);
    * ``"dp"``: per-example gradients in (leading batch axis), their clipped mean out.

    ``threshold`` is the constant bound, or ``None`` when the bound is the threshold the
    state reports for the step (adaptive rules).
    """

    name: str
    factory: Callable[..., Any]
    kind: str
    threshold: float | None = None
    hyper: dict = dataclasses.field(default_factory=dict)  # numeric: injectable
    static: dict = dataclasses.field(default_factory=dict)  # structural arguments
    rms: bool = False  # clip_by_block_rms: the leaf bound is threshold * sqrt(size)
    stateful_rule: bool = False  # has a rule state that must not absorb non-finite norms
    policy: str | None = None  # on_nonfinite's policy
    noiseless: bool = True  # dp_aggregate without noise: its mean is bounded

    def make(self, **overrides: Any) -> Any:
        return self.factory(**self.static, **{**self.hyper, **overrides})

    def inject(self) -> Any:
        """``optax.inject_hyperparams`` with every numeric hyperparameter injected."""
        return optax.inject_hyperparams(self.factory)(**self.static, **self.hyper)

    @property
    def batched(self) -> bool:
        return self.kind == "dp"

    @property
    def clipper(self) -> bool:
        """A clipper's state (``ClipState``), not a guard's or dp_aggregate's."""
        return self.kind in ("element", "global", "leaf", "unit")


def _inner() -> Any:
    return gradclip_jax.clip_by_global_norm(1.0)


def _cases() -> list[Case]:
    g = gradclip_jax
    cases = [
        Case("clip_by_value", g.clip_by_value, "element", 0.5, {"max_abs": 0.5}),
        Case("clip_by_global_norm", g.clip_by_global_norm, "global", 1.0, {"max_norm": 1.0}),
        Case("clip_by_leaf_norm", g.clip_by_leaf_norm, "leaf", 1.0, {"max_norm": 1.0}),
        Case("clip_by_block_rms", g.clip_by_block_rms, "leaf", 0.5, {"threshold": 0.5}, rms=True),
        Case("agc", g.agc, "unit", 0.1, {"clipping": 0.1, "eps": 1e-3}),
        # adaptive_clip takes a rule object: it has no numeric argument of its own.
        Case("adaptive_clip", g.adaptive_clip, "global", stateful_rule=True),
        Case(
            "adaptive_clip_leaf",
            g.adaptive_clip,
            "leaf",
            static={"granularity": "leaf"},
            stateful_rule=True,
        ),
        # Short warm-ups and histories, so that a few steps reach the rules' steady state.
        Case(
            "zclip",
            g.zclip,
            "global",
            hyper={
                "z_thresh": 2.5,
                "decay": 0.9,
                "warmup_steps": 3,
                "max_norm": 100.0,
                "eps": 1e-6,
                "initial_threshold": 1.0,
                "cold_factor": 4.0,
            },
            stateful_rule=True,
        ),
        Case(
            "autoclip",
            g.autoclip,
            "global",
            hyper={
                "p": 50.0,
                "history": 8,
                "initial_threshold": 1.0,
                "bound_factor": 4.0,
                "level_window": 4,
                "max_rise": 0.05,
            },
            stateful_rule=True,
        ),
        Case(
            "quantile_clip",
            g.quantile_clip,
            "global",
            hyper={"target": 0.5, "learning_rate": 0.2, "initial": 1.0},
            stateful_rule=True,
        ),
        Case(
            "adagc",
            g.adagc,
            "leaf",
            hyper={"abs_max": 1.0, "relative": 1.1, "decay": 0.9, "warmup_steps": 3},
            stateful_rule=True,
        ),
        Case(
            "skip_on_spike",
            g.skip_on_spike,
            "guard",
            1.0,
            hyper={"window": 8, "sigma": 6.0, "min_history": 4},
            static={"inner": _inner()},
        ),
    ]
    for policy in ("skip", "zero", "propagate"):
        cases.append(
            Case(
                f"on_nonfinite_{policy}",
                g.on_nonfinite,
                "guard",
                1.0,
                hyper={"max_consecutive": 4},
                static={"inner": _inner(), "policy": policy},
                policy=policy,
            )
        )
    cases.append(
        Case(
            "on_nonfinite_raise",
            g.on_nonfinite,
            "guard",
            1.0,
            static={"inner": _inner(), "policy": "raise"},
            policy="raise",
        )
    )
    cases.append(
        Case(
            "dp_aggregate",
            g.dp_aggregate,
            "dp",
            1.0,
            {"max_norm": 1.0, "noise_multiplier": 0.0, "seed": 3},
        )
    )
    cases.append(
        Case(
            "dp_aggregate_adaptive",
            g.dp_aggregate,
            "dp",
            None,
            {"noise_multiplier": 1.0, "seed": 7, "clipped_count_stddev": 2.0},
            noiseless=False,
        )
    )
    return cases


CASES: dict[str, Case] = {case.name: case for case in _cases()}
NAMES = list(CASES)

# ------------------------------------------------------------------------ the trees

F8 = (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
BATCH = 3  # examples per batch for dp_aggregate


def _leaf(shape, dtype):
    return (tuple(shape), jnp.dtype(dtype))


# A spec maps a key to (shape, dtype), None (a None leaf) or a nested dict / list.
SPECS: dict[str, Any] = {
    # Every dtype and leaf kind of the matrix at once (float8 apart: see FLOAT8_SPECS).
    "mixed": {
        "f32": _leaf((4, 3), jnp.float32),
        "f16": _leaf((5,), jnp.float16),
        "bf16": _leaf((2, 3), jnp.bfloat16),
        "c64": _leaf((3,), jnp.complex64),
        "scalar": _leaf((), jnp.float32),
        "empty": _leaf((0, 3), jnp.float32),
        "int": _leaf((3,), jnp.int32),
        "bool": _leaf((2,), jnp.bool_),
        "none": None,
        "nested": [_leaf((2,), jnp.float32), None],
    },
    "f32": {"w": _leaf((4, 3), jnp.float32), "b": _leaf((3,), jnp.float32)},
    "f64": {
        "w": _leaf((4, 3), jnp.float64),
        "b": _leaf((3,), jnp.float64),
        "h": _leaf((2,), jnp.float32),
    },
    "float8_e4m3fn": {
        "w": _leaf((4, 3), F8[0]),
        "b": _leaf((3,), F8[0]),
        "s": _leaf((), F8[0]),
    },
    "float8_e5m2": {
        "w": _leaf((4, 3), F8[1]),
        "b": _leaf((3,), F8[1]),
        "s": _leaf((), F8[1]),
    },
    # float8 next to other floats in one tree.
    "float8_mixed": {
        "e4m3": _leaf((3,), F8[0]),
        "e5m2": _leaf((2,), F8[1]),
        "f32": _leaf((2,), jnp.float32),
    },
    # Degenerate trees: nothing, or nothing to clip.
    "empty_tree": {},
    "none_leaves": {"a": None, "b": [None, None]},
    "int_bool_only": {"i": _leaf((3,), jnp.int32), "b": _leaf((2,), jnp.bool_)},
    "zero_size": {"e": _leaf((0,), jnp.float32), "m": _leaf((2, 0), jnp.bfloat16)},
    "scalars": {"a": _leaf((), jnp.float32), "b": _leaf((), jnp.float16)},
    # Many leaves: the compile-time path of the library (slow tier).
    "thousand": {
        f"l{i:04d}": _leaf((i % 7 + 1,), jnp.float32 if i % 3 else jnp.bfloat16)
        for i in range(1000)
    },
}


def spec_for(case: Case, spec: Any) -> Any:
    """The spec as ``case`` consumes it: dp_aggregate takes a batch of examples."""
    if not case.batched:
        return spec
    return _map_spec(
        lambda s: _leaf((BATCH, *s[0]), s[1]) if _inexact(s[1]) else s,
        spec,
    )


def _inexact(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _map_spec(fn: Callable, spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: _map_spec(fn, v) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_map_spec(fn, v) for v in spec]
    if spec is None:
        return None
    return fn(spec)


VALUE_KINDS = ("clean", "small", "zeros", "subnormal", "huge", "nan", "inf", "neg_zero")
FINITE_KINDS = ("clean", "small", "zeros", "subnormal", "huge", "neg_zero")


def _huge(dtype: Any) -> float:
    """A magnitude that squares beyond the dtype: 1e30 in float32's range, a quarter of
    the maximum for narrower floats (whose norms accumulate in float32)."""
    info = jnp.finfo(dtype)
    if float(info.max) > 1e37:
        return 1e30
    return float(info.max) / 4


def _has_inf(dtype: Any) -> bool:
    return bool(np.isinf(np.array(np.inf).astype(dtype)))


def fill(spec: Any, kind: str, seed: int = 0) -> Any:
    """A tree of ``spec`` holding values of ``kind``; integer leaves hold 0, 1, 0, ...

    ``"nan"`` puts one NaN in the first non-empty float leaf; ``"inf"`` puts ``+inf`` and
    ``-inf`` in the first two non-empty float leaves that can hold them; both keep the
    rest clean.
    """
    rng = np.random.default_rng(seed)
    placed = {"nan": 0, "inf": 0}

    def make(s):
        shape, dtype = s
        if not _inexact(dtype):
            values = np.arange(math.prod(shape)).reshape(shape) % 2
            return jnp.asarray(values, dtype)
        info = jnp.finfo(dtype)
        complex_ = jnp.issubdtype(dtype, jnp.complexfloating)
        size = math.prod(shape)

        def normal(scale):
            values = rng.normal(size=shape) * scale
            return values + 1j * rng.normal(size=shape) * scale if complex_ else values

        if kind in ("clean", "nan", "inf"):
            values = normal(2.0)
        elif kind == "small":
            values = normal(0.005)
        elif kind == "zeros":
            values = np.zeros(shape)
        elif kind == "neg_zero":
            values = np.full(shape, -0.0)
        elif kind == "subnormal":
            steps = rng.integers(1, 4, size=shape) * rng.choice([-1, 1], size=shape)
            values = steps * float(info.smallest_subnormal)
        elif kind == "huge":
            values = rng.uniform(0.5, 1.0, size=shape) * rng.choice([-1, 1], size=shape)
            values = values * _huge(dtype)
        else:
            raise ValueError(kind)
        values = np.array(values, np.complex128 if complex_ else np.float64)
        flat = values.reshape(-1)
        if size and kind == "nan" and not placed["nan"]:
            flat[size // 2] = np.nan
            placed["nan"] += 1
        if size and kind == "inf" and placed["inf"] < 2 and _has_inf(dtype):
            flat[0] = np.inf if not placed["inf"] else -np.inf
            placed["inf"] += 1
        if complex_:
            return jnp.asarray(values.astype(np.complex64))
        return jnp.asarray(values.astype(dtype))

    return _map_spec(make, spec)


def params_like(tree: Any, case: Case | None = None) -> Any:
    """Parameters for ``tree``: ones (one example's shape for dp_aggregate)."""

    def one(x):
        if x is None:
            return None
        if case is not None and case.batched and _inexact(x.dtype):
            x = x[0]
        return jnp.ones(x.shape, x.dtype)

    return jax.tree.map(one, tree)


def stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def row(tree: Any, i: int) -> Any:
    return jax.tree.map(lambda x: x[i], tree)


# ---------------------------------------------------------------- float64 references


def as64(x: Any) -> np.ndarray:
    x = np.asarray(x)
    if np.iscomplexobj(x):
        return x.astype(np.complex128)
    return x.astype(np.float64)


def is_inexact(x: Any) -> bool:
    return x is not None and hasattr(x, "dtype") and _inexact(x.dtype)


def inexact(tree: Any) -> list[np.ndarray]:
    return [as64(x) for x in jax.tree.leaves(tree) if is_inexact(x)]


def norm64(arrays: list[np.ndarray]) -> float:
    """L2 norm in float64 without overflow (scaled by the largest magnitude)."""
    mags = [np.abs(a).ravel() for a in arrays if a.size]
    if not mags:
        return 0.0
    largest = max(float(m.max()) for m in mags)
    if not np.isfinite(largest):
        return largest if not any(np.isnan(m).any() for m in mags) else math.nan
    if largest == 0:
        return 0.0
    return largest * math.sqrt(sum(float(np.sum((m / largest) ** 2)) for m in mags))


def cosine(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The cosine of the angle between two lists of arrays (real part of the inner
    product over the product of the norms)."""
    na, nb = norm64(a), norm64(b)
    return sum(float(np.real(np.vdot(x / nb, y / na))) for x, y in zip(b, a))


def clipped_sum(examples: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """Abadi et al.'s clipped sum in float64: ``sum_i g_i * min(1, C / ||g_i||)`` over
    the leading (batch) axis of every leaf."""
    batch = examples[0].shape[0]
    norms = np.array([norm64([x[i] for x in examples]) for i in range(batch)])
    scale = np.minimum(1.0, max_norm / np.where(norms > 0, norms, 1.0))
    return [np.tensordot(scale, x, axes=1) for x in examples]


def rounding(tree: Any) -> float:
    """Relative rounding of the tree's narrowest inexact dtype: how far one rounded
    output may exceed an exact bound (half an ulp), plus RTOL."""
    eps = [float(jnp.finfo(x.dtype).eps) / 2 for x in jax.tree.leaves(tree) if is_inexact(x)]
    return RTOL + max(eps, default=0.0)


def unit_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
    """AGC's documented unit layout (output features last): a unit of a rank 2-3 leaf
    spans axis 0, of a rank 4-5 leaf every axis but the last; vectors are one unit."""
    if sum(d != 1 for d in shape) <= 1 or len(shape) < 2:
        return tuple(range(len(shape)))
    return (0,) if len(shape) in (2, 3) else tuple(range(len(shape) - 1))


def finite_tree(tree: Any) -> bool:
    return all(np.all(np.isfinite(as64(x))) for x in jax.tree.leaves(tree) if is_inexact(x))


def nonfinite_mask(x: Any) -> np.ndarray:
    return ~np.isfinite(as64(x))


# ------------------------------------------------------------------- state helpers


def avals(tree: Any) -> Any:
    """Tree structure and (shape, dtype, weak_type) of every leaf: what jit keys on."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [
        (np.shape(x), jnp.result_type(x), bool(getattr(x, "weak_type", False))) for x in leaves
    ]


class Layout(tuple):
    """``avals`` of a state, kept where the state itself may be donated."""


def layout(tree: Any) -> Layout:
    return Layout(avals(tree))


def assert_same_layout(state: Any, reference: Any, what: str) -> None:
    """``state`` has the layout of ``reference`` (a state or a ``Layout``)."""
    got = avals(state)
    want = reference if isinstance(reference, Layout) else avals(reference)
    assert got[0] == want[0], f"{what}: state structure changed: {got[0]} vs {want[0]}"
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert a == b, f"{what}: state leaf {i} changed from {b} to {a}"


def assert_bitwise_equal(a: Any, b: Any, what: str) -> None:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"{what}: structures differ: {ta} vs {tb}"
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype} vs {y.dtype}"
        assert x.tobytes() == y.tobytes(), f"{what}: {x} != {y}"


def assert_trees_close(actual: Any, expected: Any, what: str, rtol: float = 1e-6) -> None:
    """Equal structures; float leaves equal to ``rtol`` plus their dtype's rounding
    (NaN where expected), other leaves exactly. Works for float8, unlike NumPy's."""
    la, ta = jax.tree.flatten(actual)
    le, te = jax.tree.flatten(expected)
    assert ta == te, f"{what}: structures differ: {ta} vs {te}"
    for a, e in zip(la, le):
        a_arr, e_arr = np.asarray(a), np.asarray(e)
        assert a_arr.dtype == e_arr.dtype and a_arr.shape == e_arr.shape, (
            f"{what}: {a_arr.dtype}{a_arr.shape} vs {e_arr.dtype}{e_arr.shape}"
        )
        if not is_inexact(a_arr):
            np.testing.assert_array_equal(a_arr, e_arr, err_msg=what)
            continue
        a64, e64 = as64(a_arr), as64(e_arr)
        eps = float(jnp.finfo(a_arr.dtype).eps)
        tol = rtol + (eps if eps > 1e-6 else 0.0)  # one ulp apart in a narrow dtype
        finite = np.abs(e64[np.isfinite(e64)])
        atol = tol * float(finite.max(initial=0)) + 2 * float(
            jnp.finfo(a_arr.dtype).smallest_subnormal
        )
        np.testing.assert_allclose(a64, e64, rtol=tol, atol=atol, equal_nan=True, err_msg=what)


def assert_state_finite(state: Any, init: Any, what: str, carried: Any = None) -> None:
    """No NaN anywhere; an infinity only where the initial state has one (e.g. "no
    smallest norm yet", "no spike threshold in warm-up"). ``carried``: a state whose
    non-finite values may have been kept (skip_on_spike's last spike value)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    init_leaves = jax.tree.leaves(init)
    carried_leaves = jax.tree.leaves(carried) if carried is not None else [None] * len(flat)
    for (path, x), y, c in zip(flat, init_leaves, carried_leaves):
        x, y = np.asarray(x), np.asarray(y)
        if not np.issubdtype(x.dtype, np.inexact):
            continue
        where = jax.tree_util.keystr(path)
        kept = (
            np.zeros(x.shape, bool)
            if c is None
            else (np.asarray(c) == x) | (np.isnan(np.asarray(c)) & np.isnan(x))
        )
        assert not (np.isnan(x) & ~kept).any(), f"{what}: NaN in the state at {where}: {x}"
        new_inf = np.isinf(x) & ~np.isinf(np.broadcast_to(y, x.shape)) & ~kept
        assert not new_inf.any(), f"{what}: an infinity in the state at {where}: {x}"


def reported(state: Any) -> dict[str, np.ndarray]:
    """The statistics record of a clipper's or guard's own state."""
    record = state.stats.record
    return {f: np.asarray(v) for f, v in zip(record._fields, record)}


# ------------------------------------------------------------------ the invariants


def _float_leaves(tree: Any) -> list[tuple[str, Any]]:
    return [
        (jax.tree_util.keystr(p), x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if is_inexact(x)
    ]


def _assert_contraction(grads: Any, out: Any, what: str) -> None:
    """|out| <= |in| entry by entry (real and imaginary parts), signs kept: what any
    scaling by a factor in [0, 1], or a clamp, does, rounding included (rounding is
    monotone, and the input is representable). ``grads``: a tree, or a list of the
    float leaves."""
    leaves = _float_leaves(grads) if not isinstance(grads, list) else list(enumerate(grads))
    for (path, g), o in zip(leaves, inexact(out)):
        g64 = as64(g)
        pairs = [(g64.real, o.real), (g64.imag, o.imag)] if np.iscomplexobj(g64) else [(g64, o)]
        finite = np.isfinite(g64)
        for gp, op in pairs:
            gp, op = gp[finite], op[finite]
            assert np.all(np.abs(op) <= np.abs(gp)), f"{what}{path}: grew: {gp} -> {op}"
            assert np.all(gp * op >= 0), f"{what}{path}: sign flipped: {gp} -> {op}"


def _assert_unchanged(g: Any, o: Any, what: str) -> None:
    """out == in, except that a part (real or imaginary) below float32's smallest normal
    number may be flushed to zero (XLA on CPU flushes float32 subnormals: the platform,
    not the clipper; docs/numerics.md)."""
    g64, o64 = as64(g), as64(o)
    tiny = float(jnp.finfo(jnp.float32).tiny)
    for gp, op in (
        [(g64.real, o64.real), (g64.imag, o64.imag)] if np.iscomplexobj(g64) else [(g64, o64)]
    ):
        flushed = (np.abs(gp) < tiny) & (op == 0)
        assert np.all((op == gp) | flushed), f"{what}: changed below the threshold: {g} -> {o}"


def _bound(case: Case, state: Any) -> float:
    if case.threshold is not None:
        return case.threshold
    return float(reported(state)["threshold"])


def _slack(dtype: Any, size: int) -> float:
    """Absolute rounding of a block's norm where its entries are subnormal in their own
    dtype: half the smallest subnormal per entry (float16 entries scaled to 1e-7 keep one
    significant bit), or the whole subnormal range where the dtype's subnormals are
    subnormal in the float32/float64 arithmetic too (float32, bfloat16, float64, complex),
    which XLA on CPU flushes to zero: the platform, not the clipper (docs/numerics.md)."""
    info = jnp.finfo(dtype)
    flushed = float(info.smallest_normal) <= float(jnp.finfo(jnp.float32).smallest_normal)
    per_entry = float(info.smallest_normal) if flushed else float(info.smallest_subnormal) / 2
    return math.sqrt(size) * per_entry


def _assert_within(g, o, limit, tol, atol, what, exact=True):
    """``||o|| <= limit`` and ``o`` parallel to ``g``, up to the output's rounding; with
    ``exact``, a block above the limit is clipped *to* it (not to zero, not below)."""
    n_out = norm64(o)
    assert n_out <= limit * (1 + tol) + atol, f"{what}: norm {n_out!r} > threshold {limit!r}"
    if exact and norm64(g) > limit:
        assert n_out >= limit * (1 - tol) - atol, (
            f"{what}: norm {norm64(g)!r} clipped to {n_out!r}, below the threshold {limit!r}"
        )
    if n_out > 0:
        c = cosine(o, g)
        assert c >= 1 - tol - 2 * atol / n_out, f"{what}: direction changed: cos {c!r}"


def _units(x: np.ndarray) -> list[np.ndarray]:
    """The units of one leaf (AGC), each flattened."""
    axes = unit_axes(x.shape)
    keep = [a for a in range(x.ndim) if a not in axes]
    moved = np.moveaxis(x, keep, list(range(len(keep))))
    count = math.prod(x.shape[a] for a in keep)  # 1 for a single unit
    return list(moved.reshape(count, math.prod(x.shape[a] for a in axes)))


def _skipped(case: Case, state: Any) -> bool:
    return case.name == "skip_on_spike" and bool(int(state.stats.skipped))


def _assert_all_zero(out: Any, what: str) -> None:
    """A rejected step: zero updates in every leaf, integer ones too, so that
    ``optax.apply_updates`` leaves every parameter as it was."""
    for path, o in jax.tree_util.tree_flatten_with_path(out)[0]:
        assert not np.any(np.asarray(o)), f"{what}{jax.tree_util.keystr(path)}: moved: {o}"


def check_step(
    case: Case,
    grads: Any,
    params: Any,
    before: Any,
    out: Any,
    after: Any,
    init: Any,
    what: str = "",
    init_layout: Layout | None = None,
) -> None:
    """Every invariant of one update: layout, finiteness, bounds, non-finite handling.

    ``init``: the initial state (a host copy where it was donated, its layout then in
    ``init_layout``)."""
    what = f"{case.name}{what}"
    # Layout: the updates keep structure, shapes and dtypes (one example's for dp); the
    # state keeps the layout of the initial state (no retracing, checkpoints fit).
    g_flat, g_def = jax.tree.flatten(grads)
    o_flat, o_def = jax.tree.flatten(out)
    assert o_def == g_def, f"{what}: update structure {o_def} != {g_def}"
    for g, o in zip(g_flat, o_flat):
        shape = g.shape[1:] if case.batched and is_inexact(g) else g.shape
        assert o.dtype == g.dtype and o.shape == shape, (
            f"{what}: {g.dtype}{g.shape} -> {o.dtype}{o.shape}"
        )
    assert_same_layout(after, init if init_layout is None else init_layout, what)

    rejected = _skipped(case, after) or (case.policy == "skip" and not finite_tree(grads))
    if rejected:
        _assert_all_zero(out, what)
        inner_before = before.inner_state
        assert_bitwise_equal(after.inner_state, inner_before, f"{what}: inner state of a skip")
    else:  # non-float leaves (counters, masks) pass through
        for g, o in zip(g_flat, o_flat):
            if not is_inexact(g):
                np.testing.assert_array_equal(o, g, err_msg=f"{what}: non-float leaf changed")

    if not finite_tree(grads):
        _check_nonfinite(case, grads, before, out, after, what)
        return
    assert finite_tree(out), f"{what}: a finite input gave a non-finite update: {out}"
    carried = before if case.name == "skip_on_spike" else None
    assert_state_finite(after, init, what, carried)
    if rejected:
        return
    if case.kind == "dp":
        if case.noiseless:
            _check_dp_mean(case, grads, out, what)
        return
    _assert_contraction(grads, out, what)
    limit = _bound(case, after)
    tol = rounding(grads)
    # (input leaf, output leaf, output in float64) for every float leaf
    pairs = [(g, o, as64(o)) for (_, g), (_, o) in zip(_float_leaves(grads), _float_leaves(out))]
    if case.kind in ("global", "guard"):
        g64 = [as64(g) for g, _, _ in pairs]
        o64 = [o for _, _, o in pairs]
        atol = sum(_slack(o.dtype, o.size) for _, o, _ in pairs)
        _assert_within(g64, o64, limit, tol, atol, what)
        n_in = norm64(g64)
        if n_in <= limit * (1 - 1e-5):
            for g, _, o in pairs:
                _assert_unchanged(g, o, f"{what} (norm {n_in:g} <= {limit:g})")
    elif case.kind == "element":
        for g, o_raw, o in pairs:
            atol = float(jnp.finfo(o_raw.dtype).smallest_subnormal)
            assert np.all(np.abs(o) <= limit * (1 + tol) + atol), f"{what}: |entry| > {limit}: {o}"
            above = np.abs(as64(g)) > limit
            assert np.all(np.abs(o[above]) >= limit * (1 - tol) - atol), (
                f"{what}: entries above {limit} clipped below it: {o[above]}"
            )
            inside = np.abs(as64(g)) <= limit
            _assert_unchanged(as64(g)[inside], o[inside], f"{what}: entries within the bound")
    elif case.kind == "leaf":
        for i, (g, o_raw, o) in enumerate(pairs):
            if not g.size:
                continue
            bound = limit * (math.sqrt(g.size) if case.rms else 1)
            atol = _slack(o_raw.dtype, o.size)
            exact = case.threshold is not None  # adaptive: only the largest bound is known
            _assert_within([as64(g)], [o], bound, tol, atol, f"{what}: leaf {i}", exact)
            if case.threshold is not None and norm64([as64(g)]) <= bound * (1 - 1e-5):
                _assert_unchanged(g, o, f"{what}: leaf {i} below its bound")
    elif case.kind == "unit":
        for i, ((g, o_raw, o), p) in enumerate(zip(pairs, inexact(params))):
            for gu, ou, pu in zip(_units(as64(g)), _units(o), _units(p)):
                bound = limit * max(norm64([pu]), case.hyper["eps"])
                atol = _slack(o_raw.dtype, ou.size)
                _assert_within([gu], [ou], bound, tol, atol, f"{what}: leaf {i}, a unit")
    if case.clipper:
        _check_reported_norms(case, grads, out, after, what)


def _check_dp_mean(case, grads, out, what):
    """dp_aggregate without noise: the mean of the examples each clipped to the bound
    (float64 reference); its norm is then at most the bound too."""
    limit = case.threshold
    o_raw = [x for _, x in _float_leaves(out)]
    o = [as64(x) for x in o_raw]
    atol = sum(_slack(x.dtype, x.size) for x in o_raw)
    _assert_within(o, o, limit, rounding(out), atol, f"{what}: the clipped mean", exact=False)
    examples = [as64(x) for _, x in _float_leaves(grads)]
    for got, raw, total in zip(o, o_raw, clipped_sum(examples, limit)):
        tol = 1e-5 + rounding([raw])
        np.testing.assert_allclose(
            got, total / BATCH, rtol=tol, atol=tol * limit + 2 * _slack(raw.dtype, 1), err_msg=what
        )


def _check_reported_norms(case, grads, out, after, what):
    """The statistics measure what went in and came out (float64 reference)."""
    logs = reported(after)
    g, o = inexact(grads), inexact(out)
    if case.kind == "element":
        want_in = max((float(np.abs(x).max()) for x in g if x.size), default=0.0)
        want_out = max((float(np.abs(x).max()) for x in o if x.size), default=0.0)
    else:
        want_in, want_out = norm64(g), norm64(o)
    if want_in > 1e-18:  # below, squares are subnormal: docs/numerics.md's known limit
        np.testing.assert_allclose(logs["norm"], want_in, rtol=1e-5, err_msg=f"{what}: norm")
        atol = sum(_slack(x.dtype, x.size) for _, x in _float_leaves(out))
        np.testing.assert_allclose(
            logs["clipped_norm"],
            want_out,
            rtol=1e-5 + rounding(out),
            atol=atol,
            err_msg=f"{what}: clipped_norm",
        )


def _check_nonfinite(case, grads, before, out, after, what):
    """A NaN or Inf input: handled as docs/numerics.md and the guards document."""
    bad_in = [nonfinite_mask(x) for _, x in _float_leaves(grads)]
    o_in = inexact(out)
    if case.kind == "dp":
        # A bad example poisons the sum where it is bad, nowhere else.
        for mask, o in zip(bad_in, o_in):
            allowed = mask.any(axis=0)
            assert not (nonfinite_mask(o) & ~allowed).any(), f"{what}: NaN spread: {o}"
        # The clip norm adapts to a noised count, which stays finite.
        assert_state_finite(after.rule_state, before.rule_state, f"{what}: rule state")
        return
    if case.name == "skip_on_spike":
        assert _skipped(case, after), f"{what}: a non-finite step was not skipped"
        assert_bitwise_equal(after.norm_rule, before.norm_rule, f"{what}: spike window")
        return
    if case.policy == "skip":
        return  # zeros and the inner state kept: checked with every rejected step
    if case.policy == "zero":
        assert finite_tree(out), f"{what}: policy='zero' left non-finite values: {out}"
        zeroed = [np.where(np.isfinite(as64(x)), as64(x), 0) for _, x in _float_leaves(grads)]
        _assert_contraction(zeroed, out, what)
        assert norm64(o_in) <= 1 + rounding(grads), f"{what}: the zeroed step was not clipped"
        return
    # Clippers and policy="propagate": bad entries stay where they were, no new ones.
    for mask, o in zip(bad_in, o_in):
        assert not (nonfinite_mask(o) & ~mask).any(), f"{what}: non-finite values spread: {o}"
    _assert_contraction(grads, out, what)
    if case.kind in ("global", "guard"):
        nan_in = any(np.isnan(as64(x)).any() for _, x in _float_leaves(grads))
        for (_, g), o, mask in zip(_float_leaves(grads), o_in, bad_in):
            if nan_in:  # a NaN norm: the scale is 1, the other entries pass unscaled
                _assert_unchanged(as64(g)[~mask], o[~mask], f"{what}: a NaN step")
            else:  # an infinite norm: the scale is 0
                assert not np.any(o[~mask]), f"{what}: an Inf step kept finite entries: {o}"
    if case.clipper:
        assert not np.isnan(reported(after)["threshold"]), f"{what}: NaN threshold"
        if case.stateful_rule:
            assert_bitwise_equal(after.rule_state, before.rule_state, f"{what}: rule absorbed")


# ------------------------------------------------------------------------ running


class Jitted:
    """``jax.jit`` of ``fn`` that counts its traces: a second trace for the same input
    layout means that the state changed its layout (dtype, shape, weak type)."""

    def __init__(self, fn, **jit_kwargs):
        self.traces = 0

        def counted(*args):
            self.traces += 1
            return fn(*args)

        self.fn = jax.jit(counted, **jit_kwargs)
        self.donates = "donate_argnums" in jit_kwargs

    def __call__(self, *args):
        return self.fn(*args)


RAISED = r"the gradient has non-finite values \(NaN or Inf\)"


def step(case: Case, update, grads, params, state, init, what: str, init_layout=None):
    """One checked update: ``(out, new state)``, or ``(None, state)`` where
    policy="raise" raised as it must (the step is then not applied). A donating
    ``update`` consumes ``state``: the checks read a host copy."""
    if case.policy == "raise" and not finite_tree(grads):
        with pytest.raises(Exception, match=RAISED):
            jax.block_until_ready(update(grads, state, params))
        return None, state
    before = jax.device_get(state) if getattr(update, "donates", False) else state
    out, after = update(grads, state, params)
    check_step(case, grads, params, before, out, after, init, what, init_layout)
    return out, after


def run(case: Case, tx, update, grads_seq, params):
    """The gradients one after the other from a fresh state, each step checked; the
    outputs and the states after each step. Asserts that only the first step traced."""
    init = tx.init(params)
    init_layout = layout(init)
    state, outs, states = init, [], []
    if getattr(update, "donates", False):
        init = jax.device_get(init)  # the first step consumes the fresh state
    traces = None
    for i, grads in enumerate(grads_seq):
        out, state = step(case, update, grads, params, state, init, f"[step {i}]", init_layout)
        outs.append(out)
        states.append(state)
        traces = getattr(update, "traces", None) if traces is None else traces
    if isinstance(update, Jitted):
        assert update.traces == traces, f"{case.name}: retraced across steps"
    return init, outs, states


def sequence(case: Case, spec_name: str, kinds, seed: int = 0):
    """Gradients of each kind (clean ones only for policy="raise") and parameters."""
    if case.policy == "raise":
        kinds = [k for k in kinds if k in FINITE_KINDS]
    spec = spec_for(case, SPECS[spec_name])
    grads_seq = [fill(spec, kind, seed=seed + i) for i, kind in enumerate(kinds)]
    return grads_seq, params_like(grads_seq[0], case)


def drawn_tree(draw, spec: Any) -> Any:
    """A tree of ``spec`` whose float leaves each get a drawn magnitude, from the
    dtype's subnormals to a hundredth of its maximum (1e35 at most: norms stay below
    2**126, see the near-max defect), and maybe a drawn NaN, Inf or -0.0 entry."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def leaf(shape, dtype):
        if not jnp.issubdtype(dtype, jnp.inexact):
            return jnp.asarray(rng.integers(0, 2, size=shape), dtype)
        info = jnp.finfo(dtype)
        low = math.floor(math.log10(float(info.smallest_subnormal)))
        high = min(35, math.floor(math.log10(float(info.max))) - 2)
        scale = 10.0 ** draw(st.integers(low, high))
        values = rng.normal(size=shape) * scale
        if jnp.issubdtype(dtype, jnp.complexfloating):
            values = values + 1j * rng.normal(size=shape) * scale
        special = draw(st.sampled_from([None, None, None, np.nan, np.inf, -np.inf, -0.0]))
        if special is not None and values.size:
            values.reshape(-1)[draw(st.integers(0, values.size - 1))] = special
        with np.errstate(all="ignore"):  # float8_e4m3fn turns inf into NaN
            return jnp.asarray(values.astype(dtype))

    def build(s):
        if isinstance(s, dict):
            return {k: build(v) for k, v in s.items()}
        if isinstance(s, list):
            return [build(v) for v in s]
        return None if s is None else leaf(*s)

    return build(spec)
