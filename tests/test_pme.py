"""Particle-mesh Ewald (the periodic gaussian kernel with ``reciprocal="pme"``): agreement with the
exact Ewald sum at the stated accuracy (neutral and charged cells), convergence with mesh spacing
and B-spline order, the Madelung constant, finite-difference forces and stress, the automatic
choice, the calculator option, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import QEqInputError, ewald, periodic, pme

try:
    from test_ewald import MADELUNG_NACL, NO_PAIRS, ROCK_SALT
    from test_periodic import MODES, check_fd, rock_salt, system_of
except ImportError:  # tests/ imported as a package
    from tests.test_ewald import MADELUNG_NACL, NO_PAIRS, ROCK_SALT
    from tests.test_periodic import MODES, check_fd, rock_salt, system_of

jax.config.update("jax_enable_x64", True)

ACCURACY = 1e-6


def solve(system, reciprocal, accuracy=ACCURACY, cutoff=9.0, **kw):
    kernel = qu.Gaussian(cutoff=cutoff, accuracy=accuracy, reciprocal=reciprocal, **kw)
    energy = qu.qeq_energy(kernel, qu.Exact(), "unrolled")
    nbrs = energy.neighbors(system, NO_PAIRS, layout="images")
    e, aux = jax.jit(energy)(NO_PAIRS, system, nbrs)
    return float(e), np.asarray(aux["charges"]), nbrs.reciprocal


@pytest.mark.parametrize("total", [0.0, 1.0])
def test_pme_matches_exact_ewald(total):
    """Energy and charges of PME equal the exact k-sum to the accuracy asked for, also for a
    charged cell (neutralising background); the plan chose a mesh, the reference an Ewald sphere."""
    pos, kinds, cell = rock_salt(2, rattle=0.2, seed=3)
    system = system_of(pos, kinds, cell, total_charge=total)
    e_ref, q_ref, plan_ref = solve(system, "ewald")
    e, q, plan = solve(system, "pme")
    assert isinstance(plan_ref, ewald.Reciprocal) and isinstance(plan, pme.Mesh)
    assert abs(e - e_ref) < ACCURACY * abs(e_ref)
    assert np.abs(q - q_ref).max() < ACCURACY


def reciprocal_error(order, points, seed=0):
    """max |H_pme q − H_ewald q| / max |H_ewald q| of the reciprocal terms for random charges, on
    a mesh of ``points``³ (the cell is 11.28 Å wide) with the splitting of the reference."""
    pos, kinds, cell = rock_salt(2, rattle=0.2, seed=seed)
    system = system_of(pos, kinds, cell)
    exact = ewald.plan(cell, (True,) * 3, 1e-12, 10.0)
    mesh = pme.Mesh((points,) * 3, order, exact.alpha)
    q = jnp.asarray(np.random.default_rng(seed).normal(size=len(pos)))
    u = ewald.reciprocal_factor(system.positions, system.cell, exact, system.mask, 1.0)
    ref = u @ (u.T @ q)
    out = pme.operator(system.positions, system.cell, mesh, system.mask, 1.0).matvec(q)
    return float(jnp.abs(out - ref).max() / jnp.abs(ref).max())


def test_pme_error_falls_with_mesh_spacing_and_order():
    by_spacing = [reciprocal_error(6, k) for k in (15, 20, 30)]  # spacing 0.75, 0.56, 0.38 Å
    by_order = [reciprocal_error(p, 15) for p in (4, 6, 8)]
    for errors in (by_spacing, by_order):
        assert all(b < 0.3 * a for a, b in zip(errors, errors[1:])), errors
    assert by_spacing[-1] < 1e-6 and by_order[-1] < 1e-5


def test_madelung_constant_with_pme():
    """Fixed ±1 point charges on the rock-salt lattice, reciprocal part on the mesh."""
    a, cutoff = 5.64, 7.0
    cell = np.eye(3) * a
    q = jnp.asarray([1.0] * 4 + [-1.0] * 4)
    mesh = pme.plan(cell, (True,) * 3, accuracy=1e-10, real_cutoff=cutoff, order=10)
    shifts = jnp.asarray(periodic.image_shifts(cell, (True,) * 3, cutoff))
    e = ewald.madelung_energy(q, jnp.asarray(ROCK_SALT * a), jnp.asarray(cell), mesh, shifts)
    assert abs(-float(e) * a / 8 - MADELUNG_NACL) < 1e-6


@pytest.mark.parametrize("mode,total", [(0, 0.0), (1, 1.0)], ids=["unrolled-K3-neutral", "implicit-charged"])
def test_fd_forces_and_stress_pme(mode, total):
    solver, gradient = MODES[mode]
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=3)
    system = system_of(pos, kinds, cell * 1.05, total_charge=total)
    layout = "images" if gradient == "unrolled" else "list"
    kernel = qu.Gaussian(cutoff=9.0, accuracy=1e-6, reciprocal="pme")
    stress_err, force_err = check_fd(kernel, solver, gradient, system, layout)
    assert stress_err < 1e-6
    assert force_err < 1e-7



def test_chunked_mesh_passes_equal_one_pass(monkeypatch):
    """Spreading and interpolation chunk by chunk (the last chunk short and zero-padded) give what
    one pass gives: the product, the quadratic form and its gradient in positions, cell and
    charges (the custom derivative's chunked partials)."""
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=5)
    mesh = pme.plan(cell, (True,) * 3, ACCURACY, 5.0)
    q = jnp.asarray(np.where(kinds == 0, 0.7, -0.6))
    mask = jnp.ones(len(pos), bool)

    def evaluate():  # traced afresh (a new function each time): the chunk settings are read at trace time
        def quadratic(positions, cell, q):
            return pme.operator(positions, cell, mesh, mask, 14.4).quadratic(q)

        def passes(positions, cell, q):
            op = pme.operator(positions, cell, mesh, mask, 14.4)
            grads = jax.grad(quadratic, argnums=(0, 1, 2))(positions, cell, q)
            return (op.matvec(q), op.coarse.matvec(q), quadratic(positions, cell, q)) + grads

        return jax.jit(passes)(jnp.asarray(pos), jnp.asarray(cell), q)

    one = evaluate()
    monkeypatch.setattr(pme, "CHUNK_BYTES", 0)
    monkeypatch.setattr(pme, "CHUNK", 3)  # 8 atoms: 3 chunks, the last with 1 padding row
    for a, b in zip(evaluate(), one):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_auto_picks_the_cheaper_reciprocal_sum():
    kernel = qu.Gaussian(cutoff=9.0, accuracy=1e-6)
    assert kernel.reciprocal == "auto"
    small = np.eye(3) * 11.28
    assert isinstance(pme.plan_for(kernel, small, (True,) * 3, 1.2, 64), ewald.Reciprocal)
    large = np.eye(3) * 45.12  # 4096 atoms of rock salt
    assert isinstance(pme.plan_for(kernel, large, (True,) * 3, 1.2, 4096), pme.Mesh)


