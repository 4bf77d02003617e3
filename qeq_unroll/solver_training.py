"""Training of learned solver parts (``learned``) against the exact solve, with optax.

The objective is the error of the K-step learned solve against the exact solve of the same
structure: charges (RMS, e), energy (eV/atom) or forces (RMS, eV/Å). Every structure goes through
the one energy function (``energy.qeq_energy`` with ``learned.learned_solver``), so the solver is
trained exactly as it will be used. Structures are padded to size buckets, so each bucket compiles
once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .energy import energy_and_forces, qeq_energy
from .errors import QEqInputError
from .learned import LearnedSolverParams, learned_solver
from .solvers import Exact

OBJECTIVES = ("charges", "energy", "forces")


def _reference(kernel, coulomb_constant):
    return jax.jit(energy_and_forces(qeq_energy(kernel, Exact(), "implicit", coulomb_constant)))


def solve_errors(lp: LearnedSolverParams, params, system, reference, kernel, coulomb_constant):
    """Errors of the learned K-step solve against ``reference = (E, forces, charges)`` of the
    exact solve: dict of charge RMS (e), |ΔE| per atom (eV), force RMS (eV/Å)."""
    e_ref, f_ref, q_ref = reference
    energy = qeq_energy(kernel, learned_solver(lp), "unrolled", coulomb_constant)
    e, f, aux = energy_and_forces(energy)(params, system)
    mask = system.mask
    n = jnp.sum(mask)
    return {
        "charges": jnp.sqrt(jnp.sum(jnp.where(mask, aux["charges"] - q_ref, 0.0) ** 2) / n),
        "energy": jnp.abs(e - e_ref) / n,
        "forces": jnp.sqrt(jnp.sum(jnp.where(mask[:, None], f - f_ref, 0.0) ** 2) / (3 * n)),
    }


def train_solver(lp, params, systems, kernel, coulomb_constant, objective="charges", steps=1000, learning_rate=2e-2, seed=0, callback=None):
    """Fit ``lp`` to ``systems`` (a list of ``System``) by Adam with cosine decay.

    Returns ``(lp, history)``; history holds the objective per step. ``callback(step, value)`` is
    called every step (progress bars). The order of structures is a seeded permutation per epoch.
    """
    if objective not in OBJECTIVES:
        raise QEqInputError(f"unknown objective '{objective}' (valid: {', '.join(OBJECTIVES)})")
    if lp.kernel != kernel.name:
        raise QEqInputError(f"learned solver parameters are for kernel '{lp.kernel}', not '{kernel.name}'")
    if not systems:
        raise QEqInputError("no training structures")
    reference = _reference(kernel, coulomb_constant)
    refs = []
    for s in systems:
        e, f, aux = reference(params, s)
        refs.append((e, f, aux["charges"]))

    def loss(lp, system, ref):
        return solve_errors(lp, params, system, ref, kernel, coulomb_constant)[objective] ** 2

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    optimiser = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    state = optimiser.init(lp)
    rng = np.random.default_rng(seed)
    order = []
    history = []
    for step in range(steps):
        if not order:
            order = list(rng.permutation(len(systems)))
        i = order.pop()
        value, grads = value_and_grad(lp, systems[i], refs[i])
        updates, state = optimiser.update(grads, state, lp)
        lp = optax.apply_updates(lp, updates)
        history.append(float(np.sqrt(value)))
        if callback is not None:
            callback(step, history[-1])
    return lp, history
