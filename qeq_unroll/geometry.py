"""Pair geometry: distances (Å) of the pairs a kernel couples, in three layouts.

- free space, all pairs: ``r`` (N, N);
- periodic, dense all-images (small cells): ``r`` (S, N, N), one slab per lattice translation n_s,
  r[s, i, j] = |x_j + n_s A − x_i|; an atom's own images (i = j, n_s ≠ 0) are pairs too;
- periodic or not, neighbour list: ``r`` (M, N), slot-major: the distance from atom i to the
  neighbour in its slot m, ``neighbors[m, i]`` (an atom index; its image is found by the
  minimum-image rule of the list's replicated cell, see ``neighbors``).

Distances are made safe for differentiation: masked entries (no pair, padding, beyond the cutoff)
get a distance of 1 Å in place of their value, so no 0/0 ever reaches a kernel or its gradient.
Lattice translations are integer rows times the current cell, so the distances are functions of
positions *and* cell, which is what the strain derivative (stress) differentiates.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from .errors import QEqInputError
from .periodic import wrap


class Pairs(NamedTuple):
    """r: distances in Å (safe: 1 where masked); mask: True for the pairs that count; neighbors:
    (M, N) partner atom indices for the neighbour-list layout, None for the dense layouts;
    self_images (static): whether a list can hold an atom's own images (``neighbors[m, i] == i``);
    occupied: for a list, the number of leading slots that hold every counted pair (a traced int,
    see ``slot_sum``'s ``stop``); vectors: the pair vectors x_j − x_i (+ the lattice translation)
    in Å, laid out like ``r`` with a trailing axis of 3 (computed only where a consumer reads them:
    environment descriptors); cutoff (static): the distance within which every pair is present
    (Å; None: all pairs, free space)."""

    r: jax.Array
    mask: jax.Array
    neighbors: jax.Array | None = None
    self_images: bool = False
    occupied: jax.Array | None = None
    vectors: jax.Array | None = None
    cutoff: float | None = None

    def species(self, species):
        """(s_i, s_j) broadcastable against ``r``."""
        if self.neighbors is None:
            return species[:, None], species[None, :]
        return species[None, :], species[self.neighbors]


_REDUCTIONS = {jnp.add: jnp.sum, jnp.minimum: jnp.min}

SLOTS_PER_STEP = 4
"""Slots that one step of ``slot_sum``'s loop combines: XLA fuses them into one pass, so the
accumulator is read and written once per four slots (at 10⁵ atoms it no longer fits in the CPU's
L2 cache, and this makes one list product 1.4× faster there)."""


def slot_sum(term, slots, combine=jnp.add, loop=None, stop=None):
    """Σ_m term(m) for m < ``slots`` (≥ 1), or ``combine = jnp.minimum``: a reduction over the
    slots of a slot-major list, ``term(m)`` a pytree of arrays computed from row m. With ``loop``
    (the default on CPU) it runs as a loop of vector updates, ``SLOTS_PER_STEP`` slots a step,
    which XLA fuses into one pass over the list per step (a reduction over the slot axis of a
    materialised (M, N) array is many times slower on CPU); without (the default on accelerators,
    where each loop step would be a kernel launch), as one reduction over all slots.

    ``stop`` (a traced int ≤ ``slots``, optional): the loop ends there, for terms that are the
    identity of ``combine`` from that slot on (``Pairs.occupied``): a pass over the occupied part of
    the list only. A loop with a traced length cannot be reverse-differentiated, so this is for
    passes inside custom derivatives; the one-reduction form ignores it."""
    if loop is None:
        loop = jax.default_backend() == "cpu"
    if not loop:
        reduce = _REDUCTIONS[combine]
        return jax.tree_util.tree_map(lambda a: reduce(a, axis=0), jax.vmap(term)(jnp.arange(slots)))
    add = lambda acc, m: jax.tree_util.tree_map(combine, acc, term(m))  # noqa: E731
    if stop is None:  # a static length: a scan, which reverse-mode differentiation accepts
        return jax.lax.fori_loop(1, slots, lambda m, acc: add(acc, m), term(0), unroll=SLOTS_PER_STEP)

    def step(b, acc):
        for u in range(SLOTS_PER_STEP):
            acc = add(acc, 1 + b * SLOTS_PER_STEP + u)
        return acc

    steps = (stop - 1) // SLOTS_PER_STEP
    acc = jax.lax.fori_loop(0, steps, step, term(0))
    return jax.lax.fori_loop(1 + steps * SLOTS_PER_STEP, stop, lambda m, acc: add(acc, m), acc)


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


def free_pairs(system) -> Pairs:
    """Free-space ``Pairs``: all pairs of real atoms, with their vectors x_j − x_i."""
    r, mask = dense_pairs(system)
    pos = system.positions
    return Pairs(r, mask, None, vectors=pos[None, :, :] - pos[:, None, :])


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
    return Pairs(_safe(d, mask), mask, None, vectors=d, cutoff=float(cutoff))


def list_pairs(system, nbrs, cutoff=None):
    """Neighbour-list layout: (M, N) distances from ``nbrs`` (a ``neighbors.NeighborList``),
    masked to real pairs within ``cutoff`` Å (None: the list's cutoff; never more than it).

    Pair vectors are x_j − x_i + n A with the slot's stored lattice translation n. Coordinates
    are gathered one Cartesian component at a time (much faster on CPU than gathering rows). The
    derivative is a custom VJP for the symmetric list (each pair stored from both atoms) under a
    symmetric use of the distances (the two slots of a pair get equal cotangents, as every
    consumer in this package ensures: pair sums, and the hardness operator's own VJP): atom i's
    cotangent is then −2 Σ_m ḡ_mi r̂_mi, a sum over its own slots instead of a scatter onto partners."""
    cutoff = nbrs.cutoff if cutoff is None else cutoff
    if cutoff > nbrs.cutoff:
        raise QEqInputError(f"neighbour list cutoff {nbrs.cutoff} Å is shorter than the {cutoff} Å needed")
    x = system.positions
    n = x.shape[0]
    if nbrs.n_atoms != n:
        raise QEqInputError(f"neighbour list was built for {nbrs.n_atoms} atoms, the system has {n}")
    valid = nbrs.partner < n
    j = jnp.where(valid, nbrs.partner, 0)
    valid = valid & system.mask[None, :] & system.mask[j]
    cell = system.cell if system.periodic else jnp.zeros((3, 3), x.dtype)
    r, mask = _list_distances(x, cell, j, nbrs.shifts, valid, float(cutoff))
    vectors = jnp.stack(_pair_components(x, cell, j, nbrs.shifts), axis=-1)
    return Pairs(r, mask, j, nbrs.self_images, occupied_slots(mask), vectors, float(cutoff))


def occupied_slots(mask):
    """1 + the last slot of a slot-major (M, N) ``mask`` that holds a pair (at least 1): the
    neighbour list orders each atom's slots by distance (``neighbors``), so the pairs within a
    cutoff shorter than the list's occupy a leading block of slots."""
    used = jnp.any(mask, axis=1)
    last = used.shape[0] - jnp.argmax(used[::-1])
    return jnp.where(jnp.any(used), last, 1).astype(jnp.int32)


def _pair_components(x, cell, j, shifts):
    """The three Cartesian components of the pair vectors x_j − x_i + n A (Å) for partner indices
    ``j`` (..., N) and integer shifts ``shifts`` (..., 3, N) of a slot-major list."""
    n = [shifts[..., a, :].astype(x.dtype) for a in range(3)]
    return [x[:, k][j] - x[:, k] + n[0] * cell[0, k] + n[1] * cell[1, k] + n[2] * cell[2, k] for k in range(3)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _list_distances(x, cell, j, shifts, valid, cutoff):
    """(r, mask): safe distances (1 where masked) and the mask of slots within ``cutoff``."""
    d = _pair_components(x, cell, j, shifts)
    r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    mask = valid & (r2 < cutoff * cutoff)
    return jnp.sqrt(jnp.where(mask, r2, 1.0)), mask


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wanted:
    """Which of positions and cell are differentiated (static, for the backward pass)."""

    positions: bool
    cell: bool


def _list_distances_fwd(x, cell, j, shifts, valid, cutoff):
    wanted = _Wanted(x.perturbed, cell.perturbed)
    x, cell, j, shifts, valid = (a.value for a in (x, cell, j, shifts, valid))
    r, mask = _list_distances(x, cell, j, shifts, valid, cutoff)
    return (r, mask), (x, cell, j, shifts, r, mask, wanted)


def _list_distances_bwd(cutoff, res, cotangents):
    x, cell, j, shifts, r, mask, wanted = res
    g = cotangents[0]
    if isinstance(g, SymbolicZero):
        return None, None, None, None, None
    stop = occupied_slots(mask)

    def slot(m):  # the pair vectors are recomputed per slot: cheaper than storing three (M, N) arrays
        d = _pair_components(x, cell, j[m], shifts[m])
        w = jnp.where(mask[m], g[m], 0.0) / r[m]  # ḡ / r, so that ḡ r̂ = w d
        n = shifts[m].astype(w.dtype)
        forces = tuple(w * dk for dk in d) if wanted.positions else None
        virial = tuple(tuple(w * dk * n[a] for dk in d) for a in range(3)) if wanted.cell else None
        return forces, virial

    wd, wdn = slot_sum(slot, j.shape[0], stop=stop)
    # slot (m, i) moves r_mi by −r̂ per unit of x_i; its mirror (j → i) by the same amount
    xbar = -2.0 * jnp.stack(wd, axis=1) if wanted.positions else None
    cellbar = jnp.stack([jnp.stack([jnp.sum(v) for v in row]) for row in wdn]) if wanted.cell else None
    return xbar, cellbar, None, None, None


# symbolic zeros: the strain terms are summed only when the cell is differentiated (stress)
_list_distances.defvjp(_list_distances_fwd, _list_distances_bwd, symbolic_zeros=True)


def min_distance(pairs):
    """Shortest real pair distance of a ``Pairs`` in Å (inf with fewer than two atoms)."""
    nearest = lambda m: jnp.where(pairs.mask[m], pairs.r[m], jnp.inf)  # noqa: E731
    if pairs.neighbors is None:
        return jnp.min(nearest(Ellipsis))
    return jnp.min(slot_sum(nearest, pairs.r.shape[0], jnp.minimum))
