"""NVE energy conservation: forces unrolled through K = 3 CG iterations conserve the energy they
report as well as exact charges with implicit forces do; envelope forces at the same K do not.

A short version of ``examples/nve_energy_conservation.py`` (same helpers, ``calculators.md``):
32-atom NaCl cluster, 600 K start, 1 fs, 400 steps. Measured on this setting (seeds 0-7): unrolled /
exact 1.01-1.15, envelope / unrolled 31-129.
"""

import pytest

from calculators import QEqCalculator
from calculators.md import REFERENCE_LABEL, compare_nve, relax, setup_label, solver_setups
from calculators.structures import nacl_cluster

CALC = dict(params="demo-nacl-water", kernel="gaussian")
STEPS = 400


@pytest.fixture(scope="module")
def runs():
    start = relax(nacl_cluster(32), QEqCalculator(solver="exact", gradient="implicit", **CALC), fmax=1e-3)
    assert start.info["relax_converged"]
    return compare_nve(start, solver_setups((3,)), STEPS, dt_fs=1.0, temperature_K=600.0, seed=7, calc_kwargs=CALC)


def test_unrolled_conserves_energy_like_exact(runs):
    ref = runs[REFERENCE_LABEL].drift.max_dev
    unrolled = runs[setup_label(3, "unrolled")].drift.max_dev
    assert 0.0 < ref < 0.05  # meV/atom: the reference itself conserves energy
    assert unrolled <= 1.5 * ref, (unrolled, ref)


def test_envelope_does_not(runs):
    unrolled = runs[setup_label(3, "unrolled")].drift.max_dev
    envelope = runs[setup_label(3, "envelope")].drift.max_dev
    assert envelope >= 10.0 * unrolled, (envelope, unrolled)


def test_neural_model_unrolled_conserves_energy_like_exact(tmp_path):
    """The same with a neural model whose short-range energy takes the charges (envelope forces are
    refused for it): networks with small random last layers on the demo set's NaCl terms, a 32-atom
    cluster, 300 steps from 600 K."""
    import jax

    import qeq_unroll as qu
    from qeq_unroll.neural import neural_terms, save_model

    params = qu.load_params("demo-nacl-water").restricted(["Na", "Cl"])
    terms = neural_terms(2, cutoff=5.0, hidden=(8, 8), charge_in_short=True, max_neighbors=32)
    networks = terms.init_networks(jax.random.PRNGKey(0), 2)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 4))
    for name in ("chi", "short"):
        networks[name][-1] = {k: 0.05 * jax.random.normal(next(keys), v.shape) for k, v in networks[name][-1].items()}
    path = tmp_path / "model.json"
    save_model(path, terms, params.replace(networks=networks), qu.Gaussian(), qu.COULOMB_CONSTANT)
    calc = dict(params=str(path))
    start = relax(nacl_cluster(32), QEqCalculator(solver="exact", gradient="implicit", **calc), fmax=1e-3)
    runs = compare_nve(start, solver_setups((3,), ("unrolled",)), 300, dt_fs=1.0, temperature_K=600.0, seed=7, calc_kwargs=calc)
    ref = runs[REFERENCE_LABEL].drift.max_dev
    unrolled = runs[setup_label(3, "unrolled")].drift.max_dev
    assert 0.0 < ref < 0.05
    assert unrolled <= 1.5 * ref, (unrolled, ref)
