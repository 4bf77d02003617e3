"""The core against an independent dense reference, finite differences of the reported energy,
invariances and the charge constraints."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from tests import reference

RNG = np.random.default_rng(7)


def params_for_test():
    """Hard enough that H is positive definite for every kernel on the grids used here."""
    return qu.Params.from_dict(
        {
            "name": "test-set",
            "elements": {
                "Na": {"chi": 2.843, "hardness": 14.0, "sigma": 1.2, "gamma": 0.6},
                "Cl": {"chi": 8.564, "hardness": 16.0, "sigma": 0.9, "gamma": 0.8},
                "O": {"chi": 8.741, "hardness": 18.0, "sigma": 0.7, "gamma": 1.0},
            },
            "pairs": {"Cl-Na": {"born_mayer": {"A": 100.0, "rho": 0.3}}, "Cl-Cl": {"morse": {"D": 0.1, "a": 1.2, "r0": 3.8}}},
        }
    )


PARAMS = params_for_test()


def grid_cluster(n, spacing=3.0, rattle=0.3, seed=0):
    """n atoms on a rattled cubic grid (Å), three elements."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    pts = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)], float)[:n]
    pos = spacing * pts + rng.normal(0, rattle, (n, 3))
    species = rng.integers(0, 3, n)
    return pos, species


def kernel_obj(name):
    return {"gaussian": qu.Gaussian(), "reaxff": qu.ReaxFF(cutoff=8.0), "point": qu.Point(cutoff=9.0)}[name]


def ref_widths(name, species):
    if name == "gaussian":
        return np.asarray(PARAMS.sigma)[species]
    return np.asarray(PARAMS.gamma)[species]


@pytest.mark.parametrize("kernel", ["gaussian", "reaxff", "point"])
@pytest.mark.parametrize("n", [2, 17, 200])
def test_dense_reference(kernel, n):
    pos, species = grid_cluster(n, seed=n)
    chi = np.asarray(PARAMS.chi)[species]
    J = np.asarray(PARAMS.hardness)[species]
    k = kernel_obj(kernel)
    H = reference.hardness(kernel, pos, chi, J, ref_widths(kernel, species), cutoff=k.cutoff)
    assert np.linalg.eigvalsh(H).min() > 0
    q_ref, e_ref = reference.solve(H, chi, total=1.0)
    system = qu.make_system(pos, species, total_charge=1.0)
    for solver in (qu.Exact(), qu.CG(tol=1e-13)):
        e, aux = jax.jit(qu.qeq_energy(k, solver, "unrolled"))(PARAMS, system)
        np.testing.assert_allclose(aux["charges"], q_ref, rtol=0, atol=1e-10)
        assert abs(float(aux["e_qeq"]) - e_ref) < 1e-10 * max(1.0, abs(e_ref))


def fd_forces(energy, params, system, atoms=None, h=1e-5):
    """Central differences of the reported energy (eV/Å)."""
    e_of = jax.jit(lambda pos: energy(params, dataclasses.replace(system, positions=pos))[0])
    pos = system.positions
    atoms = range(pos.shape[0]) if atoms is None else atoms
    out = {}
    for i in atoms:
        for d in range(3):
            out[i, d] = -(e_of(pos.at[i, d].add(h)) - e_of(pos.at[i, d].add(-h))) / (2 * h)
    return out


def max_fd_error(energy, params, system, atoms=None):
    _, forces, aux = jax.jit(qu.energy_and_forces(energy))(params, system)
    fd = fd_forces(energy, params, system, atoms)
    return max(abs(float(v) - float(forces[i, d])) for (i, d), v in fd.items()), aux


FD_SYSTEM = qu.make_system(*grid_cluster(10, spacing=2.6, seed=3), total_charge=0.0)


@pytest.mark.parametrize("solver_cls", [qu.CG, qu.GD, qu.NAG])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 50])
def test_unrolled_forces_are_exact_derivative(solver_cls, k):
    energy = qu.qeq_energy("gaussian", solver_cls(iterations=k), "unrolled")
    err, _ = max_fd_error(energy, PARAMS, FD_SYSTEM)
    assert err < 1e-7


