"""ASE calculator for the qeq-unroll charge model: a thin adapter over ``qeq_unroll``.

Units as in ASE: energy eV, forces eV/Å, charges e, dipole e·Å.

    from calculators import QEqCalculator
    atoms.calc = QEqCalculator(params="rappe-goddard-1991", kernel="gaussian", solver="cg", iterations=3)
    atoms.get_potential_energy(); atoms.get_forces(); atoms.get_charges()

Every property comes from one jitted evaluation of ``qeq_unroll.energy_and_forces``. Structures
are padded to size buckets (``qeq_unroll.size_bucket``), so moving atoms never recompiles and a
change of atom count recompiles at most once per bucket.

Periodic atoms (any ``atoms.pbc``) go through ``qeq_unroll.energy_and_forces`` or, once the stress
has been asked for, ``energy_forces_stress``, with the kernel's neighbours (``energy.neighbors``):
built once, updated inside the jitted call as atoms move, and rebuilt on the host (never used
stale) when the list overflows or the cell changes, with lattice translations and k-vectors padded
so that a changing cell keeps its shapes. Stress (ASE Voigt order, eV/Å³) needs a non-singular cell.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

import qeq_unroll
from qeq_unroll import checks
from qeq_unroll.errors import (
    QEqConvergenceError,
    QEqConvergenceWarning,
    QEqInputError,
    QEqNeighborError,
    QEqRangeError,
    QEqShortRangeWarning,
)
from qeq_unroll.learned import check_compatible, solver_from_file
from qeq_unroll.neural import is_model_file, load_model
from qeq_unroll.periodic import wrap

from .data import total_charge

DTYPES = {"float64": jnp.float64, "float32": jnp.float32}
#: Once the stress is asked for, image lists and Ewald plans are built to serve every cell within
#: this strain (‖ε‖₂) of the one they were built for (``neighbors.build(strain=...)``): a cell
#: relaxation or NPT run rebuilds them on the host only when the cell leaves that range. It costs
#: about (1.03)³ − 1 ≈ 9 % more k-vectors.
CELL_STRAIN_SKIN = 0.03
#: Once a structure's cell has left the strain skin (a relaxation going far), its k-vectors are
#: padded to this many times what the new cell needs: room for the next cells without new shapes.
CELL_CHANGE_HEADROOM = 1.5
#: the solver tolerance (relative residual) when ``tol`` is None
DEFAULT_TOL = {"float64": 1e-10, "float32": 1e-5}


class QEqCalculator(Calculator):
    """QEq charges, energy and exact forces for ASE.

    params: built-in set name, JSON path, ``qeq_unroll.Params`` or a model file of
    ``qeq-unroll fit --model neural`` (which fixes kernel, cutoff and Coulomb constant; a model
    trained with its own solver, ``fit --solver gd|nag|learned``, runs that solver unless
    ``solver`` or ``iterations`` is given). kernel: "gaussian" | "reaxff" |
    "point". cutoff: Å (None: the kernel's default). solver: "exact" | "cg" | "gd" | "nag" |
    "learned" or a solver object; solver_params: the solver file (or
    ``qeq_unroll.learned.LearnedSolverParams``) of ``solver="learned"``. iterations: fixed K, or
    None to iterate to ``tol`` (at most ``max_iterations``). tol: relative residual (None: 1e-10
    in float64, 1e-5 in float32; at least ``qeq_unroll.solvers.min_tol`` of the dtype).
    gradient: "auto" (implicit when iterating to ``tol``, unrolled for a fixed K: fast and exact
    either way) | "unrolled" | "implicit" | "envelope". total_charge: e (None: ``info["total_charge"]``
    or ``info["charge"]``, else the sum of the initial charges). coulomb_constant: eV·Å. dtype: "float64" (needs JAX x64 enabled) | "float32".
    reciprocal: the gaussian kernel's reciprocal-space method in periodic cells, "auto" | "ewald"
    (exact k-sum) | "pme" (particle-mesh Ewald), None: the kernel's default.
    skin: Å, of neighbour lists (periodic cells); neighbor_layout: "auto" | "images" (dense, small
    cells) | "list" (neighbour list over a jax-md cell list, O(N) memory), see ``qeq_unroll.neighbors.build``. fragments: a label 0..F-1 per atom (or
    ``atoms.arrays["fragments"]``): each fragment's charge is fixed, fragment_charges (F,) e (None:
    the initial charges summed per fragment). field: uniform electric field (3,) in V/Å, along
    non-periodic directions only (energy −Σ q_i E·r_i).
    min_distance: Å, atoms (or an atom and its periodic image) closer than this are an error;
    charge_margin: e, a charge beyond the largest |fragment charge| plus this is an error;
    max_memory: bytes a structure may take (None: the device's memory), checked before anything
    is built (``qeq_unroll.checks.Limits``).

    A model without short-range terms (no ``pairs`` and no short-range network; the default
    ``rappe-goddard-1991`` set) gives the electrostatics alone, under which structures collapse: a
    ``qeq_unroll.QEqShortRangeWarning`` says so once, at construction, or else at the first
    structure whose elements have no pair term among them.
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges", "dipole", "stress"]
    default_parameters = dict(
        params="rappe-goddard-1991",
        kernel="gaussian",
        cutoff=None,
        solver="cg",
        solver_params=None,
        iterations=None,
        tol=None,
        max_iterations=1000,
        gradient="auto",
        total_charge=None,
        coulomb_constant=qeq_unroll.COULOMB_CONSTANT,
        dtype="float64",
        reciprocal=None,
        skin=qeq_unroll.neighbors.DEFAULT_SKIN,
        neighbor_layout="auto",
        fragments=None,
        fragment_charges=None,
        field=None,
        min_distance=checks.Limits.min_distance,
        charge_margin=checks.Limits.charge_margin,
        max_memory=None,
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
        tol = DEFAULT_TOL[p.dtype] if p.tol is None else p.tol
        if p.iterations is None and tol < qeq_unroll.solvers.min_tol(self._dtype):
            raise QEqInputError(
                f"tol {tol:g} cannot be reached in {p.dtype}: the solver resolves relative residuals down to "
                f"{qeq_unroll.solvers.min_tol(self._dtype):.2g}; use a larger tol (None picks {DEFAULT_TOL[p.dtype]:g}) "
                "or dtype='float64'"
            )
        checks.Limits(p.min_distance, p.charge_margin, p.max_memory)  # bad limits are an error here already
        params, terms, kernel, coulomb_constant = self._model(kwargs)
        self.kernel = kernel
        if p.reciprocal is not None:
            if not self.kernel.ewald:
                raise QEqInputError(f"reciprocal='{p.reciprocal}' is an option of the gaussian kernel, not '{self.kernel.name}'")
            self.kernel = dataclasses.replace(self.kernel, reciprocal=p.reciprocal)
        if self._trained_solver is not None and "solver" not in kwargs and "iterations" not in kwargs:
            self.solver = dataclasses.replace(self._trained_solver, tol=tol)  # the solver the model was trained with
        elif p.solver == "learned":
            self.solver = solver_from_file(p.solver_params, p.iterations, tol)
            lp = self.solver.start.params
            check_compatible(lp, self.kernel.name, params.elements, source=f"solver file {p.solver_params}")
        else:
            self.solver = qeq_unroll.get_solver(p.solver, p.iterations, tol, p.max_iterations)
        self.gradient = qeq_unroll.get_gradient(p.gradient, self.solver)
        self.qeq_params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, self._dtype), params)
        self._short_range_warned = False
        self._warn_without_short_range(None, stacklevel=3)
        energy = qeq_unroll.qeq_energy(self.kernel, self.solver, self.gradient, coulomb_constant, terms=terms)
        self._energy = energy
        self._evaluate = jax.jit(qeq_unroll.energy_and_forces(energy))
        efs, ef = qeq_unroll.energy_forces_stress(energy), qeq_unroll.energy_and_forces(energy)

        def periodic_step(params, system, neighbors, stress=True, update=True):
            """Energy, forces and (when asked for: it costs a strain derivative) the stress; the
            neighbours are updated first unless no atom moved half a skin since they last were."""
            if update:
                neighbors = energy.update_neighbors(neighbors, system)
            if stress:
                e, f, sigma, aux = efs(params, system, neighbors)
            else:
                (e, f, aux), sigma = ef(params, system, neighbors), None
            return e, f, sigma, aux, neighbors

        self._evaluate_periodic = jax.jit(periodic_step, static_argnames=("stress", "update"))
        self._neighbors = None
        self._neighbors_key = None
        self._neighbors_cell, self._neighbors_strain = None, 0.0
        self._checked_size = None
        self._stress_asked = False
        self._updated_at = None

    def _model(self, given):
        """``(params, terms, kernel, coulomb_constant)``: from a model file (``neural.save_model``),
        which fixes the kernel and the Coulomb constant (naming others is an error), for a model
        without charges the solver, and gives per-element energy offsets (added to the energy); or from a parameter set with the ``kernel``, ``cutoff``
        and ``coulomb_constant`` keywords."""
        p = self.parameters
        self._offsets, self._trained_solver = {}, None
        if not is_model_file(p.params):
            return qeq_unroll.load_params(p.params), None, qeq_unroll.get_kernel(p.kernel, p.cutoff), p.coulomb_constant
        terms, params, settings = load_model(p.params)
        self._offsets = settings["energy_offsets"]
        self._trained_solver = (settings["solver"] or {}).get("trained")
        kernel = settings["kernel"]
        fixed = {"kernel": kernel["name"], "cutoff": kernel["cutoff"], "coulomb_constant": settings["coulomb_constant"]}
        if not settings["charges"]:
            fixed["solver"] = "none"
            p.solver = "none"
        for key, value in fixed.items():
            if key in given and given[key] != value:
                raise QEqInputError(f"model file {p.params} was trained with {key}={value}; got {key}={given[key]}")
        return params, terms, qeq_unroll.get_kernel(kernel["name"], kernel["cutoff"]), settings["coulomb_constant"]

    @property
    def limits(self) -> checks.Limits:
        """The checks' settings (``min_distance``, ``charge_margin``, ``max_memory``; ``calc.set`` changes them)."""
        p = self.parameters
        return checks.Limits(p.min_distance, p.charge_margin, p.max_memory)

    @property
    def energy_function(self):
        """The ``qeq_unroll`` energy function this calculator evaluates (``qeq_energy``)."""
        return self._energy

    def system(self, atoms, pad=True):
        """The ``qeq_unroll.System`` of ``atoms`` under this calculator's settings (species checked
        against the parameter set and kernel; charge constraints and field from ``_conditions``).
        Free-space systems are padded to their size bucket when ``pad``; periodic ones never."""
        species = self.qeq_params.species_indices(atoms.get_chemical_symbols())
        self.qeq_params.require(self.kernel.required, species)
        self._warn_without_short_range(species, stacklevel=4)
        conditions = self._conditions(atoms)
        if atoms.pbc.any():
            pbc = tuple(bool(b) for b in atoms.pbc)
            cell = np.asarray(atoms.cell[:], dtype=float)
            return qeq_unroll.make_system(atoms.positions, species, cell=cell, pbc=pbc, dtype=self._dtype, **conditions)
        pad_to = qeq_unroll.size_bucket(len(atoms)) if pad else None
        return qeq_unroll.make_system(atoms.positions, species, pad_to=pad_to, dtype=self._dtype, **conditions)

    def _warn_without_short_range(self, species, stacklevel):
        """Warn (``QEqShortRangeWarning``, once per calculator) when the model has no short-range
        terms between the elements of ``species`` (None: between any of its elements): no pair term
        among them and no short-range network. Its energies and forces are then the electrostatics
        alone, which nothing stops from pulling oppositely charged atoms onto each other."""
        params = self.qeq_params
        if self._short_range_warned or "short" in params.networks:
            return
        present = set(params.elements) if species is None else {params.elements[s] for s in np.unique(species)}
        if any(set(key.split("-")) <= present for key in params.pairs):
            return
        self._short_range_warned = True
        which = (
            "(no \"pairs\" and no short-range network)" if species is None
            else f"among {', '.join(sorted(present))} (its pair terms: {', '.join(params.pairs)})"
        )
        warnings.warn(
            f"parameter set '{params.name}' has no short-range terms {which}: energies and forces are the "
            "electrostatics alone, and structures will collapse under relaxation or MD. For short-range terms, "
            "fit them to reference data with `qeq-unroll fit` (it adds pair terms between the data's elements), "
            "or use a set with \"pairs\" between these elements (e.g. the built-in 'demo-nacl-water' for NaCl "
            "and water)",
            QEqShortRangeWarning,
            stacklevel=stacklevel,
        )

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if atoms.pbc.any():
            self._calculate_periodic(atoms, properties)
            return
        system = self.system(atoms)
        if self._checked_size != len(system.positions):  # memory of all pairs: once per padded size
            self._energy.neighbors(system, self.qeq_params, limits=self.limits)
            self._checked_size = len(system.positions)
        energy, forces, aux = self._evaluate(self.qeq_params, system)
        self._check(atoms, system, aux)
        self._store(atoms, energy, forces, aux)

    def _store(self, atoms, energy, forces, aux):
        n = len(atoms)
        q = np.asarray(aux["charges"][:n], dtype=float)
        energy = float(energy) + self.energy_offset(atoms)
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": np.asarray(forces[:n], dtype=float),
            "charges": q,
            "dipole": q @ atoms.positions,
            "qeq_residual": float(aux["residual"]),
            "qeq_iterations": int(aux["iterations"]),
            "qeq_converged": bool(aux["converged"]),
        }

    def energy_offset(self, atoms) -> float:
        """The model file's per-element energy offsets summed over ``atoms`` (eV; 0 without)."""
        return sum(self._offsets.get(s, 0.0) for s in atoms.get_chemical_symbols())

    def _calculate_periodic(self, atoms, properties):
        if self.parameters.solver == "learned":
            raise QEqInputError("the learned solver does not support periodic cells yet: set atoms.pbc = False")
        system = self.system(atoms)
        pbc = system.pbc
        cell = np.asarray(atoms.cell[:], dtype=float)
        species = np.asarray(system.species)
        total = float(np.sum(np.asarray(system.fragment_charges)))
        singular = abs(np.linalg.det(cell)) < 1e-9 * max(1.0, np.abs(cell).max()) ** 3
        if "stress" in properties and singular:
            raise QEqInputError(
                f"stress needs a non-singular cell (volume > 0), got cell {cell.tolist()}: give every "
                "non-periodic direction a cell vector too"
            )
        # the stress costs a strain derivative: computed once asked for, and from then on (a cell
        # filter asks for forces and stress of every step: one evaluation gives both)
        first_stress = not self._stress_asked and "stress" in properties
        self._stress_asked = self._stress_asked or "stress" in properties
        wants_stress = self._stress_asked and not singular
        key = (len(atoms), pbc, tuple(sorted(set(species.tolist()))), round(total, 12))
        # the first stress (a cell filter, NPT) rebuilds the kept neighbours for the cells around this one
        reuse = (self._neighbors is not None and self._neighbors_key == key and not first_stress
                 and qeq_unroll.neighbors.serves(self._neighbors, self._neighbors_cell, self._neighbors_strain, cell))  # fmt: skip

        def attempt(multiplier):  # the kept neighbours first; after an overflow a larger list
            nonlocal reuse
            built = not reuse
            if built:  # translations and k-vectors padded to buckets, never shrinking: a new cell, same shapes
                previous = self._neighbors if self._neighbors_key == key and not first_stress else None
                strain = CELL_STRAIN_SKIN if wants_stress else 0.0
                self._neighbors = qeq_unroll.neighbors.stackable(self._energy.neighbors(
                    system, self.qeq_params, skin=self.parameters.skin, layout=self.parameters.neighbor_layout,
                    limits=self.limits, capacity_multiplier=multiplier, strain=strain,
                ), like=previous, headroom=CELL_CHANGE_HEADROOM if previous is not None else 1.0)
                self._neighbors_key, self._neighbors_cell, self._neighbors_strain = key, cell.copy(), strain
            # a list just built is current, and image lists never change with the positions
            listed = isinstance(self._neighbors.pairs, qeq_unroll.NeighborList)
            update = listed and not built and not self._within_half_skin(atoms.positions)
            reuse = False
            out = self._evaluate_periodic(self.qeq_params, system, self._neighbors, stress=wants_stress, update=update)
            if built or update:
                self._updated_at = atoms.positions.copy()
            return out, out[-1].error

        try:
            (energy, forces, stress, aux, neighbors), _ = qeq_unroll.neighbors.until_it_fits(attempt)
        except QEqNeighborError as exc:
            self._neighbors = None
            raise QEqNeighborError(f"the neighbour list kept overflowing after reallocation: {exc}", exc.error) from None
        self._neighbors = neighbors
        self._check(atoms, system, aux, neighbors)
        self._store(atoms, energy, forces, aux)
        if wants_stress:
            s = np.asarray(stress, dtype=float)
            self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])

    def _conditions(self, atoms):
        """Charge constraints and field as ``make_system`` keywords. Fragments: the ``fragments``
        parameter or ``atoms.arrays["fragments"]`` (labels 0..F-1 per atom), with charges from the
        ``fragment_charges`` parameter or, by default, the initial charges summed per fragment.
        Without fragments: one total charge (``total_charge``, default ``info["total_charge"]``,
        else ``info["charge"]``, else the initial charges' sum, as the data reader takes it)."""
        p = self.parameters
        out = {"field": None if p.field is None else np.asarray(p.field, dtype=float)}
        labels = p.fragments if p.fragments is not None else atoms.arrays.get("fragments")
        if labels is None:
            if p.fragment_charges is not None:
                raise QEqInputError("fragment_charges given without fragments (a label per atom)")
            total = p.total_charge
            out["total_charge"] = total_charge(atoms) if total is None else total
            return out
        labels = np.asarray(labels)
        if labels.shape != (len(atoms),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise QEqInputError(f"fragments must be one integer label >= 0 per atom ({len(atoms)}), got shape {labels.shape}")
        n_frag = int(labels.max()) + 1
        if p.fragment_charges is None:
            charges = np.bincount(labels, weights=atoms.get_initial_charges(), minlength=n_frag)
        else:
            charges = np.asarray(p.fragment_charges, dtype=float).reshape(-1)
            if charges.shape != (n_frag,):
                raise QEqInputError(f"fragment_charges needs one charge per fragment label 0..{n_frag - 1}, got {charges.shape[0]}")
        if p.total_charge is not None and abs(charges.sum() - p.total_charge) > 1e-10:
            raise QEqInputError(f"total_charge {p.total_charge} disagrees with the fragment charges (sum {charges.sum():g})")
        out.update(fragments=labels, fragment_charges=charges)
        return out

    def _within_half_skin(self, positions) -> bool:
        """Whether no atom moved half a skin since the neighbours were last built or updated: the
        list still holds every pair within the cutoff, and its update (a search over the cells,
        about a quarter of an evaluation at 4096 atoms) can be skipped."""
        last = self._updated_at
        if last is None or last.shape != positions.shape:
            return False
        return float(np.max(np.linalg.norm(positions - last, axis=1))) < 0.5 * self.parameters.skin

    def _check(self, atoms, system, aux, neighbors=None):
        """Turn the evaluation's diagnostics into clear errors and warnings: atoms too close,
        a hardness matrix that is not positive definite, charges out of range, no convergence."""
        symbols = atoms.get_chemical_symbols()
        closest = lambda: self._closest_pairs(system, neighbors)  # noqa: E731
        checks.check_distances(float(aux["min_distance"]), closest, symbols, self.limits)
        self._energy.terms.check(aux["terms"])
        charges = np.asarray(aux["charges"][: len(atoms)], dtype=float)
        if not bool(aux["positive_definite"]) or not np.all(np.isfinite(charges)):
            raise QEqConvergenceError(
                f"the hardness matrix of kernel '{self.kernel.name}' is not positive definite at this geometry "
                f"(the charges would run away): the Coulomb coupling of close atoms outweighs their hardness "
                f"(closest: {checks.describe_pairs(closest(), symbols)}){self._advice(system)}"
            )
        try:
            checks.check_charges(charges, system.fragment_charges, symbols, self.limits)
        except QEqRangeError as error:
            raise QEqRangeError(f"{error}{self._advice(system)}") from None
        if not bool(aux["converged"]):
            solver = self.solver
            detail = (
                f"solver '{solver.name}' reached a relative residual of {float(aux['residual']):.3g} "
                f"after {int(aux['iterations'])} iterations (tol {solver.tol:g})"
            )
            if self.gradient.name == "implicit":
                auto = " (gradient='auto' is implicit when iterating to tol)" if self.parameters.gradient == "auto" else ""
                raise QEqConvergenceError(
                    f"implicit gradients{auto} need a converged solve, but {detail}: the implicit forces would "
                    "not be the derivative of the reported energy. Raise max_iterations or tol, or use "
                    "gradient='unrolled' (exact forces of the unconverged energy) or a fixed number of iterations"
                )
            if getattr(solver, "iterations", None) is None:
                warnings.warn(f"charge solve did not converge: {detail}", QEqConvergenceWarning, stacklevel=3)

    def _closest_pairs(self, system, neighbors):
        """The closest pairs of ``system`` over the pairs the energy saw (host)."""
        pairs = None if neighbors is None else neighbors.pairs
        if isinstance(pairs, qeq_unroll.NeighborList):
            return checks.closest_pairs(system.positions, system.cell, system.pbc, pairs.shifts, pairs.partner)
        if isinstance(pairs, qeq_unroll.ImageList):
            x = wrap(system.positions, system.cell, system.pbc)
            return checks.closest_pairs(x, system.cell, system.pbc, pairs.shifts)
        return checks.closest_pairs(system.positions, mask=system.mask)

    def _advice(self, system):
        """What to change when the model breaks down, for this kernel and the elements present."""
        species = sorted(set(np.asarray(system.species)[np.asarray(system.mask)].tolist()))
        params = self.qeq_params

        def values(key):
            return ", ".join(f"{params.elements[s]} {float(getattr(params, key)[s]):.4g}" for s in species)

        hardness = f"larger hardness J (now {values('hardness')} eV)"
        if self.kernel.name == "reaxff":
            return (
                f". Use a smaller reaxff gamma (now {values('gamma')} /Å; the coupling of two atoms at contact is "
                f"k_e √(γ_i γ_j), so a smaller γ shields more), {hardness}, or the gaussian kernel"
            )
        if self.kernel.name == "point":
            return f". Bare 1/r has no shielding: use a shielded kernel (gaussian, reaxff, slater) or {hardness}"
        if self.kernel.name == "slater":
            return f". Use a larger Slater radius (now {values('radius')} Å; a more diffuse density shields more) or {hardness}"
        return f". Use {hardness}"
