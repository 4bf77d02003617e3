"""Periodic cells: all-images sums of the cutoff kernels against an independent NumPy reference
and LAMMPS (``fix qeq/reaxff``, ``fix qeq/point``), image lists against neighbour lists, slabs,
finite-difference forces and stress, and bad input."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import QEqInputError
from qeq_unroll.energy import energy_forces_stress

try:
    from lammps_helpers import import_lammps, lammps_qeq_charges
except ImportError:  # tests/ imported as a package
    from tests.lammps_helpers import import_lammps, lammps_qeq_charges

jax.config.update("jax_enable_x64", True)

KE_LAMMPS = qu.LAMMPS_COULOMB_CONSTANT
TOL_CHARGE = 1e-6  # e
PARAMS = qu.Params.from_dict(
    {
        "name": "periodic-test",
        "elements": {
            "Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60, "sigma": 1.0},
            "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65, "sigma": 1.2},
        },
        "pairs": {"Cl-Na": {"born_mayer": {"A": 300.0, "rho": 0.32}}},
    }
)
TYPE_ELEMENTS = ["Na", "Cl"]


# --- structures (cells in LAMMPS's lower-triangular form) ------------------------------------------


def rock_salt(reps, a=5.64, rattle=0.1, seed=0):
    """Rattled rock-salt NaCl, reps³ conventional cells (8 reps³ atoms)."""
    basis = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]])
    kinds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    grid = np.stack(np.meshgrid(*[np.arange(reps)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid[:, None, :] + basis[None]).reshape(-1, 3) / reps
    cell = np.eye(3) * a * reps
    rng = np.random.default_rng(seed)
    pos = frac @ cell + rng.normal(0.0, rattle, (len(frac), 3))
    return pos, np.tile(kinds, len(grid)), cell


def triclinic(n=4, rattle=0.12, seed=1):
    """n³ alternating Na/Cl sites on a grid of a skewed cell (tilts below half), rattled."""
    cell = np.array([[11.6, 0.0, 0.0], [3.1, 11.0, 0.0], [-2.4, 2.7, 11.3]])
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    pos = (grid / n) @ cell + rng.normal(0.0, rattle, grid.shape)
    return pos, grid.sum(axis=1) % 2, cell


def small_cell():
    """The 8-atom rock-salt cell (5.64 Å), rattled: with a 10 Å cutoff each atom sees ~160 images
    of the cell, several of itself."""
    return rock_salt(1, rattle=0.1, seed=3)


STRUCTURES = {"nacl512": lambda: rock_salt(4), "triclinic64": triclinic, "nacl8": small_cell}


def system_of(pos, kinds, cell, pbc=True, **kw):
    return qu.make_system(pos, kinds, cell=cell, pbc=pbc, **kw)


# --- an independent NumPy reference of periodic cutoff sums ---------------------------------------


def taper(r, rc):
    x = np.minimum(r / rc, 1.0)
    return 20 * x**7 - 70 * x**6 + 84 * x**5 - 35 * x**4 + 1


def reference_hardness(pos, kinds, cell, kernel, rc, ke, pbc=(True, True, True)):
    """Brute force over a generous block of lattice translations."""
    gamma = np.asarray(PARAMS.gamma)[kinds]
    h = np.diag(np.asarray(PARAMS.hardness)[kinds]).astype(float)
    span = [int(np.ceil(rc / (abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]))))) + 2 if pbc[k] else 0 for k in range(3)]
    shifts = np.array(list(itertools.product(*[range(-m, m + 1) for m in span]))) @ cell
    for i in range(len(pos)):
        d = pos[None, :, :] - pos[i] + shifts[:, None, :]
        r = np.linalg.norm(d, axis=-1)
        r[np.all(shifts == 0, axis=1), i] = np.inf
        inside = r < rc
        if kernel == "reaxff":
            k = taper(r, rc) / np.cbrt(r**3 + (gamma[i] * gamma[None, :]) ** -1.5)
        else:  # hard-truncated 1/r (LAMMPS qeq/point)
            k = 1.0 / r
        h[i] += ke * np.sum(np.where(inside, k, 0.0), axis=0)
    return h


def reference_charges(h, chi, total=0.0):
    n = len(chi)
    a = np.zeros((n + 1, n + 1))
    a[:n, :n] = h
    a[:n, n] = a[n, :n] = 1.0
    return np.linalg.solve(a, np.concatenate([-chi, [total]]))[:n]


def our_charges(system, kernel, ke, layout, solver=None):
    energy = qu.qeq_energy(kernel, solver or qu.Exact(), "unrolled", coulomb_constant=ke)
    nbrs = energy.neighbors(system, PARAMS, layout=layout)
    _, aux = jax.jit(energy)(PARAMS, system, nbrs)
    assert not bool(aux["neighbors_overflow"])
    assert bool(aux["positive_definite"])
    return np.asarray(aux["charges"])


@pytest.fixture(scope="module")
def lammps_available():
    lammps, reason = import_lammps()
    if lammps is None:
        pytest.skip(reason)
    return lammps


# --- all-images sums --------------------------------------------------------------------------------


def test_layouts_agree_on_forces_and_stress():
    """Image list and neighbour list: same energy, forces and stress (reaxff, replicated cell)."""
    pos, kinds, cell = triclinic(n=3, rattle=0.15, seed=7)
    system = system_of(pos[:26], kinds[:26], cell)  # heights ~10 Å < 2 (r_c + skin): replicated
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=6.0), qu.CG(iterations=3), "unrolled")
    f = jax.jit(energy_forces_stress(energy))
    out = [f(PARAMS, system, energy.neighbors(system, layout=layout)) for layout in ("images", "list")]
    assert abs(float(out[0][0] - out[1][0])) < 1e-10
    np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-10)
    np.testing.assert_allclose(out[0][2], out[1][2], atol=1e-12)


@pytest.mark.parametrize("name", ["triclinic64", "nacl8"])
@pytest.mark.parametrize("layout", ["images", "list"])
def test_cutoff_kernels_match_numpy_reference(name, layout):
    pos, kinds, cell = STRUCTURES[name]()
    chi = np.asarray(PARAMS.chi)[kinds]
    system = system_of(pos, kinds, cell)
    for kernel, ref_kernel, ke in ((qu.ReaxFF(cutoff=10.0), "reaxff", KE_LAMMPS), (qu.Point(cutoff=9.0, taper=False), "point", 1.0)):
        h = reference_hardness(pos, kinds, cell, ref_kernel, kernel.cutoff, ke)
        q = our_charges(system, kernel, ke, layout)
        np.testing.assert_allclose(q, reference_charges(h, chi), rtol=0, atol=1e-10)


def test_small_cell_has_many_self_images():
    """The test is meaningful: with a 10 Å cutoff in a 5.64 Å cell each atom couples to dozens of
    its own images, and leaving them out changes the charges by far more than the tolerance."""
    pos, kinds, cell = small_cell()
    h = reference_hardness(pos, kinds, cell, "reaxff", 10.0, KE_LAMMPS)
    chi = np.asarray(PARAMS.chi)[kinds]
    lattice = np.array(list(itertools.product(range(-2, 3), repeat=3))) @ cell
    assert np.sum((np.linalg.norm(lattice, axis=1) < 10.0) & (np.linalg.norm(lattice, axis=1) > 0)) >= 18
    q_all = reference_charges(h, chi)
    h_no_self = h - np.diag(np.diag(h)) + np.diag(np.asarray(PARAMS.hardness)[kinds])
    assert np.abs(reference_charges(h_no_self, chi) - q_all).max() > 1e-2


# --- LAMMPS parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_reaxff_matches_lammps_periodic(lammps_available, name):
    """Charges of qeq_unroll's periodic reaxff kernel (k_e = 14.4) equal LAMMPS fix qeq/reaxff."""
    pos, kinds, cell = STRUCTURES[name]()
    ref = lammps_qeq_charges(pos, kinds + 1, TYPE_ELEMENTS, PARAMS, style="reaxff", cutoff=10.0, tol=1e-12, cell=cell)
    assert np.abs(ref).max() > 0.5
    system = system_of(pos, kinds, cell)
    for layout in ("list", "images") if len(pos) <= 64 else ("list",):
        q = our_charges(system, qu.ReaxFF(cutoff=10.0), KE_LAMMPS, layout)
        np.testing.assert_allclose(q, ref, rtol=0, atol=TOL_CHARGE)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_point_matches_lammps_qeq_point_periodic(lammps_available, name):
    """LAMMPS fix qeq/point: H_ij = Σ_images 1/r for r <= cutoff, hard cut, no taper, no Coulomb
    constant: qeq_unroll's Point(cutoff, taper=False) with k_e = 1."""
    pos, kinds, cell = STRUCTURES[name]()
    no_gamma = PARAMS.replace(gamma=jnp.full(2, jnp.nan))
    ref = lammps_qeq_charges(pos, kinds + 1, TYPE_ELEMENTS, no_gamma, style="point", cutoff=9.0, tol=1e-12, cell=cell)
    q = our_charges(system_of(pos, kinds, cell), qu.Point(cutoff=9.0, taper=False), 1.0, "list")
    np.testing.assert_allclose(q, ref, rtol=0, atol=TOL_CHARGE)


