"""Geometry optimisation on the device: FIRE (jax-md's ``minimize.fire_descent``) jitted in blocks,
with the neighbour list updated before every step, one structure at a time or a batch of
free-space structures of one padded size together (``vmap``), each stopping at its own
convergence.

Units: energies eV, forces eV/Å, positions Å. FIRE runs with unit masses (a minimiser, not
dynamics): ``dt_start`` and ``dt_max`` are its step sizes in those units (jax-md's defaults).
A periodic structure's cell stays fixed unless ``fire(..., cell=True)`` relaxes it too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import md
from .energy import energy_and_forces
from .errors import QEqInputError
from .neighbors import stackable
from .periodic import deform


class Relaxed(NamedTuple):
    """One relaxed structure: positions (N, 3) Å of the real atoms, energy eV, forces (N, 3) eV/Å,
    charges (N,) e, the convergence measure ``fmax`` (the largest force norm, eV/Å, and with the
    cell relaxed the largest component of V σ / N, eV), the FIRE ``steps`` taken, ``converged``
    (fmax below the target within the step budget) and the relaxed ``cell`` (3, 3) Å or None."""

    positions: np.ndarray
    energy: float
    forces: np.ndarray
    charges: np.ndarray
    fmax: float
    steps: int
    converged: bool
    cell: np.ndarray | None = None


def _physical(x, system):
    """The system at FIRE coordinates ``x``: positions (N, 3) Å with the cell fixed, or
    ``{"positions": R, "strain": u}`` with the cell relaxed: positions and cell deformed by the
    strain ε = u / N (N real atoms), x → x (1 + ε), so that −∂E/∂u = −V σ / N (eV) weighs like an
    atom's force (as ASE's cell filters scale the cell's degrees of freedom)."""
    if not isinstance(x, dict):
        return dataclasses.replace(system, positions=x)
    n = jnp.sum(system.mask)
    positions, cell = deform(x["positions"], system.cell, x["strain"] / n)
    return dataclasses.replace(system, positions=positions, cell=cell)


def _fmax(force, mask):
    """The largest force norm over the real atoms (eV/Å)."""
    return jnp.max(jnp.where(mask, jnp.linalg.norm(force, axis=-1), 0.0))


def _largest_force(force, system):
    """The largest force norm over the real atoms (eV/Å) and, with the cell relaxed, the largest
    component of −V σ / N (eV): the convergence measure."""
    if not isinstance(force, dict):
        return _fmax(force, system.mask)
    return jnp.maximum(_fmax(force["positions"], system.mask), jnp.max(jnp.abs(force["strain"])))


@functools.lru_cache(maxsize=None)
def _fire(energy, dt_start, dt_max):
    """``(init_fn, apply_fn)`` of FIRE on ``fn(x, params=, system=, neighbor=)`` (one per model
    and step sizes, so that the jitted functions below are built and compiled once)."""
    from jax_md import minimize, space  # noqa: PLC0415 - heavy import

    def fn(x, params=None, system=None, neighbor=None, **ignored):
        return energy(params, _physical(x, system), neighbor, None)[0]

    return minimize.fire_descent(fn, space.free()[1], dt_start=dt_start, dt_max=dt_max)


@functools.lru_cache(maxsize=None)
def _single(energy, dt_start, dt_max):
    """Jitted ``(init, block)`` of one structure; ``block`` takes up to ``limit`` FIRE steps and
    stops early at convergence (largest force ≤ ``fmax``) or a neighbour-list overflow."""
    init_fn, apply_fn = _fire(energy, dt_start, dt_max)

    def cond(carry):
        state, nbrs, params, system, fmax, i, limit = carry
        return (i < limit) & (_largest_force(state.force, system) > fmax) & ~nbrs.did_buffer_overflow

    def body(carry):
        state, nbrs, params, system, fmax, i, limit = carry
        nbrs = energy.update_neighbors(nbrs, _physical(state.position, system))
        return apply_fn(state, params=params, system=system, neighbor=nbrs), nbrs, params, system, fmax, i + 1, limit

    def block(state, nbrs, params, system, fmax, limit):
        state, nbrs, *_, taken, _ = lax.while_loop(cond, body, (state, nbrs, params, system, fmax, 0, limit))
        return state, nbrs, taken

    def init(x, params, system, nbrs):  # unit masses, one per leaf of the coordinates
        mass = jax.tree_util.tree_map(lambda leaf: jnp.ones((), leaf.dtype), x)
        return init_fn(x, mass=mass, params=params, system=system, neighbor=nbrs)

    return jax.jit(init), jax.jit(block)


