"""The neural charge model: symmetry functions against a direct loop, forces and stress equal to
finite differences of the reported energy (unrolled K = 2 and 3, implicit; free space and
periodic; with and without the charge in the short-range network), envelope forces visibly wrong
once the short-range energy depends on the charges, invariances, Σq = Q, an untrained model equal
to its element table, and the model file."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll.descriptors import cutoff_function
from qeq_unroll.energy import layout_pairs
from qeq_unroll.neural import MODEL_VERSION, NeuralTerms, load_model, neural_terms, save_model

PARAMS = qu.load_params("demo-nacl-water").restricted(["Na", "Cl"])
A = 5.64


def random_networks(terms, seed=0, scale=0.3):
    """Networks whose last layers are not zero, so every output reaches the energy."""
    net = terms.init_networks(jax.random.PRNGKey(seed), 2)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), 16))
    for name in ("chi", "short"):
        last = net[name][-1]
        net[name][-1] = {k: scale * jax.random.normal(next(keys), v.shape) for k, v in last.items()}
    return net


def rock_salt(periodic, seed=0, extra_na=False):
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = 2.82 * grid + np.random.default_rng(seed).normal(0, 0.12, (8, 3))
    symbols = ["Na" if g.sum() % 2 == 0 else "Cl" for g in grid]
    if extra_na:
        positions = np.vstack([positions, [2.82 * 2, 0.1, 0.0]])
        symbols.append("Na")
    species = PARAMS.species_indices(symbols)
    if periodic:
        return qu.make_system(positions, species, cell=np.eye(3) * A, pbc=True)
    return qu.make_system(positions, species, total_charge=float(extra_na), pad_to=12)


def central_differences(energy_of, x, entries, h=1e-5):
    return np.asarray([-(energy_of(x.at[i, k].add(h)) - energy_of(x.at[i, k].add(-h))) / (2 * h) for i, k in entries])


TERMS = {q: neural_terms(2, cutoff=5.0, hidden=(8, 8), charge_in_short=q) for q in (False, True)}
SOLVERS = {"unrolled2": ("unrolled", qu.CG(iterations=2)), "unrolled3": ("unrolled", qu.CG(iterations=3)),
           "implicit": ("implicit", qu.CG(tol=1e-13, max_iterations=300))}  # fmt: skip
CASES = [("free", None, "unrolled2", True), ("free", None, "unrolled3", False), ("free", None, "implicit", True),
         ("periodic", "images", "unrolled2", True), ("periodic", "images", "implicit", False),
         ("periodic", "list", "unrolled3", True)]  # fmt: skip


@pytest.mark.parametrize("where, layout, solver, charge_in_short", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_forces_and_stress_are_derivatives_of_the_energy(where, layout, solver, charge_in_short):
    gradient, cg = SOLVERS[solver]
    terms = TERMS[charge_in_short]
    params = PARAMS.replace(networks=random_networks(terms))
    system = rock_salt(where == "periodic")
    model = qu.qeq_energy(qu.Gaussian(reciprocal="ewald"), cg, gradient, terms=terms)
    neighbors = None if layout is None else model.neighbors(system, params, layout=layout)
    entries = [(0, 0), (3, 1), (6, 2)]
    energy_of = jax.jit(lambda x: model(params, dataclasses.replace(system, positions=x), neighbors)[0])
    fd = central_differences(energy_of, system.positions, entries)
    if layout is None:
        e, forces, aux = jax.jit(qu.energy_and_forces(model))(params, system)
    else:
        e, forces, stress, aux = jax.jit(qu.energy_forces_stress(model))(params, system, neighbors)
        h = 1e-6  # strain xx and xy: (E(+h) − E(−h)) / (2 h V)
        for a, b in ((0, 0), (0, 1)):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = h
            e_at = [float(model(params, dataclasses.replace(system, positions=system.positions @ (np.eye(3) + s * eps),
                                cell=system.cell @ (np.eye(3) + s * eps)), neighbors)[0]) for s in (1, -1)]  # fmt: skip
            expected = (e_at[0] - e_at[1]) / (2 * h * A**3) / (1 if a == b else 2)
            assert abs(float(stress[a, b]) - expected) < 1e-7
    np.testing.assert_allclose(np.asarray([forces[i, k] for i, k in entries]), fd, atol=1e-7)
    assert gradient == "unrolled" or bool(aux["converged"])
    assert abs(float(jnp.sum(aux["charges"]))) < 1e-10
    assert float(jnp.max(jnp.abs(forces))) > 1e-2  # the check is not trivially met


def test_envelope_forces_are_wrong_when_the_short_range_energy_depends_on_the_charges():
    """Hold converged charges fixed (envelope) and the forces miss the ∂E_short/∂q dq/dR part
    by far more than the solve's error; implicit gradients keep it."""

    @dataclasses.dataclass(frozen=True)
    class Unannounced(NeuralTerms):
        @property
        def charge_dependent(self):
            return False  # hides the charge dependence, so the model accepts envelope gradients

    terms = Unannounced(**{f.name: getattr(TERMS[True], f.name) for f in dataclasses.fields(NeuralTerms)})
    params = PARAMS.replace(networks=random_networks(terms))
    system = rock_salt(False)
    tight = qu.CG(tol=1e-13, max_iterations=300)
    entries = [(0, 0), (3, 1), (6, 2)]
    errors = {}
    for gradient in ("envelope", "implicit"):
        model = qu.qeq_energy("gaussian", tight, gradient, terms=terms)
        _, forces, aux = jax.jit(qu.energy_and_forces(model))(params, system)
        assert bool(aux["converged"])
        energy_of = jax.jit(lambda x: model(params, dataclasses.replace(system, positions=x))[0])
        fd = central_differences(energy_of, system.positions, entries)
        errors[gradient] = np.max(np.abs(np.asarray([forces[i, k] for i, k in entries]) - fd))
    assert errors["implicit"] < 1e-7
    assert errors["envelope"] > 1e-3


