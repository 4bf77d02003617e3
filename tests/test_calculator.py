"""The ASE calculator: one compiled function per size bucket, ASE drivers, results and bad input."""

import warnings

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

import qeq_unroll as qu
from calculators import QEqCalculator
from qeq_unroll.errors import QEqConvergenceError, QEqInputError


def nacl_block(nx=2, ny=2, nz=2, a=2.9):
    pos, sym = [], []
    for i in range(nx):
        for j in range(ny):
            for k in range(nz):
                pos.append((i * a, j * a, k * a))
                sym.append("Na" if (i + j + k) % 2 == 0 else "Cl")
    return Atoms(sym, pos)


@pytest.fixture(scope="module")
def calc():
    return QEqCalculator(params="demo-nacl-water", solver="cg", iterations=3)


def test_results_match_core(calc):
    atoms = nacl_block()
    atoms.positions += np.random.default_rng(0).normal(0, 0.05, atoms.positions.shape)
    atoms.calc = calc
    e = atoms.get_potential_energy()
    params = qu.load_params("demo-nacl-water")
    system = qu.make_system(atoms.positions, params.species_indices(atoms.get_chemical_symbols()))
    e_ref, f_ref, aux = qu.energy_and_forces(qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled"))(params, system)
    assert abs(e - float(e_ref)) < 1e-10
    np.testing.assert_allclose(atoms.get_forces(), f_ref, atol=1e-10)
    np.testing.assert_allclose(atoms.get_charges(), aux["charges"], atol=1e-12)
    np.testing.assert_allclose(atoms.get_dipole_moment(), np.asarray(aux["charges"]) @ atoms.positions, atol=1e-12)
    assert calc.results["free_energy"] == e
    assert calc.results["qeq_iterations"] == 3 and calc.results["qeq_residual"] > 0


def test_auto_gradient_is_implicit_to_a_tolerance_and_unrolled_at_fixed_k(calc):
    """The default: implicit where the solver iterates to ``tol`` (one more solve, no tape), unrolled
    for a fixed K (``test_results_match_core`` checks those forces against the unrolled core)."""
    assert calc.gradient.name == "unrolled"
    assert QEqCalculator(params="demo-nacl-water").gradient.name == "implicit"
    assert qu.qeq_energy("gaussian", qu.CG()).gradient.name == "implicit"
    assert qu.qeq_energy("gaussian", qu.Exact()).gradient.name == "unrolled"


def test_moving_atoms_does_not_recompile(calc):
    atoms = nacl_block()
    atoms.calc = calc
    atoms.get_forces()
    before = calc._evaluate._cache_size()
    for step in range(3):
        atoms.positions[0, 0] += 0.01
        atoms.get_forces()
    assert calc._evaluate._cache_size() == before
    # 8 and 6 atoms share the smallest bucket: no recompilation either
    small = nacl_block(3, 2, 1)
    small.calc = calc
    small.get_potential_energy()
    assert calc._evaluate._cache_size() == before
    # a larger structure compiles once for its bucket, then reuses it
    big = nacl_block(3, 3, 2)
    big.calc = calc
    big.get_potential_energy()
    assert calc._evaluate._cache_size() == before + 1
    assert qu.size_bucket(18) == qu.size_bucket(20) == 32
    bigger = nacl_block(5, 2, 2)
    bigger.calc = calc
    bigger.get_potential_energy()
    assert calc._evaluate._cache_size() == before + 1


def test_total_charge_from_initial_charges():
    atoms = nacl_block()
    atoms.set_initial_charges([1.0] + [0.0] * 7)
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="exact")
    assert abs(atoms.get_charges().sum() - 1.0) < 1e-12
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="exact", total_charge=-2.0)
    assert abs(atoms.get_charges().sum() + 2.0) < 1e-12
    atoms.info["total_charge"] = 3.0  # as the data reader reads it, before the initial charges
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="exact")
    assert abs(atoms.get_charges().sum() - 3.0) < 1e-12


@pytest.mark.parametrize("optimizer", [BFGS, FIRE])
def test_optimizers_relax(optimizer, calc):
    atoms = nacl_block()
    atoms.positions += np.random.default_rng(1).normal(0, 0.1, atoms.positions.shape)
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="cg")
    e0 = atoms.get_potential_energy()
    opt = optimizer(atoms, logfile=None)
    assert opt.run(fmax=0.01, steps=500)
    assert atoms.get_potential_energy() < e0
    assert np.abs(atoms.get_forces()).max() < 0.01


@pytest.mark.parametrize("dynamics", ["verlet", "langevin"])
def test_md_drivers_run(dynamics, calc):
    atoms = nacl_block()
    atoms.calc = calc
    if dynamics == "verlet":
        md = VelocityVerlet(atoms, timestep=1.0 * 0.09822694750253)  # 1 fs in ASE units
    else:
        md = Langevin(atoms, timestep=0.0982269475, temperature_K=300, friction=0.02, fixcm=False, rng=np.random.default_rng(0))
    e0 = atoms.get_total_energy()
    md.run(20)
    assert np.isfinite(atoms.get_total_energy())
    if dynamics == "verlet":
        assert abs(atoms.get_total_energy() - e0) < 1e-3


