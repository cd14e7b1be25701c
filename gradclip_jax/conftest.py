"""Doctests run with the same strict settings as the tests."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

# Doctests that take seconds (they train or compile many leaves) join the slow tier:
# `pytest -m "not slow"` skips them, a plain `pytest` (CI) runs them.
SLOW_DOCTESTS = {
    "gradclip_jax._per_example.dp_aggregate",
    "gradclip_jax.demo.train.train_step",
    "gradclip_jax.demo.sweep.sweep",
    "gradclip_jax._adaptive.autoclip",
    "gradclip_jax._adaptive.adagc",
    "gradclip_jax.demo.tasks.sample_temporal_order",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.name in SLOW_DOCTESTS:
            item.add_marker("slow")
