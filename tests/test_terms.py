"""The per-atom terms interface: a model whose χ_i depends on the environment plugs in without
touching solvers, gradient modes or kernels, and its forces are the exact derivative of its energy.

The toy: χ_i = χ_e + a CN_i, with CN_i = Σ_j Tap(r_ij / r_c) a smooth coordination number, and
J_i = J_e (1 + b CN_i); FD-checked through unrolled K = 3 and implicit gradients, in free space,
in a periodic cell (Ewald) over an image list and over a neighbour list.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll.kernels import taper
from qeq_unroll.terms import AtomTerms, ElementTable, atom_sum

PARAMS = qu.load_params("demo-nacl-water")
SLOPE, STIFFEN, RC = 0.4, 0.05, 3.5


@dataclasses.dataclass(frozen=True)
class CoordinationTerms(ElementTable):
    """χ and J per element, shifted by the coordination number; the element pair terms as before."""

    def atom_terms(self, params, system, pairs):
        cn = atom_sum(pairs, jnp.where(pairs.mask, taper(pairs.r, RC), 0.0))
        base = super().atom_terms(params, system, pairs)
        return AtomTerms(base.chi + SLOPE * cn, base.hardness * (1.0 + STIFFEN * cn))


def rock_salt_cluster(periodic, seed=0):
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = 2.82 * grid + np.random.default_rng(seed).normal(0, 0.15, (8, 3))
    symbols = ["Na" if g.sum() % 2 == 0 else "Cl" for g in grid]
    species = PARAMS.species_indices(symbols)
    if periodic:
        return qu.make_system(positions, species, cell=np.eye(3) * 5.64, pbc=True)
    return qu.make_system(positions, species, pad_to=10)


def central_differences(energy_of, positions, entries, h=1e-5):
    out = []
    for i, k in entries:
        step = jnp.zeros_like(positions).at[i, k].set(h)
        out.append(-(energy_of(positions + step) - energy_of(positions - step)) / (2 * h))
    return np.asarray(out)


CASES = [("free", None), ("periodic", "images"), ("periodic", "list")]
GRADIENTS = [("unrolled", qu.CG(iterations=3)), ("implicit", qu.CG(tol=1e-13, max_iterations=200))]


@pytest.mark.parametrize("where, layout", CASES)
@pytest.mark.parametrize("gradient, solver", GRADIENTS, ids=[g for g, _ in GRADIENTS])
def test_environment_dependent_chi_gives_exact_forces(where, layout, gradient, solver):
    system = rock_salt_cluster(where == "periodic")
    kernel = qu.Gaussian(reciprocal="ewald")
    model = qu.qeq_energy(kernel, solver, gradient, terms=CoordinationTerms())
    neighbors = None if layout is None else model.neighbors(system, PARAMS, layout=layout)

    def energy_of(positions):
        return model(PARAMS, dataclasses.replace(system, positions=positions), neighbors)[0]

    e, forces, aux = jax.jit(qu.energy_and_forces(model))(PARAMS, system, neighbors)
    entries = [(0, 0), (3, 1), (5, 2), (7, 0)]
    fd = central_differences(jax.jit(energy_of), system.positions, entries)
    np.testing.assert_allclose(np.asarray([forces[i, k] for i, k in entries]), fd, atol=1e-7)
    assert bool(aux["converged"]) or gradient == "unrolled"
    # the environment matters: the toy's charges differ from the element table's
    plain = qu.qeq_energy(kernel, solver, gradient)(PARAMS, system, neighbors)[1]["charges"]
    assert float(jnp.max(jnp.abs(aux["charges"] - plain))) > 1e-3
    assert abs(float(jnp.sum(aux["charges"]))) < 1e-10


def test_list_and_images_agree_on_the_toy():
    """The coordination number summed over a neighbour list equals the image-list sum, and so do
    the energies and forces built on it."""
    system = rock_salt_cluster(True, seed=1)
    model = qu.qeq_energy(qu.Gaussian(reciprocal="ewald"), qu.CG(iterations=3), "unrolled", terms=CoordinationTerms())
    run = jax.jit(qu.energy_and_forces(model))
    e1, f1, _ = run(PARAMS, system, model.neighbors(system, PARAMS, layout="images"))
    e2, f2, _ = run(PARAMS, system, model.neighbors(system, PARAMS, layout="list"))
    np.testing.assert_allclose(e1, e2, rtol=1e-12)
    np.testing.assert_allclose(f1, f2, atol=1e-10)


def test_charge_dependent_terms_refuse_envelope_forces():
    @dataclasses.dataclass(frozen=True)
    class ChargeDependent(ElementTable):
        charge_dependent = True

    with pytest.raises(qu.QEqInputError, match="envelope forces are wrong at any tolerance"):
        qu.qeq_energy("gaussian", "cg", "envelope", terms=ChargeDependent())
    assert qu.qeq_energy("gaussian", "cg", "implicit", terms=ChargeDependent()).terms.charge_dependent
