"""Learned solver parts: exact forces, SPD preconditioner, constraints, training, stability, files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll.energy import qeq_problem
from qeq_unroll.errors import QEqInputError
from qeq_unroll.learned import (
    LearnedPreconditioner,
    LearnedSolverParams,
    LearnedStart,
    _apply_m,
    check_compatible,
    coarse_level,
    init_learned,
    learned_solver,
    load_learned,
    save_learned,
    solver_from_file,
)
from qeq_unroll.solver_training import solve_errors, train_solver
from tests.test_core import max_fd_error

PARAMS = qu.load_params("demo-nacl-water")
KERNEL = qu.Gaussian()


def cluster(n, seed, strain=1.0, rattle=0.12):
    """A compact neutral NaCl cluster (Å), rattled."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil((2 * n) ** (1 / 3))) + 2
    idx = np.indices((side,) * 3).reshape(3, -1).T
    idx = idx[np.argsort(np.linalg.norm(idx - (side - 1) / 2, axis=1) + 1e-6 * rng.random(len(idx)))]
    na = [i for i in idx if i.sum() % 2 == 0][: n // 2]
    cl = [i for i in idx if i.sum() % 2 == 1][: n // 2]
    pos = np.asarray(na + cl, float) * 2.85 * strain + rng.normal(0, rattle, (n, 3))
    species = PARAMS.species_indices(["Na"] * (n // 2) + ["Cl"] * (n // 2))
    return qu.make_system(pos, species, pad_to=qu.size_bucket(n))


def random_learned(family, seed=0, scale=0.3):
    """Learned parameters with every part switched on (random, not trained), Cl-centred aggregates."""
    lp = init_learned(family, 4, "gaussian", PARAMS.elements, cutoff=5.0, n_basis=4, coarse_centres=("Cl",))
    keys = jax.random.split(jax.random.PRNGKey(seed), 9)
    return dataclasses.replace(
        lp,
        start=scale * jax.random.normal(keys[0], lp.start.shape),
        precond=scale * jax.random.normal(keys[1], lp.precond.shape),
        precond_diag=scale * jax.random.normal(keys[2], lp.precond_diag.shape),
        transfer=1.0 + scale * jax.random.normal(keys[5], lp.transfer.shape),
        steps=lp.steps + scale * jax.random.normal(keys[3], lp.steps.shape),
        momenta=lp.momenta + scale * jax.random.normal(keys[4], lp.momenta.shape),
        coarse=lp.coarse + scale * jax.random.normal(keys[6], lp.coarse.shape),
        coarse_scale=scale * jax.random.normal(keys[7], ()),
        smoothing=scale * jax.random.normal(keys[8], ()),
    )


@pytest.mark.parametrize("family", ["cg", "gd", "nag"])
def test_learned_forces_are_exact_derivative(family):
    system = cluster(10, seed=1)
    energy = qu.qeq_energy(KERNEL, learned_solver(random_learned(family)), "unrolled")
    err, aux = max_fd_error(energy, PARAMS, system, atoms=range(10))
    assert err < 1e-7
    assert abs(float(jnp.sum(aux["charges"]))) < 1e-12


@pytest.mark.parametrize("centres", [(), ("Cl",)])
def test_preconditioner_is_spd_and_keeps_the_plane(centres):
    lp = dataclasses.replace(random_learned("cg", seed=3, scale=3.0), coarse_centres=centres)  # large entries
    system = cluster(20, seed=2)
    frags = np.r_[np.zeros(10, int), np.ones(10, int)]
    system = qu.make_system(system.positions[:20], system.species[:20], fragments=frags, fragment_charges=[1.0, -1.0])
    problem = qeq_problem(KERNEL, PARAMS, system)
    pre = LearnedPreconditioner(lp)
    setup = pre.setup(problem)
    fine, coarse, sigma = setup[:3]
    assert (coarse is None) == (not centres)
    m = np.asarray(jax.vmap(lambda v: _apply_m(fine, coarse, sigma, v), in_axes=1, out_axes=1)(jnp.eye(20)))
    np.testing.assert_allclose(m, m.T, atol=1e-12 * np.abs(m).max())
    assert np.linalg.eigvalsh(0.5 * (m + m.T)).min() > 0
    r = jax.random.normal(jax.random.PRNGKey(0), (20,))
    z = pre.apply(setup, r, problem)
    np.testing.assert_allclose(np.bincount(frags, weights=np.asarray(z)), 0.0, atol=1e-12)
    q0 = LearnedStart(lp)(problem)
    np.testing.assert_allclose(np.bincount(frags, weights=np.asarray(q0)), [1.0, -1.0], atol=1e-12)


def test_coarse_level_and_start():
    """Aggregates: each Cl centre belongs to itself only, every Na's weights sum to at most 1 (1 up
    to the 1e-9 regulariser of the normalisation); A_c = Pᵀ H P;
    before its smoothing step, the start is the exact minimiser over q0 + P y on the plane: Pᵀ∇E
    lies in span(Pᵀ C), so a coarse move that keeps the charge sum cannot lower the energy; the
    smoothing step is ω times the preconditioned residual of that point, computed with H."""
    lp = random_learned("cg", seed=5)
    unsmoothed = dataclasses.replace(lp, smoothing=jnp.asarray(-60.0))
    system = cluster(16, seed=3)
    problem = qeq_problem(KERNEL, PARAMS, system)
    coarse = coarse_level(lp, problem)
    p = np.asarray(coarse.p)
    species = np.asarray(system.species)
    real = np.asarray(system.mask)
    cl = np.flatnonzero(real & (species == PARAMS.elements.index("Cl")))
    used = p[:, : len(cl)]
    np.testing.assert_array_equal(used[cl], np.eye(len(cl)))
    sums = used[real].sum(axis=1)
    assert np.all(sums <= 1.0 + 1e-12) and np.all(sums > 0.9) and np.all(used >= 0)
    assert np.all(p[:, len(cl):] == 0) and np.all(p[~real] == 0)
    h = np.asarray(problem.hardness.dense())
    a = np.asarray(coarse.chol)
    a = a @ a.T
    np.testing.assert_allclose(a[: len(cl), : len(cl)], used.T @ h @ used, rtol=1e-10)
    q0 = np.asarray(LearnedStart(unsmoothed)(problem))
    g = used.T @ (h @ q0 + np.asarray(problem.chi))
    ones = used.sum(axis=0)
    np.testing.assert_allclose(g - ones * (ones @ g) / (ones @ ones), 0.0, atol=1e-9 * np.abs(g).max())
    pre = LearnedPreconditioner(lp)
    step = float(jax.nn.softplus(lp.smoothing)) * pre.apply(pre.setup(problem), -(h @ q0 + problem.chi), problem)
    np.testing.assert_allclose(LearnedStart(lp)(problem), q0 + step, atol=1e-12)


@pytest.fixture(scope="module")
def trained():
    """A learned CG (K = 4) trained briefly on small clusters."""
    systems = [cluster(n, seed) for n in (12, 16, 20, 24) for seed in range(2)]
    lp0 = init_learned("cg", 4, "gaussian", PARAMS.elements, cutoff=5.0, n_basis=4, coarse_centres=("Cl",))
    lp, history = train_solver(lp0, PARAMS, systems, KERNEL, qu.COULOMB_CONSTANT, steps=150, learning_rate=5e-2)
    return lp0, lp, history


def errors(lp, system):
    ref = jax.jit(qu.energy_and_forces(qu.qeq_energy(KERNEL, qu.Exact(), "implicit")))(PARAMS, system)
    f = jax.jit(lambda lp, system, ref: solve_errors(lp, PARAMS, system, ref, KERNEL, qu.COULOMB_CONSTANT))
    return f(lp, system, (ref[0], ref[1], ref[2]["charges"]))


def test_training_improves_held_out_larger_structures(trained):
    lp0, lp, history = trained
    assert history[-1] < history[0]
    held_out = cluster(48, seed=9)
    before, after = errors(lp0, held_out), errors(lp, held_out)
    # the untrained solver (Jacobi-like parts, coarse level, smoothing step) is already at 1.5e-6 e
    # here; training brings it to 8.7e-7
    assert float(after["charges"]) < 0.75 * float(before["charges"])


@pytest.mark.parametrize("strain,n", [(1.0, 150), (0.85, 40)])
def test_trained_solver_does_not_diverge_far_from_training(trained, strain, n):
    """Much larger or strongly compressed structures: the learned solve is no worse than its own
    starting guess (and finite)."""
    _, lp, _ = trained
    system = cluster(n, seed=4, strain=strain)
    problem = jax.jit(lambda s: qeq_problem(KERNEL, PARAMS, s))(system)
    q_exact, _ = jax.jit(qu.Exact().run)(problem)
    q_start = jax.jit(lambda p: LearnedStart(lp)(p))(problem)
    q_k, _ = jax.jit(lambda p: learned_solver(lp).run(p))(problem)
    assert np.all(np.isfinite(np.asarray(q_k)))
    assert float(jnp.linalg.norm(q_k - q_exact)) <= float(jnp.linalg.norm(q_start - q_exact))


def test_solver_file_round_trip_and_mismatches(tmp_path, trained):
    _, lp, _ = trained
    path = tmp_path / "solver.json"
    save_learned(lp, path)
    again = load_learned(path)
    assert again.to_dict() == lp.to_dict()
    old = {k: v for k, v in lp.to_dict().items() if k not in ("transfer", "coarse", "coarse_scale", "coarse_centres", "smoothing")}
    older = LearnedSolverParams.from_dict(old)  # a file from before the coarse level
    assert older.coarse_centres == () and float(jnp.max(jax.nn.softplus(older.transfer))) < 1e-12
    assert float(jax.nn.softplus(older.smoothing)) < 1e-12
    check_compatible(again, "gaussian", PARAMS.elements, 4)
    with pytest.raises(QEqInputError, match="kernel 'gaussian', not 'reaxff'"):
        check_compatible(again, "reaxff", PARAMS.elements)
    with pytest.raises(QEqInputError, match="elements"):
        check_compatible(again, "gaussian", ("Na", "Cl"))
    with pytest.raises(QEqInputError, match="K = 4 iterations, not 6"):
        solver_from_file(str(path), iterations=6)
    with pytest.raises(QEqInputError, match="needs solver_params"):
        solver_from_file(None)
    with pytest.raises(QEqInputError, match="built from a solver file"):
        qu.get_solver("learned")
    with pytest.raises(QEqInputError, match="unknown learned solver family"):
        init_learned("adam", 4, "gaussian", PARAMS.elements)
    with pytest.raises(QEqInputError, match="coarse centres"):
        init_learned("cg", 4, "gaussian", PARAMS.elements, coarse_centres=("Xe",))


def test_calculator_runs_a_solver_file(tmp_path, trained):
    from calculators import QEqCalculator
    from ase import Atoms

    _, lp, _ = trained
    path = tmp_path / "solver.json"
    save_learned(lp, path)
    system = cluster(16, seed=5)
    atoms = Atoms(["Na"] * 8 + ["Cl"] * 8, positions=np.asarray(system.positions[:16]))
    atoms.calc = QEqCalculator(params="demo-nacl-water", solver="learned", solver_params=str(path))
    e = atoms.get_potential_energy()
    e_ref, _, _ = jax.jit(qu.energy_and_forces(qu.qeq_energy(KERNEL, learned_solver(lp), "unrolled")))(PARAMS, system)
    assert abs(e - float(e_ref)) < 1e-10
    assert atoms.calc.results["qeq_iterations"] <= 4
    with pytest.raises(QEqInputError, match="kernel 'gaussian', not 'reaxff'"):
        QEqCalculator(params="demo-nacl-water", kernel="reaxff", solver="learned", solver_params=str(path))


def test_nve_with_learned_solver_conserves_energy(tmp_path, trained):
    """K = 4 learned CG (every part a function of positions only) conserves the energy it reports
    within 1.5x the drift of exact charges with implicit forces, from the same start."""
    from calculators import QEqCalculator
    from calculators.md import drift_stats, relax, run_nve
    from calculators.structures import nacl_cluster

    _, lp, _ = trained
    path = tmp_path / "solver.json"
    save_learned(lp, path)
    calc_kw = dict(params="demo-nacl-water", kernel="gaussian")
    start = relax(nacl_cluster(32), QEqCalculator(solver="exact", gradient="implicit", **calc_kw), fmax=1e-3)
    dev = {}
    for label, kw in (("exact", dict(solver="exact", gradient="implicit")),
                      ("learned", dict(solver="learned", solver_params=str(path)))):
        etot = run_nve(start, QEqCalculator(**calc_kw, **kw), steps=300, temperature_K=600.0, seed=7)
        dev[label] = drift_stats(etot, len(start)).max_dev
    assert 0.0 < dev["exact"] < 0.05 and dev["learned"] <= 1.5 * dev["exact"], dev