@pytest.mark.parametrize("gradient", ["implicit", "envelope", "unrolled"])
def test_exact_solver_forces(gradient):
    err, _ = max_fd_error(qu.qeq_energy("gaussian", qu.Exact(), gradient), PARAMS, FD_SYSTEM)
    assert err < 1e-7


@pytest.mark.parametrize("kernel", ["reaxff", "point"])
@pytest.mark.parametrize("solver,gradient", [(qu.CG(iterations=3), "unrolled"), (qu.CG(tol=1e-13), "implicit")])
def test_forces_other_kernels(kernel, solver, gradient):
    err, aux = max_fd_error(qu.qeq_energy(kernel_obj(kernel), solver, gradient), PARAMS, FD_SYSTEM)
    assert bool(aux["positive_definite"])
    assert err < 1e-7


def test_envelope_with_few_iterations_is_not_the_derivative():
    """The FD check is not blind: Hellmann–Feynman forces of a 2-step solve are measurably wrong."""
    err, _ = max_fd_error(qu.qeq_energy("gaussian", qu.CG(iterations=2), "envelope"), PARAMS, FD_SYSTEM)
    assert err > 1e-4


def test_implicit_cg_matches_exact_forces():
    system = FD_SYSTEM
    _, f_exact, _ = qu.energy_and_forces(qu.qeq_energy("gaussian", qu.Exact(), "implicit"))(PARAMS, system)
    _, f_cg, aux = qu.energy_and_forces(qu.qeq_energy("gaussian", qu.CG(tol=1e-12), "implicit"))(PARAMS, system)
    assert bool(aux["converged"])
    np.testing.assert_allclose(f_cg, f_exact, atol=1e-9)



def test_implicit_adjoint_starts_from_zero_not_from_the_guess():
    """Warm-started implicit forces (the guess = the converged charges, as in MD) need no adjoint
    iterations: its right-hand side is the forward residual, solved by zero. Capped at one
    iteration, the forces are still the converged ones; an adjoint started from the guess (charges,
    not multipliers) would be a cold solve, cut off after that iteration."""
    system = FD_SYSTEM
    _, f_exact, aux = qu.energy_and_forces(qu.qeq_energy("gaussian", qu.Exact(), "implicit"))(PARAMS, system)
    energy = qu.qeq_energy("gaussian", qu.CG(tol=1e-10, max_iterations=1), "implicit")

    def of(positions):
        return energy(PARAMS, dataclasses.replace(system, positions=positions), guess=aux["charges"])

    (_, aux_cg), grad = jax.value_and_grad(of, has_aux=True)(system.positions)
    assert bool(aux_cg["converged"]) and int(aux_cg["iterations"]) == 0
    np.testing.assert_allclose(-grad, f_exact, atol=1e-9)

