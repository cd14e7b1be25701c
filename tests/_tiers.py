"""The fast tier runs a representative part of a parametrized test; CI runs it all."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def tiered(values: Iterable[Any], fast: Iterable[Any]) -> list:
    """``values`` as parameters, those not in ``fast`` marked slow (``pytest -m slow``).

    A value of ``fast`` that is not among ``values`` is an error: a misspelt name would
    otherwise move every case of the test to the slow tier without a word.
    """
    values, fast = list(values), list(fast)
    unknown = [f for f in fast if f not in values]
    if unknown:
        raise ValueError(f"tiered: {unknown} are not among the parameters {values}")
    return [pytest.param(v, marks=() if v in fast else pytest.mark.slow) for v in values]