def test_calculator_passes_the_reciprocal_option():
    from ase import Atoms

    from calculators import QEqCalculator

    pos, kinds, cell = rock_salt(2, rattle=0.2, seed=3)
    atoms = Atoms(["Na" if k == 0 else "Cl" for k in kinds], positions=pos, cell=cell, pbc=True)
    out = {}
    for method in ("ewald", "pme"):
        atoms.calc = QEqCalculator(params=NO_PAIRS, kernel="gaussian", solver="exact", reciprocal=method)
        out[method] = (atoms.get_potential_energy(), atoms.get_charges())
        assert isinstance(atoms.calc._neighbors.reciprocal, ewald.Reciprocal if method == "ewald" else pme.Mesh)
    assert abs(out["pme"][0] - out["ewald"][0]) < 1e-8 * abs(out["ewald"][0])
    np.testing.assert_allclose(out["pme"][1], out["ewald"][1], atol=1e-8)
    with pytest.raises(QEqInputError, match="option of the gaussian kernel, not 'reaxff'"):
        QEqCalculator(params=NO_PAIRS, kernel="reaxff", reciprocal="pme")


def test_pme_bad_input():
    cell = np.eye(3) * 5.64
    pbc = (True,) * 3
    with pytest.raises(QEqInputError, match=r"order must be an integer in \[3, 12\], got 2"):
        pme.plan(cell, pbc, 1e-6, 9.0, order=2)
    with pytest.raises(QEqInputError, match=r"PME accuracy 1e-08 cannot be reached with a mesh spacing of 1.5 Å at order 6"):
        pme.plan(cell, pbc, 1e-8, 9.0, spacing=1.5)
    with pytest.raises(QEqInputError, match=r"PME accuracy 1e-12 cannot be reached: this cell needs a"):
        pme.plan(cell * 40, pbc, 1e-12, 6.0, order=4, max_points=10**6)
    with pytest.raises(QEqInputError, match=r"Ewald accuracy 1e-20 cannot be reached"):
        pme.plan(cell, pbc, 1e-20, 9.0)
    with pytest.raises(QEqInputError, match=r"unknown reciprocal-space method 'fft'"):
        qu.Gaussian(reciprocal="fft")


