"""Shared test setup: float64 everywhere (the library itself never flips this switch)."""

import jax

jax.config.update("jax_enable_x64", True)