@functools.lru_cache(maxsize=None)
def _batch(energy, dt_start, dt_max):
    """Jitted ``(init, block)`` of a batch of free-space structures: a converged structure is held
    where it is while the others go on; ``steps`` (B,) counts each one's steps."""
    init_fn, apply_fn = _fire(energy, dt_start, dt_max)

    def done(states, systems, fmax):
        return jax.vmap(_fmax)(states.force, systems.mask) <= fmax

    def cond(carry):
        states, params, systems, nbrs, fmax, i, limit, _ = carry
        return (i < limit) & ~jnp.all(done(states, systems, fmax))

    def body(carry):
        states, params, systems, nbrs, fmax, i, limit, steps = carry
        new = jax.vmap(lambda s, sys: apply_fn(s, params=params, system=sys, neighbor=nbrs))(states, systems)
        finished = done(states, systems, fmax)
        keep = lambda a, b: jnp.where(finished.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        states = jax.tree_util.tree_map(keep, states, new)
        return states, params, systems, nbrs, fmax, i + 1, limit, steps + (~finished).astype(jnp.int32)

    def block(states, params, systems, nbrs, fmax, limit, steps):
        out = lax.while_loop(cond, body, (states, params, systems, nbrs, fmax, 0, limit, steps))
        return out[0], out[-1]

    def init(params, systems, nbrs):
        return jax.vmap(lambda s: init_fn(s.positions, params=params, system=s, neighbor=nbrs))(systems)

    return jax.jit(init), jax.jit(block)


@functools.lru_cache(maxsize=None)
def _evaluate(energy):
    """Jitted ``(E, forces, aux)`` of a system (forces −∂E/∂R, eV/Å)."""
    return jax.jit(energy_and_forces(lambda params, system, nbrs: energy(params, system, nbrs, None)))


def _result(energy, params, state, system, nbrs, steps, fmax) -> Relaxed:
    relaxed = _physical(state.position, system)
    e, forces, aux = _evaluate(energy)(params, relaxed, nbrs)
    n = int(np.sum(np.asarray(system.mask)))
    f = float(_largest_force(state.force, system))
    cell = None if relaxed.cell is None else np.asarray(relaxed.cell)
    return Relaxed(np.asarray(relaxed.positions)[:n], float(e), np.asarray(forces)[:n], np.asarray(aux["charges"])[:n], f,
                   int(steps), f <= fmax, cell)  # fmt: skip


def fire(energy, params, system, fmax=0.05, steps=1000, skin=1.0, layout="auto", block=100, dt_start=0.1,
         dt_max=0.4, capacity_multiplier=1.25, cell=False) -> Relaxed:  # fmt: skip
    """Relax one structure (free or periodic) with FIRE until the largest force is below ``fmax``
    (eV/Å) or ``steps`` steps were taken. ``cell``: relax the cell of a periodic structure too
    (positions and a homogeneous strain, the stress as its force; see ``_physical``). The
    neighbour list (``skin`` Å) is updated before every step and reallocated on the host when it
    overflows (the block is redone); with ``cell``, the images and Ewald k-vectors are planned
    again for the current cell after every block (padded to keep their shapes)."""
    if cell and system.cell is None:
        raise QEqInputError("cell relaxation needs a periodic structure")
    init, block_fn = _single(energy, float(dt_start), float(dt_max))
    nfn = md.neighbor_fn(energy, params, system, skin, layout)
    nbrs = nfn.allocate(system.positions, capacity_multiplier)
    x = {"positions": system.positions, "strain": jnp.zeros((3, 3), system.positions.dtype)} if cell else system.positions
    state = init(x, params, system, nbrs)
    done = 0
    while done < steps and float(_largest_force(state.force, system)) > fmax:
        new, new_nbrs, taken = block_fn(state, nbrs, params, system, fmax, min(block, steps - done))
        if bool(new_nbrs.did_buffer_overflow):
            capacity_multiplier *= md.GROWTH
            nbrs = md.neighbor_fn(energy, params, _physical(state.position, system), skin, layout).allocate(
                _physical(state.position, system).positions, capacity_multiplier)
            continue
        state, nbrs, done = new, new_nbrs, done + int(taken)
        if cell:  # plan the images and k-vectors for the current cell
            current = _physical(state.position, system)
            nbrs = stackable(md.neighbor_fn(energy, params, current, skin, layout).allocate(current.positions, capacity_multiplier),
                             like=nbrs, headroom=1.5)  # fmt: skip
    return _result(energy, params, state, system, nbrs, done, fmax)


def fire_batch(energy, params, systems: Sequence, fmax=0.05, steps=1000, block=100, dt_start=0.1,
               dt_max=0.4) -> list[Relaxed]:  # fmt: skip
    """Relax free-space structures padded to one size together (``vmap``), each until its own
    largest force is below ``fmax`` (eV/Å) or ``steps`` steps. Equal to :func:`fire` on each."""
    sizes = {s.positions.shape[0] for s in systems}
    if len(sizes) != 1 or any(s.cell is not None for s in systems):
        raise QEqInputError("fire_batch takes free-space systems padded to one size (see qeq_unroll.size_bucket)")
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *systems)
    init, block_fn = _batch(energy, float(dt_start), float(dt_max))
    nbrs = md.neighbor_fn(energy, params, systems[0]).allocate(systems[0].positions)
    states = init(params, stacked, nbrs)
    taken = jnp.zeros(len(systems), jnp.int32)
    for start in range(0, steps, block):
        states, taken = block_fn(states, params, stacked, nbrs, fmax, min(block, steps - start), taken)
        if bool(jnp.all(jax.vmap(_fmax)(states.force, stacked.mask) <= fmax)):
            break
    pick = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)  # noqa: E731
    return [_result(energy, params, pick(states, i), s, nbrs, taken[i], fmax) for i, s in enumerate(systems)]
