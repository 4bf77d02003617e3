"""Uniform external electric fields and per-fragment charge constraints, in the core and the ASE
calculator: the dipole is the finite-field derivative of the energy, the polarizability is
symmetric, fields along periodic directions are refused, fragment sums hold exactly."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import QEqInputError

try:
    from test_periodic import PARAMS, TYPE_ELEMENTS, rock_salt, system_of, triclinic
except ImportError:  # tests/ imported as a package
    from tests.test_periodic import PARAMS, TYPE_ELEMENTS, rock_salt, system_of, triclinic

jax.config.update("jax_enable_x64", True)


def cluster(seed=0):
    pos, kinds, _ = triclinic(n=3, rattle=0.2, seed=seed)
    return pos[:14] * 0.9, kinds[:14]


def energy_of_field(energy, system, nbrs=None):
    return jax.jit(lambda f: energy(PARAMS, dataclasses.replace(system, field=f), nbrs)[0])


@pytest.mark.parametrize("total", [0.0, 1.0])
def test_dipole_is_minus_field_derivative_of_energy(total):
    """At the minimising charges dE/dE_a = −Σ q_i r_i,a (finite field, central differences), and
    the polarizability α_ab = dμ_a/dE_b is symmetric positive definite."""
    pos, kinds = cluster()
    field = np.array([0.02, -0.01, 0.03])  # V/Å
    system = qu.make_system(pos, kinds, total_charge=total, field=field)
    energy = qu.qeq_energy("gaussian", qu.Exact(), "implicit")
    e_of = energy_of_field(energy, system)
    _, aux = energy(PARAMS, system)
    dipole = np.asarray(aux["charges"]) @ pos
    h = 1e-4
    fd = np.array([(e_of(field + h * np.eye(3)[a]) - e_of(field - h * np.eye(3)[a])) / (2 * h) for a in range(3)])
    np.testing.assert_allclose(fd, -dipole, atol=1e-8)
    np.testing.assert_allclose(jax.grad(e_of)(jnp.asarray(field)), -dipole, atol=1e-10)
    assert np.abs(dipole).max() > 0.1  # a real dipole

    def dipole_of(f):
        _, a = energy(PARAMS, dataclasses.replace(system, field=f))
        return a["charges"] @ system.positions

    alpha = np.asarray(jax.jacobian(dipole_of)(jnp.asarray(field)))  # e·Å per V/Å = e Å²/V
    np.testing.assert_allclose(alpha, alpha.T, atol=1e-10)
    assert np.linalg.eigvalsh(0.5 * (alpha + alpha.T)).min() > 0


def test_field_response_changes_charges_linearly():
    """The field enters χ_i − E·r_i: charges respond, and the response is linear in E."""
    pos, kinds = cluster(seed=2)
    energy = jax.jit(qu.qeq_energy("gaussian", qu.Exact(), "unrolled"))
    q = [np.asarray(energy(PARAMS, qu.make_system(pos, kinds, field=[0.0, 0.0, ez]))[1]["charges"]) for ez in (0.0, 0.05, 0.1)]
    assert np.abs(q[1] - q[0]).max() > 1e-3
    np.testing.assert_allclose(q[2] - q[1], q[1] - q[0], atol=1e-12)


def test_field_forces_are_exact_with_few_iterations():
    """Forces with a field (−∂E/∂r includes q_i E) are the derivative of the energy, K = 3."""
    pos, kinds = cluster(seed=3)
    system = qu.make_system(pos, kinds, total_charge=-1.0, field=[0.05, 0.02, -0.04])
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled")
    _, forces, _ = jax.jit(qu.energy_and_forces(energy))(PARAMS, system)
    e_of = jax.jit(lambda p: energy(PARAMS, dataclasses.replace(system, positions=p))[0])
    h = 1e-5
    for i, d in ((0, 2), (5, 0), (9, 1)):
        step = jnp.zeros_like(system.positions).at[i, d].set(h)
        assert abs(float(-(e_of(system.positions + step) - e_of(system.positions - step)) / (2 * h) - forces[i, d])) < 1e-8


def test_field_across_a_periodic_slab():
    """A slab periodic in a and b with a field along the normal: dE/dE_z = −μ_z."""
    pos, kinds, cell = rock_salt(1, rattle=0.15, seed=8)
    cell[2] = [0.0, 0.0, 0.0]
    field = np.array([0.0, 0.0, 0.05])
    system = system_of(pos, kinds, cell, pbc=(True, True, False), field=field)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=7.0), qu.Exact(), "implicit")
    nbrs = energy.neighbors(system)
    e_of = energy_of_field(energy, system, nbrs)
    _, aux = energy(PARAMS, system, nbrs)
    mu_z = float(np.asarray(aux["charges"]) @ pos[:, 2])
    h = 1e-4
    fd = (e_of(field + [0, 0, h]) - e_of(field - [0, 0, h])) / (2 * h)
    assert abs(float(fd) + mu_z) < 1e-8 and abs(mu_z) > 1e-3


def test_field_along_a_periodic_direction_is_refused():
    pos, kinds, cell = rock_salt(1)
    with pytest.raises(QEqInputError, match=r"component .* along the periodic cell vector a"):
        system_of(pos, kinds, cell, pbc=(True, True, False), field=[0.1, 0.0, 0.0])
    with pytest.raises(QEqInputError, match=r"field must be three finite numbers"):
        qu.make_system(pos, kinds, field=[0.1, np.nan, 0.0])


# --- the calculator ------------------------------------------------------------------------------------


def molecules():
    """Four Na-Cl pairs far enough apart to be separate fragments, close enough to exchange charge."""
    from ase import Atoms

    pos, sym = [], []
    for k, origin in enumerate([(0, 0, 0), (4.5, 0, 0), (0, 4.5, 0), (4.5, 4.5, 0.5)]):
        pos += [np.add(origin, (0, 0, 0)), np.add(origin, (2.4, 0.3 * k, 0.1))]
        sym += ["Na", "Cl"] if k % 2 == 0 else ["Cl", "Na"]
    return Atoms(sym, positions=pos)


def test_calculator_fragments_hold_exactly_and_match_core():
    from calculators import QEqCalculator

    atoms = molecules()
    labels = np.repeat(np.arange(4), 2)
    atoms.set_array("fragments", labels)
    atoms.calc = QEqCalculator(params=PARAMS, kernel="gaussian", solver="cg", iterations=3, fragment_charges=[0.0, 0.5, -0.5, 0.0])
    q = atoms.get_charges()
    np.testing.assert_allclose(np.bincount(labels, weights=q), [0.0, 0.5, -0.5, 0.0], atol=1e-13)
    species = PARAMS.species_indices(atoms.get_chemical_symbols())
    system = qu.make_system(atoms.positions, species, fragments=labels, fragment_charges=[0.0, 0.5, -0.5, 0.0])
    e, aux = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled")(PARAMS, system)
    assert abs(atoms.get_potential_energy() - float(e)) < 1e-10
    np.testing.assert_allclose(q, aux["charges"], atol=1e-12)
    # without fragments the same atoms exchange charge between the pairs
    free = molecules()
    free.calc = QEqCalculator(params=PARAMS, kernel="gaussian", solver="exact")
    assert np.abs(np.bincount(labels, weights=free.get_charges())).max() > 1e-3


def test_calculator_fragment_charges_default_to_initial_charges_and_keyword():
    from calculators import QEqCalculator

    atoms = molecules()
    atoms.set_initial_charges([1.0, 0, 0, 0, 0, 0, 0, -1.0])
    labels = np.repeat(np.arange(4), 2)
    atoms.calc = QEqCalculator(params=PARAMS, kernel="gaussian", solver="exact", fragments=labels)
    np.testing.assert_allclose(np.bincount(labels, weights=atoms.get_charges()), [1.0, 0.0, 0.0, -1.0], atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fragments=[0, 1]), r"fragments must be one integer label >= 0 per atom \(8\)"),
        (dict(fragments=[0] * 4 + [1] * 4, fragment_charges=[0.0]), r"fragment_charges needs one charge per fragment label 0..1"),
        (dict(fragments=[0] * 4 + [1] * 4, fragment_charges=[1.0, 0.0], total_charge=0.0), r"total_charge 0.0 disagrees"),
        (dict(fragment_charges=[0.0]), r"fragment_charges given without fragments"),
    ],
)
def test_calculator_bad_fragments(kwargs, message):
    from calculators import QEqCalculator

    atoms = molecules()
    atoms.calc = QEqCalculator(params=PARAMS, kernel="gaussian", **kwargs)
    with pytest.raises(QEqInputError, match=message):
        atoms.get_potential_energy()


def test_calculator_field_dipole_consistency():
    """Calculator with a field: ASE's dipole equals −dE/dE by finite differences of the calculator."""
    from calculators import QEqCalculator

    atoms = molecules()
    field = np.array([0.0, 0.03, -0.02])
    h = 1e-4
    energies = []
    for sign in (1, -1):
        atoms.calc = QEqCalculator(params=PARAMS, kernel="gaussian", solver="exact", gradient="implicit", field=field + sign * h * np.eye(3)[1])
        energies.append(atoms.get_potential_energy())
    atoms.calc = QEqCalculator(params=PARAMS, kernel="gaussian", solver="exact", gradient="implicit", field=field)
    assert abs((energies[0] - energies[1]) / (2 * h) + atoms.get_dipole_moment()[1]) < 1e-8
