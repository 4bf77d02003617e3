"""Fitting on periodic data: parameter gradients of energy, force and stress losses against central
finite differences through unconverged (K = 3) and implicit solves, for a cutoff kernel over image
lists and for Ewald sums; padded neighbours equal unpadded ones; batches mixing free-space and
periodic structures; recovery of hidden parameters from periodic cells.

The data are labelled by the project itself (exact solves) with hidden parameters: rattled and
strained rock-salt NaCl cells of 8 and 16 atoms and a free-space cluster."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import fit as F
from qeq_unroll.dataset import Configuration, Dataset
from qeq_unroll.loss import VOIGT
from qeq_unroll.neighbors import stackable

HIDDEN = qu.Params.from_dict(
    {
        "name": "hidden",
        "elements": {
            "Na": {"chi": 3.1, "hardness": 8.0, "sigma": 1.1, "gamma": 0.45},
            "Cl": {"chi": 7.6, "hardness": 10.0, "sigma": 0.9, "gamma": 0.55},
        },
        "pairs": {"Cl-Na": {"born_mayer": {"A": 120.0, "rho": 0.31}}},
    }
)
KERNELS = {"reaxff": qu.get_kernel("reaxff", 6.0), "gaussian": qu.get_kernel("gaussian")}


def rocksalt(repeat, seed, rattle=0.2, strain=0.03, a=5.64):
    """Conventional rock-salt NaCl cells repeated ``repeat`` times along a, rattled (Å) and strained."""
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    frac = np.concatenate([base, base + [0.5, 0, 0]])
    frac = np.concatenate([(frac + [r, 0, 0]) / [repeat, 1, 1] for r in range(repeat)])
    species = np.tile([0] * 4 + [1] * 4, repeat).astype(np.int32)
    eps = rng.uniform(-strain, strain, (3, 3))
    cell = np.diag([repeat * a, a, a]) @ (np.eye(3) + 0.5 * (eps + eps.T))
    return frac @ cell + rng.normal(0, rattle, frac.shape), species, cell


def cluster(seed):
    """A free-space Na4Cl4 cube, rattled."""
    pos, species, _ = rocksalt(1, seed, rattle=0.1, strain=0.0)
    return pos * 0.5, species, None


def label(model, structures, params=HIDDEN):
    """Configurations with energy, forces, charges and (for cells) stress from ``model``."""
    out = []
    for k, (pos, species, cell) in enumerate(structures):
        s = qu.make_system(pos, species, cell=cell)
        if cell is None:
            e, f, aux = qu.energy_and_forces(model)(params, s)
            stress = None
        else:
            e, f, st, aux = qu.energy_forces_stress(model)(params, s, model.neighbors(s, params, layout="images"))
            stress = np.asarray(st)[VOIGT]
        pbc = (cell is not None,) * 3
        out.append(Configuration(pos, species, 0.0, float(e), np.asarray(f), np.asarray(aux["charges"]), None,
                                 source=f"labelled:{k}", cell=cell, pbc=pbc, stress=stress))  # fmt: skip
    return Dataset(params.elements, tuple(out))


@functools.lru_cache(maxsize=None)
def data(kernel):
    exact = qu.QEqModel(KERNELS[kernel], qu.Exact(), qu.get_gradient("unrolled"))
    structures = [rocksalt(2, 1)] + ([cluster(2)] if kernel == "gaussian" else [])
    return label(exact, structures)


WEIGHTS = {"energy": 1.0, "forces": 1.0, "stress": 1.0e3}


@pytest.mark.parametrize("kernel", ["reaxff", "gaussian"])
@pytest.mark.parametrize("mode", ["unrolled", "implicit"])
def test_parameter_gradients_equal_finite_differences(kernel, mode):
    """d(loss)/dθ of energy + force + stress errors on a 16-atom cell (and, for Ewald, a free-space
    cluster in the same data set) equals central differences to 1e-6, K = 3 unconverged or implicit."""
    solver = qu.CG(iterations=3) if mode == "unrolled" else qu.CG(iterations=60, tol=1e-13)
    model = qu.QEqModel(KERNELS[kernel], solver, qu.get_gradient(mode))
    start = HIDDEN.replace(chi=HIDDEN.chi + jnp.array([0.2, -0.1]), hardness=HIDDEN.hardness * 1.1)
    batches = F.batcher_for(data(kernel), model, start, 4).all_batches()
    assert len(batches) == (2 if kernel == "gaussian" else 1)  # free space and periodic never share a batch

    def loss(p):
        sums = [F.batch_sums(model, p, jnp.zeros(2), b) for b in batches]
        total = functools.reduce(F.add_sums, sums)
        return F.loss_from_sums(total, WEIGHTS), total["unconverged"]

    value = jax.jit(loss)
    grad = jax.jit(jax.grad(lambda p: loss(p)[0]))(start)
    assert (value(start)[1] > 0) == (mode == "unrolled")  # K = 3 is far from converged
    width = "sigma" if kernel == "gaussian" else "gamma"
    for key in ("chi", "hardness", width):
        for i in range(2):
            h = 1e-5 * max(1.0, abs(float(getattr(start, key)[i])))
            up = value(start.replace(**{key: getattr(start, key).at[i].add(h)}))[0]
            down = value(start.replace(**{key: getattr(start, key).at[i].add(-h)}))[0]
            fd = (up - down) / (2 * h)
            assert float(getattr(grad, key)[i]) == pytest.approx(float(fd), rel=1e-6, abs=1e-9), (key, i)
    bm = lambda p, a: p.replace(pairs={"Cl-Na": {"born_mayer": {"A": a, "rho": 0.31}}})  # noqa: E731
    fd = (value(bm(start, 120.01))[0] - value(bm(start, 119.99))[0]) / 0.02
    assert float(grad.pairs["Cl-Na"]["born_mayer"]["A"]) == pytest.approx(float(fd), rel=1e-6)


@pytest.mark.parametrize("kernel", ["reaxff", "gaussian"])
def test_stackable_neighbours_change_nothing(kernel):
    """Padding the image translations and Miller indices to size buckets leaves energy, forces and
    stress unchanged (the padding lies beyond every cutoff / is the skipped k = 0)."""
    model = qu.QEqModel(KERNELS[kernel], qu.Exact(), qu.get_gradient("unrolled"))
    pos, species, cell = rocksalt(1, 5)
    s = qu.make_system(pos, species, cell=cell)
    nb = model.neighbors(s, HIDDEN, layout="images")
    padded = stackable(nb)
    assert padded.pairs.shifts.shape[0] > nb.pairs.shifts.shape[0]
    if kernel == "gaussian":
        assert padded.reciprocal.miller.shape[0] > nb.reciprocal.miller.shape[0]
    evaluate = qu.energy_forces_stress(model)
    for a, b in zip(evaluate(HIDDEN, s, nb)[:3], evaluate(HIDDEN, s, padded)[:3]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)


def perturbed(params, factor):
    """``params`` with χ, J, σ, γ and the pair coefficients scaled by ``factor[key]`` per element."""
    d = params.to_dict()
    for el, f in zip(("Na", "Cl"), (1.0, -1.0)):
        for key in ("chi", "hardness", "sigma", "gamma"):
            d["elements"][el][key] *= 1.0 + f * factor
    bm = d["pairs"]["Cl-Na"]["born_mayer"]
    bm["A"], bm["rho"] = bm["A"] * (1 + 1.5 * factor), bm["rho"] * (1 - factor)
    return qu.Params.from_dict(d)


def assert_recovered(fitted, hidden=HIDDEN, width="gamma", rtol=0.01):
    dchi = float(fitted.chi[1] - fitted.chi[0]) / float(hidden.chi[1] - hidden.chi[0])
    assert abs(dchi - 1.0) < rtol
    np.testing.assert_allclose(fitted.hardness, hidden.hardness, rtol=rtol)
    np.testing.assert_allclose(getattr(fitted, width), getattr(hidden, width), rtol=rtol)
    for c in ("A", "rho"):
        got, want = fitted.pairs["Cl-Na"]["born_mayer"][c], hidden.pairs["Cl-Na"]["born_mayer"][c]
        assert float(got) == pytest.approx(float(want), rel=rtol), c


def test_default_fit_recovers_hidden_parameters_from_periodic_cells():
    """The default optimiser (Levenberg–Marquardt) on noise-free energies, forces and stresses of
    rattled, strained cells (reaxff, 6 Å cutoff, image lists), from a start 12 % off: Δχ, J, γ and
    the Born–Mayer A and ρ within 1 % (Adam with its defaults stays 10-25 % away on such data:
    benchmarks/bench_fit.py)."""
    exact = qu.QEqModel(KERNELS["reaxff"], qu.Exact(), qu.get_gradient("unrolled"))
    train = label(exact, [rocksalt(1, 10 + s, rattle=0.15) for s in range(6)])
    start = perturbed(HIDDEN, 0.12)
    model = qu.QEqModel(KERNELS["reaxff"], qu.CG(iterations=20), qu.get_gradient("unrolled"))
    config = F.FitConfig(train=("chi", "hardness", "gamma", "pairs"), weights=WEIGHTS, epochs=100)
    assert config.optimizer == "lm"
    result = F.fit(start, train, model, config)
    assert_recovered(result.params)
    with pytest.raises(AssertionError):
        assert_recovered(start)
    assert result.history[-1]["train"]["stress_rmse_gpa"] < 1e-4
    assert len(result.history) < 100  # stopped at the minimum


def test_widths_that_outgrow_the_ewald_cutoff_are_named():
    """The cells of a fit are summed with the Ewald cutoff of the start widths; fitted widths that
    need a longer one are reported with the cutoff they need."""
    from types import SimpleNamespace

    run = SimpleNamespace(energy=qu.QEqModel(KERNELS["gaussian"], qu.Exact(), qu.get_gradient("unrolled")),
                          train=data("gaussian"), params=HIDDEN)  # fmt: skip
    assert F._ewald_warnings(run, HIDDEN.replace(sigma=HIDDEN.sigma * 1.15)) == []
    (message,) = F._ewald_warnings(run, HIDDEN.replace(sigma=HIDDEN.sigma * 1.5))
    assert "largest σ 1.65 Å" in message and "need an Ewald real-space cutoff of 14.16 Å" in message, message
