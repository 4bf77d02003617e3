"""MD on the device (qeq_unroll.md, calculators.device_md): the jax-md form equals the ASE
calculator, energy conservation with unrolled K = 3, charge-history integrators, NVT, bad input."""

import dataclasses
import json

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import simulate, space

import qeq_unroll as qu
from calculators import QEqCalculator
from calculators.device_md import run_md
from calculators.structures import nacl_cluster, rock_salt
from qeq_unroll import md

PARAMS = qu.load_params("demo-nacl-water")
#: Salt parameters whose reaxff hardness matrix is positive definite in rock salt.
SALT = qu.Params.from_dict(
    {
        "name": "salt",
        "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60}, "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}},
        "pairs": {"Cl-Na": {"born_mayer": {"A": 300.0, "rho": 0.32}}},
    }
)


def free_system(atoms):
    return qu.make_system(atoms.positions, PARAMS.species_indices(atoms.get_chemical_symbols()))


def collect(records):
    records = list(records)
    step = np.concatenate([r.step for r in records])
    e_tot = np.concatenate([r.e_pot + r.e_kin for r in records])
    charges = np.concatenate([r.charges for r in records])
    return step, e_tot, charges


@pytest.mark.parametrize(
    "atoms, calc_kw",
    [
        (nacl_cluster(16), dict(params=PARAMS, kernel="gaussian", solver="cg", iterations=3)),
        (rock_salt(1, rattle=0.1, seed=2),
         dict(params=SALT, kernel="reaxff", cutoff=6.0, solver="cg", iterations=3, neighbor_layout="list")),
    ],
    ids=["free-gaussian", "periodic-reaxff-list"],
)
def test_jax_md_form_equals_calculator(atoms, calc_kw):
    """energy_fn(R, neighbor=...) and its jax-md force give the calculator's energy, forces and charges."""
    atoms = atoms.copy()
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.05, atoms.positions.shape)
    calc = QEqCalculator(**calc_kw)
    atoms.calc = calc
    e_ref, f_ref, q_ref = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_charges()
    system = calc.system(atoms, pad=False)
    fn = md.energy_fn(calc.energy_function, calc.qeq_params, system)
    nfn = md.neighbor_fn(calc.energy_function, calc.qeq_params, system, layout=calc.parameters.neighbor_layout)
    nbrs = nfn.allocate(system.positions)
    nbrs = nfn.update(system.positions, nbrs)
    force_fn = jax.jit(lambda r, nb: -jax.grad(fn)(r, neighbor=nb))
    e, aux = fn.with_aux(system.positions, neighbor=nbrs)
    assert abs(float(e) - e_ref) < 1e-10
    np.testing.assert_allclose(np.asarray(force_fn(system.positions, nbrs)), f_ref, atol=1e-10)
    np.testing.assert_allclose(np.asarray(aux["charges"]), q_ref, atol=1e-10)
    # one jax-md velocity-Verlet step with it moves the atoms as its own force says
    init, apply = simulate.nve(fn, space.free()[1], dt=1.0 * md.FS)
    masses = jnp.asarray(atoms.get_masses())
    state = init(jax.random.PRNGKey(0), system.positions, kT=0.0, mass=masses, neighbor=nbrs)
    np.testing.assert_allclose(np.asarray(state.force), f_ref, atol=1e-10)
    moved = apply(state, neighbor=nbrs).position - system.positions
    np.testing.assert_allclose(np.asarray(moved), 0.5 * md.FS**2 * f_ref / atoms.get_masses()[:, None], atol=1e-12)


@pytest.fixture(scope="module")
def cluster():
    atoms = nacl_cluster(16)
    atoms.positions += np.random.default_rng(1).normal(0.0, 0.05, atoms.positions.shape)
    return atoms


def nve(atoms, solver, gradient, charges="geometry", steps=300, dt_fs=2.0):
    settings = md.Settings(steps=steps, dt_fs=dt_fs, temperature_K=800.0, charges=charges, report_every=5, block=20, seed=4)
    energy = qu.qeq_energy("gaussian", solver, gradient)
    return collect(md.run(settings, energy, PARAMS, free_system(atoms), atoms.get_masses()))


@pytest.fixture(scope="module")
def exact_run(cluster):
    return nve(cluster, qu.Exact(), "implicit")


