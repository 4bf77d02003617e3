"""The energy function E(R) = E_short(R) + E_QEq(q(R), R): the one place the model is assembled.

:class:`QEqModel` is the model as a value: a kernel, a solver, a gradient mode, the Coulomb
constant and the per-atom terms (``terms``), all frozen strategy values. Calling it,
``model(params, system, neighbors=None, guess=None) -> (E, aux)``, is the energy (E in eV; ``aux``
holds the charges (e), the solver diagnostics and the geometry checks). The calculator, the fitter
and MD drivers all call it; forces and stress come from ``jax.grad`` of it, so they are the exact
derivative of the energy reported. ``qeq_energy(kernel, solver, gradient)`` builds one from names.

``neighbors`` says which interactions exist (``neighbors.Neighbors``, built on the host by
``model.neighbors(system)`` = ``neighbors.build``): None for free space with all pairs; for
periodic cells the pairs within the cutoff over every lattice image (a dense image list or a
matrix-free neighbour list) and, for the gaussian kernel, the Ewald reciprocal vectors.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import ewald
from .constants import COULOMB_CONSTANT
from .errors import QEqInputError
from .geometry import Pairs, free_pairs, image_pairs, list_pairs, min_distance
from .gradients import get_gradient
from .hardness import dense_hardness, electronegativity, pair_hardness
from .kernels import get_kernel
from .neighbors import ImageList, NeighborList, Neighbors, build, update_neighbors
from .periodic import deform, volume
from .solvers import Problem, get_solver
from .terms import ElementTable


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


def _check_layout(kernel, system, source, reciprocal):
    """Errors for a system and neighbours that the kernel cannot use together."""
    if not system.periodic and kernel.ewald and kernel.cutoff is not None:
        raise QEqInputError(
            f"the gaussian kernel's cutoff ({kernel.cutoff} Å) is the Ewald real-space cutoff of periodic cells; "
            "a free-space system sums all pairs and cannot honour it: use cutoff=None"
        )
    if source is None and system.periodic:
        raise QEqInputError(
            "a periodic system needs its neighbours: pass neighbors=energy.neighbors(system) "
            "(qeq_unroll.neighbors.build), built on the host for the kernel and cell"
        )
    if source is not None and system.periodic and kernel.ewald and reciprocal is None:
        raise QEqInputError("the gaussian kernel in a periodic cell needs its Ewald plan: use energy.neighbors(system)")
    if source is not None and not (system.periodic and kernel.ewald) and kernel.cutoff is None:
        raise QEqInputError(f"kernel '{kernel.name}' with a neighbour list needs a cutoff")


def _geometry(kernel, system, source, reciprocal) -> Pairs:
    """The pairs the kernel couples: all pairs in free space, else those of the neighbours within
    the kernel's cutoff (the Ewald real-space cutoff for the periodic gaussian kernel)."""
    if source is None:
        return free_pairs(system)
    ewald_sum = system.periodic and kernel.ewald
    return _pairs(system, source, reciprocal.real_cutoff if ewald_sum else kernel.cutoff)


def layout_pairs(kernel, system, neighbors=None) -> Pairs:
    """The pairs ``kernel`` couples in ``system`` with ``neighbors`` (see :func:`_geometry`),
    after checking that the three fit together."""
    source, reciprocal = _unpack(neighbors)
    _check_layout(kernel, system, source, reciprocal)
    return _geometry(kernel, system, source, reciprocal)


def _ewald_hardness(kernel, params, system, pairs, reciprocal, hardness, coulomb_constant):
    """H of the periodic gaussian kernel: real-space pairs, self terms and reciprocal space
    (low-rank exact sum or PME operator)."""
    alpha = reciprocal.alpha
    h = pair_hardness(kernel, params, system, pairs, hardness, coulomb_constant, coupling=ewald.real_coupling(alpha))
    shift = jnp.where(system.mask, coulomb_constant * ewald.self_term(alpha), 0.0)
    h = h._replace(
        diagonal=h.diagonal + shift,
        matrix=None if h.matrix is None else h.matrix + jnp.diag(shift),
        base=None if h.base is None else h.base + shift,
    )
    return reciprocal.add_to(h, system.positions, system.cell, system.mask, coulomb_constant)


def assemble(kernel, params, system, coulomb_constant=COULOMB_CONSTANT, neighbors=None, terms=ElementTable()):
    """``(problem, pairs, e_constant)``: the charge problem, the pair geometry (for short-range
    terms) and a charge-independent energy (eV; the Ewald background of a charged cell). χ_i and
    J_i come from ``terms`` (``terms.ElementTable`` by default)."""
    source, reciprocal = _unpack(neighbors)
    pairs = layout_pairs(kernel, system, neighbors)
    atoms = terms.atom_terms(params, system, pairs)
    chi = electronegativity(atoms.chi, system)
    e_const = jnp.zeros((), chi.dtype)
    if source is None:
        hardness = dense_hardness(kernel, params, system, pairs.r, pairs.mask, atoms.hardness, coulomb_constant)
        return Problem(hardness, chi, system.fragments, system.fragment_charges, system.species, pairs.r, pairs.mask), pairs, e_const
    if system.periodic and kernel.ewald:
        hardness = _ewald_hardness(kernel, params, system, pairs, reciprocal, atoms.hardness, coulomb_constant)
        dchi, e_const = ewald.background(params, system, reciprocal, coulomb_constant)
        chi = chi + dchi
    else:
        hardness = pair_hardness(kernel, params, system, pairs, atoms.hardness, coulomb_constant)
    return Problem(hardness, chi, system.fragments, system.fragment_charges, system.species, None, None), pairs, e_const