def test_slab_and_wire_sum_images_along_periodic_directions_only():
    """pbc (T, T, F) and (T, F, F): images only along periodic cell vectors; the non-periodic
    cell vector is irrelevant (zero here) and image list, neighbour list and reference agree."""
    pos, kinds, cell = triclinic(n=3, seed=5)
    chi = np.asarray(PARAMS.chi)[kinds]
    for pbc in ((True, True, False), (True, False, False)):
        flat = cell.copy()
        for k in range(3):
            if not pbc[k]:
                flat[k] = 0.0
        h = reference_hardness(pos, kinds, cell, "reaxff", 8.0, KE_LAMMPS, pbc=pbc)
        ref = reference_charges(h, chi)
        system = system_of(pos, kinds, flat, pbc=pbc)
        for layout in ("images", "list"):
            q = our_charges(system, qu.ReaxFF(cutoff=8.0), KE_LAMMPS, layout)
            np.testing.assert_allclose(q, ref, rtol=0, atol=1e-10)


def test_free_space_neighbour_list_equals_all_pairs():
    """(Short-range pair terms are left out: the list truncates them at the cutoff.)"""
    pos, kinds, _ = triclinic(n=3, seed=6)
    system = qu.make_system(pos, kinds)
    params = PARAMS.replace(pairs={})
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=6.0), qu.Exact(), "unrolled")
    f = jax.jit(qu.energy_and_forces(energy))
    e0, f0, a0 = f(params, system)
    e1, f1, a1 = f(params, system, energy.neighbors(system, layout="list"))
    assert abs(float(e1 - e0)) < 1e-10
    np.testing.assert_allclose(f1, f0, atol=1e-10)
    np.testing.assert_allclose(a1["charges"], a0["charges"], atol=1e-12)