def test_symmetry_functions_equal_a_direct_loop_and_agree_across_layouts():
    terms = neural_terms(2, cutoff=5.0)
    sf = terms.descriptors
    system = rock_salt(False, seed=3)
    x, s = np.asarray(system.positions)[:8], np.asarray(system.species)[:8]
    fc = lambda r: np.asarray(cutoff_function(jnp.asarray(r), sf.cutoff))  # noqa: E731
    expected = np.zeros((8, sf.size))
    pair_index = {(e, f): k for k, (e, f) in enumerate(zip(*np.triu_indices(2)))}
    for i in range(8):
        for j in range(8):
            rij = np.linalg.norm(x[j] - x[i])
            if j == i or rij >= sf.cutoff:
                continue
            for a, (eta, rs) in enumerate(sf.radial):
                expected[i, s[j] * len(sf.radial) + a] += np.exp(-eta * (rij - rs) ** 2) * fc(rij)
            for k in range(j + 1, 8):
                rik, rjk = np.linalg.norm(x[k] - x[i]), np.linalg.norm(x[k] - x[j])
                if k == i or rik >= sf.cutoff:
                    continue
                cos = np.dot(x[j] - x[i], x[k] - x[i]) / (rij * rik)
                p = pair_index[tuple(sorted((s[j], s[k])))]
                for b, (eta, zeta, lam) in enumerate(sf.angular):
                    g = 2 ** (1 - zeta) * (1 + lam * cos) ** zeta * np.exp(-eta * (rij**2 + rik**2 + rjk**2))
                    expected[i, 2 * len(sf.radial) + p * len(sf.angular) + b] += g * fc(rij) * fc(rik) * fc(rjk)
    g, count = sf(layout_pairs(qu.Gaussian(), system), system.species)
    np.testing.assert_allclose(g[:8], expected, rtol=1e-10, atol=1e-12)
    within = (np.linalg.norm(x[:, None] - x[None], axis=-1) < sf.cutoff).sum(axis=1) - 1
    assert np.all(np.asarray(g[8:]) == 0.0) and np.array_equal(np.asarray(count[:8]), within)  # padding: no environment
    periodic = rock_salt(True, seed=3)
    model = qu.qeq_energy(qu.Gaussian(reciprocal="ewald"), terms=terms)
    by_layout = [sf(layout_pairs(model.kernel, periodic, model.neighbors(periodic, PARAMS, layout=lay)), periodic.species)[0]
                 for lay in ("images", "list")]  # fmt: skip
    np.testing.assert_allclose(by_layout[0], by_layout[1], rtol=1e-10, atol=1e-12)
    assert float(jnp.max(by_layout[0])) > 1.0


def test_invariances_charge_sum_and_an_untrained_model_is_its_element_table():
    terms = TERMS[True]
    params = PARAMS.replace(networks=random_networks(terms))
    system = rock_salt(False, seed=5, extra_na=True)  # Na5Cl4+, 9 atoms in 12 slots
    model = qu.qeq_energy("gaussian", qu.CG(iterations=4), "unrolled", terms=terms)
    evaluate = jax.jit(qu.energy_and_forces(model))
    e, f, aux = evaluate(params, system)
    assert abs(float(jnp.sum(aux["charges"])) - 1.0) < 1e-10
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    perm = np.r_[np.random.default_rng(2).permutation(9), np.arange(9, 12)]
    x = np.asarray(system.positions)
    moved = x[perm] @ rot.T + np.array([1.0, -2.0, 0.5])
    moved[9:] = x[9:]
    other = dataclasses.replace(system, positions=jnp.asarray(moved), species=system.species[perm])
    e2, f2, aux2 = evaluate(params, other)
    assert abs(float(e2 - e)) < 1e-10
    np.testing.assert_allclose(np.asarray(f2[:9]), np.asarray(f[perm][:9]) @ rot.T, atol=1e-9)
    np.testing.assert_allclose(np.asarray(aux2["charges"][:9]), np.asarray(aux["charges"][perm][:9]), atol=1e-10)
    fresh = PARAMS.replace(networks=terms.init_networks(jax.random.PRNGKey(0), 2))
    table = qu.qeq_energy("gaussian", qu.CG(iterations=4), "unrolled")
    assert abs(float(model(fresh, system)[0] - table(PARAMS, system)[0])) < 1e-12


