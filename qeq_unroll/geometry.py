"""Pair geometry of a free-space system: all-pairs distances with masks (Å).

Distances are made safe for differentiation: masked pairs (the diagonal, padding) get a
distance of 1 Å in place of 0, so no 0/0 ever reaches a kernel or its gradient.
"""

from __future__ import annotations

import jax.numpy as jnp


def dense_pairs(system):
    """``(r, pair_mask)``: (N, N) distances in Å and a mask of the real pairs i != j."""
    pos = system.positions
    mask = system.mask
    n = pos.shape[0]
    pair_mask = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
    d = pos[:, None, :] - pos[None, :, :]
    r2 = jnp.sum(d * d, axis=-1)
    r = jnp.sqrt(jnp.where(pair_mask, r2, 1.0))
    return r, pair_mask


def min_distance(r, pair_mask):
    """Shortest real pair distance in Å (inf with fewer than two atoms)."""
    return jnp.min(jnp.where(pair_mask, r, jnp.inf))
