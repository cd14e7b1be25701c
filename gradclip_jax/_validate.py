"""Hyperparameter checks, in one place: every factory validates through these.

Each check raises a ``ValueError`` that names the function, the argument, the value and
what is allowed. Traced values (``optax.inject_hyperparams`` inside ``jit``) are not
checked: they were checked when the transformation was first built with concrete ones.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ORDS = (1, 2, math.inf)
# Integers that shape or count state are int32 in the state.
_INT32_MAX = int(np.iinfo(np.int32).max)


def is_tracer(value: Any) -> bool:
    """True when ``value`` is an abstract value inside a JAX transformation."""
    return isinstance(value, jax.core.Tracer)


def concrete(fn: str, arg: str, value: Any) -> np.ndarray | None:
    """``value`` as a real NumPy array, or ``None`` when it is traced."""
    if is_tracer(value):
        return None
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        array = None
    # jnp.issubdtype knows bfloat16 and the other ml_dtypes, which NumPy does not count
    # as numbers: optax.inject_hyperparams hands bfloat16 values to a bfloat16 model.
    if array is None or array.dtype == bool or not jnp.issubdtype(array.dtype, jnp.number):
        raise ValueError(f"{fn}: `{arg}` must be a real number; got {value!r}.")
    if jnp.issubdtype(array.dtype, jnp.complexfloating):
        raise ValueError(
            f"{fn}: `{arg}` must be real; got the complex value {value!r}. "
            "optax.inject_hyperparams casts hyperparameters to the parameters' dtype: with "
            "complex parameters, pass hyperparam_dtype=jnp.float32 to it."
        )
    return array


def check_scalar(fn: str, arg: str, value: Any) -> None:
    """A hyperparameter is one number: an array of several would clip element-wise."""
    shape = jnp.shape(value) if hasattr(value, "shape") else np.shape(value)
    if shape != ():
        raise ValueError(
            f"{fn}: `{arg}` must be a scalar; got an array of shape {shape}. One value "
            "applies to the whole block being clipped."
        )


def check_range(
    fn: str,
    arg: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    hint: str = "",
) -> None:
    """A scalar in ``[low, high]`` (or the open variants), never NaN."""
    array = concrete(fn, arg, value)
    check_scalar(fn, arg, value)
    if array is None:
        return
    too_low = array < low if low_inclusive else array <= low
    too_high = array > high if high_inclusive else array >= high
    if np.isnan(array) or too_low or too_high:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        raise ValueError(f"{fn}: `{arg}` must lie in {lo}{low}, {high}{hi}; got {value!r}.{hint}")


def check_threshold(fn: str, arg: str, value: Any) -> None:
    """A clipping threshold: a scalar ``>= 0``, not NaN; ``inf`` means never clip."""
    check_range(
        fn,
        arg,
        value,
        hint=" Use math.inf to never clip; a negative threshold would flip the update's sign.",
    )


def check_positive_finite(fn: str, arg: str, value: Any) -> None:
    """A scale or rate that must be a finite number ``> 0``."""
    check_range(fn, arg, value, low_inclusive=False, high_inclusive=False)


def check_count(fn: str, arg: str, value: Any, minimum: int = 0) -> None:
    """An integer that counts steps or sizes a buffer (stored as int32)."""
    array = concrete(fn, arg, value)
    if array is None:
        return
    ok = array.ndim == 0 and float(array).is_integer() and minimum <= array <= _INT32_MAX
    if not ok:
        raise ValueError(
            f"{fn}: `{arg}` must be an integer in [{minimum}, {_INT32_MAX}]; got {value!r}."
        )


def check_choice(fn: str, arg: str, value: Any, choices: tuple[Any, ...]) -> None:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{fn}: `{arg}` must be one of {choices}; got {value!r}.")


def check_ord(fn: str, ord: Any) -> float:
    """The norm order, a structural choice: 1, 2 or ``math.inf``, never traced.

    ``None`` means 2: a default that ``optax.inject_hyperparams`` leaves alone (it
    injects every numeric argument, defaults included). Returns ``1``, ``2`` or
    ``math.inf``.
    """
    if ord is None:
        return 2
    if is_tracer(ord):
        raise ValueError(
            f"{fn}: `ord` chooses which norm is computed, so it cannot be a traced value. "
            "Under optax.inject_hyperparams, name it in static_args=('ord',)."
        )
    try:
        ok = not isinstance(ord, bool) and float(ord) in ORDS
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `ord` must be 1, 2 or math.inf (jnp.inf); got {ord!r}. "
            "Other orders have no cheap overflow-safe form and are not supported."
        )
    return math.inf if float(ord) == math.inf else int(ord)


def state_size(fn: str, arg: str, value: Any) -> int:
    """A hyperparameter that shapes the state, as a Python int (it must be concrete)."""
    if is_tracer(value):
        raise ValueError(
            f"{fn}: `{arg}` sets the size of the state, so it must be a concrete integer "
            "when the state is created; got a traced value. Under "
            "`optax.inject_hyperparams`, create the state outside `jax.jit`, or name it in "
            f"`static_args=('{arg}',)`."
        )
    return int(value)
