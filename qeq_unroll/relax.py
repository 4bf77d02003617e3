"""Geometry optimisation on the device: FIRE (jax-md's ``minimize.fire_descent``) jitted in blocks,
with the neighbour list updated before every step, one structure at a time or a batch of
free-space structures of one padded size together (``vmap``), each stopping at its own
convergence.

Units: energies eV, forces eV/Å, positions Å. FIRE runs with unit masses (a minimiser, not
dynamics): ``dt_start`` and ``dt_max`` are its step sizes in those units (jax-md's defaults).
The cell stays fixed (positions only).
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
from .errors import QEqInputError


class Relaxed(NamedTuple):
    """One relaxed structure: positions (N, 3) Å of the real atoms, energy eV, forces (N, 3) eV/Å,
    charges (N,) e, the largest force norm ``fmax`` eV/Å, the FIRE ``steps`` taken and ``converged``
    (fmax below the target within the step budget)."""

    positions: np.ndarray
    energy: float
    forces: np.ndarray
    charges: np.ndarray
    fmax: float
    steps: int
    converged: bool


@functools.lru_cache(maxsize=None)
def _fire(energy, dt_start, dt_max):
    """``(init_fn, apply_fn)`` of FIRE on ``fn(R, params=, system=, neighbor=)`` (one per model
    and step sizes, so that the jitted functions below are built and compiled once)."""
    from jax_md import minimize, space  # noqa: PLC0415 - heavy import

    def fn(positions, params=None, system=None, neighbor=None, **ignored):
        return energy(params, dataclasses.replace(system, positions=positions), neighbor, None)[0]

    return minimize.fire_descent(fn, space.free()[1], dt_start=dt_start, dt_max=dt_max)


def _fmax(force, mask):
    """The largest force norm over the real atoms (eV/Å)."""
    return jnp.max(jnp.where(mask, jnp.linalg.norm(force, axis=-1), 0.0))


@functools.lru_cache(maxsize=None)
def _single(energy, dt_start, dt_max):
    """Jitted ``(init, block)`` of one structure; ``block`` takes up to ``limit`` FIRE steps and
    stops early at convergence (largest force ≤ ``fmax``) or a neighbour-list overflow."""
    init_fn, apply_fn = _fire(energy, dt_start, dt_max)

    def cond(carry):
        state, nbrs, params, system, fmax, i, limit = carry
        return (i < limit) & (_fmax(state.force, system.mask) > fmax) & ~nbrs.did_buffer_overflow

    def body(carry):
        state, nbrs, params, system, fmax, i, limit = carry
        nbrs = energy.update_neighbors(nbrs, dataclasses.replace(system, positions=state.position))
        return apply_fn(state, params=params, system=system, neighbor=nbrs), nbrs, params, system, fmax, i + 1, limit

    def block(state, nbrs, params, system, fmax, limit):
        state, nbrs, *_, taken, _ = lax.while_loop(cond, body, (state, nbrs, params, system, fmax, 0, limit))
        return state, nbrs, taken

    init = lambda params, system, nbrs: init_fn(system.positions, params=params, system=system, neighbor=nbrs)  # noqa: E731
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
    return jax.jit(lambda positions, params, system, nbrs: energy(params, dataclasses.replace(system, positions=positions), nbrs, None))


def _result(energy, params, state, system, nbrs, steps, fmax) -> Relaxed:
    e, aux = _evaluate(energy)(state.position, params, system, nbrs)
    n = int(np.sum(np.asarray(system.mask)))
    f = float(_fmax(state.force, system.mask))
    return Relaxed(np.asarray(state.position)[:n], float(e), np.asarray(state.force)[:n], np.asarray(aux["charges"])[:n], f,
                   int(steps), f <= fmax)  # fmt: skip


def fire(energy, params, system, fmax=0.05, steps=1000, skin=1.0, layout="auto", block=100, dt_start=0.1,
         dt_max=0.4, capacity_multiplier=1.25) -> Relaxed:  # fmt: skip
    """Relax one structure (free or periodic; cell fixed) with FIRE until the largest force is
    below ``fmax`` (eV/Å) or ``steps`` steps were taken. The neighbour list (``skin`` Å) is
    updated before every step and reallocated on the host when it overflows (the block is redone)."""
    init, block_fn = _single(energy, float(dt_start), float(dt_max))
    nfn = md.neighbor_fn(energy, params, system, skin, layout)
    nbrs = nfn.allocate(system.positions, capacity_multiplier)
    state = init(params, system, nbrs)
    done = 0
    while done < steps and float(_fmax(state.force, system.mask)) > fmax:
        new, new_nbrs, taken = block_fn(state, nbrs, params, system, fmax, min(block, steps - done))
        if bool(new_nbrs.did_buffer_overflow):
            capacity_multiplier *= md.GROWTH
            nbrs = nfn.allocate(state.position, capacity_multiplier)
            continue
        state, nbrs, done = new, new_nbrs, done + int(taken)
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
