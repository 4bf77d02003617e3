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


GRADIENTS = [("unrolled", qu.CG(iterations=3)), ("implicit", qu.CG(tol=1e-13, max_iterations=200))]
CASES = [("free", None, g) for g in GRADIENTS] + [("periodic", "images", GRADIENTS[0]), ("periodic", "list", GRADIENTS[0]),
                                                  ("periodic", "list", GRADIENTS[1])]  # fmt: skip


@pytest.mark.parametrize("where, layout, case", CASES, ids=[f"{w}-{lay}-{g}" for w, lay, (g, _) in CASES])
def test_environment_dependent_chi_gives_exact_forces(where, layout, case):
    gradient, solver = case
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
    assert abs(float(jnp.sum(aux["charges"]))) < 1e-10


def test_the_environment_reaches_the_charges():
    """The toy's coordination numbers are those of the pairs, on any layout, and they move the
    charges away from the element table's."""
    system = rock_salt_cluster(True, seed=1)
    model = qu.qeq_energy(qu.Gaussian(reciprocal="ewald"), qu.CG(iterations=3), "unrolled", terms=CoordinationTerms())
    x = np.asarray(system.positions)
    d = x[None, :, None, :] - x[:, None, None, :] + (np.asarray(list(np.ndindex(3, 3, 3))) - 1)[None, None] * 5.64
    r = np.linalg.norm(d, axis=-1)
    expected = np.sum(np.where((r > 0) & (r < RC), np.asarray(taper(jnp.asarray(r), RC)), 0.0), axis=(1, 2))
    for layout in ("images", "list"):
        neighbors = model.neighbors(system, PARAMS, layout=layout)
        pairs = qu.energy._geometry(model.kernel, system, neighbors.pairs, neighbors.reciprocal)
        np.testing.assert_allclose(atom_sum(pairs, jnp.where(pairs.mask, taper(pairs.r, RC), 0.0)), expected, atol=1e-12)
    q = model(PARAMS, system, neighbors)[1]["charges"]
    plain = qu.qeq_energy(model.kernel, model.solver, "unrolled")(PARAMS, system, neighbors)[1]["charges"]
    assert float(jnp.max(jnp.abs(q - plain))) > 1e-3


def test_charge_dependent_terms_refuse_envelope_forces():
    @dataclasses.dataclass(frozen=True)
    class ChargeDependent(ElementTable):
        charge_dependent = True

    with pytest.raises(qu.QEqInputError, match="envelope forces are wrong at any tolerance"):
        qu.qeq_energy("gaussian", "cg", "envelope", terms=ChargeDependent())
    assert qu.qeq_energy("gaussian", "cg", "implicit", terms=ChargeDependent()).terms.charge_dependent