# --- the long-wavelength mesh preconditioner -------------------------------------------------------


def pme_problem(reps, dtype=None, **kw):
    """The charge problem of rattled rock salt (8 reps³ atoms) with a PME reciprocal term."""
    pos, kinds, cell = rock_salt(reps, rattle=0.2, seed=3)
    system = system_of(pos, kinds, cell, dtype=dtype, **kw)
    kernel = qu.Gaussian(cutoff=9.0, accuracy=ACCURACY, reciprocal="pme")
    nbrs = qu.qeq_energy(kernel).neighbors(system, NO_PAIRS, layout="images")
    return jax.jit(lambda s, n: qu.energy.qeq_problem(kernel, NO_PAIRS, s, neighbors=n))(system, nbrs)


def on_plane(problem, preconditioner):
    """Dense M (N, N) from applying the preconditioner to unit vectors, a basis Z of the plane's
    tangent space (real atoms, every fragment sum zero), and the eigenvalues of M and of M H there."""
    n = problem.chi.shape[0]
    pre = preconditioner.setup(problem)
    m = np.asarray(jax.jit(jax.vmap(lambda e: preconditioner.apply(pre, e, problem)))(jnp.eye(n))).T
    real = np.asarray(problem.fragments) >= 0
    c = np.asarray(problem.fragments)[real][:, None] == np.arange(problem.n_fragments)[None, :]
    z = np.zeros((n, real.sum() - problem.n_fragments))
    z[real] = np.linalg.svd(c.T.astype(float))[2][problem.n_fragments :].T  # orthonormal null space of Cᵀ
    mz, hz = z.T @ m @ z, z.T @ np.asarray(jax.jit(lambda h: h.dense())(problem.hardness)) @ z
    factor = np.linalg.cholesky(0.5 * (mz + mz.T))
    return m, z, np.linalg.eigvalsh(0.5 * (mz + mz.T)), np.linalg.eigvalsh(factor.T @ hz @ factor)


def test_mesh_preconditioner_is_spd_on_the_plane_and_keeps_the_condition_number_bounded():
    """M is symmetric, positive definite on the plane, maps onto it (zero fragment sums, zero on
    padding); the condition number of M H on the plane stays near 1 from 64 to 216 atoms, while
    Jacobi's grows like the cell's L² (long charge waves cost 4π k_e n/k²)."""
    kappa = {}
    for reps in (2, 3):
        problem = pme_problem(reps, pad_to=8 * reps**3 + 3)
        for name, preconditioner in (("jacobi", qu.solvers.Jacobi()), ("mesh", pme.MeshPreconditioner())):
            m, z, eig_m, eig_mh = on_plane(problem, preconditioner)
            np.testing.assert_allclose(m, m.T, atol=1e-12 * np.abs(m).max())
            assert np.abs(m[-3:]).max() == 0.0 and np.abs(m[:, -3:]).max() == 0.0  # padding decoupled
            np.testing.assert_allclose(m.sum(axis=0), 0.0, atol=1e-12 * np.abs(m).max())  # Σ z = 0
            assert eig_m.min() > 0 and eig_mh.min() > 0
            kappa[name, reps] = eig_mh.max() / eig_mh.min()
    assert kappa["jacobi", 3] > 1.8 * kappa["jacobi", 2] and kappa["jacobi", 3] > 4.0
    assert kappa["mesh", 2] < 1.3 and kappa["mesh", 3] < 1.3, kappa


