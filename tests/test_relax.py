"""Relaxation on the device (FIRE, ``qeq_unroll.relax``): the minima ASE's BFGS finds with the same
calculator, a batch equal to relaxing each structure alone, and ``qeq-unroll relax`` writing every
structure, converged or not."""

import ase.io
import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.filters import FrechetCellFilter
from ase.optimize import BFGS

from calculators import QEqCalculator
from calculators.cli import main as cli
from qeq_unroll.relax import fire, fire_batch

jax.config.update("jax_enable_x64", True)

FMAX = 1e-3  # eV/Å

CELL_PARAMS = {
    "name": "cell-relax-test",
    "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.6, "sigma": 1.0},
                 "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65, "sigma": 1.0}},
    "pairs": {k: {"born_mayer": {"A": 1200.0, "rho": 0.32}} for k in ("Cl-Na", "Cl-Cl", "Na-Na")},
}  # fmt: skip


def cluster(seed, n=8):
    """n atoms of a 2×2×2 rock-salt cube (2.8 Å), rattled."""
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    atoms = Atoms(["Na" if g.sum() % 2 == 0 else "Cl" for g in grid], positions=grid * 2.8)
    atoms.rattle(0.15, seed=seed)
    return atoms


def rock_salt_cell():
    """A rattled rock-salt cell at 6.0 Å, where the perfect lattice is the minimum of this set (at
    5.64 Å it is a saddle that a minimiser may stop near)."""
    atoms = bulk("NaCl", "rocksalt", a=6.0, cubic=True)
    atoms.rattle(0.1, seed=3)
    return atoms


@pytest.fixture(scope="module")
def calc():
    return QEqCalculator(params="demo-nacl-water")


@pytest.mark.parametrize("structure", [lambda: cluster(1), rock_salt_cell], ids=["cluster", "periodic"])
def test_device_fire_reaches_the_bfgs_minimum(calc, structure):
    atoms = structure()
    reference = atoms.copy()
    reference.calc = calc
    assert BFGS(reference, logfile=None).run(fmax=FMAX / 10, steps=2000)
    result = fire(calc.energy_function, calc.qeq_params, calc.system(atoms), fmax=FMAX, steps=3000)
    assert result.converged and result.fmax <= FMAX
    assert abs(result.energy - reference.get_potential_energy()) / len(atoms) < 1e-4
    moved = atoms.copy()
    moved.positions = result.positions
    moved.calc = calc
    np.testing.assert_allclose(moved.get_forces(), result.forces, atol=1e-9)  # forces of the reported positions


def test_device_cell_relaxation_reaches_the_frechet_cell_filter_minimum():
    """Positions and cell of a rattled rock-salt cell strained by 3 %, gaussian (Ewald) kernel:
    the minimum of ASE's FrechetCellFilter + BFGS, energies to 1e-4 eV/atom and the cell to 1 %."""
    calc = QEqCalculator(params=CELL_PARAMS)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    reference = atoms.copy()
    reference.calc = calc
    assert BFGS(FrechetCellFilter(reference), logfile=None).run(fmax=1e-4, steps=500)
    result = fire(calc.energy_function, calc.qeq_params, calc.system(atoms), fmax=1e-3, steps=3000, cell=True)
    assert result.converged
    assert abs(result.energy - reference.get_potential_energy()) / len(atoms) < 1e-4
    np.testing.assert_allclose(result.cell, reference.cell[:], rtol=1e-2, atol=1e-2)
    assert abs(np.linalg.det(result.cell) / atoms.get_volume() - 1) > 0.5  # the cell did move (its volume nearly triples: this test set repels strongly)


def test_batch_equals_each_structure_alone(calc):
    systems = [calc.system(cluster(seed, n)) for seed, n in [(1, 8), (2, 8), (3, 6)]]
    together = fire_batch(calc.energy_function, calc.qeq_params, systems, fmax=FMAX, steps=3000)
    for system, batched in zip(systems, together):
        alone = fire(calc.energy_function, calc.qeq_params, system, fmax=FMAX, steps=3000)
        assert batched.converged and batched.steps == alone.steps
        np.testing.assert_allclose(batched.positions, alone.positions, atol=1e-10)
        assert batched.energy == pytest.approx(alone.energy, abs=1e-10)


def test_relax_command_writes_every_structure_and_names_the_unconverged(tmp_path, capsys):
    """The clusters need 16-17 FIRE steps to 0.05 eV/Å, the cell 8: a budget of 12 leaves the
    clusters unconverged, reported by name and exit status, and all three written."""
    frames = [cluster(1), cluster(2), rock_salt_cell()]
    source, out = tmp_path / "in.xyz", tmp_path / "out.xyz"
    ase.io.write(source, frames)
    status = cli(["relax", str(source), "--out", str(out), "--fmax", "0.05", "--steps", "12", "--quiet"])
    relaxed = ase.io.read(out, ":")
    assert len(relaxed) == 3 and [len(a) for a in relaxed] == [len(a) for a in frames]
    flags = [a.info["relax_converged"] for a in relaxed]
    assert flags == [False, False, True] and status == 4
    assert f"not converged within 12 steps: {source}:0, {source}:1" in capsys.readouterr().out
    for atoms, flag in zip(relaxed, flags):
        fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
        assert fmax == pytest.approx(atoms.info["relax_fmax"]) and (fmax <= 0.05) == flag




@pytest.mark.parametrize("kernel, options", [("gaussian", {}), ("reaxff", {"cutoff": 8.0})])
def test_cell_relaxation_compiles_a_handful_of_times(kernel, options, caplog):
    """A 60-step FrechetCellFilter relaxation of a 64-atom cell strained by 3 %: every cell change
    rebuilds the images and Ewald k-vectors, padded so that their shapes (and the compiled step)
    stay; at most 3 compilations of the periodic step in all (without the padding: one per few
    steps, 60 in this run)."""
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = QEqCalculator(params=CELL_PARAMS, kernel=kernel, **options)
    with caplog.at_level("WARNING"), jax.log_compiles():
        BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=0.01, steps=60)
    compiles = [r for r in caplog.records if "Finished XLA compilation of jit(periodic_step)" in r.getMessage()]
    assert 1 <= len(compiles) <= 3