def rotation(seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


@pytest.mark.parametrize("solver", [qu.CG(iterations=3), qu.NAG(iterations=4), qu.Exact()])
def test_invariances(solver):
    pos, species = grid_cluster(15, seed=11)
    f = jax.jit(qu.energy_and_forces(qu.qeq_energy("gaussian", solver, "unrolled")))
    e0, f0, a0 = f(PARAMS, qu.make_system(pos, species, total_charge=-1.0))
    np.testing.assert_allclose(np.sum(f0, axis=0), 0.0, atol=1e-10)
    # translation
    e1, f1, a1 = f(PARAMS, qu.make_system(pos + np.array([3.0, -7.0, 11.0]), species, total_charge=-1.0))
    assert abs(e1 - e0) < 1e-10
    np.testing.assert_allclose(f1, f0, atol=1e-9)
    # rotation
    rot = rotation(5)
    e2, f2, a2 = f(PARAMS, qu.make_system(pos @ rot.T, species, total_charge=-1.0))
    assert abs(e2 - e0) < 1e-10
    np.testing.assert_allclose(f2, np.asarray(f0) @ rot.T, atol=1e-9)
    np.testing.assert_allclose(a2["charges"], a0["charges"], atol=1e-11)
    # permutation
    perm = np.random.default_rng(2).permutation(len(pos))
    e3, f3, a3 = f(PARAMS, qu.make_system(pos[perm], species[perm], total_charge=-1.0))
    assert abs(e3 - e0) < 1e-10
    np.testing.assert_allclose(f3, np.asarray(f0)[perm], atol=1e-9)
    np.testing.assert_allclose(a3["charges"], np.asarray(a0["charges"])[perm], atol=1e-11)


@pytest.mark.parametrize("total", [0.0, 1.0, -2.0])
@pytest.mark.parametrize("solver", [qu.CG(iterations=1), qu.GD(iterations=1), qu.NAG(iterations=1), qu.CG(), qu.NAG(iterations=7), qu.Exact()])
def test_total_charge_holds_after_any_k(total, solver):
    pos, species = grid_cluster(23, seed=4)
    _, aux = qu.qeq_energy("gaussian", solver, "unrolled")(PARAMS, qu.make_system(pos, species, total_charge=total, pad_to=32))
    q = np.asarray(aux["charges"])
    assert abs(q[:23].sum() - total) < 1e-12
    assert np.all(q[23:] == 0.0)


def test_fragment_charges_hold():
    pos, species = grid_cluster(12, seed=8)
    frags = np.repeat([0, 1, 2], 4)
    system = qu.make_system(pos, species, fragments=frags, fragment_charges=[0.0, 1.0, -1.0])
    for solver in (qu.CG(iterations=2), qu.Exact()):
        _, aux = qu.qeq_energy("gaussian", solver, "implicit" if solver.name == "exact" else "unrolled")(PARAMS, system)
        sums = np.bincount(frags, weights=np.asarray(aux["charges"]))
        np.testing.assert_allclose(sums, [0.0, 1.0, -1.0], atol=1e-12)


def crystal_like_float32(n=50000):
    """Two alternating values per array (every atom of a species alike, as in a crystal), in
    float32, with fragments of 40000 and 9000 atoms and 1000 padding rows."""
    kinds = np.arange(n) % 2
    frags = np.concatenate([np.zeros(40000, int), np.ones(9000, int), -np.ones(n - 49000, int)])
    return kinds, frags


def test_fragment_sums_stay_accurate_over_many_alike_terms():
    """A running float32 sum of 40000 equal terms drifts by ~10³ ε (each addition rounds the same
    way); the fragment sums stay within a few roundings of the exact sum, padding left out."""
    kinds, frags = crystal_like_float32()
    v = np.where(kinds == 0, 2.84 / 9.0, 8.56 / 12.0).astype(np.float32)
    v[frags < 0] = 1e6
    sums = np.asarray(jax.jit(lambda a, b: qu.constraints.fragment_sums(a, b, 2))(v, frags), np.float64)
    exact = np.array([np.sum(v[frags == f].astype(np.float64)) for f in (0, 1)])
    assert np.all(np.abs(sums - exact) <= 4 * np.finfo(np.float32).eps * exact)


def test_float32_start_holds_the_fragment_charges():
    """The diagonal-model start in float32 on 49000 atoms: each fragment's charge holds to a few ε
    of Σ|q| (a plain scatter-add sum puts it off by ~10³ ε: 2.8 e on the 40000-atom fragment)."""
    kinds, frags = crystal_like_float32()
    chi = np.where(kinds == 0, 2.84, 8.56).astype(np.float32)
    diag = np.where(kinds == 0, 9.0, 12.0).astype(np.float32)
    targets = np.array([1.0, -1.0], np.float32)
    q = np.asarray(jax.jit(qu.constraints.diagonal_start)(chi, diag, frags, targets), np.float64)
    assert np.all(q[frags < 0] == 0.0)
    for f in (0, 1):
        assert abs(q[frags == f].sum() - targets[f]) <= 16 * np.finfo(np.float32).eps * np.abs(q[frags == f]).sum()


def test_float32_cg_reaches_a_tolerance_near_its_resolution():
    """float32 CG iterates to relative residuals of 10 ε: tol 3e-6 is reached, and the charges
    equal the float64 solution to float32 accuracy."""
    pos, species = grid_cluster(40, seed=12)
    energy = qu.qeq_energy("gaussian", qu.CG(tol=3e-6), "unrolled")
    params32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), PARAMS)
    _, aux = energy(params32, qu.make_system(pos, species, dtype=np.float32))
    _, exact = qu.qeq_energy("gaussian", qu.Exact(), "unrolled")(PARAMS, qu.make_system(pos, species))
    assert aux["charges"].dtype == jnp.float32
    assert bool(aux["converged"]) and float(aux["residual"]) <= 3e-6
    np.testing.assert_allclose(aux["charges"], exact["charges"], atol=2e-6)