def test_mesh_preconditioner_refinement_reaches_the_condition_number_of_its_model():
    """With its refinement step, M H has the condition number of B⁻¹ H on the plane (B = D + the
    coarse mesh's PME term, the model M inverts); the translation-invariant Woodbury step alone is
    9 % off on 216 atoms, and more on larger cells."""
    problem = pme_problem(3)
    h = problem.hardness
    _, z, _, eig_mh = on_plane(problem, pme.MeshPreconditioner())
    _, _, _, eig_plain = on_plane(problem, pme.MeshPreconditioner(refinements=0))
    dense = np.asarray(jax.jit(lambda h: h.dense())(h))
    model = np.diag(np.diag(dense) - np.asarray(h.operator.diagonal())) + np.asarray(h.operator.coarse.dense())
    eig_model = np.linalg.eigvals(np.linalg.solve(z.T @ model @ z, z.T @ dense @ z)).real
    kappa, kappa_plain, kappa_model = (e.max() / e.min() for e in (eig_mh, eig_plain, eig_model))
    assert abs(kappa / kappa_model - 1.0) < 0.01 and kappa_plain > 1.05 * kappa_model, (kappa, kappa_plain, kappa_model)
    with pytest.raises(QEqInputError, match="refinements"):
        pme.MeshPreconditioner(refinements=-1)


def test_mesh_preconditioner_on_a_slab_uses_the_density_the_atoms_see():
    """Rock salt with as much vacuum as matter along c: the smoothed weight density is not uniform,
    so the refinement is skipped; M stays positive definite on the plane and, with the density
    inside the slab (twice the cell's mean) in its model, M H is far better conditioned than
    Jacobi's; CG reaches the dense solve's charges."""
    pos, kinds, cell = rock_salt(3, rattle=0.2, seed=3)
    cell = cell.copy()
    cell[2, 2] *= 2.0
    kernel = qu.Gaussian(cutoff=9.0, accuracy=ACCURACY, reciprocal="pme")
    system = system_of(pos, kinds, cell)
    nbrs = qu.qeq_energy(kernel).neighbors(system, NO_PAIRS, layout="images")
    problem = jax.jit(lambda s, n: qu.energy.qeq_problem(kernel, NO_PAIRS, s, neighbors=n))(system, nbrs)
    assert not bool(pme.MeshPreconditioner().setup(problem)[2])
    kappa = {}
    for name, preconditioner in (("jacobi", qu.solvers.Jacobi()), ("mesh", pme.MeshPreconditioner())):
        _, _, eig_m, eig_mh = on_plane(problem, preconditioner)
        assert eig_m.min() > 0 and eig_mh.min() > 0
        kappa[name] = eig_mh.max() / eig_mh.min()
    assert kappa["mesh"] < 0.2 * kappa["jacobi"], kappa
    q, diag = jax.jit(qu.CG(tol=1e-10).run_forward)(problem)
    assert bool(diag.converged)
    np.testing.assert_allclose(q, qu.Exact().run(problem)[0], atol=1e-9)


def test_mesh_preconditioned_cg_gives_the_exact_charges_in_fewer_iterations():
    """Default CG (mesh preconditioner) against the dense solve, with two fragments of different
    charge, and against Jacobi-CG; in float32 too (to the float32 level)."""
    labels = np.arange(64) % 2  # all Na in fragment 0 (charge 1), all Cl in fragment 1 (charge −1)
    problem = pme_problem(2, fragments=labels, fragment_charges=[1.0, -1.0])
    q_ref, _ = qu.Exact().run(problem)
    runs = {}
    for name, solver in (("mesh", qu.CG(tol=1e-10)), ("jacobi", qu.CG(tol=1e-10, preconditioner=qu.solvers.Jacobi()))):
        q, diag = jax.jit(solver.run_forward)(problem)
        assert bool(diag.converged) and bool(diag.positive_definite)
        np.testing.assert_allclose(q, q_ref, atol=1e-9)
        runs[name] = int(diag.iterations)
    assert runs["mesh"] <= runs["jacobi"] // 2, runs
    single = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, problem)
    q32, diag32 = jax.jit(qu.CG(tol=1e-5).run_forward)(single)
    assert q32.dtype == jnp.float32 and bool(diag32.converged)
    np.testing.assert_allclose(q32, q_ref, atol=1e-4)
