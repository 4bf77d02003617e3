"""Ewald summation of Gaussian charges (the periodic gaussian kernel): the Madelung constant,
an independent reciprocal-space reference (neutral and charged cells), independence of the
splitting, convergence of the direct lattice sum, finite-difference forces and stress, bad input."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

import qeq_unroll as qu
from qeq_unroll import QEqInputError, ewald, periodic
from qeq_unroll.energy import qeq_problem

try:
    from test_periodic import MODES, PARAMS, check_fd, reference_charges, rock_salt, system_of, triclinic
except ImportError:  # tests/ imported as a package
    from tests.test_periodic import MODES, PARAMS, check_fd, reference_charges, rock_salt, system_of, triclinic

jax.config.update("jax_enable_x64", True)

KE = qu.COULOMB_CONSTANT
ROCK_SALT = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]])
MADELUNG_NACL = 1.747565


@pytest.mark.parametrize("cutoff", [4.0, 7.0])
def test_madelung_constant_of_rock_salt(cutoff):
    """Fixed ±1 point charges (σ → 0) on the rock-salt lattice: E = −M N k_e / (2 r0)."""
    a = 5.64
    cell = np.eye(3) * a
    q = jnp.asarray([1.0] * 4 + [-1.0] * 4)
    plan = ewald.plan(cell, (True,) * 3, accuracy=1e-12, real_cutoff=cutoff)
    shifts = jnp.asarray(periodic.image_shifts(cell, (True,) * 3, cutoff))
    e = ewald.madelung_energy(q, jnp.asarray(ROCK_SALT * a), jnp.asarray(cell), plan, shifts)
    madelung = -float(e) * 2 * (a / 2) / 8
    assert abs(madelung - MADELUNG_NACL) < 1e-6
    assert abs(madelung - 1.7475645946) < 1e-9


def kspace_hardness(pos, kinds, cell, ke, kmax=12):
    """Independent reference: J + k_e (4π/V) Σ_{k≠0} cos(k·r_ij) exp(−k² γ_ij²/2) / k², a pure
    reciprocal-space sum of Gaussian charges (self terms and background included by construction)."""
    sig = np.asarray(PARAMS.sigma)[kinds]
    vol = abs(np.linalg.det(cell))
    m = np.array(list(itertools.product(range(-kmax, kmax + 1), repeat=3)))
    k = m[np.any(m != 0, axis=1)] @ (2 * np.pi * np.linalg.inv(cell).T)
    k2 = np.sum(k * k, axis=1)
    c, s = np.cos(pos @ k.T), np.sin(pos @ k.T)
    h = np.empty((len(pos), len(pos)))
    for i in range(len(pos)):
        w = np.exp(-k2[None, :] * (sig[i] ** 2 + sig[:, None] ** 2) / 2) / k2[None, :]
        h[i] = 4 * np.pi / vol * np.sum((c[i] * c + s[i] * s) * w, axis=1)
    return np.diag(np.asarray(PARAMS.hardness)[kinds]) + ke * h


NO_PAIRS = PARAMS.replace(pairs={})


@pytest.mark.parametrize("total", [0.0, 1.0, -2.0])
def test_ewald_matches_reciprocal_space_reference(total):
    """Charges and energy of the periodic gaussian kernel equal a pure k-space sum, also for a
    charged cell (neutralising background), for two splittings and both pair layouts."""
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=3)
    chi = np.asarray(PARAMS.chi)[kinds]
    h = kspace_hardness(pos, kinds, cell, KE)
    q_ref = reference_charges(h, chi, total)
    e_ref = chi @ q_ref + 0.5 * q_ref @ h @ q_ref
    system = system_of(pos, kinds, cell, total_charge=total)
    for cutoff, layout in ((12.0, "images"), (14.0, "list")):
        energy = qu.qeq_energy(qu.Gaussian(cutoff=cutoff, accuracy=1e-10), qu.Exact(), "unrolled")
        e, aux = jax.jit(energy)(NO_PAIRS, system, energy.neighbors(system, NO_PAIRS, layout=layout))
        np.testing.assert_allclose(aux["charges"], q_ref, rtol=0, atol=1e-10)
        assert abs(float(e) - e_ref) < 1e-9 * abs(e_ref)


def test_background_term_matters_for_charged_cells():
    """Leaving the background out shifts a charged cell's energy by π k_e Q²/(2Vα²) — the test
    above would see it."""
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=3)
    system = system_of(pos, kinds, cell, total_charge=1.0)
    plan = ewald.plan(cell, (True,) * 3, 1e-10, 12.0)
    _, e_bg = ewald.background(NO_PAIRS, system, plan, KE)
    assert abs(float(e_bg)) > 0.1


def fixed_charge_energy(system, q, kernel, ke=KE):
    """Electrostatic energy ½ qᵀ(H − diag J)q of fixed charges and its forces (eV, eV/Å)."""
    energy = qu.qeq_energy(kernel, qu.Exact(), "unrolled", coulomb_constant=ke)
    nbrs = energy.neighbors(system, NO_PAIRS, layout="images")
    q = jnp.asarray(q)

    def e_of(positions):
        problem = qeq_problem(kernel, NO_PAIRS, dataclasses.replace(system, positions=positions), ke, nbrs)
        return 0.5 * q @ problem.hardness.matvec(q) - 0.5 * jnp.sum(NO_PAIRS.hardness[system.species] * q**2)

    e, g = jax.value_and_grad(e_of)(system.positions)
    return float(e), -np.asarray(g)


def direct_lattice_sum(pos, kinds, cell, q, shells, ke=KE):
    """Σ over whole cells n with |n| <= shells (a sphere) of the Gaussian pair energy plus self
    energies, and its forces: the conditionally convergent sum in its spherical order."""
    sig = np.asarray(PARAMS.sigma)[kinds]
    m = np.array(list(itertools.product(range(-shells, shells + 1), repeat=3)))
    m = m[np.sum(m * m, axis=1) <= shells * shells]
    t = m @ cell
    e, f = ke * np.sum(q**2 / (2 * sig * np.sqrt(np.pi))), np.zeros((len(pos), 3))
    for i in range(len(pos)):
        d = pos[None, :, :] - pos[i] + t[:, None, :]
        own = np.all(m == 0, axis=1)[:, None] & (np.arange(len(pos)) == i)[None, :]
        r = np.where(own, 1.0, np.linalg.norm(d, axis=-1))
        g = np.sqrt(sig[i] ** 2 + sig**2)[None, :]
        phi = np.where(own, 0.0, erf(r / (np.sqrt(2) * g)) / r)
        dphi = np.where(own, 0.0, np.sqrt(2 / np.pi) / g * np.exp(-(r**2) / (2 * g * g)) / r - erf(r / (np.sqrt(2) * g)) / r**2)
        e += 0.5 * ke * q[i] * np.sum(q[None, :] * phi)
        f[i] += ke * q[i] * np.sum((q[None, :] * dphi)[:, :, None] * d / r[:, :, None], axis=(0, 1))
    return e, f


def test_direct_lattice_sum_converges_to_ewald():
    """Spherical shells of cells converge to the Ewald (tin-foil) energy and forces plus the
    surface term of a sphere in vacuum, 2π k_e |D|² / (3V) (forces −4π k_e q_i D / (3V))."""
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=3)
    q = np.random.default_rng(1).normal(0.0, 0.5, len(pos))
    q -= q.mean()
    e_ew, f_ew = fixed_charge_energy(system_of(pos, kinds, cell), q, qu.Gaussian(cutoff=12.0, accuracy=1e-10))
    vol = abs(np.linalg.det(cell))
    dipole = q @ pos
    e_target = e_ew + 2 * np.pi * KE * dipole @ dipole / (3 * vol)
    f_target = f_ew - 4 * np.pi * KE / (3 * vol) * q[:, None] * dipole[None, :]
    assert abs(e_target - e_ew) > 0.1  # the surface term is not negligible here
    errors = []
    for shells in (2, 4, 8, 16):
        e, f = direct_lattice_sum(pos, kinds, cell, q, shells)
        errors.append((abs(e - e_target), np.abs(f - f_target).max()))
    for (e0, f0), (e1, f1) in zip(errors, errors[1:]):
        assert e1 < 0.5 * e0 and f1 < 0.5 * f0
    assert errors[-1][0] < 2e-5 and errors[-1][1] < 1e-5


def test_splitting_parameter_does_not_matter():
    """Different real-space cutoffs (hence α and reciprocal vectors) give the same energy and forces."""
    pos, kinds, cell = rock_salt(1, rattle=0.15, seed=4)
    system = system_of(pos, kinds, cell, total_charge=-1.0)
    out = []
    for cutoff in (12.5, 17.0):
        energy = qu.qeq_energy(qu.Gaussian(cutoff=cutoff, accuracy=1e-11), qu.Exact(), "unrolled")
        e, f, s, _ = qu.energy_forces_stress(energy)(PARAMS, system, energy.neighbors(system, PARAMS))
        out.append((float(e), np.asarray(f), np.asarray(s)))
    for e, f, s in out[1:]:
        assert abs(e - out[0][0]) < 1e-8
        np.testing.assert_allclose(f, out[0][1], atol=1e-8)
        np.testing.assert_allclose(s, out[0][2], atol=1e-9)


@pytest.mark.parametrize("solver,gradient", MODES, ids=["unrolled-K3", "implicit"])
@pytest.mark.parametrize("total", [0.0, 1.0])
def test_fd_forces_and_stress_ewald(solver, gradient, total):
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=3)
    system = system_of(pos, kinds, cell * 1.05, total_charge=total)
    layout = "images" if gradient == "unrolled" else "list"
    stress_err, force_err = check_fd(qu.Gaussian(cutoff=9.0, accuracy=1e-6), solver, gradient, system, layout)
    assert stress_err < 1e-6
    assert force_err < 1e-7


def test_ewald_bad_input():
    cell = np.eye(3) * 5.64
    with pytest.raises(QEqInputError, match=r"Ewald accuracy 1e-20 cannot be reached: it must lie in"):
        ewald.plan(cell, (True,) * 3, accuracy=1e-20, real_cutoff=9.0)
    with pytest.raises(QEqInputError, match=r"Ewald accuracy 1e-15 cannot be reached: this cell needs"):
        ewald.plan(cell * 20, (True,) * 3, accuracy=1e-15, real_cutoff=3.0)
    with pytest.raises(QEqInputError, match=r"needs a cutoff of at least 11.52 Å"):
        ewald.plan(cell, (True,) * 3, accuracy=1e-10, real_cutoff=9.0, sigma_max=1.2)
    pos, kinds, _ = rock_salt(1)
    slab = system_of(pos, kinds, cell, pbc=(True, True, False))
    with pytest.raises(QEqInputError, match=r"Ewald, which needs all three directions periodic"):
        qu.qeq_energy("gaussian").neighbors(slab, PARAMS)


def test_strained_plan_holds_what_every_cell_within_its_strain_needs():
    """Built with ``strain`` s, the Ewald plan and the image list of a cell hold every Miller index
    and lattice translation that the exact plan of any cell ``cell (1 + ε)`` with ‖ε‖₂ ≤ s needs
    (compressions and shears included), so a relaxing cell can keep them."""
    pos, kinds, cell = triclinic(n=2)
    s, pbc, rc = 0.05, (True,) * 3, 10.5  # rc just below the cell heights (10.7-11.3 Å)
    system = system_of(pos, kinds, cell)
    wide = ewald.plan(cell, pbc, accuracy=1e-8, real_cutoff=rc, strain=s)
    images = qu.neighbors.build(qu.ReaxFF(cutoff=rc), system, layout="images", strain=s).pairs.shifts
    held = {tuple(m) for m in np.asarray(wide.miller, int)}
    held_images = {tuple(t) for t in np.asarray(images, int)}
    rng = np.random.default_rng(0)
    for _ in range(30):
        eps = rng.normal(size=(3, 3))
        strained = cell @ (np.eye(3) + eps * s / np.linalg.norm(eps, 2))
        needed = ewald.plan(strained, pbc, accuracy=1e-8, real_cutoff=rc)
        assert {tuple(m) for m in np.asarray(needed.miller, int)} <= held
        assert {tuple(t) for t in periodic.image_shifts(strained, pbc, rc).astype(int)} <= held_images
    assert len(held) > len(ewald.plan(cell, pbc, accuracy=1e-8, real_cutoff=rc).miller)