# --- bad input -------------------------------------------------------------------------------


def test_unknown_element_names_element_and_set():
    atoms = Atoms("NaU", positions=[[0, 0, 0], [0, 0, 2.5]])
    atoms.calc = QEqCalculator(params="demo-nacl-water")
    with pytest.raises(QEqInputError, match=r"U .*demo-nacl-water"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("key,kernel", [("hardness", "gaussian"), ("sigma", "gaussian"), ("gamma", "reaxff")])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_non_physical_parameters(key, kernel, value):
    data = qu.load_params("demo-nacl-water").to_dict()
    data["elements"]["Cl"][key] = value
    with pytest.raises(QEqInputError, match=f"'{key}' of element Cl.*must be positive"):
        QEqCalculator(params=data, kernel=kernel)


def test_missing_kernel_parameter_names_it():
    data = qu.load_params("demo-nacl-water").to_dict()
    del data["elements"]["Na"]["sigma"]
    atoms = nacl_block()
    atoms.calc = QEqCalculator(params=data, kernel="gaussian")
    with pytest.raises(QEqInputError, match="'sigma' of element Na is missing"):
        atoms.get_potential_energy()
    atoms.calc = QEqCalculator(params=data, kernel="reaxff")  # reaxff does not need sigma
    assert np.isfinite(atoms.get_potential_energy())


def test_atoms_on_top_of_each_other():
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 1e-7]])
    atoms.calc = QEqCalculator(params="demo-nacl-water", kernel="point", solver="exact")
    with pytest.raises(QEqInputError, match="on top of each other"):
        atoms.get_potential_energy()


def test_non_finite_positions():
    atoms = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, np.nan]])
    atoms.calc = QEqCalculator(params="demo-nacl-water")
    with pytest.raises(QEqInputError, match="non-finite positions"):
        atoms.get_potential_energy()


@pytest.mark.parametrize(
    "option,valid", [("kernel", "gaussian, reaxff, point"), ("solver", "exact, cg, gd, nag"), ("gradient", "unrolled, implicit, envelope")]
)
def test_unknown_names_list_valid_ones(option, valid):
    with pytest.raises(QEqInputError, match=f"unknown {option}.*{valid}"):
        QEqCalculator(**{option: "bogus"})


def test_implicit_refuses_unconverged_solve():
    atoms = nacl_block(3, 3, 2)
    atoms.positions += np.random.default_rng(3).normal(0, 0.1, atoms.positions.shape)
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="cg", iterations=2, gradient="implicit")
    with pytest.raises(QEqConvergenceError, match="implicit gradients need a converged solve"):
        atoms.get_forces()


def test_tolerance_not_reached_warns_or_is_an_error_for_implicit_forces():
    """Unrolled: the forces are exact for the unconverged energy, a warning says it did not
    converge. The default (auto: implicit to a tolerance) cannot give exact forces: an error."""
    atoms = nacl_block(3, 3, 2)
    atoms.positions += np.random.default_rng(3).normal(0, 0.1, atoms.positions.shape)
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="gd", tol=1e-14, max_iterations=2, gradient="unrolled")
    with pytest.warns(qu.QEqConvergenceWarning, match="did not converge"):
        atoms.get_potential_energy()
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="gd", tol=1e-14, max_iterations=2)
    with pytest.raises(QEqConvergenceError, match="gradient='auto' is implicit when iterating to tol"):
        atoms.get_potential_energy()


def test_indefinite_hardness_is_an_error():
    data = qu.load_params("demo-nacl-water").to_dict()
    for el in data["elements"].values():
        el["hardness"] = 0.5
    atoms = nacl_block(a=1.2)
    atoms.calc = QEqCalculator(params=data, kernel="point", solver="exact")
    with pytest.raises(QEqConvergenceError, match="not positive definite"):
        atoms.get_potential_energy()


def test_float64_needs_x64_and_says_how():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(QEqInputError, match="jax_enable_x64"):
            QEqCalculator()
        calc = QEqCalculator(dtype="float32")
        atoms = molecule("H2O")
        atoms.calc = calc
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.isfinite(atoms.get_potential_energy())
    finally:
        jax.config.update("jax_enable_x64", True)