# --- finite differences: forces and stress ------------------------------------------------------------


def strained(system, eps):
    pos, cell = system.positions @ (jnp.eye(3) + eps), system.cell @ (jnp.eye(3) + eps)
    return dataclasses.replace(system, positions=pos, cell=cell)


def fd_stress(energy, params, system, nbrs, h=1e-5):
    """Central differences of the reported energy under symmetric strains (eV/Å³)."""
    e_of = jax.jit(lambda s: energy(params, s, nbrs)[0])
    vol = abs(np.linalg.det(np.asarray(system.cell)))
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(a, 3):
            eps = np.zeros((3, 3))
            eps[a, b] += h / 2
            eps[b, a] += h / 2
            de = e_of(strained(system, eps)) - e_of(strained(system, -eps))
            out[a, b] = out[b, a] = float(de) / (2 * h) / vol
    return out


def fd_forces(energy, params, system, nbrs, atoms, h=1e-5):
    e_of = jax.jit(lambda p: energy(params, dataclasses.replace(system, positions=p), nbrs)[0])
    pos = system.positions
    return {
        (i, d): -float(e_of(pos.at[i, d].add(h)) - e_of(pos.at[i, d].add(-h))) / (2 * h) for i in atoms for d in range(3)
    }


CUTOFF_KERNELS = {"reaxff": qu.ReaxFF(cutoff=7.0), "point": qu.Point(cutoff=7.0)}
MODES = [(qu.CG(iterations=3), "unrolled"), (qu.CG(tol=1e-13), "implicit")]


