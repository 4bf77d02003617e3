"""Fitting through the solver: second derivatives against finite differences, recovery of hidden
parameters, exact resume, bucketing, positivity, the chi gauge, and data-parallel fitting.

Small NaCl clusters (4-8 atoms, one size bucket) labelled by the project itself with hidden
parameters keep every compiled function small; the jitted steps are shared between tests through
module-level energy functions (the compiled step is cached on the model and the settings)."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qeq_unroll as qu
from qeq_unroll import fit as F
from qeq_unroll.dataset import Batcher, Configuration, Dataset, epoch_plan, plan_batches
from qeq_unroll.errors import QEqInputError

HIDDEN = qu.Params.from_dict(
    {
        "name": "hidden",
        "elements": {
            "Na": {"chi": 3.1, "hardness": 6.0, "sigma": 1.1},
            "Cl": {"chi": 7.6, "hardness": 9.0, "sigma": 0.9},
        },
        # Like-ion repulsion at the 3.8 Å like-ion distances of these clusters would be ~1e-4 eV:
        # such terms leave no trace in the data and could not be recovered, so there are none.
        "pairs": {"Cl-Na": {"born_mayer": {"A": 120.0, "rho": 0.31}}},
    }
)
#: Arbitrary per-element energy zero of the "reference method" (eV): offsets must absorb it.
ZERO = {"Na": -1234.5, "Cl": 321.0}

EXACT = qu.qeq_energy("gaussian", qu.Exact(), "unrolled")
UNROLLED = qu.qeq_energy("gaussian", qu.CG(iterations=3), "unrolled")  # far from converged
IMPLICIT = qu.qeq_energy("gaussian", qu.CG(iterations=30, tol=1e-14), "implicit")
ENVELOPE = qu.qeq_energy("gaussian", qu.CG(iterations=30, tol=1e-14), "envelope")
FIT_MODEL = qu.qeq_energy("gaussian", qu.CG(iterations=12), "unrolled")


def cluster(n, seed, spacing=2.7, rattle=0.12, scale=1.0):
    """n atoms (even) of a rock-salt grid near the origin, alternating Na/Cl, rattled (Å)."""
    rng = np.random.default_rng(seed)
    sites = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(2)])
    order = np.argsort(np.linalg.norm(sites - [1.0, 1.0, 0.5], axis=1) + 1e-6 * np.arange(len(sites)), kind="stable")
    na = [s for s in sites[order] if s.sum() % 2 == 0][: n // 2]
    cl = [s for s in sites[order] if s.sum() % 2 == 1][: n // 2]
    pos = scale * spacing * np.array(na + cl, float) + rng.normal(0, rattle, (n, 3))
    species = np.array([0] * (n // 2) + [1] * (n // 2), np.int32)
    return pos, species


def label(params, structures, energy=EXACT, zero=ZERO):
    """Configurations with energy, forces, charges, dipole from the model ``energy``."""
    f = jax.jit(qu.energy_and_forces(energy))
    out = []
    for k, (pos, species) in enumerate(structures):
        n = len(species)
        e, forces, aux = f(params, qu.make_system(pos, species, pad_to=qu.size_bucket(n)))
        q, forces = np.asarray(aux["charges"])[:n], np.asarray(forces)[:n]
        e = float(e) + sum(zero[params.elements[s]] for s in species)
        out.append(Configuration(pos, species, 0.0, e, np.asarray(forces), q, q @ pos, source=f"labelled:{k}"))
    return Dataset(params.elements, tuple(out))


def perturbed(params, factors):
    d = params.to_dict()
    for el, keys in factors.get("elements", {}).items():
        for key, f in keys.items():
            d["elements"][el][key] *= f
    for pair, coeffs in factors.get("pairs", {}).items():
        for c, f in coeffs.items():
            d["pairs"][pair]["born_mayer"][c] *= f
    return qu.Params.from_dict(d)


START = perturbed(
    HIDDEN,
    {
        "elements": {"Na": {"chi": 1.15, "hardness": 1.2, "sigma": 1.1}, "Cl": {"chi": 0.88, "hardness": 0.85, "sigma": 0.9}},
        "pairs": {"Cl-Na": {"A": 1.15, "rho": 0.9}},
    },
)


@pytest.fixture(scope="module")
def data():
    structures = [cluster(n, seed) for seed, n in enumerate([4, 6, 8, 8, 6, 8, 4, 8])]
    structures += [cluster(8, 100 + s, scale=sc) for s, sc in enumerate([0.93, 1.07])]
    return label(HIDDEN, structures)


# --- second derivatives through the solver --------------------------------------------------
@functools.lru_cache(maxsize=None)
def force_loss(energy):
    """Jitted force loss and its parameter gradient, ``f(params, batch)`` (compiled once per model)."""

    def loss(params, batch):
        sums = F.batch_sums(energy, params, jnp.zeros(2), batch)
        return F.loss_from_sums(sums, {"forces": 1.0})

    return jax.jit(loss), jax.jit(jax.grad(loss))


def flat(params):
    """The fittable scalars of ``params``: (name, getter, setter) triples."""
    items = []
    for key in ("chi", "hardness", "sigma"):
        for i, el in enumerate(params.elements):
            items.append((f"{key}[{el}]", key, i))
    for pair in sorted(params.pairs):
        for c in ("A", "rho"):
            items.append((f"{pair}.{c}", pair, c))
    return items


def get(params, item):
    _, key, i = item
    if key in params.pairs:
        return params.pairs[key]["born_mayer"][i]
    return getattr(params, key)[i]


def shifted(params, item, h):
    _, key, i = item
    if key in params.pairs:
        pairs = {k: {f: dict(c) for f, c in forms.items()} for k, forms in params.pairs.items()}
        pairs[key]["born_mayer"][i] = pairs[key]["born_mayer"][i] + h
        return params.replace(pairs=pairs)
    return params.replace(**{key: getattr(params, key).at[i].add(h)})


def gradient_check(energy, data):
    batch = Batcher(data.subset([0, 1, 2]), 3).all_batches()[0]
    loss, grad = force_loss(energy)
    params = START
    g = grad(params, batch)
    ad, fd = [], []
    for item in flat(params):
        x = float(get(params, item))
        h = 1e-5 * max(abs(x), 1.0)
        fd.append((float(loss(shifted(params, item, h), batch)) - float(loss(shifted(params, item, -h), batch))) / (2 * h))
        ad.append(float(get(g, item)))
    return np.asarray(ad), np.asarray(fd)


@pytest.mark.parametrize("energy", [UNROLLED, IMPLICIT], ids=["unrolled-K3", "implicit"])
def test_force_loss_parameter_gradients_match_finite_differences(energy, data):
    ad, fd = gradient_check(energy, data)
    scale = np.max(np.abs(fd))
    assert scale > 1e-3  # the test means something: the loss depends on the parameters
    assert np.max(np.abs(ad - fd) / np.maximum(np.abs(fd), 1e-3 * scale)) < 1e-6


def test_envelope_parameter_gradients_are_measurably_wrong(data):
    ad, fd = gradient_check(ENVELOPE, data)
    # Hellmann-Feynman forces are exact at the converged charges, but their parameter derivative
    # leaves out how the charges respond to the parameters: the force loss then has no gradient
    # at all with respect to chi and J, and a wrong one with respect to sigma. The pair terms do
    # not involve the charges and stay right.
    qeq = [i for i, item in enumerate(flat(START)) if item[1] in ("chi", "hardness", "sigma")]
    pairs = [i for i in range(len(fd)) if i not in qeq]
    error = np.linalg.norm(ad[qeq] - fd[qeq]) / np.linalg.norm(fd[qeq])
    assert error > 0.5, error
    assert np.all(ad[[i for i in qeq if flat(START)[i][1] in ("chi", "hardness")]] == 0.0)
    assert np.max(np.abs(ad[pairs] - fd[pairs]) / np.abs(fd[pairs])) < 1e-6
    # ... while the converged implicit gradient of the same loss is right
    ad_i, _ = gradient_check(IMPLICIT, data)
    assert np.linalg.norm(ad_i[qeq] - fd[qeq]) / np.linalg.norm(fd[qeq]) < 1e-6


# --- recovery of hidden parameters ----------------------------------------------------------
def test_recovers_hidden_parameters(data):
    config = F.FitConfig(
        train=("chi", "hardness", "sigma", "pairs"),
        weights={"energy": 1.0, "forces": 1.0, "charges": 1.0},
        optimizer="lbfgs",
        epochs=120,
        batch_size=10,
    )
    result = F.fit(START, data, IMPLICIT, config)
    p = result.params
    chi, chi0 = np.asarray(p.chi), np.asarray(HIDDEN.chi)
    # chi is defined up to a common shift (neutral data): compare the difference Cl - Na
    assert abs((chi[1] - chi[0]) / (chi0[1] - chi0[0]) - 1.0) < 0.01
    np.testing.assert_allclose(p.hardness, HIDDEN.hardness, rtol=0.01)
    np.testing.assert_allclose(p.sigma, HIDDEN.sigma, rtol=0.01)
    np.testing.assert_allclose(START.hardness, HIDDEN.hardness, rtol=0.25)
    assert abs((START.chi[1] - START.chi[0]) / (chi0[1] - chi0[0]) - 1.0) > 0.1  # it did move
    # forces on new structures, including a size the fit never saw
    fresh = label(HIDDEN, [cluster(8, 500, rattle=0.2), cluster(6, 501), cluster(2, 502)])
    m = F.evaluate(p, fresh, IMPLICIT, offsets=result.offsets)
    assert m["force_rmse"] < 1e-4, m
    assert F.evaluate(START, fresh, IMPLICIT)["force_rmse"] > 1e-2  # the start was far off
    # the fitted energy offsets absorb the reference's energy zero (only Na + Cl is determined)
    assert abs(result.offsets["Na"] + result.offsets["Cl"] - (ZERO["Na"] + ZERO["Cl"])) < 1e-3
    assert m["energy_mae"] < 1e-2  # meV/atom


# --- positivity and the chi gauge -----------------------------------------------------------
def test_positivity_by_construction():
    par = F.make_parametrisation(START, ("chi", "hardness", "sigma", "pairs"), [0, 1], True, {"Cl-Na": 2.7})
    anchor = par.anchor(START, {"Cl-Na": 2.7})
    raw = par.raw(anchor, jnp.zeros(2))
    wild = jax.tree_util.tree_map(lambda x: x - 40.0, raw)  # far below zero in raw coordinates
    p = par.params(wild, anchor)
    assert np.all(np.asarray(p.hardness) > 0) and np.all(np.asarray(p.sigma) > 0)
    assert all(float(c[k]) > 0 for forms in p.pairs.values() for c in forms.values() for k in ("A", "rho"))
    back = par.params(raw, anchor)
    assert float(back.pairs["Cl-Na"]["born_mayer"]["A"]) == pytest.approx(float(START.pairs["Cl-Na"]["born_mayer"]["A"]), rel=1e-14)
    np.testing.assert_allclose(back.hardness, START.hardness, rtol=1e-14)
    np.testing.assert_allclose(back.chi, START.chi, rtol=1e-14)


def test_fit_refuses_start_parameters_with_an_indefinite_hardness_matrix(data):
    """reaxff shielding far too weak for these ion distances (coupling at contact k_e·3 /Å ≈ 43 eV
    against J ≈ 6-9 eV): the charges run away, and the fit says so before it starts, naming the
    structures, instead of learning from unconverged charges."""
    d = START.to_dict()
    for el in d["elements"]:
        d["elements"][el]["gamma"] = 3.0
    weak = qu.Params.from_dict(d)
    energy = qu.qeq_energy(qu.get_kernel("reaxff", 8.0), qu.CG(iterations=12), "unrolled")
    with pytest.raises(qu.QEqConvergenceError, match=r"not positive definite on 5 training structure\(s\) \(labelled:2, labelled:3, labelled:5, \.\.\.\)"):
        F.fit(weak, data, energy, F.FitConfig(epochs=1, train=("chi", "hardness", "gamma")))


def test_uniform_chi_shift_is_a_gauge_and_is_held(data, uninterrupted):
    batch = Batcher(data.subset([0, 1, 2]), 3).all_batches()[0]
    loss, _ = force_loss(UNROLLED)
    shifted_chi = START.replace(chi=START.chi + 1.7)
    assert abs(float(loss(shifted_chi, batch)) - float(loss(START, batch))) < 1e-12 * float(loss(START, batch))
    # held by construction: a uniform shift of the raw chi does not change the parameters
    par = F.make_parametrisation(START, ("chi", "hardness"), [0, 1], chi_gauge=True)
    anchor = par.anchor(START)
    raw = par.raw(anchor, jnp.zeros(2))
    moved = dict(raw, chi=raw["chi"] + jnp.array([3.0, 1.0]))
    np.testing.assert_allclose(par.params(moved, anchor).chi, START.chi + jnp.array([1.0, -1.0]), rtol=1e-14)
    result, _ = uninterrupted  # a fit of chi (and more) on neutral clusters
    assert abs(float(np.mean(result.params.chi)) - float(np.mean(START.chi))) < 1e-12
    assert abs(float(result.params.chi[1] - result.params.chi[0]) - float(START.chi[1] - START.chi[0])) > 1e-4


def test_wild_learning_rate_keeps_hardness_and_widths_positive(data):
    config = F.FitConfig(**{**RESUME_CONFIG.__dict__, "epochs": 1, "learning_rate": 3.0, "schedule": "constant"})
    result = F.fit(START, data.subset(range(8)), FIT_MODEL, config)
    p = result.params
    assert np.all(np.asarray(p.hardness) > 0) and np.all(np.asarray(p.sigma) > 0)
    assert not np.allclose(p.hardness, START.hardness)


# --- batches of different sizes -------------------------------------------------------------
def test_buckets_compile_once_per_size(data):
    mixed = label(HIDDEN, [cluster(n, 40 + n) for n in (4, 6, 8, 10, 12, 4, 6)])
    plans = plan_batches(mixed, 2)
    assert {p.bucket for p in plans} == {8, 16}
    assert all(len({mixed[i].n_atoms for i in p.indices}) >= 1 and p.bucket == qu.size_bucket(mixed[p.indices[0]].n_atoms) for p in plans)
    config = F.FitConfig(**{**RESUME_CONFIG.__dict__, "epochs": 2, "seed": 3})
    before = F._adam_step._cache_size()
    F.fit(START, mixed, FIT_MODEL, config)
    # two epochs of structures of 4, 6, 8, 10 and 12 atoms: at most one compiled step per bucket
    # (the bucket of 8 may have been compiled by an earlier test of the same model and settings)
    assert F._adam_step._cache_size() - before <= 2
    after = F._adam_step._cache_size()
    F.fit(START, mixed, FIT_MODEL, F.FitConfig(**{**config.__dict__, "seed": 4, "learning_rate": 0.01}))
    assert F._adam_step._cache_size() == after
    # the epoch order is a function of (seed, epoch) only
    assert epoch_plan(mixed, 2, 3, 1) == epoch_plan(mixed, 2, 3, 1) != epoch_plan(mixed, 2, 3, 0)
    # a filler keeps the batch shape and does not count
    b = Batcher(mixed, 3).batch(plans[-1])
    assert b.size == 3 and float(b.weight.sum()) == len(plans[-1].indices)


def test_fillers_and_padding_do_not_change_the_loss(data):
    one = Batcher(data.subset([1, 2]), 2).all_batches()[0]
    padded = Batcher(data.subset([1, 2]), 3).all_batches()[0]
    s1 = F._param_sums(UNROLLED, START, jnp.zeros(2), one)[0]
    s2 = F._param_sums(UNROLLED, START, jnp.zeros(2), padded)[0]
    for k in s1:
        assert abs(float(s1[k]) - float(s2[k])) <= 1e-12 * max(1.0, abs(float(s1[k]))), k


# --- checkpoints, resume, early stopping ------------------------------------------------------
RESUME_CONFIG = F.FitConfig(train=("chi", "hardness", "sigma", "pairs"), optimizer="adam", epochs=3, batch_size=3,
                            learning_rate=0.02, checkpoint_every=2, patience=50, seed=5)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    result = F.fit(START, data.subset(range(8)), FIT_MODEL, RESUME_CONFIG, validation=data.subset([8, 9]),
                   checkpoint=d / "ck.json", log=d / "log.jsonl")
    return result, d


def params_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_ends_with_the_same_parameters(data, uninterrupted, tmp_path):
    full, _ = uninterrupted
    assert full.steps == 9  # 3 epochs x 3 batches (8 structures, batches of 3)

    def stop_at_5(info):
        if info["step"] == 5:
            raise F.FitInterrupted

    kwargs = dict(validation=data.subset([8, 9]), checkpoint=tmp_path / "ck.json", log=tmp_path / "log.jsonl")
    with pytest.raises(F.FitInterrupted):
        F.fit(START, data.subset(range(8)), FIT_MODEL, RESUME_CONFIG, callback=stop_at_5, **kwargs)
    state = F.load_checkpoint(tmp_path / "ck.json")
    assert state["step"] == 4 and state["epoch"] == 1 and state["position"] == 1  # mid-epoch
    resumed = F.fit(START, data.subset(range(8)), FIT_MODEL, RESUME_CONFIG, resume=True, **kwargs)
    params_equal(resumed.params, full.params)
    assert resumed.offsets == full.offsets and resumed.steps == full.steps
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in full.history]
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and [x["epoch"] for x in lines[1:]] == [0, 1, 2]
    for key in ("energy_mae", "force_rmse", "force_mae", "charge_rmse"):
        assert lines[-1]["train"][key] is not None and lines[-1]["validation"][key] is not None


def test_resume_refuses_a_different_fit(data, uninterrupted):
    _, d = uninterrupted
    other = F.FitConfig(**{**RESUME_CONFIG.__dict__, "learning_rate": 0.5})
    with pytest.raises(QEqInputError, match="different fit.*config"):
        F.fit(START, data.subset(range(8)), FIT_MODEL, other, validation=data.subset([8, 9]),
              checkpoint=d / "ck.json", resume=True)


def test_checkpoints_of_another_version_say_so(uninterrupted, tmp_path):
    _, d = uninterrupted
    state = json.loads((d / "ck.json").read_text())
    (tmp_path / "old.json").write_text(json.dumps({**state, "version": 0}))
    with pytest.raises(QEqInputError, match=r"old\.json has format version 0, this qeq-unroll reads version 2: start the fit again"):
        F.load_checkpoint(tmp_path / "old.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(QEqInputError, match="not a qeq-unroll fit checkpoint"):
        F.load_checkpoint(tmp_path / "other.json")


def test_interrupted_checkpoint_write_leaves_the_last_checkpoint(data, uninterrupted, tmp_path, monkeypatch):
    full, _ = uninterrupted
    path = tmp_path / "ck.json"
    real_replace = os.replace
    writes = []

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(path):
            writes.append(dst)
            if len(writes) == 3:  # killed while writing the third checkpoint
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    kwargs = dict(validation=data.subset([8, 9]), checkpoint=path)
    with pytest.raises(KeyboardInterrupt):
        F.fit(START, data.subset(range(8)), FIT_MODEL, RESUME_CONFIG, **kwargs)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json"]  # no half-written file
    state = F.load_checkpoint(path)  # still valid JSON: the second checkpoint
    assert state["step"] == 3 and state["epoch"] == 1 and state["position"] == 0
    resumed = F.fit(START, data.subset(range(8)), FIT_MODEL, RESUME_CONFIG, resume=True, **kwargs)
    params_equal(resumed.params, full.params)


def test_early_stopping_returns_the_best_epoch(data):
    # validation labelled by a different model: fitting the training set makes it worse
    other = perturbed(HIDDEN, {"elements": {"Na": {"hardness": 0.3}}, "pairs": {"Cl-Na": {"A": 3.0}}})
    val = label(other, [cluster(8, 900), cluster(6, 901)])
    config = F.FitConfig(train=("chi", "hardness", "sigma", "pairs"), optimizer="adam", epochs=30, batch_size=3,
                         learning_rate=0.02, patience=2, seed=5)
    result = F.fit(START, data.subset(range(8)), FIT_MODEL, config, validation=val)
    losses = [h["validation"]["loss"] for h in result.history]
    assert result.stopped_early and len(losses) < 30
    assert result.best_epoch == int(np.argmin(losses))
    assert len(losses) - 1 - result.best_epoch == 2


# --- data-parallel fitting ------------------------------------------------------------------
def test_data_parallel_matches_one_device(tmp_path):
    script = textwrap.dedent(
        """
        import json, sys
        import jax, numpy as np
        sys.path.insert(0, sys.argv[1])
        from tests import test_fit as T
        from qeq_unroll import fit as F
        from qeq_unroll.dataset import Batcher
        assert len(jax.devices()) == 4, jax.devices()
        data = T.label(T.HIDDEN, [T.cluster(n, s) for s, n in enumerate([4, 6, 8, 8, 6, 8, 4, 8])])
        out = {}
        for devices in (1, 4):
            config = F.FitConfig(train=("chi", "hardness", "sigma", "pairs"), optimizer="adam", epochs=1, batch_size=4,
                                 learning_rate=0.02, devices=devices, weights={"energy": 1.0, "forces": 1.0, "charges": 1.0})
            par = F.make_parametrisation(T.START, config.train, [0, 1], True)
            fitter = F.Fitter(T.FIT_MODEL, par, par.anchor(T.START), config, 4)
            raw = F._strong(par.raw(par.anchor(T.START), np.array([1.0, -2.0])))
            batch = fitter.shard(Batcher(data, 8, multiple_of=devices).all_batches()[0])
            raw_r = fitter.replicate(raw)
            loss, grad = jax.jit(fitter.loss_and_grad)(raw_r, raw_r, batch)
            if devices == 4:
                assert len(batch.system.positions.sharding.device_set) == 4
            result = F.fit(T.START, data, T.FIT_MODEL, config)
            def flat(tree):
                return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).tolist()

            out[devices] = dict(loss=float(loss), grad=flat(grad), params=flat(result.params),
                                history=[h["train"]["force_rmse"] for h in result.history])
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_ENABLE_X64="1",
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script, root], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    one, four = out["1"], out["4"]
    assert abs(one["loss"] - four["loss"]) <= 1e-12 * abs(one["loss"])
    np.testing.assert_allclose(four["grad"], one["grad"], rtol=1e-10, atol=1e-12 * np.max(np.abs(one["grad"])))
    np.testing.assert_allclose(four["params"], one["params"], rtol=1e-10)
    np.testing.assert_allclose(four["history"], one["history"], rtol=1e-10)