def test_float32_defaults_to_a_tolerance_it_can_reach():
    """dtype='float32' alone iterates to its own default tol (1e-5), converges without a warning
    and agrees with float64; a tol below float32's resolution is refused up front."""
    atoms = nacl_block(3, 3, 2)
    atoms.positions += np.random.default_rng(3).normal(0, 0.1, atoms.positions.shape)
    energies = {}
    for dtype in ("float32", "float64"):
        atoms.calc = QEqCalculator(params="demo-nacl-water", dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", qu.QEqConvergenceWarning)
            energies[dtype] = atoms.get_potential_energy()
    assert abs(energies["float32"] - energies["float64"]) < 1e-5 * abs(energies["float64"])
    with pytest.raises(QEqInputError, match="tol 1e-10 cannot be reached in float32"):
        QEqCalculator(dtype="float32", tol=1e-10)
    QEqCalculator(dtype="float32", tol=1e-10, iterations=3)  # a fixed K: tol only stops it early


def short_range_warnings(calc, *structures):
    """The ``QEqShortRangeWarning``s of ``calc`` computing the energy of each of ``structures``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for atoms in structures:
            atoms.calc = calc
            atoms.get_potential_energy()
    return [w for w in caught if issubclass(w.category, qu.QEqShortRangeWarning)]


def test_a_set_without_short_range_terms_warns_once_at_construction():
    with pytest.warns(qu.QEqShortRangeWarning, match="electrostatics alone.*collapse.*qeq-unroll fit.*pairs") as record:
        calc = QEqCalculator(params="rappe-goddard-1991", solver="cg", iterations=3)
    assert len([w for w in record if issubclass(w.category, qu.QEqShortRangeWarning)]) == 1
    assert "'rappe-goddard-1991' has no short-range terms" in str(record[0].message)
    assert not short_range_warnings(calc, molecule("H2O"), nacl_block())  # said once: not again per structure


def test_pair_terms_between_the_elements_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", qu.QEqShortRangeWarning)
        calc = QEqCalculator(params="demo-nacl-water", solver="cg", iterations=3)
    assert not short_range_warnings(calc, nacl_block())


def test_a_structure_without_pair_terms_among_its_elements_warns_once():
    """A set with pair terms, none of them among the structure's elements: the first calculation
    of such a structure warns (also ``system``, the path of ``qeq-unroll md``), later ones do not."""
    data = qu.load_params("demo-nacl-water").to_dict()
    data["pairs"] = {"Cl-Na": data["pairs"]["Cl-Na"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", qu.QEqShortRangeWarning)
        calc = QEqCalculator(params=data, solver="cg", iterations=3)
    assert not short_range_warnings(calc, nacl_block())
    water, moved = molecule("H2O"), molecule("H2O")
    moved.positions[0] += 0.05
    caught = short_range_warnings(calc, water, moved)
    assert len(caught) == 1
    assert "no short-range terms among H, O (its pair terms: Cl-Na)" in str(caught[0].message)
    with pytest.warns(qu.QEqShortRangeWarning, match="among H, O"):
        QEqCalculator(params=data).system(molecule("H2O"), pad=False)


def test_a_short_range_network_gives_no_warning(tmp_path):
    """A model file (``neural``) of a set without pair terms: its short-range network is the
    short-range energy."""
    from qeq_unroll.neural import neural_terms, save_model

    params = qu.load_params("rappe-goddard-1991").restricted(["Na", "Cl"])
    terms = neural_terms(len(params.elements), max_neighbors=8)
    networks = terms.init_networks(jax.random.PRNGKey(0), len(params.elements))
    save_model(tmp_path / "model.json", terms, params.replace(networks=networks), qu.Gaussian(), qu.COULOMB_CONSTANT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", qu.QEqShortRangeWarning)
        QEqCalculator(params=str(tmp_path / "model.json")).system(nacl_block(), pad=False)


def test_stress_is_computed_once_asked_for():
    """Forces alone skip the strain derivative; once the stress was asked for (a cell filter asks
    at every step) each evaluation gives it, equal to a fresh calculator's."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.calc = QEqCalculator(params="demo-nacl-water")
    forces = atoms.get_forces()
    assert "stress" not in atoms.calc.results
    fresh = atoms.copy()
    fresh.calc = QEqCalculator(params="demo-nacl-water")
    np.testing.assert_allclose(atoms.get_stress(), fresh.get_stress(), atol=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-12)
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert "stress" in atoms.calc.results


def test_neighbour_update_skipped_only_within_half_a_skin():
    """A periodic neighbour list (skin 0.3 Å) is not searched again while no atom moved 0.15 Å
    since the last search, and is when one did: both give a fresh calculator's energy and forces."""
    from ase.build import bulk

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(3)
    atoms.rattle(0.05, seed=4)
    params = {"name": "shielded", "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.6},
                                               "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}},
              "pairs": {"Cl-Na": {"born_mayer": {"A": 1200.0, "rho": 0.32}}}}  # fmt: skip
    settings = dict(params=params, kernel="reaxff", cutoff=6.0, skin=0.3, neighbor_layout="list",
                    gradient="unrolled", solver="cg", iterations=8)  # fmt: skip
    atoms.calc = QEqCalculator(**settings)
    atoms.get_forces()
    for atom, step in ((0, 0.1), (5, 0.6), (5, 0.6)):  # within half a skin, then beyond it twice
        atoms.positions[atom] += [step, 0.5 * step, 0.0]
        fresh = atoms.copy()
        fresh.calc = QEqCalculator(**settings)
        assert atoms.get_potential_energy() == pytest.approx(fresh.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), fresh.get_forces(), atol=1e-10)
