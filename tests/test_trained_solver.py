"""A solver trained together with the neural model (``learned.TrainedSolver``): its step sizes
stay in their ranges and never expand the error, gradients of a training loss with respect to its
arrays and forces of its energy equal finite differences, and a model file that carries it runs it."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll.energy import qeq_problem
from qeq_unroll.learned import TrainedSolver
from qeq_unroll.neural import load_model, save_model
from tests.test_neural import PARAMS, TERMS, central_differences, random_networks, rock_salt

ELEMENTS = tuple(PARAMS.elements)


def with_solver(solver, seed=0, scale=0.0):
    """PARAMS with random networks and the solver's arrays, shifted by ``scale`` × N(0, 1)."""
    arrays = solver.init_arrays()
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(arrays)))
    arrays = {k: v + scale * jax.random.normal(next(keys), v.shape) for k, v in arrays.items()}
    return PARAMS.replace(networks=dict(random_networks(TERMS[True]), solver=arrays))


def h_norm_errors(solver, params, system):
    """‖q_k − q*‖_H after k = 0..K iterations of the bound solver: K iterations with the steps
    (and momenta) from k on set to zero, which leave the iterate where it is."""
    problem = qeq_problem(qu.Gaussian(), params, system, terms=TERMS[True])
    exact = qu.Exact().run(problem)[0]
    bound = solver.bind(params)

    @jax.jit
    def error(keep):
        zeroed = {"steps": bound.steps * keep}
        if getattr(bound, "momenta", None) is not None:
            zeroed["momenta"] = bound.momenta * keep
        e = dataclasses.replace(bound, **zeroed).run(problem)[0] - exact
        return jnp.sqrt(e @ problem.hardness.matvec(e))

    k = solver.iterations
    return np.asarray([float(error((jnp.arange(k) < j).astype(float))) for j in range(k + 1)])


@pytest.mark.parametrize("family", ["gd", "nag"])
def test_learned_steps_stay_in_range_and_never_expand_the_error(family):
    """Raw steps of any size map into (0, 1.9)/L̂ (GD) or (0, 1)/L̂ and momenta into (0, 1)
    (NAG); GD at the largest steps still contracts the error in the H norm at every iteration."""
    solver = TrainedSolver(family, 6, "steps", "gaussian", ELEMENTS)
    for raw in (-40.0, 0.0, 40.0):
        arrays = {k: jnp.full_like(v, raw) for k, v in solver.init_arrays().items()}
        bound = solver.bind(PARAMS.replace(networks={"solver": arrays}))
        upper = 1.9 if family == "gd" else 1.0
        assert np.all((np.asarray(bound.steps) >= 0) & (np.asarray(bound.steps) <= upper))
        if family == "nag":
            assert np.all((np.asarray(bound.momenta) >= 0) & (np.asarray(bound.momenta) <= 1))
    params = with_solver(solver)
    params = params.replace(networks=dict(params.networks, solver={k: jnp.full_like(v, 40.0) for k, v in params.networks["solver"].items()}))
    errors = h_norm_errors(solver, params, rock_salt(False, extra_na=True))
    if family == "gd":
        assert np.all(np.diff(errors) <= 1e-12 * errors[0]), errors
    assert errors[-1] < errors[0]


CASES = [("nag", "steps", 3), ("cg", "all", 2)]


@pytest.mark.parametrize("family, parts, k", CASES, ids=[f"{f}-{p}-K{k}" for f, p, k in CASES])
def test_joint_training_gradients_and_forces_equal_finite_differences(family, parts, k):
    """The gradient of a training loss (energy and forces of one structure against fixed targets)
    with respect to the solver's raw arrays, and the forces, equal central differences."""
    solver = TrainedSolver(family, k, parts, "gaussian", ELEMENTS)
    params = with_solver(solver, scale=0.3)
    system = rock_salt(False, extra_na=True)
    model = qu.qeq_energy("gaussian", solver, "unrolled", terms=TERMS[True])
    ef = qu.energy_and_forces(model)
    target = jnp.asarray(np.random.default_rng(3).normal(0, 0.5, system.positions.shape))

    def loss(arrays):
        e, f, _ = ef(params.replace(networks=dict(params.networks, solver=arrays)), system)
        return e / 9 + jnp.sum(((f - target) * system.mask[:, None]) ** 2)

    arrays = params.networks["solver"]
    grad = jax.jit(jax.grad(loss))(arrays)
    loss_jit = jax.jit(loss)
    for name in ("steps", "precond") if parts == "all" else arrays:
        flat = np.asarray(arrays[name]).reshape(-1)
        for i in (0, flat.size - 1):
            h = 1e-5
            shifted = [dict(arrays, **{name: jnp.asarray(flat + s * h * np.eye(flat.size)[i]).reshape(arrays[name].shape)})
                       for s in (1, -1)]  # fmt: skip
            fd = (float(loss_jit(shifted[0])) - float(loss_jit(shifted[1]))) / (2 * h)
            analytic = float(np.asarray(grad[name]).reshape(-1)[i])
            assert abs(fd - analytic) < 1e-6 * max(1.0, abs(fd)), (name, i, fd, analytic)
    energy_of = jax.jit(lambda x: model(params, dataclasses.replace(system, positions=x))[0])
    forces = jax.jit(ef)(params, system)[1]
    entries = [(0, 0), (4, 1), (8, 2)]
    fd = central_differences(energy_of, system.positions, entries)
    assert np.max(np.abs(fd - np.asarray([forces[i, c] for i, c in entries]))) < 1e-7


def test_a_model_file_runs_the_solver_it_was_trained_with(tmp_path):
    from ase import Atoms

    from calculators import QEqCalculator

    solver = TrainedSolver("nag", 3, "steps", "gaussian", ELEMENTS)
    params = with_solver(solver, scale=1.0)
    path = tmp_path / "model.json"
    save_model(path, TERMS[True], params, qu.Gaussian(), 14.4, solver=solver)
    settings = load_model(path)[2]
    assert settings["solver"]["trained"] == solver and json.loads(path.read_text())["solver"]["iterations"] == 3
    system = rock_salt(False)
    atoms = Atoms(["Na" if int(s) == 0 else "Cl" for s in np.asarray(system.species)[:8]], positions=np.asarray(system.positions)[:8])
    for calc_kw, run in (({}, solver), ({"solver": "cg"}, qu.CG(tol=1e-10))):
        atoms.calc = QEqCalculator(params=str(path), **calc_kw)
        model = qu.qeq_energy("gaussian", run, terms=TERMS[True], coulomb_constant=14.4)
        assert abs(atoms.get_potential_energy() - float(model(params, system)[0])) < 1e-9
    three_steps = float(qu.qeq_energy("gaussian", solver, terms=TERMS[True], coulomb_constant=14.4)(params, system)[0])
    assert abs(three_steps - atoms.get_potential_energy()) > 1e-6  # K = 3 and converged differ: the default mattered


def test_fit_refuses_a_learned_solver_without_a_network_or_a_fixed_k(tmp_path, capsys):
    from calculators.cli import main
    from calculators.data import shipped_reference

    out = str(tmp_path / "m.json")
    assert main(["fit", str(shipped_reference("train")), "--solver", "learned", "--out", out]) != 0
    assert "--model neural" in capsys.readouterr().err
    assert main(["fit", str(shipped_reference("ct-train")), "--model", "neural", "--solver", "learned", "-K", "none", "--out", out]) != 0
    assert "fixed K" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before a split is drawn
