"""The energy function E(R) = E_short(R) + E_QEq(q(R), R): the one place the model is assembled.

``qeq_energy(kernel, solver, gradient)`` returns ``energy(params, system, neighbors=None,
guess=None) -> (E, aux)`` (jax-md style factory). E in eV; ``aux`` holds the charges (e), the solver diagnostics and the
geometry checks. The calculator, the fitter and MD drivers all call this function; forces and
stress come from ``jax.grad`` of it, so they are the exact derivative of the energy reported.

``neighbors`` says which interactions exist (``neighbors.Neighbors``, built on the host by
``energy.neighbors(system)`` = ``neighbors.build``): None for free space with all pairs; for
periodic cells the pairs within the cutoff over every lattice image (a dense image list or a
matrix-free neighbour list) and, for the gaussian kernel, the Ewald reciprocal vectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import ewald, pme
from .constants import COULOMB_CONSTANT
from .errors import QEqInputError
from .geometry import Pairs, dense_pairs, image_pairs, list_pairs, min_distance
from .gradients import get_gradient
from .hardness import add_lowrank, add_operator, dense_hardness, electronegativity, pair_hardness
from .kernels import get_kernel
from .neighbors import ImageList, NeighborList, Neighbors, build, update_neighbors
from .pairs import pair_energy
from .periodic import deform, volume
from .solvers import Problem, get_solver


def _unpack(neighbors):
    if neighbors is None:
        return None, None
    if isinstance(neighbors, Neighbors):
        return neighbors.pairs, neighbors.reciprocal
    if isinstance(neighbors, (ImageList, NeighborList)):
        return neighbors, None
    raise QEqInputError(f"neighbors must be a qeq_unroll.neighbors.Neighbors, got {type(neighbors).__name__}")


def _pairs(system, source, cutoff):
    if isinstance(source, ImageList):
        if cutoff > source.cutoff * (1 + 1e-12):
            raise QEqInputError(f"image list built for {source.cutoff} Å, the kernel needs {cutoff} Å")
        return image_pairs(system, source.shifts, cutoff)
    return list_pairs(system, source, cutoff)


def assemble(kernel, params, system, coulomb_constant=COULOMB_CONSTANT, neighbors=None):
    """``(problem, pairs, e_constant)``: the charge problem, the pair geometry (for short-range
    terms) and a charge-independent energy (eV; the Ewald background of a charged cell)."""
    source, reciprocal = _unpack(neighbors)
    chi = electronegativity(params, system)
    targets = system.fragment_charges
    if not system.periodic and getattr(kernel, "ewald", False) and kernel.cutoff is not None:
        raise QEqInputError(
            f"the gaussian kernel's cutoff ({kernel.cutoff} Å) is the Ewald real-space cutoff of periodic cells; "
            "a free-space system sums all pairs and cannot honour it: use cutoff=None"
        )
    if source is None:
        if system.periodic:
            raise QEqInputError(
                "a periodic system needs its neighbours: pass neighbors=energy.neighbors(system) "
                "(qeq_unroll.neighbors.build), built on the host for the kernel and cell"
            )
        r, mask = dense_pairs(system)
        hardness = dense_hardness(kernel, params, system, r, mask, coulomb_constant)
        problem = Problem(hardness, chi, system.fragments, targets, system.species, r, mask)
        return problem, Pairs(r, mask, None), jnp.zeros((), chi.dtype)
    e_const = jnp.zeros((), chi.dtype)
    if system.periodic and getattr(kernel, "ewald", False):
        if reciprocal is None:
            raise QEqInputError("the gaussian kernel in a periodic cell needs its Ewald plan: use energy.neighbors(system)")
        alpha = reciprocal.alpha
        pairs = _pairs(system, source, reciprocal.real_cutoff)
        hardness = pair_hardness(kernel, params, system, pairs, coulomb_constant, coupling=ewald.real_coupling(alpha))
        shift = jnp.where(system.mask, coulomb_constant * ewald.self_term(alpha), 0.0)
        hardness = hardness._replace(
            diagonal=hardness.diagonal + shift,
            matrix=None if hardness.matrix is None else hardness.matrix + jnp.diag(shift),
            base=None if hardness.base is None else hardness.base + shift,
        )
        if isinstance(reciprocal, pme.Mesh):
            term = pme.operator(system.positions, system.cell, reciprocal, system.mask, coulomb_constant)
            hardness = add_operator(hardness, term)
        else:
            factor = ewald.reciprocal_factor(system.positions, system.cell, reciprocal, system.mask, coulomb_constant)
            hardness = add_lowrank(hardness, factor)
        dchi, e_const = ewald.background(params, system, reciprocal, coulomb_constant)
        chi = chi + dchi
    else:
        if kernel.cutoff is None:
            raise QEqInputError(f"kernel '{kernel.name}' with a neighbour list needs a cutoff")
        pairs = _pairs(system, source, kernel.cutoff)
        hardness = pair_hardness(kernel, params, system, pairs, coulomb_constant)
    problem = Problem(hardness, chi, system.fragments, targets, system.species, None, None)
    return problem, pairs, e_const


def qeq_problem(kernel, params, system, coulomb_constant=COULOMB_CONSTANT, neighbors=None) -> Problem:
    """The charge problem of ``system``: hardness operator, χ, constraints and pair geometry."""
    return assemble(kernel, params, system, coulomb_constant, neighbors)[0]


def _check_solver(solver, system, neighbors):
    parts = (getattr(solver, "start", None), getattr(solver, "preconditioner", None))
    if (system.periodic or _unpack(neighbors)[0] is not None) and any(type(p).__name__.startswith("Learned") for p in parts):
        raise QEqInputError(
            "the learned solver does not support periodic systems or neighbour lists yet (it works on "
            "dense free-space pairs)"
        )


def qeq_energy(kernel="gaussian", solver="cg", gradient="unrolled", coulomb_constant=COULOMB_CONSTANT):
    """Build ``energy(params, system, neighbors=None, guess=None) -> (E, aux)``.

    kernel, solver, gradient: strategy objects or names (see ``kernels``, ``solvers``,
    ``gradients``). coulomb_constant: k_e in eV·Å/e² (LAMMPS uses 14.4).

    aux: ``charges`` (N,) e, ``e_qeq`` and ``e_short`` eV, ``residual``, ``iterations``,
    ``converged``, ``positive_definite`` (solver diagnostics), ``min_distance`` Å,
    ``neighbors_overflow`` (True: the neighbour list was too small or stale; results invalid).

    guess: optional (N,) starting charges (e) for the iterative solvers (MD history: the previous
    step's charges, or extended-Lagrangian auxiliary charges). It is a constant for
    differentiation, so the forces are −∂E/∂R at that fixed guess; the exact solver ignores it.

    ``energy.neighbors(system, params=None, **kw)`` builds the ``neighbors`` argument on the host
    (``neighbors.build`` for this kernel); ``energy.update_neighbors(neighbors, system)`` updates
    it inside jit.
    """
    kernel = get_kernel(kernel)
    solver = get_solver(solver)
    gradient = get_gradient(gradient)

    def energy(params, system, neighbors=None, guess=None):
        _check_solver(solver, system, neighbors)
        problem, pairs, e_const = assemble(kernel, params, system, coulomb_constant, neighbors)
        if guess is not None:
            problem = problem._replace(guess=guess)
        q, diagnostics = gradient.charges(solver, problem)
        e_qeq = jnp.vdot(problem.chi, q) + problem.hardness.quadratic(q) + e_const
        e_short = pair_energy(params, system.species, pairs.r, pairs.mask, pairs.neighbors)
        overflow = _unpack(neighbors)[0]
        overflow = jnp.asarray(False) if overflow is None else getattr(overflow, "overflow", jnp.asarray(False))
        aux = dict(
            charges=q,
            e_qeq=e_qeq,
            e_short=e_short,
            min_distance=jax.lax.stop_gradient(min_distance(pairs)),
            neighbors_overflow=overflow,
            **diagnostics._asdict(),
        )
        return e_qeq + e_short, aux

    energy.kernel, energy.solver, energy.gradient = kernel, solver, gradient
    energy.coulomb_constant = coulomb_constant
    energy.neighbors = lambda system, params=None, **kw: build(kernel, system, params, **kw)
    energy.update_neighbors = lambda neighbors, system: _update(neighbors, system)
    return energy


def _update(neighbors, system):
    if isinstance(neighbors, Neighbors):
        return neighbors.update(system)
    if isinstance(neighbors, NeighborList):
        return update_neighbors(neighbors, system)
    return neighbors


def energy_and_forces(energy):
    """Wrap ``energy`` into ``f(params, system, neighbors=None) -> (E, forces, aux)``; forces =
    −∂E/∂R in eV/Å."""

    def evaluate(params, system, neighbors=None):
        def of_positions(positions):
            return energy(params, dataclasses.replace(system, positions=positions), neighbors)

        (e, aux), grad = jax.value_and_grad(of_positions, has_aux=True)(system.positions)
        return e, -grad, aux

    return evaluate


def energy_forces_stress(energy):
    """Wrap ``energy`` into ``f(params, system, neighbors=None) -> (E, forces, stress, aux)`` for a
    system with a cell. stress (3, 3) in eV/Å³, ASE's sign convention: σ = (1/V) ∂E/∂ε, the
    derivative with respect to a homogeneous strain x → x(1 + ε) of positions and cell (symmetrised);
    positive stress means the cell wants to shrink. The cell must be non-singular (V > 0)."""

    def evaluate(params, system, neighbors=None):
        if system.cell is None:
            raise QEqInputError("stress needs a cell")

        def of(positions, strain):
            pos, cell = deform(positions, system.cell, strain)
            return energy(params, dataclasses.replace(system, positions=pos, cell=cell), neighbors)

        strain = jnp.zeros((3, 3), system.positions.dtype)
        (e, aux), (gpos, gstrain) = jax.value_and_grad(of, argnums=(0, 1), has_aux=True)(system.positions, strain)
        stress = 0.5 * (gstrain + gstrain.T) / volume(system.cell)
        return e, -gpos, stress, aux

    return evaluate


def dipole_moment(charges, positions):
    """Σ q_i r_i in e·Å (origin-dependent for a charged system, as in ASE)."""
    return charges @ positions
