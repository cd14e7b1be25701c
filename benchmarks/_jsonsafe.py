"""Strict JSON: non-finite floats become ``null``."""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> Any:
    """A copy of ``value`` in which NaN and infinite floats are ``None`` and tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