def check_fd(kernel, solver, gradient, system, layout, params=PARAMS, atoms=(0, 3, 5)):
    energy = qu.qeq_energy(kernel, solver, gradient)
    nbrs = energy.neighbors(system, params, layout=layout)
    e, forces, stress, aux = jax.jit(energy_forces_stress(energy))(params, system, nbrs)
    assert not bool(aux["neighbors_overflow"])
    assert bool(aux["positive_definite"])
    assert gradient != "implicit" or bool(aux["converged"])
    fd = fd_stress(energy, params, system, nbrs)
    scale = np.abs(fd).max()
    assert scale > 1e-4  # a real stress, not a trivial zero
    stress_err = np.abs(np.asarray(stress) - fd).max() / scale
    fd_f = fd_forces(energy, params, system, nbrs, atoms)
    force_err = max(abs(v - float(forces[i, d])) for (i, d), v in fd_f.items())
    return stress_err, force_err


@pytest.mark.parametrize("kernel", list(CUTOFF_KERNELS))
@pytest.mark.parametrize("solver,gradient", MODES, ids=["unrolled-K3", "implicit"])
def test_fd_forces_and_stress_cutoff_kernels(kernel, solver, gradient):
    pos, kinds, cell = triclinic(n=3, rattle=0.15, seed=7)  # 27 atoms: odd, so not neutral...
    pos, kinds = pos[:26], kinds[:26]  # ...until one is dropped (13 Na, 13 Cl)
    assert kinds.sum() == 13
    system = system_of(pos, kinds, cell)  # heights ~10 Å < 2 r_c: images of the cell count
    layout = "images" if gradient == "unrolled" else "list"  # (the layouts agree: see above)
    stress_err, force_err = check_fd(CUTOFF_KERNELS[kernel], solver, gradient, system, layout)
    assert stress_err < 1e-6
    assert force_err < 1e-7


# --- the ASE calculator ------------------------------------------------------------------------------


def ase_atoms(pos, kinds, cell, pbc=True):
    from ase import Atoms

    return Atoms([TYPE_ELEMENTS[k] for k in kinds], positions=pos, cell=cell, pbc=pbc)


def test_calculator_periodic_matches_core_and_reuses_neighbours():
    from calculators import QEqCalculator

    pos, kinds, cell = rock_salt(2, rattle=0.08, seed=11)  # 64 atoms, 11.3 Å: images of the cell count
    atoms = ase_atoms(pos, kinds, cell)
    calc = QEqCalculator(params=PARAMS, kernel="reaxff", cutoff=7.0, solver="cg", iterations=3)
    atoms.calc = calc
    e = atoms.get_potential_energy()
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=7.0), qu.CG(iterations=3), "unrolled")
    system = system_of(pos, kinds, cell)
    e_ref, f_ref, s_ref, aux = energy_forces_stress(energy)(PARAMS, system, energy.neighbors(system, PARAMS, layout="images"))
    assert abs(e - float(e_ref)) < 1e-9
    np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=1e-9)
    np.testing.assert_allclose(atoms.get_charges(), aux["charges"], atol=1e-11)
    s = np.asarray(s_ref)
    np.testing.assert_allclose(atoms.get_stress(), [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]], atol=1e-10)
    # ASE's own finite-difference stress of the calculator agrees
    from ase.calculators.fd import calculate_numerical_stress

    np.testing.assert_allclose(calculate_numerical_stress(atoms, eps=1e-5), atoms.get_stress(), atol=1e-7)


@pytest.mark.parametrize(
    "cell, pbc, kwargs, message",
    [
        (np.diag([11.0, 11.0, 0.0]), True, {}, r"cell vector c is zero but direction c is periodic"),
        (np.array([[11.0, 0, 0], [0, 11.0, 0], [11.0, 11.0, 0.0]]), True, {}, r"singular cell"),
        (np.eye(3) * 11.0, True, dict(kernel="point", cutoff=None), r"kernel 'point' in a periodic cell needs a cutoff"),
        (np.eye(3) * 11.0, True, dict(kernel="gaussian", cutoff=4.0), r"Ewald accuracy 1e-08 cannot be reached with a real-space cutoff of 4.0"),
        (np.eye(3) * 11.0, True, dict(kernel="reaxff", total_charge=1.0), r"charged periodic cell \(total charge 1 e\) with kernel 'reaxff'"),
        (np.zeros((3, 3)), False, dict(kernel="gaussian", cutoff=6.0), r"free-space system sums all pairs and cannot honour it"),
    ],
)
def test_calculator_bad_periodic_input(cell, pbc, kwargs, message):
    from calculators import QEqCalculator

    pos, kinds, _ = rock_salt(2, a=5.5, rattle=0.0)
    atoms = ase_atoms(pos, kinds, cell, pbc)
    atoms.calc = QEqCalculator(params=PARAMS, **{"kernel": "reaxff", "cutoff": 7.0, **kwargs})
    with pytest.raises(QEqInputError, match=message):
        atoms.get_potential_energy()


