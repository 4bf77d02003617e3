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


def _fire(energy, params, dt_start, dt_max):
    """``(init_fn, apply_fn, evaluate)`` of FIRE on ``fn(R, system, neighbor)``."""
    from jax_md import minimize, space  # noqa: PLC0415 - heavy import

    def fn(positions, system=None, neighbor=None, **ignored):
        return energy(params, dataclasses.replace(system, positions=positions), neighbor, None)[0]

    def evaluate(positions, system, neighbor):
        return energy(params, dataclasses.replace(system, positions=positions), neighbor, None)

    init_fn, apply_fn = minimize.fire_descent(fn, space.free()[1], dt_start=dt_start, dt_max=dt_max)
    return init_fn, apply_fn, evaluate


def _fmax(force, mask):
    """The largest force norm over the real atoms (eV/Å)."""
    return jnp.max(jnp.where(mask, jnp.linalg.norm(force, axis=-1), 0.0))


def _single_block(apply_fn, nfn, fmax):
    """Up to ``limit`` FIRE steps of one structure; stops early at convergence or overflow."""

    def cond(carry):
        state, nbrs, system, i, limit = carry
        return (i < limit) & (_fmax(state.force, system.mask) > fmax) & ~nbrs.did_buffer_overflow

    def body(carry):
        state, nbrs, system, i, limit = carry
        nbrs = nfn.update(state.position, nbrs)
        return apply_fn(state, system=system, neighbor=nbrs), nbrs, system, i + 1, limit

    return jax.jit(lambda state, nbrs, system, limit: lax.while_loop(cond, body, (state, nbrs, system, 0, limit))[:4])


def _batch_block(apply_fn, fmax):
    """Up to ``limit`` FIRE steps of a batch of free-space structures: a converged structure is
    held where it is while the others go on; ``steps`` (B,) counts each one's steps."""

    def done(states, systems):
        return jax.vmap(_fmax)(states.force, systems.mask) <= fmax

    def cond(carry):
        states, systems, nbrs, i, limit, _ = carry
        return (i < limit) & ~jnp.all(done(states, systems))

    def body(carry):
        states, systems, nbrs, i, limit, steps = carry
        new = jax.vmap(lambda s, sys: apply_fn(s, system=sys, neighbor=nbrs))(states, systems)
        finished = done(states, systems)
        keep = lambda a, b: jnp.where(finished.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        return jax.tree_util.tree_map(keep, states, new), systems, nbrs, i + 1, limit, steps + (~finished).astype(jnp.int32)

    def run(states, systems, nbrs, limit, steps):
        out = lax.while_loop(cond, body, (states, systems, nbrs, 0, limit, steps))
        return out[0], out[5]

    return jax.jit(run)


def _result(evaluate, state, system, nbrs, steps, fmax) -> Relaxed:
    e, aux = jax.jit(evaluate)(state.position, system, nbrs)
    n = int(np.sum(np.asarray(system.mask)))
    f = float(_fmax(state.force, system.mask))
    return Relaxed(np.asarray(state.position)[:n], float(e), np.asarray(state.force)[:n], np.asarray(aux["charges"])[:n], f,
                   int(steps), f <= fmax)  # fmt: skip


def fire(energy, params, system, fmax=0.05, steps=1000, skin=1.0, layout="auto", block=100, dt_start=0.1,
         dt_max=0.4, capacity_multiplier=1.25) -> Relaxed:  # fmt: skip
    """Relax one structure (free or periodic; cell fixed) with FIRE until the largest force is
    below ``fmax`` (eV/Å) or ``steps`` steps were taken. The neighbour list (``skin`` Å) is
    updated before every step and reallocated on the host when it overflows (the block is redone)."""
    init_fn, apply_fn, evaluate = _fire(energy, params, dt_start, dt_max)
    nfn = md.neighbor_fn(energy, params, system, skin, layout)
    nbrs = nfn.allocate(system.positions, capacity_multiplier)
    state = jax.jit(init_fn)(system.positions, system=system, neighbor=nbrs)
    run_block = _single_block(apply_fn, nfn, fmax)
    done = 0
    while done < steps and float(_fmax(state.force, system.mask)) > fmax:
        new, new_nbrs, _, taken = run_block(state, nbrs, system, min(block, steps - done))
        if bool(new_nbrs.did_buffer_overflow):
            capacity_multiplier *= md.GROWTH
            nbrs = nfn.allocate(state.position, capacity_multiplier)
            continue
        state, nbrs, done = new, new_nbrs, done + int(taken)
    return _result(evaluate, state, system, nbrs, done, fmax)


def fire_batch(energy, params, systems: Sequence, fmax=0.05, steps=1000, block=100, dt_start=0.1,
               dt_max=0.4) -> list[Relaxed]:  # fmt: skip
    """Relax free-space structures padded to one size together (``vmap``), each until its own
    largest force is below ``fmax`` (eV/Å) or ``steps`` steps. Equal to :func:`fire` on each."""
    sizes = {s.positions.shape[0] for s in systems}
    if len(sizes) != 1 or any(s.cell is not None for s in systems):
        raise QEqInputError("fire_batch takes free-space systems padded to one size (see qeq_unroll.size_bucket)")
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *systems)
    init_fn, apply_fn, evaluate = _fire(energy, params, dt_start, dt_max)
    nbrs = md.neighbor_fn(energy, params, systems[0]).allocate(systems[0].positions)
    states = jax.jit(jax.vmap(lambda s: init_fn(s.positions, system=s, neighbor=nbrs)))(stacked)
    run_block = _batch_block(apply_fn, fmax)
    taken = jnp.zeros(len(systems), jnp.int32)
    for start in range(0, steps, block):
        states, taken = run_block(states, stacked, nbrs, min(block, steps - start), taken)
        if bool(jnp.all(jax.vmap(_fmax)(states.force, stacked.mask) <= fmax)):
            break
    pick = lambda tree, i: jax.tree_util.tree_map(lambda x: x[i], tree)  # noqa: E731
    return [_result(evaluate, pick(states, i), s, nbrs, taken[i], fmax) for i, s in enumerate(systems)]