def qeq_problem(kernel, params, system, coulomb_constant=COULOMB_CONSTANT, neighbors=None, terms=ElementTable()) -> Problem:
    """The charge problem of ``system``: hardness operator, χ, constraints and pair geometry."""
    return assemble(kernel, params, system, coulomb_constant, neighbors, terms)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class QEqModel:
    """The charge model as a value: ``kernel``, ``solver`` and ``gradient`` strategy values, the
    Coulomb constant k_e (eV·Å/e²; LAMMPS uses 14.4) and ``terms``, where χ_i, J_i and the
    short-range energy come from (``terms.ElementTable``: per element).

    ``model(params, system, neighbors=None, guess=None) -> (E, aux)``: the energy (eV). aux:
    ``charges`` (N,) e, ``e_qeq`` and ``e_short`` eV, ``residual``, ``iterations``,
    ``converged``, ``positive_definite`` (solver diagnostics), ``min_distance`` Å,
    ``neighbors_overflow`` (True: the neighbour list was too small or stale; results invalid),
    ``terms``: the terms' own diagnostics (``terms.check(aux["terms"])`` raises on the host when
    they show the evaluation invalid).
    guess: optional (N,) starting charges (e) for the iterative solvers (MD history: the previous
    step's charges, or extended-Lagrangian auxiliary charges). It is a constant for
    differentiation, so the forces are −∂E/∂R at that fixed guess; the exact solver ignores it.

    ``model.neighbors(system, params=None, **kw)`` builds the ``neighbors`` argument on the host
    (``neighbors.build`` for this kernel); ``model.update_neighbors(neighbors, system)`` updates
    it inside jit. Frozen and hashed by identity (jit caches compiled functions on it): build a
    model once and reuse it."""

    kernel: object
    solver: object
    gradient: object
    coulomb_constant: float = COULOMB_CONSTANT
    terms: object = ElementTable()

    def __post_init__(self):
        if self.terms.charge_dependent and self.gradient.name == "envelope":
            raise QEqInputError(
                "a short-range energy that depends on the charges makes the energy non-stationary in q, so "
                "envelope forces are wrong at any tolerance: use gradient 'unrolled' or 'implicit'"
            )

    def __call__(self, params, system, neighbors=None, guess=None):
        source = _unpack(neighbors)[0]
        if (system.periodic or source is not None) and self.solver.needs_distances:
            raise QEqInputError(
                f"solver '{self.solver.name}' does not support periodic systems or neighbour lists yet (it works on "
                "dense free-space pairs)"
            )
        problem, pairs, e_const = assemble(self.kernel, params, system, self.coulomb_constant, neighbors, self.terms)
        if guess is not None:
            problem = problem._replace(guess=guess)
        # a solver trained with the model (``learned.TrainedSolver``) reads its arrays from params
        solver = self.solver.bind(params) if hasattr(self.solver, "bind") else self.solver
        q, diagnostics = self.gradient.charges(solver, problem)
        e_qeq = jnp.vdot(problem.chi, q) + problem.hardness.quadratic(q) + e_const
        e_short = self.terms.short_range(params, system, pairs, q)
        aux = dict(
            charges=q,
            e_qeq=e_qeq,
            e_short=e_short,
            min_distance=jax.lax.stop_gradient(min_distance(pairs)),
            neighbors_overflow=jnp.asarray(False) if source is None else source.overflow,
            terms=self.terms.diagnostics(params, system, pairs),
            **diagnostics._asdict(),
        )
        return e_qeq + e_short, aux

    def neighbors(self, system, params=None, **kw) -> Neighbors:
        """The ``neighbors`` argument of ``system`` for this model's kernel (host, ``neighbors.build``)."""
        return build(self.kernel, system, params, **kw)

    def update_neighbors(self, neighbors, system):
        """``neighbors`` for the current positions (jittable, fixed capacity)."""
        if isinstance(neighbors, Neighbors):
            return neighbors.update(system)
        if isinstance(neighbors, NeighborList):
            return update_neighbors(neighbors, system)
        return neighbors


def qeq_energy(kernel="gaussian", solver="cg", gradient="auto", coulomb_constant=COULOMB_CONSTANT, terms=None) -> QEqModel:
    """A :class:`QEqModel` from strategy values or names (see ``kernels``, ``solvers``,
    ``gradients``; ``gradient="auto"``: implicit for a solver iterating to a tolerance, unrolled
    for a fixed K; ``terms`` None: ``terms.ElementTable``)."""
    terms = ElementTable() if terms is None else terms
    solver = get_solver(solver)
    return QEqModel(get_kernel(kernel), solver, get_gradient(gradient, solver), coulomb_constant, terms)


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
