"""Doctests run with the same strict settings as the tests."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
