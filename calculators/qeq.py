"""ASE calculator for the qeq-unroll charge model: a thin adapter over ``qeq_unroll``.

Units as in ASE: energy eV, forces eV/Å, charges e, dipole e·Å.

    from calculators import QEqCalculator
    atoms.calc = QEqCalculator(params="rappe-goddard-1991", kernel="gaussian", solver="cg", iterations=3)
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_charges()

Every property comes from one jitted evaluation of ``qeq_unroll.energy_and_forces``. Structures
are padded to size buckets (``qeq_unroll.size_bucket``), so moving atoms never recompiles and a
change of atom count recompiles at most once per bucket.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

import qeq_unroll
from qeq_unroll.errors import QEqConvergenceError, QEqConvergenceWarning, QEqInputError
from qeq_unroll.learned import check_compatible

#: Two atoms closer than this (Å) are "on top of each other".
MIN_DISTANCE = 1e-6
DTYPES = {"float64": jnp.float64, "float32": jnp.float32}


class QEqCalculator(Calculator):
    """QEq charges, energy and exact forces for ASE.

    params: built-in set name, JSON path or ``qeq_unroll.Params``. kernel: "gaussian" | "reaxff" |
    "point". cutoff: Å (None: the kernel's default). solver: "exact" | "cg" | "gd" | "nag" |
    "learned" or a solver object; solver_params: the solver file (or
    ``qeq_unroll.learned.LearnedSolverParams``) of ``solver="learned"``. iterations: fixed K, or
    None to iterate to ``tol`` (at most ``max_iterations``).
    gradient: "unrolled" | "implicit" | "envelope". total_charge: e (None: sum of the initial
    charges). coulomb_constant: eV·Å. dtype: "float64" (needs JAX x64 enabled) | "float32".
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges", "dipole"]
    default_parameters = dict(
        params="rappe-goddard-1991",
        kernel="gaussian",
        cutoff=None,
        solver="cg",
        solver_params=None,
        iterations=None,
        tol=1e-10,
        max_iterations=1000,
        gradient="unrolled",
        total_charge=None,
        coulomb_constant=qeq_unroll.COULOMB_CONSTANT,
        dtype="float64",
    )

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        p = self.parameters
        if p.dtype not in DTYPES:
            raise QEqInputError(f"unknown dtype '{p.dtype}' (valid: {', '.join(DTYPES)})")
        if p.dtype == "float64" and not jax.config.read("jax_enable_x64"):
            raise QEqInputError(
                "dtype='float64' needs JAX's 64-bit mode, which is off: call "
                "jax.config.update('jax_enable_x64', True) at the start of your program (or set "
                "JAX_ENABLE_X64=1), or pass dtype='float32' for the faster, less precise mode"
            )
        self._dtype = DTYPES[p.dtype]
        params = qeq_unroll.load_params(p.params)
        self.kernel = qeq_unroll.get_kernel(p.kernel, p.cutoff)
        self.solver = qeq_unroll.get_solver(p.solver, p.iterations, p.tol, p.max_iterations, p.solver_params)
        if p.solver == "learned":
            lp = self.solver.start.params
            check_compatible(lp, self.kernel.name, params.elements, source=f"solver file {p.solver_params}")
        self.gradient = qeq_unroll.get_gradient(p.gradient)
        self.qeq_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self._dtype), params)
        energy = qeq_unroll.qeq_energy(self.kernel, self.solver, self.gradient, p.coulomb_constant)
        self._evaluate = jax.jit(qeq_unroll.energy_and_forces(energy))

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if atoms.pbc.any():
            raise QEqInputError("periodic cells are not supported yet: set atoms.pbc = False")
        species = self.qeq_params.species_indices(atoms.get_chemical_symbols())
        self.qeq_params.require(self.kernel.required, species)
        total = self.parameters.total_charge
        if total is None:
            total = float(np.sum(atoms.get_initial_charges()))
        n = len(atoms)
        system = qeq_unroll.make_system(
            atoms.positions, species, total_charge=total, pad_to=qeq_unroll.size_bucket(n), dtype=self._dtype
        )
        energy, forces, aux = self._evaluate(self.qeq_params, system)
        self._check(aux)
        q = np.asarray(aux["charges"][:n], dtype=float)
        self.results = {
            "energy": float(energy),
            "free_energy": float(energy),
            "forces": np.asarray(forces[:n], dtype=float),
            "charges": q,
            "dipole": q @ atoms.positions,
            "qeq_residual": float(aux["residual"]),
            "qeq_iterations": int(aux["iterations"]),
            "qeq_converged": bool(aux["converged"]),
        }

    def _check(self, aux):
        """Turn the evaluation's diagnostics into clear errors and warnings."""
        if float(aux["min_distance"]) < MIN_DISTANCE:
            raise QEqInputError(
                f"atoms on top of each other: two atoms are {float(aux['min_distance']):.3g} Å apart "
                f"(minimum {MIN_DISTANCE} Å)"
            )
        if not bool(aux["positive_definite"]) or not np.all(np.isfinite(np.asarray(aux["charges"]))):
            raise QEqConvergenceError(
                f"the hardness matrix of kernel '{self.kernel.name}' is not positive definite at this "
                "geometry (the charges would run away): atoms too close for this kernel, or hardness too "
                "small; use a shielded kernel ('gaussian' or 'reaxff') or larger hardness"
            )
        if not bool(aux["converged"]):
            solver = self.solver
            detail = (
                f"solver '{solver.name}' reached a relative residual of {float(aux['residual']):.3g} "
                f"after {int(aux['iterations'])} iterations (tol {solver.tol:g})"
            )
            if self.gradient.name == "implicit":
                raise QEqConvergenceError(
                    f"implicit gradients need a converged solve, but {detail}: the implicit forces would "
                    "not be the derivative of the reported energy. Use gradient='unrolled' for a fixed "
                    "number of iterations, or iterate to tol (iterations=None)"
                )
            if getattr(solver, "iterations", None) is None:
                warnings.warn(f"charge solve did not converge: {detail}", QEqConvergenceWarning, stacklevel=3)