def test_model_file_round_trip_and_its_errors(tmp_path):
    from calculators import QEqCalculator
    from ase import Atoms

    terms = TERMS[True]
    params = PARAMS.replace(networks=random_networks(terms))
    path = tmp_path / "model.json"
    save_model(path, terms, params, qu.Gaussian(), 14.4)
    loaded_terms, loaded, settings = load_model(path)
    assert loaded_terms == terms
    assert settings == {"kernel": {"name": "gaussian", "cutoff": None}, "coulomb_constant": 14.4, "charges": True,
                        "energy_offsets": {"Na": 0.0, "Cl": 0.0}, "solver": None}
    system = rock_salt(False)
    model = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled", 14.4, terms=terms)
    assert float(model(loaded, system)[0]) == float(model(params, system)[0])
    x = np.asarray(system.positions)[:8]
    atoms = Atoms(["Na" if int(s) == 0 else "Cl" for s in np.asarray(system.species)[:8]], positions=x)
    atoms.calc = QEqCalculator(params=str(path), solver="cg", iterations=3)
    assert abs(atoms.get_potential_energy() - float(model(params, system)[0])) < 1e-10
    wrong = Atoms("NaO", positions=[[0, 0, 0], [2.5, 0, 0]])
    wrong.calc = QEqCalculator(params=str(path))
    with pytest.raises(qu.QEqInputError, match="element.*O.*missing"):
        wrong.get_potential_energy()
    data = json.loads(path.read_text())
    data["version"] = MODEL_VERSION + 1
    (tmp_path / "future.json").write_text(json.dumps(data))
    with pytest.raises(qu.QEqInputError, match=f"version {MODEL_VERSION + 1}, this qeq-unroll reads version 1 or {MODEL_VERSION}"):
        QEqCalculator(params=str(tmp_path / "future.json"))
    data["version"] = MODEL_VERSION
    data["terms"]["max_neighbors"] = 3  # the 8-atom cube has 7 neighbours within 5 Å
    (tmp_path / "narrow.json").write_text(json.dumps(data))
    atoms.calc = QEqCalculator(params=str(tmp_path / "narrow.json"), solver="cg", iterations=3)
    with pytest.raises(qu.QEqInputError, match="7 neighbours within 5.0 Å.*at most 3"):
        atoms.get_potential_energy()


def test_fit_from_the_command_line_learns_and_its_model_file_runs_in_ase(tmp_path):
    """``qeq-unroll fit --model neural`` on neutral and charged NaCl clusters of the shipped
    charge-transfer set: the training force error falls, the model file gives the calculator the
    reference's energy scale and Σq = Q; ``--model local`` writes a model without charges."""
    import ase.io

    from calculators import QEqCalculator
    from calculators.cli import main
    from calculators.data import shipped_reference

    frames = [a for a in ase.io.read(shipped_reference("ct-train"), ":") if len(a) <= 9]
    frames = [a for a in frames if a.info["system"] == "nacl"][:12] + [a for a in frames if a.info["system"] == "nacl+"][:12]
    data = tmp_path / "train.xyz"
    ase.io.write(data, frames)
    out = tmp_path / "model.json"
    common = ["--validation", "0", "--hidden", "8", "--no-progress", "--batch-size", "8"]
    assert main(["fit", str(data), "--model", "neural", "--out", str(out), "--epochs", "4", *common]) == 0
    log = [json.loads(line) for line in (tmp_path / "model.log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r["event"] == "start")["train"]["force_rmse"]
    assert [r for r in log if r["event"] == "epoch"][-1]["train"]["force_rmse"] < 0.9 * start
    charged = next(a for a in frames if a.info["total_charge"] == 1)
    atoms = charged.copy()
    atoms.calc = QEqCalculator(params=str(out), solver="cg", iterations=20, total_charge=1.0)
    assert abs(atoms.get_charges().sum() - 1.0) < 1e-10
    assert abs(atoms.get_potential_energy() - charged.info["REF_energy"]) / len(atoms) < 0.05  # eV/atom
    local = tmp_path / "local.json"
    assert main(["fit", str(data), "--model", "local", "--out", str(local), "--epochs", "1", *common]) == 0
    assert load_model(local)[2]["charges"] is False
    atoms.calc = QEqCalculator(params=str(local))
    assert np.all(atoms.get_charges() == 0.0)
    with pytest.raises(qu.QEqInputError, match="trained with solver=none; got solver=cg"):
        QEqCalculator(params=str(local), solver="cg")
