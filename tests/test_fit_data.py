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
            "--weights", "energy=1,forces=1,charges=1", "--checkpoint-every", "1", "--no-progress"]
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


# --- periodic data, bad cells, the split, starting pairs, permissions, the closing table -------------
def cell_frame(a=5.64, seed=0, stress=True):
    """A rock-salt NaCl conventional cell with made-up references (and a Voigt stress)."""
    rng = np.random.default_rng(seed)
    base = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    atoms = Atoms(["Na"] * 4 + ["Cl"] * 4, scaled_positions=np.concatenate([base, base + [0.5, 0, 0]]),
                  cell=np.eye(3) * a, pbc=True)  # fmt: skip
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    atoms.info["REF_energy"] = -20.0
    atoms.arrays["REF_forces"] = rng.normal(0, 0.3, (8, 3))
    if stress:
        atoms.info["REF_stress"] = rng.normal(0, 0.01, 6)
    return atoms


def test_periodic_structures_are_read_with_cell_and_stress(tmp_path):
    path = tmp_path / "mixed.xyz"
    tensor = cell_frame(seed=1, stress=False)
    full = np.arange(9.0).reshape(3, 3)
    tensor.calc = SinglePointCalculator(tensor, stress=full + full.T)  # a 3 x 3 stress of a calculator
    write(path, [frame(4, 0), cell_frame(), tensor], format="extxyz")
    data, report = read_reference(path, PARAMS)
    free, cell, other = data.configurations
    assert free.cell is None and not free.periodic and free.stress is None
    assert cell.pbc == (True, True, True) and np.allclose(cell.cell, np.eye(3) * 5.64)
    assert np.allclose(cell.stress, read(path, 1).info["REF_stress"])
    np.testing.assert_allclose(other.stress, [0, 8, 16, 12, 8, 4])  # Voigt xx yy zz yz xz xy
    assert report["properties"]["stress"] == 2


@pytest.mark.parametrize(
    "case, message",
    [
        ("singular", "linearly dependent"),
        ("tiny", "own periodic image"),
        ("stress without cell", "not periodic in all three directions"),
    ],
)
def test_bad_cells_are_named_and_nothing_is_written(tmp_path, capsys, case, message):
    """A singular cell, a cell too small for the atoms (they meet their own images) and a stress
    on a free-space structure: each an error naming the file and configuration; the previous
    output stays as it was and no split is drawn."""
    bad = cell_frame(seed=2)
    if case == "singular":
        bad.cell = [[5.64, 0, 0], [0, 5.64, 0], [5.64, 5.64, 0]]
    elif case == "tiny":
        bad.cell = np.eye(3) * 0.3
    else:
        bad = frame(4, 3)
        bad.info["REF_stress"] = np.zeros(6)
    path = tmp_path / "bad.xyz"
    write(path, [cell_frame(), bad], format="extxyz")
    out = tmp_path / "p.json"
    out.write_text("previous\n")
    assert main(["fit", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:1" in err and message in err, err
    assert out.read_text() == "previous\n" and not (tmp_path / "p.split.json").exists()


def test_split_belongs_to_the_structures(tmp_path):
    """The persisted split is keyed by the structures: a start set with another element order and
    other reference keys read the same file to the same split."""
    path = tmp_path / "d.xyz"
    write(path, [frame(4, s) for s in range(8)], format="extxyz")
    data, _ = read_reference(path, PARAMS)
    reordered = PARAMS.to_dict()
    reordered["elements"] = dict(reversed(list(reordered["elements"].items())))
    other, _ = read_reference(path, qu.Params.from_dict(reordered), keys={"energy": "none"}, required=("forces",))
    split = persisted_split(tmp_path / "split.json", data, 0.25)
    assert persisted_split(tmp_path / "split.json", other, 0.25) == split
    moved = [frame(4, s) for s in range(8)]
    moved[3].positions[0, 0] += 0.01
    write(path, moved, format="extxyz")
    with pytest.raises(QEqInputError, match="other structures"):
        persisted_split(tmp_path / "split.json", read_reference(path, PARAMS)[0], 0.25)


def test_starting_pair_terms_are_added_when_the_start_set_has_none():
    from ase.data import covalent_radii

    from calculators.fitting import START_CONTACT_ENERGY, add_start_pairs

    rappe = qu.load_params("rappe-goddard-1991")
    ch = Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
    ch.info["REF_energy"] = -5.0
    ch.arrays["REF_forces"] = np.zeros((5, 3))
    data = read_reference_atoms([ch], rappe)
    params, added = add_start_pairs(rappe, data)
    assert added == ["C-C", "C-H", "H-H"]
    bm = params.pairs["C-H"]["born_mayer"]
    contact = covalent_radii[6] + covalent_radii[1]
    assert float(bm["A"]) * np.exp(-contact / float(bm["rho"])) == pytest.approx(START_CONTACT_ENERGY)
    morse = add_start_pairs(rappe, data, "morse")[0].pairs["H-H"]["morse"]
    assert float(morse["r0"]) == pytest.approx(2 * covalent_radii[1])
    assert add_start_pairs(params, data) == (params, [])  # a set with pair terms is left alone


def read_reference_atoms(frames, params):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.xyz"
        write(path, frames, format="extxyz")
        return read_reference(path, params)[0]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    import os

    from qeq_unroll.params import write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "out.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == mode


def test_implausible_values_and_worse_metrics_are_named():
    from calculators.fitting import format_summary
    from qeq_unroll.fit import FitResult, implausible

    start = qu.load_params("demo-nacl-water")
    runaway = start.to_dict()
    runaway["pairs"]["Cl-Na"]["born_mayer"]["A"] = 5.4e7
    runaway["elements"]["Cl"]["hardness"] /= 20.0  # 0.49 eV: below the range
    runaway["elements"]["Na"]["sigma"] *= 0.09  # 11 times smaller, still plausible
    runaway["elements"]["Na"]["chi"] += 0.5  # moved, but plausibly
    messages = implausible(start, qu.Params.from_dict(runaway), [2, 3])
    assert len(messages) == 3, messages
    assert "hardness of Cl" in messages[0] and "plausible range" in messages[0]
    assert "sigma of Na" in messages[1] and "ran far from its start" in messages[1]
    assert "born_mayer A of Cl-Na = 5.4e+07" in messages[2] and "plausible range" in messages[2]
    metrics = lambda e, f: dict(energy_mae=e, force_rmse=f, force_mae=f, charge_rmse=None, stress_rmse_gpa=None)  # noqa: E731
    result = FitResult(start, {}, [dict(epoch=0, train=metrics(5606.0, 0.5))], 0, 3, False, {"train": metrics(4441.0, 0.9)})
    table = format_summary(result)
    assert "5606.00!" in table and "! train E MAE meV/atom got worse than at the start (4441 -> 5606)" in table
    assert "0.5000!" not in table and "S RMSE" not in table
