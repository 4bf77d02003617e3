"""The slater kernel: exact Coulomb integrals of ns Slater densities (Rappé–Goddard 1991), against
closed forms and an independent Fourier-space quadrature; QEq charges of alkali-halide diatomics;
finite-difference forces (free space) and stress (periodic, with cutoff)."""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import slater

try:
    from test_periodic import MODES, check_fd, rock_salt, system_of
except ImportError:  # tests/ imported as a package
    from tests.test_periodic import MODES, check_fd, rock_salt, system_of

jax.config.update("jax_enable_x64", True)


def h2_coulomb_integral(r, z):
    """Closed form of the Coulomb integral of two 1s densities of exponent ζ (1/Å)."""
    x = z * r
    return (1 - (1 + 11 / 8 * x + 3 / 4 * x * x + x**3 / 6) * np.exp(-2 * x)) / r


@pytest.mark.parametrize("r", [0.05, 0.7, 1.9, 4.0, 11.0])
def test_1s_1s_closed_form(r):
    assert abs(float(slater.coulomb_integral(r, 1.3, 1, 1.3, 1)) - h2_coulomb_integral(r, 1.3)) < 1e-13


@pytest.mark.parametrize("na,nb,za,zb", [(2, 3, 1.2, 0.7), (3, 3, 0.6, 0.6), (1, 6, 2.0, 0.5), (5, 2, 1.0, 1.9), (4, 4, 0.9, 0.91)])
def test_against_fourier_quadrature(na, nb, za, zb):
    """Against J(R) = (2/π) ∫ ρ̂_a ρ̂_b sin(kR)/(kR) dk by SciPy's adaptive quadrature (its own
    error is ~1e-12 here), symmetric in a ↔ b, and → 1/R far away."""
    for r in (0.3, 1.5, 3.3, 8.0):
        j = float(slater.coulomb_integral(r, za, na, zb, nb))
        assert abs(j - slater.coulomb_integral_reference(r, za, na, zb, nb)) < 5e-12
        assert abs(j - float(slater.coulomb_integral(r, zb, nb, za, na))) < 1e-13
    assert abs(float(slater.coulomb_integral(60.0, za, na, zb, nb)) - 1 / 60.0) < 1e-13


#: Experimental bond lengths (Å) of the alkali-halide diatomics and their QEq cation charges (e)
#: with the Rappé–Goddard parameters, three decimals, as tabulated in the test suite of the
#: independent QEq implementation "cheq" (crate cheq 0.5.1, tests/alkali.rs), which follows
#: Rappé & Goddard (1991). The table of the paper itself could not be consulted here.
ALKALI_HALIDES = {
    "LiF": (1.564, 0.791), "LiCl": (2.021, 0.939), "LiBr": (2.170, 0.902), "LiI": (2.392, 0.841),
    "NaF": (1.926, 0.665), "NaCl": (2.361, 0.766), "NaBr": (2.502, 0.745), "NaI": (2.711, 0.709),
    "KF": (2.171, 0.662), "KCl": (2.667, 0.775), "KBr": (2.821, 0.768), "KI": (3.048, 0.754),
    "RbF": (2.270, 0.653), "RbCl": (2.787, 0.763), "RbBr": (2.945, 0.757), "RbI": (3.177, 0.747),
    "CsF": (2.345, 0.655), "CsCl": (2.906, 0.769), "CsBr": (3.072, 0.767), "CsI": (3.315, 0.763),
}  # fmt: skip


def test_rappe_goddard_alkali_halide_charges():
    params = qu.load_params("rappe-goddard-1991")
    energy = jax.jit(qu.qeq_energy("slater", "exact", "unrolled", coulomb_constant=qu.LAMMPS_COULOMB_CONSTANT))
    for name, (bond, charge) in ALKALI_HALIDES.items():
        system = qu.make_system([[0.0, 0.0, 0.0], [bond, 0.0, 0.0]], params.species_indices(re.findall("[A-Z][a-z]?", name)))
        _, aux = energy(params, system)
        assert abs(float(aux["charges"][0]) - charge) < 1e-3, name


def test_shielding_matters():
    """The test above is not blind: unshielded point charges give very different cations."""
    params = qu.load_params("rappe-goddard-1991")
    system = qu.make_system([[0.0, 0.0, 0.0], [2.361, 0.0, 0.0]], params.species_indices(["Na", "Cl"]))
    _, aux = qu.qeq_energy("point", "exact", "unrolled", coulomb_constant=qu.LAMMPS_COULOMB_CONSTANT)(params, system)
    assert abs(float(aux["charges"][0]) - 0.766) > 0.05


SLATER_PARAMS = qu.Params.from_dict(
    {
        "name": "slater-test",
        "elements": {
            "Na": {"chi": 2.84, "hardness": 9.0, "radius": 2.0, "n": 3},
            "Cl": {"chi": 8.56, "hardness": 12.0, "radius": 1.0, "n": 3},
        },
    }
)


@pytest.mark.parametrize("solver,gradient", MODES, ids=["unrolled-K3", "implicit"])
def test_fd_forces_and_stress_slater(solver, gradient):
    pos, kinds, cell = rock_salt(1, rattle=0.2, seed=5)
    periodic = system_of(pos, kinds, cell * 1.1)
    stress_err, force_err = check_fd(qu.Slater(cutoff=6.0), solver, gradient, periodic, "images", params=SLATER_PARAMS)
    assert stress_err < 1e-6 and force_err < 1e-7
    # free space, all pairs
    energy = qu.qeq_energy("slater", solver, gradient)
    system = qu.make_system(pos, kinds)
    _, forces, aux = jax.jit(qu.energy_and_forces(energy))(SLATER_PARAMS, system)
    assert bool(aux["positive_definite"])
    e_of = jax.jit(lambda p: energy(SLATER_PARAMS, dataclasses.replace(system, positions=p))[0])
    h = 1e-5
    for i, d in ((0, 0), (3, 1), (6, 2)):
        step = np.zeros_like(pos)
        step[i, d] = h
        fd = -(e_of(pos + step) - e_of(pos - step)) / (2 * h)
        assert abs(float(fd) - float(forces[i, d])) < 1e-7
