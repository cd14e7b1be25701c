"""Strict JAX settings for every test: sloppy broadcasting fails loudly."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests compile JAX functions: keep example counts small and drop deadlines.
settings.register_profile(
    "gradclip",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("gradclip")


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


# The test files that take longest (on one of CI's two CPUs: invariants 550 s, their
# scale tests 250-300 s, the 8-device and golden subprocesses 120-200 s, multihost
# 100 s, docs, demo and per_example 80-100 s), longest first; the rest follow in their
# collection order.
# pytest-xdist (--dist loadfile --no-loadscope-reorder, pyproject.toml) hands out files
# in collection order, so the long ones start first and the short ones fill in around
# them. Its default order, by number of tests, left the one-test golden and 8-device
# files to the end, with one process idle for minutes.
LONGEST_FIRST = (
    "test_invariants.py",
    "test_invariants_scale.py",
    "test_explicit_sharding.py",
    "test_golden.py",
    "test_multihost.py",
    "test_docs.py",
    "test_demo.py",
    "test_per_example.py",
    "test_sharding.py",
    "test_benchmarks.py",
)
_missing = [name for name in LONGEST_FIRST if not (Path(__file__).parent / name).is_file()]
assert not _missing, f"conftest.LONGEST_FIRST names files that do not exist: {_missing}"


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
