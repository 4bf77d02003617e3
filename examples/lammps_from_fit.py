"""Fit a QEq model on the shipped periodic NaCl data, export it to LAMMPS, run LAMMPS MD on a large
cell, and compare the first frame's energy with ours.

    python examples/lammps_from_fit.py                    # 11x11x11 rock-salt cells: 10648 atoms
    python examples/lammps_from_fit.py --repeat 4 --steps 50 --np 1    # a quick look

Steps:
1. ``qeq-unroll fit`` on the NaCl cells of the shipped GFN1-xTB periodic set (energies, forces,
   stress), with the ``reaxff`` kernel (the one LAMMPS's ``fix qeq/reaxff`` solves) and Born–Mayer
   pair terms, ``--lammps-out DECK``: the deck is written with the fitted set.
   The start is ``uff-qeq`` with its shielding γ halved: the built-in γ = J/k_e shields too weakly
   for rock salt (the hardness matrix is not positive definite at 2.8 Å, and the fit says so).
2. A rattled rock-salt supercell (``--repeat`` conventional cells per side) at 300 K.
3. LAMMPS (``calculators.lammps.run_deck``: the ``lammps`` module, or ``mpirun -np N lmp``) with
   ``include DECK/in.qeq``: ``--steps`` of NVE (1 fs), energy printed every 10 steps.
4. Our energy of the first frame through ``QEqCalculator`` (CG to 1e-10), against LAMMPS's
   ``v_qeq_energy``, and LAMMPS's potential energy along the run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ase.io
import jax
import numpy as np
from ase.build import bulk

jax.config.update("jax_enable_x64", True)

from calculators import QEqCalculator  # noqa: E402
from calculators.cli import main as cli  # noqa: E402
from calculators.data import shipped_reference  # noqa: E402
from calculators.lammps import run_deck  # noqa: E402
from qeq_unroll import load_params  # noqa: E402

CUTOFF = 8.0  # Å, the reaxff kernel's taper radius


def start_set(folder: Path) -> Path:
    """uff-qeq's Na and Cl with the shielding γ halved."""
    data = load_params("uff-qeq").restricted(["Na", "Cl"]).to_dict()
    for entry in data["elements"].values():
        entry["gamma"] *= 0.5
    data["name"] = "uff-qeq-shielded"
    path = folder / "start.json"
    path.write_text(json.dumps(data))
    return path


def fit(folder: Path) -> tuple[Path, Path]:
    frames = [a for a in ase.io.read(shipped_reference("periodic-train"), ":") if a.info.get("system") == "nacl"]
    train = folder / "nacl-train.xyz"
    ase.io.write(train, frames)
    out, deck = folder / "fitted.json", folder / "deck"
    args = ["fit", str(train), "--params", str(start_set(folder)), "--kernel", "reaxff", "--cutoff", str(CUTOFF),
            "--out", str(out), "--lammps-out", str(deck), "--no-progress"]  # fmt: skip
    if cli(args) != 0:
        raise SystemExit("the fit failed")
    return out, deck


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=11, help="conventional cells per side (default 11: 10648 atoms)")
    ap.add_argument("--steps", type=int, default=300, help="LAMMPS NVE steps of 1 fs (default 300)")
    ap.add_argument("--np", type=int, default=2, help="MPI processes of the LAMMPS run (default 2)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fitted, deck = fit(Path(tmp))
        atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(args.repeat)
        atoms.rattle(0.05, seed=0)
        print(f"\n{len(atoms)} atoms; LAMMPS: mpirun -np {args.np}, {args.steps} NVE steps")
        started = time.perf_counter()
        lmp = run_deck(atoms, deck, ["Na", "Cl"], nprocs=args.np, steps=args.steps, every=10,
                       commands=["velocity all create 300 1 mom yes rot yes", "timestep 0.001", "fix md all nve"])  # fmt: skip
        lammps_s = time.perf_counter() - started
        atoms.calc = QEqCalculator(params=str(fitted), kernel="reaxff", cutoff=CUTOFF, tol=1e-10)
        started = time.perf_counter()
        ours = atoms.get_potential_energy()
        ours_s = time.perf_counter() - started
    n = len(atoms)
    print(f"first frame: qeq-unroll {ours:.6f} eV, LAMMPS {lmp['energy']:.6f} eV "
          f"(difference {abs(ours - lmp['energy']) / n:.2e} eV/atom); charges differ by at most "
          f"{np.abs(lmp['charges'] - atoms.get_charges()).max():.1e} e")  # fmt: skip
    print(f"LAMMPS potential energy every 10 steps (eV): {np.array2string(lmp['energies'][:6], precision=3)} ...")
    print(f"LAMMPS run {lammps_s:.1f} s for {args.steps} steps ({1000 * lammps_s / max(args.steps, 1):.0f} ms/step); "
          f"qeq-unroll first call {ours_s:.1f} s (compilation included)")  # fmt: skip


if __name__ == "__main__":
    main()
