"""Reference data for fitting: the extended XYZ reader and its errors, the shipped GFN2-xTB set,
the persisted split, and the ``qeq-unroll fit`` / ``plot-fit`` commands end to end."""

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

import qeq_unroll as qu
from calculators.cli import main
from calculators.data import read_reference, shipped_reference
from qeq_unroll.dataset import persisted_split, split_indices
from qeq_unroll.errors import QEqInputError

PARAMS = qu.load_params("demo-nacl-water")


def frame(n=4, seed=0, energy=-10.0, symbols=None):
    rng = np.random.default_rng(seed)
    symbols = symbols or ["Na", "Cl"] * (n // 2)
    a = Atoms(symbols, positions=2.8 * np.array([(i % 2, (i // 2) % 2, i // 4) for i in range(n)], float))
    a.positions += rng.normal(0, 0.05, a.positions.shape)
    a.info["REF_energy"] = energy
    a.info["REF_dipole"] = np.array([0.1, 0.0, -0.2])
    a.arrays["REF_forces"] = rng.normal(0, 0.3, (n, 3))
    a.arrays["REF_charges"] = np.tile([0.7, -0.7], n // 2)
    return a


def test_reads_all_properties_and_names_missing_keys(tmp_path):
    path = tmp_path / "d.xyz"
    write(path, [frame(4, 0), frame(6, 1)], format="extxyz")
    data, report = read_reference(path, PARAMS)
    assert len(data) == 2 and report["properties"] == {"energy": 2, "forces": 2, "charges": 2, "dipole": 2, "stress": 0}
    c = data[1]
    assert c.n_atoms == 6 and c.energy == -10.0 and c.forces.shape == (6, 3)
    assert [PARAMS.elements[s] for s in c.species] == ["Na", "Cl"] * 3
    # a required key that is not there: the error names the key and the file
    with pytest.raises(QEqInputError, match=r"d\.xyz.*'DFT_forces'"):
        read_reference(path, PARAMS, keys={"forces": "DFT_forces"})
    # ... unless that property is not required
    data, report = read_reference(path, PARAMS, keys={"charges": "nope"}, required=("energy",))
    assert report["properties"]["charges"] == 0 and data[0].charges is None


def test_calculator_results_are_used_when_present(tmp_path):
    a = frame(4, 2)
    forces = np.full((4, 3), 0.25)
    a.calc = SinglePointCalculator(a, energy=-3.5, forces=forces)
    for key in ("REF_energy",):
        del a.info[key]
    del a.arrays["REF_forces"]
    path = tmp_path / "calc.xyz"
    write(path, a, format="extxyz")
    data, _ = read_reference(path, PARAMS, keys={"energy": "energy", "forces": "forces"})
    assert data[0].energy == -3.5
    np.testing.assert_allclose(data[0].forces, forces)


def test_unknown_elements_are_named(tmp_path):
    path = tmp_path / "k.xyz"
    write(path, [frame(4, 0), frame(4, 1, symbols=["K", "Br", "Na", "Cl"])], format="extxyz")
    with pytest.raises(QEqInputError, match=r"k\.xyz.*Br, K.*demo-nacl-water"):
        read_reference(path, PARAMS)


def test_non_finite_values_are_skipped_and_counted(tmp_path):
    frames = [frame(4, 0), frame(4, 1, energy=float("nan")), frame(4, 2)]
    frames[2].arrays["REF_forces"][1, 2] = np.inf
    path = tmp_path / "nan.xyz"
    write(path, frames, format="extxyz")
    data, report = read_reference(path, PARAMS)
    assert len(data) == 1 and report["skipped_nonfinite"] == [f"{path}:1", f"{path}:2"]
    with pytest.raises(QEqInputError, match=r"nan\.xyz:1.*non-finite"):
        read_reference(path, PARAMS, on_nonfinite="error")


def test_close_atoms_are_named_with_the_configuration(tmp_path):
    """Two atoms pasted twice with a tiny offset: the file, the configuration, the atoms and the
    distance are named; a lower ``min_distance`` lets the file through."""
    bad = frame(4, 1)
    bad.positions[3] = bad.positions[0] + [0.05, 0.0, 0.0]
    path = tmp_path / "close.xyz"
    write(path, [frame(4, 0), bad], format="extxyz")
    with pytest.raises(QEqInputError, match=r"close\.xyz:1: atoms closer than min_distance 0.5 Å: atoms 0 \(Na\) and 3 \(Cl\) at 0.05 Å"):
        read_reference(path, PARAMS)
    assert len(read_reference(path, PARAMS, min_distance=0.01)[0]) == 2


def test_shipped_reference_set():
    train, held = shipped_reference("train"), shipped_reference("heldout")
    assert train.stat().st_size + held.stat().st_size < 5e6
    tr, _ = read_reference(train, PARAMS, required=("energy", "forces", "charges", "dipole"))
    he, _ = read_reference(held, PARAMS, required=("energy", "forces", "charges", "dipole"))
    assert 200 <= len(tr) + len(he) <= 600
    nacl = lambda d: {c.n_atoms for c in d.configurations if set(int(s) for s in c.species) <= {2, 3}}  # noqa: E731
    assert nacl(tr) and nacl(he) and not nacl(tr) & nacl(he)  # held-out sizes absent from training
    assert {PARAMS.elements[i] for i in tr.species_present()} == {"H", "O", "Na", "Cl"}
    frames = read(held, ":")
    assert {a.info["config_type"] for a in frames} == {"relaxed", "rattle", "strain", "md"}
    for c in he.configurations:  # GFN2-xTB: ionic charges, neutral clusters, no net force
        q = c.charges[c.species == 2]
        assert 0.4 < q.mean() < 1.0 and abs(c.charges.sum()) < 1e-6
        assert np.abs(c.forces.sum(axis=0)).max() < 1e-3


def test_split_is_persisted_and_checked(tmp_path):
    path = tmp_path / "d.xyz"
    write(path, [frame(4, s) for s in range(10)], format="extxyz")
    data, _ = read_reference(path, PARAMS)
    tr, va = persisted_split(tmp_path / "split.json", data, 0.3, seed=1)
    assert len(va) == 3 and sorted(tr + va) == list(range(10))
    assert persisted_split(tmp_path / "split.json", data, 0.3, seed=1) == (tr, va)
    assert (tr, va) == split_indices(10, 0.3, 1) != split_indices(10, 0.3, 2)
    with pytest.raises(QEqInputError, match="split file"):
        persisted_split(tmp_path / "split.json", data, 0.5, seed=1)


def labelled_frames(n_frames=6):
    """Small NaCl clusters labelled by the project itself (demo-nacl-water, exact solver)."""
    import jax

    f = jax.jit(qu.energy_and_forces(qu.qeq_energy("gaussian", qu.Exact(), "unrolled")))
    frames = []
    for s in range(n_frames):
        a = frame(4 + 2 * (s % 3), 100 + s)
        species = PARAMS.species_indices(a.get_chemical_symbols())
        e, forces, aux = f(PARAMS, qu.make_system(a.positions, species, pad_to=8))
        n = len(a)
        a.info["REF_energy"] = float(e) - 50.0 * n  # an arbitrary energy zero
        a.arrays["REF_forces"] = np.asarray(forces)[:n]
        a.arrays["REF_charges"] = np.asarray(aux["charges"])[:n]
        frames.append(a)
    return frames


def test_fit_command_end_to_end(tmp_path, capsys):
    train = tmp_path / "train.xyz"
    write(train, labelled_frames(), format="extxyz")
    start = PARAMS.to_dict()
    start["elements"]["Na"]["hardness"] *= 1.2
    start["elements"]["Cl"]["chi"] *= 0.9
    (tmp_path / "start.json").write_text(json.dumps(start))
    out = tmp_path / "fitted.json"
    args = ["fit", str(train), "--out", str(out), "--params", str(tmp_path / "start.json"), "--epochs", "3",
            "--batch-size", "2", "--validation", "0.34", "--train", "chi,hardness", "--iterations", "12",
            "--weights", "energy=1,forces=1,charges=1", "--checkpoint-every", "1", "--no-progress",
            "--lammps-out", str(tmp_path / "qeq.point")]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "train start" in text and "validation fitted" in text and "F RMSE" in text
    fitted = qu.load_params(out)
    assert fitted.name == "demo-nacl-water-fit" and "energy offsets" in fitted.notes.lower()
    assert not np.allclose(fitted.hardness, qu.load_params(tmp_path / "start.json").hardness)
    lines = [json.loads(x) for x in (tmp_path / "fitted.log.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and len(lines) == 4
    assert lines[-1]["train"]["force_rmse"] < lines[0]["train"]["force_rmse"]
    split = json.loads((tmp_path / "fitted.split.json").read_text())
    assert len(split["validation"]) == 2 and len(split["train"]) == 4
    # LAMMPS export of the fitted set, read back
    back = qu.read_lammps_qeq(tmp_path / "qeq.point", ["Na", "Cl"], style="point")
    np.testing.assert_allclose(back.hardness, np.asarray(fitted.hardness)[[2, 3]], rtol=1e-12)
    # resuming a finished fit gives the same parameters
    assert main(args + ["--resume"]) == 0
    assert qu.load_params(out).to_dict() == fitted.to_dict()
    # learning curves
    png = tmp_path / "curves.png"
    assert main(["plot-fit", str(tmp_path / "fitted.log.jsonl"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_command_reports_bad_input(tmp_path, capsys):
    path = tmp_path / "nokey.xyz"
    frames = [frame(4, 0)]
    del frames[0].arrays["REF_forces"]
    write(path, frames, format="extxyz")
    assert main(["fit", str(path), "--out", str(tmp_path / "p.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "REF_forces" in err and "nokey.xyz" in err
    good = tmp_path / "good.xyz"
    write(good, [frame(4, 0)], format="extxyz")
    assert main(["fit", str(good), "--out", str(tmp_path / "p.json"), "--train", "chi,magic"]) == 2
    assert "magic" in capsys.readouterr().err
    assert main(["plot-fit", str(tmp_path / "missing.jsonl")]) == 2
