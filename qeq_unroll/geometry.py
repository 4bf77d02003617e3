"""Pair geometry: distances (Å) of the pairs a kernel couples, in three layouts.

- free space, all pairs: ``r`` (N, N);
- periodic, dense all-images (small cells): ``r`` (S, N, N), one slab per lattice translation n_s,
  r[s, i, j] = |x_j + n_s A − x_i|; an atom's own images (i = j, n_s ≠ 0) are pairs too;
- periodic or not, neighbour list: ``r`` (N, M), the distance from atom i to its m-th neighbour
  ``neighbors[i, m]`` (an atom index; its image is found by the minimum-image rule of the list's
  replicated cell, see ``neighbors``).

Distances are made safe for differentiation: masked entries (no pair, padding, beyond the cutoff)
get a distance of 1 Å in place of their value, so no 0/0 ever reaches a kernel or its gradient.
Lattice translations are integer rows times the current cell, so the distances are functions of
positions *and* cell, which is what the strain derivative (stress) differentiates.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .errors import QEqInputError
from .periodic import frame, wrap


class Pairs(NamedTuple):
    """r: distances in Å (safe: 1 where masked); mask: True for the pairs that count; neighbors:
    (N, M) partner atom indices for the neighbour-list layout, None for the dense layouts."""

    r: jax.Array
    mask: jax.Array
    neighbors: jax.Array | None = None

    def species(self, species):
        """(s_i, s_j) broadcastable against ``r``."""
        if self.neighbors is None:
            return species[:, None], species[None, :]
        return species[:, None], species[self.neighbors]

    def row_sum(self, values):
        """Σ_j values_ij over the pairs of each atom i (masked entries must already be zero): (N,)."""
        if self.neighbors is None:
            return jnp.sum(values.reshape((-1,) + values.shape[-2:]), axis=(0, 2))
        return jnp.sum(values, axis=1)


def dense_pairs(system):
    """``(r, pair_mask)``: (N, N) free-space distances in Å and a mask of the real pairs i != j."""
    pos = system.positions
    mask = system.mask
    n = pos.shape[0]
    pair_mask = mask[:, None] & mask[None, :] & ~jnp.eye(n, dtype=bool)
    d = pos[:, None, :] - pos[None, :, :]
    r2 = jnp.sum(d * d, axis=-1)
    r = jnp.sqrt(jnp.where(pair_mask, r2, 1.0))
    return r, pair_mask


def _safe(d, mask):
    r2 = jnp.sum(d * d, axis=-1)
    return jnp.sqrt(jnp.where(mask, r2, 1.0))


def image_pairs(system, shifts, cutoff):
    """Dense all-images layout: (S, N, N) distances for the lattice translations ``shifts``
    (S, 3) (integers, (0, 0, 0) first), masked to real pairs within ``cutoff`` Å."""
    cell = system.cell
    x = wrap(system.positions, cell, system.pbc)
    t = shifts.astype(x.dtype) @ cell  # (S, 3)
    d = x[None, None, :, :] - x[None, :, None, :] + t[:, None, None, :]
    n = x.shape[0]
    real = system.mask[:, None] & system.mask[None, :]
    not_self = ~(jnp.eye(n, dtype=bool)[None] & (jnp.arange(shifts.shape[0]) == 0)[:, None, None])
    mask = real[None] & not_self
    r2 = jnp.sum(d * d, axis=-1)
    mask = mask & (r2 < cutoff * cutoff)
    return Pairs(_safe(d, mask), mask, None)


def list_pairs(system, nbrs, cutoff=None):
    """Neighbour-list layout: (N, M) distances from ``nbrs`` (a ``neighbors.NeighborList``),
    masked to real pairs within ``cutoff`` Å (None: the list's cutoff; never more than it)."""
    cutoff = nbrs.cutoff if cutoff is None else cutoff
    if cutoff > nbrs.cutoff:
        raise QEqInputError(f"neighbour list cutoff {nbrs.cutoff} Å is shorter than the {cutoff} Å needed")
    x = system.positions
    n = x.shape[0]
    if nbrs.n_atoms != n:
        raise QEqInputError(f"neighbour list was built for {nbrs.n_atoms} atoms, the system has {n}")
    idx = nbrs.idx
    valid = idx < nbrs.sentinel
    j = jnp.where(valid, idx % n, 0)
    if system.periodic:
        cell = system.cell
        reps = jnp.asarray(nbrs.replicate, x.dtype)
        offsets = nbrs.replicas.astype(x.dtype) @ cell  # (R, 3)
        d0 = x[j] - x[:, None, :] + offsets[jnp.where(valid, idx // n, 0)]
        supercell = reps[:, None] * cell
        inv = jnp.linalg.inv(jax.lax.stop_gradient(frame(supercell, system.pbc)))
        image = jnp.round(jax.lax.stop_gradient(d0) @ inv) * jnp.asarray(system.pbc, x.dtype)
        d = d0 - jax.lax.stop_gradient(image) @ supercell
    else:
        d = x[j] - x[:, None, :]
    mask = valid & system.mask[:, None] & system.mask[j]
    r2 = jnp.sum(d * d, axis=-1)
    mask = mask & (r2 < cutoff * cutoff)
    return Pairs(_safe(d, mask), mask, j)


def min_distance(r, pair_mask):
    """Shortest real pair distance in Å (inf with fewer than two atoms)."""
    return jnp.min(jnp.where(pair_mask, r, jnp.inf))