def test_calculator_slab_without_c_vector_has_no_stress():
    from calculators import QEqCalculator

    pos, kinds, cell = rock_salt(2, rattle=0.05, seed=2)
    flat = cell.copy()
    flat[2] = 0.0
    atoms = ase_atoms(pos, kinds, flat, pbc=(True, True, False))
    atoms.calc = QEqCalculator(params=PARAMS, kernel="reaxff", cutoff=7.0, solver="exact", gradient="implicit")
    assert np.isfinite(atoms.get_potential_energy())
    with pytest.raises(QEqInputError, match=r"stress needs a non-singular cell"):
        atoms.get_stress()


def test_cell_relaxation_example_converges(tmp_path):
    """examples/relax_cell.py: atoms and cell of rock salt with ASE's FrechetCellFilter (8 atoms)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "relax_cell.py"
    spec = importlib.util.spec_from_file_location("relax_cell", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "relax.traj"), "--reps", "1", "--fmax", "0.02"])


def test_calculator_keeps_images_and_kvectors_within_the_strain_skin(monkeypatch, caplog):
    """Once the stress is asked for, cells within ``CELL_STRAIN_SKIN`` of the one the image list
    and Ewald plan were built for reuse them (no host rebuild). A cell beyond it rebuilds them with
    room for larger cells, so the next rebuild keeps the shapes and the step does not compile
    again. Energy, forces and stress equal a fresh calculator's at each cell, and the stress of a
    reused plan is the strain derivative of the reported energy."""
    from ase.calculators.fd import calculate_numerical_stress

    from calculators import QEqCalculator
    from calculators.qeq import CELL_STRAIN_SKIN

    builds = []
    build = qu.energy.build
    monkeypatch.setattr(qu.energy, "build", lambda *a, **k: builds.append(k.get("strain")) or build(*a, **k))
    pos, kinds, cell = rock_salt(1, rattle=0.1, seed=4)
    atoms = ase_atoms(pos, kinds, cell)
    atoms.calc = QEqCalculator(params=PARAMS, gradient="implicit")
    atoms.get_stress()
    assert builds == [CELL_STRAIN_SKIN]
    scales, results, rebuilt, compiled = (1.0 + 0.9 * CELL_STRAIN_SKIN, 0.99, 1.08, 1.14), [], [], []
    with caplog.at_level("WARNING"), jax.log_compiles():
        for scale in scales:
            before, logged = len(builds), len(caplog.records)
            atoms.set_cell(cell * scale, scale_atoms=True)
            results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
            rebuilt.append(len(builds) > before)
            compiled.append(sum("compilation of jit(periodic_step)" in r.getMessage() for r in caplog.records[logged:]))
    assert rebuilt == [False, False, True, True]
    assert compiled[:2] == [0, 0] and compiled[3] == 0, compiled
    for scale, (e, f, stress) in zip(scales, results):
        fresh = atoms.copy()
        fresh.set_cell(cell * scale, scale_atoms=True)
        fresh.calc = QEqCalculator(params=PARAMS, gradient="implicit")
        assert abs(e - fresh.get_potential_energy()) < 1e-7
        np.testing.assert_allclose(f, fresh.get_forces(), atol=1e-7)
        np.testing.assert_allclose(stress, fresh.get_stress(), atol=1e-8)
    before = len(builds)
    np.testing.assert_allclose(calculate_numerical_stress(atoms, eps=1e-5), atoms.get_stress(), atol=1e-8)
    assert len(builds) == before
