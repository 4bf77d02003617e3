"""The energy function E(R) = E_short(R) + E_QEq(q(R), R): the one place the model is assembled.

``qeq_energy(kernel, solver, gradient)`` returns ``energy(params, system) -> (E, aux)`` (jax-md style
factory). E in eV; ``aux`` holds the charges (e), the solver diagnostics and the geometry checks.
The calculator, the fitter and MD drivers all call this function; forces and stress come from
``jax.grad`` of it, so they are the exact derivative of the energy reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .constants import COULOMB_CONSTANT
from .geometry import dense_pairs, min_distance
from .gradients import get_gradient
from .hardness import dense_hardness, electronegativity
from .kernels import get_kernel
from .pairs import pair_energy
from .solvers import Problem, get_solver


def qeq_problem(kernel, params, system, coulomb_constant=COULOMB_CONSTANT) -> Problem:
    """The charge problem of ``system``: hardness operator, χ, constraints and pair geometry."""
    r, pair_mask = dense_pairs(system)
    hardness = dense_hardness(kernel, params, system, r, pair_mask, coulomb_constant)
    chi = electronegativity(params, system)
    return Problem(hardness, chi, system.fragments, system.fragment_charges, system.species, r, pair_mask)


def qeq_energy(kernel="gaussian", solver="cg", gradient="unrolled", coulomb_constant=COULOMB_CONSTANT):
    """Build ``energy(params, system) -> (E, aux)``.

    kernel, solver, gradient: strategy objects or names (see ``kernels``, ``solvers``,
    ``gradients``). coulomb_constant: k_e in eV·Å/e² (LAMMPS uses 14.4).

    aux: ``charges`` (N,) e, ``e_qeq`` and ``e_short`` eV, ``residual``, ``iterations``,
    ``converged``, ``positive_definite`` (solver diagnostics), ``min_distance`` Å.
    """
    kernel = get_kernel(kernel)
    solver = get_solver(solver)
    gradient = get_gradient(gradient)

    def energy(params, system):
        problem = qeq_problem(kernel, params, system, coulomb_constant)
        q, diagnostics = gradient.charges(solver, problem)
        e_qeq = jnp.vdot(problem.chi, q) + 0.5 * jnp.vdot(q, problem.hardness.matvec(q))
        e_short = pair_energy(params, system.species, problem.distances, problem.pair_mask)
        aux = dict(
            charges=q,
            e_qeq=e_qeq,
            e_short=e_short,
            min_distance=jax.lax.stop_gradient(min_distance(problem.distances, problem.pair_mask)),
            **diagnostics._asdict(),
        )
        return e_qeq + e_short, aux

    energy.kernel, energy.solver, energy.gradient = kernel, solver, gradient
    return energy


def energy_and_forces(energy):
    """Wrap ``energy`` into ``f(params, system) -> (E, forces, aux)``; forces = −∂E/∂R in eV/Å."""

    def evaluate(params, system):
        def of_positions(positions):
            return energy(params, dataclasses.replace(system, positions=positions))

        (e, aux), grad = jax.value_and_grad(of_positions, has_aux=True)(system.positions)
        return e, -grad, aux

    return evaluate


def dipole_moment(charges, positions):
    """Σ q_i r_i in e·Å (origin-dependent for a charged system, as in ASE)."""
    return charges @ positions