def test_unrolled_k3_conserves_energy_like_exact(cluster, exact_run):
    """jax-md NVE: unrolled CG K = 3 drifts within 1.5× of the exact solve; envelope K = 3 does not."""
    _, e_exact, q_exact = exact_run
    worst = lambda e: np.max(np.abs(e - e[0]))  # noqa: E731
    _, e_k3, q_k3 = nve(cluster, qu.CG(iterations=3), "unrolled")
    _, e_env, _ = nve(cluster, qu.CG(iterations=3), "envelope")
    assert worst(e_exact) > 0
    assert worst(e_k3) <= 1.5 * worst(e_exact), (worst(e_k3), worst(e_exact))
    assert worst(e_env) > 3.0 * worst(e_exact), (worst(e_env), worst(e_exact))
    assert np.max(np.abs(q_k3.sum(axis=1))) < 1e-12  # charge sum holds on every step


def test_extended_lagrangian_charges_follow_the_exact_ones(cluster, exact_run):
    """XL with CG K = 1: charges within 3e-3 e of the exact ones all along the same trajectory
    start, total charge exact, and energy conserved within 3× of the exact solve."""
    step, e_exact, q_exact = exact_run
    step_xl, e_xl, q_xl = nve(cluster, qu.CG(iterations=1), "unrolled", charges="xl")
    np.testing.assert_array_equal(step, step_xl)
    early = step <= 60  # before the trajectories separate chaotically
    assert np.max(np.abs(q_xl[early] - q_exact[early])) < 3e-3
    assert np.max(np.abs(q_xl.sum(axis=1))) < 1e-12
    worst = lambda e: np.max(np.abs(e - e[0]))  # noqa: E731
    assert worst(e_xl) < 3.0 * worst(e_exact), (worst(e_xl), worst(e_exact))


def test_forces_at_a_fixed_guess_are_the_derivative_of_the_energy(cluster):
    """With a guess (MD history), forces = −∂E/∂R at that fixed guess: central differences."""
    system = free_system(cluster)
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=2), "unrolled")
    fn = md.energy_fn(energy, PARAMS, system)
    guess = jnp.asarray(np.random.default_rng(3).normal(0.0, 0.3, len(cluster)))
    e_of = jax.jit(lambda r: fn(r, guess=guess))
    force = -np.asarray(jax.grad(lambda r: fn(r, guess=guess))(system.positions))
    h = 1e-5
    for i, k in [(0, 0), (5, 2), (11, 1)]:
        d = np.zeros(system.positions.shape)
        d[i, k] = h
        fd = -(float(e_of(system.positions + d)) - float(e_of(system.positions - d))) / (2 * h)
        assert abs(fd - force[i, k]) < 1e-7
    q = fn.with_aux(system.positions, guess=guess)[1]["charges"]
    q0 = fn.with_aux(system.positions)[1]["charges"]
    assert abs(float(q.sum())) < 1e-12 and np.max(np.abs(np.asarray(q - q0))) > 1e-3  # the guess matters at K = 2


def test_langevin_at_zero_kelvin_drains_the_kinetic_energy(cluster):
    settings = md.Settings(steps=200, dt_fs=1.0, ensemble="langevin", temperature_K=0.0, friction=0.05,
                           report_every=10, block=10)
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled")
    momenta = md.maxwell_boltzmann(jax.random.PRNGKey(0), cluster.get_masses(), 600.0)
    records = list(md.run(settings, energy, PARAMS, free_system(cluster), cluster.get_masses(), momenta=momenta))
    ke = np.concatenate([r.e_kin for r in records])
    assert ke[-1] < 0.01 * ke[0]


def test_cli_style_run_writes_frames_and_report(cluster, tmp_path):
    atoms = cluster.copy()
    calc = QEqCalculator(params="demo-nacl-water", kernel="gaussian", solver="cg", iterations=3)
    info = run_md(atoms, calc, md.Settings(steps=100, dt_fs=1.0, temperature_K=300.0, report_every=10, block=5),
                  out=tmp_path / "md.xyz", report=tmp_path / "md.json", progress=False)
    assert info["steps_done"] == 100 and info["n_atoms"] == len(atoms)
    frames = ase.io.read(tmp_path / "md.xyz", index=":")
    assert [f.info["step"] for f in frames] == list(range(0, 101, 10))
    # a frame's energy is the calculator's at its positions, and its charges sum to zero
    atoms.positions = frames[-1].positions
    atoms.calc = calc
    assert abs(atoms.get_potential_energy() - frames[-1].info["e_pot"]) < 1e-6  # extxyz keeps 8 decimals
    assert abs(frames[-1].get_initial_charges().sum()) < 1e-7
    saved = json.loads((tmp_path / "md.json").read_text())
    assert saved["steps_done"] == 100 and np.isfinite(saved["drift_meV_atom_ps"])


