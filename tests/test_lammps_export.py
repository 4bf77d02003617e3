"""A parameter set exported as a LAMMPS deck computes our energy, forces and charges (serial and
under ``mpirun -np 2``); ReaxFF ``ffield`` files as a parameter source, in parity with LAMMPS's
``pair_style reaxff`` + ``fix qeq/reaxff ... reaxff``. LAMMPS runs skip where it is absent."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

import qeq_unroll as qu
from calculators import QEqCalculator
from calculators.cli import main as cli
from calculators.data import shipped_reference
from calculators.lammps import import_lammps, run_deck
from qeq_unroll import QEqInputError
from qeq_unroll.lammps_export import export_lammps
from qeq_unroll.reaxff_ffield import ffield_taper_radius, is_ffield, read_ffield

jax.config.update("jax_enable_x64", True)

#: Na/Cl terms with every pair form, so each LAMMPS pair style of the deck is exercised.
PARAMS = {
    "name": "export-test",
    "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.6}, "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}},
    "pairs": {"Cl-Na": {"born_mayer": {"A": 1200.0, "rho": 0.32}},
              "Cl-Cl": {"buckingham": {"A": 3000.0, "rho": 0.3, "C": 20.0}},
              "Na-Na": {"morse": {"D": 0.1, "a": 1.2, "r0": 3.5}}},
}  # fmt: skip
ELEMENTS = ["Na", "Cl"]
CUTOFF = 7.0  # Å


@pytest.fixture(scope="module")
def lammps():
    module, reason = import_lammps()
    if module is None:
        pytest.skip(reason)
    return module


@pytest.fixture(scope="module")
def params():
    return qu.Params.from_dict(PARAMS)


def rock_salt():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2)
    atoms.rattle(0.1, seed=1)
    return atoms


def triclinic():
    """The fcc primitive cell of rock salt (60° between the cell vectors), 3×3×3."""
    atoms = bulk("NaCl", "rocksalt", a=5.64).repeat(3)
    atoms.rattle(0.1, seed=2)
    return atoms


def ours(atoms, params, kernel, k_e):
    atoms = atoms.copy()
    atoms.calc = QEqCalculator(params=params, kernel=kernel, solver="exact", coulomb_constant=k_e)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_charges()


def assert_parity(result, reference, n):
    energy, forces, charges = reference
    np.testing.assert_allclose(result["charges"], charges, atol=1e-6, rtol=0)
    np.testing.assert_allclose(result["forces"], forces, atol=1e-5, rtol=0)
    assert abs(result["energy"] - energy) / n < 1e-6


@pytest.mark.parametrize("structure", [rock_salt, triclinic])
def test_exported_deck_reproduces_energy_forces_charges(lammps, params, tmp_path, structure):
    """reaxff kernel with Born-Mayer, Buckingham and Morse terms, periodic cubic and triclinic
    cells; the default k_e (not LAMMPS's 14.4) checks the scaling of the fix's parameters."""
    atoms = structure()
    kernel = qu.get_kernel("reaxff", CUTOFF)
    export_lammps(params, kernel, ELEMENTS, tmp_path, qu.COULOMB_CONSTANT)
    reference = ours(atoms, params, kernel, qu.COULOMB_CONSTANT)
    assert_parity(run_deck(atoms, tmp_path, ELEMENTS), reference, len(atoms))


def test_exported_deck_under_mpirun_two_processes(lammps, params, tmp_path):
    atoms = triclinic()
    kernel = qu.get_kernel("reaxff", CUTOFF)
    export_lammps(params, kernel, ELEMENTS, tmp_path, qu.COULOMB_CONSTANT)
    reference = ours(atoms, params, kernel, qu.COULOMB_CONSTANT)
    assert_parity(run_deck(atoms, tmp_path, ELEMENTS, nprocs=2), reference, len(atoms))


def test_hard_cut_point_kernel_deck_with_another_coulomb_constant(lammps, params, tmp_path):
    """fix qeq/point adds a bare 1/r: the exported χ and J are scaled by 1/k_e."""
    atoms = rock_salt()
    kernel = qu.Point(cutoff=6.0, taper=False)
    stiff = params.replace(hardness=params.hardness * 2.0)  # point charges need more hardness to stay PD
    export_lammps(stiff, kernel, ELEMENTS, tmp_path, 10.0)
    assert_parity(run_deck(atoms, tmp_path, ELEMENTS), ours(atoms, stiff, kernel, 10.0), len(atoms))


def test_free_cluster_deck(lammps, params, tmp_path):
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    atoms = Atoms(["Na" if g.sum() % 2 == 0 else "Cl" for g in grid], positions=grid * 2.8)
    atoms.rattle(0.05, seed=3)
    kernel = qu.get_kernel("reaxff", CUTOFF)
    export_lammps(params, kernel, ELEMENTS, tmp_path, qu.COULOMB_CONSTANT)
    assert_parity(run_deck(atoms, tmp_path, ELEMENTS), ours(atoms, params, kernel, qu.COULOMB_CONSTANT), len(atoms))
    atoms.set_initial_charges([1.0] + [0.0] * (len(atoms) - 1))
    with pytest.raises(ValueError, match="neutral systems only"):
        run_deck(atoms, tmp_path, ELEMENTS)


@pytest.mark.parametrize(
    "kernel, message",
    [
        (qu.get_kernel("gaussian"), "kernel 'gaussian' cannot be exported"),
        (qu.get_kernel("slater", 8.0), "kernel 'slater' cannot be exported"),
        (qu.get_kernel("point", 8.0), "only with a hard cutoff"),
    ],
)
def test_export_refuses_what_lammps_cannot_reproduce(params, tmp_path, kernel, message):
    with pytest.raises(QEqInputError, match=message):
        export_lammps(params, kernel, ELEMENTS, tmp_path, qu.COULOMB_CONSTANT)
    assert not any(tmp_path.iterdir())


def test_export_refuses_bad_element_lists(params, tmp_path):
    kernel = qu.get_kernel("reaxff", CUTOFF)
    with pytest.raises(QEqInputError, match="element Mg missing .* built-in sets with Mg: uff-qeq"):
        export_lammps(params, kernel, ["Na", "Mg"], tmp_path, qu.COULOMB_CONSTANT)
    with pytest.raises(QEqInputError, match="names an element twice"):
        export_lammps(params, kernel, ["Na", "Na"], tmp_path, qu.COULOMB_CONSTANT)
    with pytest.raises(QEqInputError, match="neural model"):
        export_lammps(params.replace(networks={"chi": {}}), kernel, ELEMENTS, tmp_path, qu.COULOMB_CONSTANT)


def test_export_command_and_fit_refuses_before_fitting(tmp_path, capsys):
    out = tmp_path / "deck"
    assert cli(["export-lammps", "rappe-goddard-1991", "--kernel", "reaxff", "--elements", "Na,Cl", "--out", str(out)]) == 0
    deck = (out / "in.qeq").read_text()
    assert "fix qeq_unroll all qeq/reaxff" in deck and "WARNING: no short-range pair terms" in deck
    assert len((out / "param.qeq").read_text().splitlines()) == 2
    data = shipped_reference("train")
    fit_out = tmp_path / "fit.json"
    status = cli(["fit", str(data), "--out", str(fit_out), "--lammps-out", str(tmp_path / "fitdeck"), "--no-progress"])
    assert status == 2 and "kernel 'gaussian' cannot be exported" in capsys.readouterr().err
    assert not fit_out.exists()


# --- ReaxFF ffield ----------------------------------------------------------------------------------

FFIELD_HEAD = """Reactive force field written for this test
 3       ! Number of general parameters
   50.0000 !p(boc1)
    9.4514 !p(boc2)
    3.0000 !Triple bond stabilisation
"""
ATOM_HEADER = """ 2    ! Nr of atoms; cov.r; valency;a.m;Rvdw;Evdw;gammaEEM;cov.r2;#
            alfa;gammavdW;valency;Eunder;Eover;chiEEM;etaEEM;n.u.
            cov r3;Elp;Heat inc.;n.u.;n.u.;n.u.;n.u.
            ov/un;val1;n.u.;val3,vval4
"""
BLOCK = """ {el}    0.8930   1.0000   1.0080   1.3550   0.0930   {gamma}  -0.1000   1.0000
      8.2230  33.2894   1.0000   0.0000 121.1250   {chi}   {eta}   1.0000
     -0.1000   0.0000  61.6606   3.0408   2.4197   0.0003   1.0698   0.0000
    -19.4571   4.2733   1.0338   1.0000   2.8793   0.0000   0.0000   0.0000
"""


def write_ffield(path, blocks=(("H", 0.8203, 3.7248, 9.6093), ("O", 1.0898, 8.5000, 8.3122)), head=FFIELD_HEAD):
    text = head + ATOM_HEADER + "".join(BLOCK.format(el=e, gamma=g, chi=c, eta=h) for e, g, c, h in blocks)
    path.write_text(text + " 1      ! Nr of bonds\n")
    return path


def test_ffield_reader_takes_chi_twice_eta_and_gamma(tmp_path):
    path = write_ffield(tmp_path / "ffield.test")
    assert is_ffield(path)
    p = qu.load_params(path)
    assert p.elements == ("H", "O")
    np.testing.assert_allclose(p.chi, [3.7248, 8.5])
    np.testing.assert_allclose(p.hardness, [2 * 9.6093, 2 * 8.3122])
    np.testing.assert_allclose(p.gamma, [0.8203, 1.0898])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.split(" 2    ! Nr of atoms")[0], "ends before the atoms section"),
        (lambda t: t.replace(" 3       ! Number of general", " x       ! Number of general"), "line 2: expected the number of general"),
        (lambda t: t.replace("   8.3122   1.0000", ""), "element O has no etaEEM"),
        (lambda t: t.replace(" O    0.8930", " 7    0.8930"), "expected element 2 of 2"),
        (lambda t: t.replace("   9.6093", "  -9.6093"), "element H has etaEEM = -9.6093"),
    ],
)
def test_ffield_reader_errors_name_file_and_line(tmp_path, change, message):
    path = write_ffield(tmp_path / "ffield.bad")
    path.write_text(change(path.read_text()))
    with pytest.raises(QEqInputError, match=message) as info:
        read_ffield(path)
    assert "ffield.bad" in str(info.value)


def test_ffield_taper_radius_is_general_parameter_13():
    module, reason = import_lammps()
    if module is None:
        pytest.skip(reason)
    path = lammps_potential("ffield.reax.cho")
    assert ffield_taper_radius(path) == 10.0


def lammps_potential(name) -> Path:
    module, _ = import_lammps()
    path = Path(module.__file__).parent / "share" / "lammps" / "potentials" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this LAMMPS")
    return path


def test_ffield_charges_match_lammps_pair_reaxff(lammps):
    """ffield.reax.cho (Chenoweth, van Duin and Goddard, J. Phys. Chem. A 112, 1040 (2008)), shipped
    with LAMMPS: an ethanol and a water molecule, charges of ``pair_style reaxff`` with
    ``fix qeq/reaxff ... reaxff`` against ours from ``params=<the ffield>``."""
    path = lammps_potential("ffield.reax.cho")
    atoms = molecule("CH3CH2OH")
    water = molecule("H2O")
    water.translate([0.0, 0.0, 4.5])
    atoms += water
    elements = ["C", "H", "O"]
    types = [elements.index(s) + 1 for s in atoms.get_chemical_symbols()]
    lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
    try:
        for line in ("units real", "atom_style charge", "boundary f f f", "region box block -20 20 -20 20 -20 20",
                     "create_box 3 box", "mass * 1.0"):  # fmt: skip
            lmp.command(line)
        lmp.create_atoms(len(atoms), list(range(1, len(atoms) + 1)), types, atoms.positions.ravel().tolist())
        for line in ("pair_style reaxff NULL", f"pair_coeff * * {path} C H O",
                     "fix q all qeq/reaxff 1 0.0 10.0 1e-12 reaxff maxiter 2000", "run 0"):  # fmt: skip
            lmp.command(line)
        n = len(atoms)
        q, ids = np.array(lmp.numpy.extract_atom("q")[:n]), np.array(lmp.numpy.extract_atom("id")[:n])
    finally:
        lmp.close()
    reference = np.empty(n)
    reference[ids - 1] = q
    atoms.calc = QEqCalculator(params=str(path), kernel="reaxff", cutoff=ffield_taper_radius(path), solver="exact",
                               coulomb_constant=qu.LAMMPS_COULOMB_CONSTANT)  # fmt: skip
    np.testing.assert_allclose(atoms.get_charges(), reference, atol=1e-6, rtol=0)