@pytest.mark.parametrize("solver", [qu.CG(iterations=3), qu.CG(), qu.Exact()])
def test_padded_equals_unpadded(solver):
    pos, species = grid_cluster(13, seed=9)
    f = qu.energy_and_forces(qu.qeq_energy("gaussian", solver, "unrolled"))
    e0, f0, a0 = f(PARAMS, qu.make_system(pos, species, total_charge=1.0))
    e1, f1, a1 = f(PARAMS, qu.make_system(pos, species, total_charge=1.0, pad_to=40))
    assert abs(e1 - e0) < 1e-11
    np.testing.assert_allclose(f1[:13], f0, atol=1e-11)
    np.testing.assert_allclose(f1[13:], 0.0, atol=0)
    np.testing.assert_allclose(a1["charges"][:13], a0["charges"], atol=1e-12)


def test_solvers_agree_when_converged():
    pos, species = grid_cluster(40, seed=12)
    system = qu.make_system(pos, species)
    q = {}
    for solver in (qu.Exact(), qu.CG(tol=1e-12), qu.GD(tol=1e-12, max_iterations=5000), qu.NAG(tol=1e-12, max_iterations=5000)):
        _, aux = qu.qeq_energy("gaussian", solver, "unrolled")(PARAMS, system)
        assert bool(aux["converged"]), solver.name
        q[solver.name] = np.asarray(aux["charges"])
    for name in ("cg", "gd", "nag"):
        np.testing.assert_allclose(q[name], q["exact"], atol=1e-10)


def test_iterating_past_convergence_stays_finite_and_exact():
    """Two atoms: CG converges in one step; K = 50 must freeze, not divide 0 by 0."""
    system = qu.make_system([[0, 0, 0], [0, 0, 2.5]], [0, 1])
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=50, tol=0.0), "unrolled")
    err, aux = max_fd_error(energy, PARAMS, system)
    assert np.all(np.isfinite(np.asarray(aux["charges"])))
    assert int(aux["iterations"]) < 50
    assert err < 1e-7


def test_diagnostics_report_non_convergence():
    pos, species = grid_cluster(40, seed=12)
    _, aux = qu.qeq_energy("gaussian", qu.GD(tol=1e-12, max_iterations=3), "unrolled")(PARAMS, qu.make_system(pos, species))
    assert not bool(aux["converged"]) and int(aux["iterations"]) == 3 and float(aux["residual"]) > 1e-12


def test_indefinite_hardness_is_flagged():
    """Point charges too close for their hardness: H is indefinite and both solver families say so."""
    soft = PARAMS.replace(hardness=jnp.asarray([1.0, 1.0, 1.0]))
    pos, species = grid_cluster(8, spacing=1.0, rattle=0.0)
    system = qu.make_system(pos, species)
    for solver in (qu.Exact(), qu.CG(iterations=10)):
        _, aux = qu.qeq_energy("point", solver, "unrolled")(soft, system)
        assert not bool(aux["positive_definite"]), solver.name