def test_too_large_time_step_stops_and_keeps_frames(cluster, tmp_path):
    calc = QEqCalculator(params="demo-nacl-water", kernel="gaussian", solver="cg", iterations=3)
    settings = md.Settings(steps=2000, dt_fs=100.0, temperature_K=600.0, report_every=5, block=4)
    with pytest.raises(md.MDError, match=r"blew up at step \d+ .*time step 100.0 fs may be too large"):
        run_md(cluster, calc, settings, out=tmp_path / "md.xyz", report=tmp_path / "md.json", progress=False)
    frames = ase.io.read(tmp_path / "md.xyz", index=":")
    saved = json.loads((tmp_path / "md.json").read_text())
    assert len(frames) >= 1 and "blew up" in saved["error"]
    assert all(np.isfinite(f.positions).all() for f in frames)


def test_neighbour_overflow_that_cannot_fit_is_an_error():
    atoms = rock_salt(1, rattle=0.1)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=6.0), qu.CG(iterations=3), "unrolled")
    system = qu.make_system(atoms.positions, SALT.species_indices(atoms.get_chemical_symbols()),
                            cell=np.asarray(atoms.cell[:]), pbc=(True, True, True))
    settings = md.Settings(steps=10, capacity_multiplier=0.5, max_capacity_multiplier=0.7)
    with pytest.raises(md.MDError, match="neighbour list overflowed at step 0 and cannot be made to fit: an atom has more neighbours"):
        list(md.run(settings, energy, SALT, system, atoms.get_masses(), layout="list"))


def test_charges_beyond_the_bound_stop_the_run():
    """The charge bound of ``checks.Limits`` holds in MD too: with no margin over the zero total
    charge, the ionic charges of the start are beyond it, and the run names the atom."""
    atoms = rock_salt(1, rattle=0.1)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=6.0), qu.CG(iterations=3), "unrolled")
    system = qu.make_system(atoms.positions, SALT.species_indices(atoms.get_chemical_symbols()),
                            cell=np.asarray(atoms.cell[:]), pbc=(True, True, True))
    settings = md.Settings(steps=10, charge_margin=0.0)
    with pytest.raises(md.MDError, match=r"not fit for MD: the charge of atom \d+ reached [+-]\d\.\d+ e \(bound ±0 e\)"):
        list(md.run(settings, energy, SALT, system, atoms.get_masses()))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(ensemble="npt"), "unknown ensemble 'npt'"),
        (dict(charges="xl", ensemble="langevin"), "charge mode 'xl' runs NVE only"),
        (dict(dt_fs=-1.0), "time step must be a positive number of fs"),
        (dict(charges="old"), "unknown charge mode 'old'"),
    ],
)
def test_bad_settings(kw, message):
    with pytest.raises(qu.QEqInputError, match=message):
        md.Settings(steps=10, **kw)


def test_bad_masses(cluster):
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled")
    masses = cluster.get_masses()
    masses[3] = 0.0
    with pytest.raises(qu.QEqInputError, match="masses must be 16 positive numbers"):
        list(md.run(md.Settings(steps=10), energy, PARAMS, free_system(cluster), masses))


def test_history_state_is_a_pytree():
    fields = [f.name for f in dataclasses.fields(md.HistoryState)]
    leaves = jax.tree_util.tree_leaves(md.HistoryState(*[jnp.zeros(1)] * (len(fields) - 1), aux={"a": jnp.zeros(1)}))
    assert len(leaves) == len(fields)


def test_successive_runs_with_fresh_neighbour_lists():
    """Runs one after another, each with its own jax-md list (whose static metadata JAX compares
    between traces), in the order the energy-conservation study uses."""
    atoms = rock_salt(1, rattle=0.05, seed=1)
    system = qu.make_system(atoms.positions, SALT.species_indices(atoms.get_chemical_symbols()),
                            cell=np.asarray(atoms.cell[:]), pbc=(True, True, True))
    out = []
    for solver, gradient, charges in [(qu.Exact(), "implicit", "geometry"), (qu.CG(tol=1e-6), "envelope", "warm"),
                                      (qu.CG(iterations=2), "envelope", "geometry")]:
        settings = md.Settings(steps=20, dt_fs=2.0, temperature_K=1000.0, charges=charges, report_every=10, block=2)
        energy = qu.qeq_energy(qu.ReaxFF(cutoff=6.0), solver, gradient)
        out.append(collect(md.run(settings, energy, SALT, system, atoms.get_masses(), layout="list"))[1][0])
    assert abs(out[1] - out[0]) < 1e-8  # same start: the warm-started solve at tol 1e-6 is exact to second order
    assert 0 < out[2] - out[0] < 1e-3  # K = 2 charges are not the minimiser: the QEq energy is higher