def test_shielding_cube_root_exact_to_rounding():
    """The reaxff shielding (r³ + g)^(−1/3), computed by Newton steps from a float32 bit guess,
    equals an extended-precision reference to rounding, from overlapping atoms to far beyond any
    cutoff and for soft to hard shielding."""
    from qeq_unroll.kernels import shielding

    r = np.concatenate([np.linspace(0.0, 12.0, 2001), np.logspace(-3, 8, 2001)])
    for g in (0.05, 4.0, 60.0):
        s = np.asarray(shielding(jnp.asarray(r), g))
        reference = (r.astype(np.longdouble) ** 3 + g) ** (-1.0 / 3.0)
        assert float(np.max(np.abs(s - reference) / reference)) < 2e-15


def test_reaxff_kernel_derivatives_written_out_equal_finite_differences():
    """The taper's and the shielding's derivatives are written out (custom JVPs): first and second
    derivatives in r and the derivative in γ equal central differences of the kernel, inside the
    cutoff and across it."""
    kernel = qu.ReaxFF(cutoff=6.0)
    params = qu.Params.from_dict(
        {"name": "t", "elements": {"Na": {"chi": 2.8, "hardness": 9.0, "gamma": 0.6}, "Cl": {"chi": 8.6, "hardness": 12.0, "gamma": 0.7}}}
    )

    def k(r, gamma):
        return kernel.coupling(dataclasses.replace(params, gamma=gamma), 0, 1, r)

    gamma = jnp.asarray(params.gamma)
    h = 1e-4
    for r in (0.7, 2.5, 5.9, 6.0 + 1e-3):
        d1 = jax.grad(k)(r, gamma)
        fd1 = (k(r + h, gamma) - k(r - h, gamma)) / (2 * h)
        assert abs(float(d1 - fd1)) < 1e-8 * max(1.0, abs(float(fd1)))
        d2 = jax.grad(jax.grad(k))(r, gamma)
        fd2 = (jax.grad(k)(r + h, gamma) - jax.grad(k)(r - h, gamma)) / (2 * h)
        assert abs(float(d2 - fd2)) < 1e-7
        dg = jax.grad(k, argnums=1)(r, gamma)
        for e in range(2):
            step = jnp.zeros(2).at[e].set(h)
            fdg = (k(r, gamma + step) - k(r, gamma - step)) / (2 * h)
            assert abs(float(dg[e] - fdg)) < 1e-8
    assert float(jax.grad(k)(6.5, gamma)) == 0.0


def test_implicit_derivative_in_the_fragment_charges():
    """dE/dQ (eV/e, the chemical potential) through the implicit adjoint, whose multiplier is
    recovered from the whole cotangent, equals the finite difference of the energy in Q."""
    energy = qu.qeq_energy("gaussian", qu.CG(tol=1e-13, max_iterations=2000), "implicit")

    def e_of(q_total):
        return energy(PARAMS, dataclasses.replace(FD_SYSTEM, fragment_charges=q_total))[0]

    q0 = jnp.asarray(FD_SYSTEM.fragment_charges) + 0.3
    h = 1e-4
    fd = (e_of(q0 + h) - e_of(q0 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(lambda q: e_of(q).sum())(q0), fd, rtol=1e-7)


def test_exact_solver_says_when_its_residual_misses_tol():
    """Near-coincident Gaussian atoms with a tiny hardness make H ill-conditioned (κ ~ 1e9): the
    factorisation's residual then misses a tight tol and the solve reports it, and passes a loose one."""
    data = PARAMS.to_dict()
    data["elements"]["Na"]["hardness"] = 1e-8
    soft = qu.load_params(data)
    system = qu.make_system([[0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [3.0, 0.0, 0.0]], soft.species_indices(["Na", "Na", "Cl"]))
    tight = qu.qeq_energy("gaussian", qu.Exact(tol=1e-15), "implicit")(soft, system)[1]
    loose = qu.qeq_energy("gaussian", qu.Exact(tol=1e-3), "implicit")(soft, system)[1]
    assert float(tight["residual"]) > 2.3e-15 and not bool(tight["converged"]) and bool(tight["positive_definite"])
    assert bool(loose["converged"]) and float(loose["residual"]) == float(tight["residual"])
