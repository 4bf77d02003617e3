"""Generate GFN2-xTB reference data (tblite) for fitting QEq parameters: NaCl and water clusters.

    pip install -e ".[reference]"            # tblite
    python examples/make_reference_data.py   # ~10 min on 2 cores; writes qeq_unroll/data/reference/

For every cluster the script first relaxes it with GFN2-xTB, then labels perturbed copies:

- NaCl (neutral Na_n Cl_n, 8-32 atoms, cut from the rock-salt grid around a cube centre):
  rattled (Gaussian noise 0.05-0.15 Å), compressed and stretched (uniform scaling 0.92-1.10 plus a
  small rattle), and snapshots of a short NVE MD run started at 2 x ``--temperature``.
- Water clusters (1-6 molecules, 3-18 atoms): rattled copies and short MD snapshots.

Each configuration is written to extended XYZ with the reference properties under the keys
``REF_energy`` (eV, total GFN2-xTB energy), ``REF_forces`` (eV/Å), ``REF_charges`` (e, the Mulliken
charges tblite reports) and ``REF_dipole`` (e·Å, tblite's total dipole, which includes the atomic
dipoles of xTB, so a point-charge model cannot match it exactly), plus ``cluster``
(``nacl``/``water``), ``n_atoms`` and ``config_type`` (``relaxed``/``rattle``/``strain``/``md``).

Files (the split is by cluster size, so the held-out file holds sizes absent from training):

- ``xtb-train.xyz``: NaCl clusters of ``--train-sizes`` atoms and all water clusters;
- ``xtb-heldout.xyz``: NaCl clusters of ``--heldout-sizes`` atoms.

Configurations whose SCF does not converge are skipped and counted. tblite runs with one thread
(``OMP_NUM_THREADS=1``, set here unless given) so runs are reproducible; the random numbers come
from ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.calculators.calculator import CalculationFailed  # noqa: E402
from ase.io import write  # noqa: E402
from ase.md import velocitydistribution  # noqa: E402
from ase.md.velocitydistribution import Stationary, ZeroRotation  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

#: Where the shipped set lives (package data of qeq_unroll; read through calculators.data).
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "qeq_unroll" / "data" / "reference"
NACL_SPACING = 2.82  # Å, bulk nearest-neighbour distance, the starting point before relaxation
WATER_OH, WATER_HOH = 0.96, 104.5  # Å, degrees


def xtb_calculator():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0, max_iterations=300)


# --- structures ------------------------------------------------------------------------------
def nacl_cluster(n: int, spacing: float = NACL_SPACING) -> Atoms:
    """Neutral Na_{n/2} Cl_{n/2}: the n/2 sites of each element nearest the centre of a rock-salt
    cube (the point (½, ½, ½) of the grid), so n = 8 is the cube and n = 32 its first two shells."""
    if n < 2 or n % 2:
        raise ValueError(f"n must be even, got {n}")
    m = 4
    idx = np.array([(i, j, k) for i in range(-m, m + 1) for j in range(-m, m + 1) for k in range(-m, m + 1)])
    d = np.linalg.norm(idx - 0.5, axis=1)
    # Ties broken by a fixed, symmetric-enough key so the choice is deterministic.
    order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0], np.round(d, 6)))
    na = [i for i in order if idx[i].sum() % 2 == 0][: n // 2]
    cl = [i for i in order if idx[i].sum() % 2 != 0][: n // 2]
    pos = spacing * np.concatenate([idx[na], idx[cl]]).astype(float)
    atoms = Atoms(["Na"] * (n // 2) + ["Cl"] * (n // 2), positions=pos - pos.mean(axis=0))
    return atoms


def water_molecule(centre, rng) -> Atoms:
    theta = math.radians(WATER_HOH)
    local = np.array([[0.0, 0.0, 0.0], [WATER_OH, 0.0, 0.0], [WATER_OH * math.cos(theta), WATER_OH * math.sin(theta), 0.0]])
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))  # a random orthogonal matrix
    return Atoms("OH2", positions=local @ q.T + centre)


def water_cluster(n_molecules: int, rng) -> Atoms:
    """Waters with random orientations on a compact grid of oxygens 2.9 Å apart."""
    sites = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)], float)
    sites = sites[np.argsort(np.linalg.norm(sites - 1.0, axis=1), kind="stable")][:n_molecules] * 2.9
    out = Atoms()
    for c in sites:
        for _ in range(100):  # keep every H at least 1.6 Å from atoms of other molecules
            mol = water_molecule(c, rng)
            if len(out) == 0 or np.min(np.linalg.norm(out.positions[:, None] - mol.positions[None], axis=-1)) > 1.6:
                break
        out += mol
    out.positions -= out.positions.mean(axis=0)
    return out


# --- labelling -------------------------------------------------------------------------------
class Labeller:
    def __init__(self):
        self.failed = 0
        self.calls = 0

    def label(self, atoms: Atoms, calc, **info) -> Atoms | None:
        """A copy of ``atoms`` with REF_* properties from ``calc``, or None if the SCF failed."""
        atoms = atoms.copy()
        atoms.calc = calc
        self.calls += 1
        try:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            charges = atoms.get_charges()
            dipole = atoms.get_dipole_moment()
        except CalculationFailed:
            self.failed += 1
            return None
        out = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions)
        out.info.update(info)
        out.info["n_atoms"] = len(out)
        out.info["REF_energy"] = float(energy)
        out.info["REF_dipole"] = np.asarray(dipole, dtype=float)
        out.arrays["REF_forces"] = np.asarray(forces, dtype=float)
        out.arrays["REF_charges"] = np.asarray(charges, dtype=float)
        return out


def relax(atoms: Atoms, fmax: float, steps: int) -> Atoms:
    atoms = atoms.copy()
    atoms.calc = xtb_calculator()
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
    return atoms


def md_snapshots(atoms: Atoms, labeller, rng, temperature, timestep_fs, n_steps, every, **info):
    """NVE velocity Verlet from Maxwell-Boltzmann velocities at 2 T (equipartition brings it to
    about T); the configurations every ``every`` steps are labelled."""
    atoms = atoms.copy()
    calc = xtb_calculator()
    atoms.calc = calc
    if hasattr(velocitydistribution, "thermalize_momenta"):  # ASE >= 3.29
        velocitydistribution.thermalize_momenta(atoms, 2.0 * temperature, rng=rng)
    else:
        velocitydistribution.MaxwellBoltzmannDistribution(atoms, temperature_K=2.0 * temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs, logfile=None)
    out = []
    for _ in range(n_steps // every):
        try:
            dyn.run(every)
        except CalculationFailed:
            labeller.failed += 1
            break
        lab = labeller.label(atoms, calc, config_type="md", **info)
        if lab is not None:
            out.append(lab)
    return out


def nacl_configurations(n, args, rng, labeller):
    base = relax(nacl_cluster(n), fmax=0.05, steps=args.relax_steps)
    calc = xtb_calculator()
    configs = [labeller.label(base, calc, cluster="nacl", config_type="relaxed")]
    for k in range(args.rattles):
        a = base.copy()
        a.positions += rng.normal(0.0, 0.05 + 0.1 * k / max(args.rattles - 1, 1), a.positions.shape)
        configs.append(labeller.label(a, calc, cluster="nacl", config_type="rattle"))
    for scale in np.linspace(0.92, 1.10, args.strains):
        a = base.copy()
        a.positions = scale * a.positions + rng.normal(0.0, 0.03, a.positions.shape)
        configs.append(labeller.label(a, calc, cluster="nacl", config_type="strain", scale=float(scale)))
    configs += md_snapshots(
        base, labeller, rng, args.temperature, 2.0, args.md_steps, args.md_every, cluster="nacl"
    )
    return [c for c in configs if c is not None]


def water_configurations(m, args, rng, labeller):
    base = relax(water_cluster(m, rng), fmax=0.05, steps=args.relax_steps)
    calc = xtb_calculator()
    configs = [labeller.label(base, calc, cluster="water", config_type="relaxed")]
    for k in range(args.rattles):
        a = base.copy()
        a.positions += rng.normal(0.0, 0.02 + 0.06 * k / max(args.rattles - 1, 1), a.positions.shape)
        configs.append(labeller.label(a, calc, cluster="water", config_type="rattle"))
    configs += md_snapshots(
        base, labeller, rng, args.temperature, 0.5, 2 * args.md_steps, 2 * args.md_every, cluster="water"
    )
    return [c for c in configs if c is not None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the shipped set)")
    ap.add_argument("--train-sizes", default="8,16,24,32", help="NaCl cluster sizes (atoms) for training")
    ap.add_argument("--heldout-sizes", default="12,20,28", help="NaCl cluster sizes held out of training")
    ap.add_argument("--water", default="1,2,3,4,5,6", help="water cluster sizes (molecules), training file")
    ap.add_argument("--rattles", type=int, default=10, help="rattled copies per cluster")
    ap.add_argument("--strains", type=int, default=7, help="compressed/stretched copies per NaCl cluster")
    ap.add_argument("--md-steps", type=int, default=80, help="MD steps per cluster (2 fs NaCl, 0.5 fs water x2)")
    ap.add_argument("--md-every", type=int, default=8, help="label every this many MD steps")
    ap.add_argument("--temperature", type=float, default=400.0, help="MD temperature (K)")
    ap.add_argument("--relax-steps", type=int, default=150, help="BFGS steps of the xTB pre-relaxation")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    labeller = Labeller()
    sizes = {
        "train": [int(s) for s in args.train_sizes.split(",") if s],
        "heldout": [int(s) for s in args.heldout_sizes.split(",") if s],
    }
    overlap = set(sizes["train"]) & set(sizes["heldout"])
    if overlap:
        ap.error(f"sizes {sorted(overlap)} are both in training and held out")
    t0 = time.time()
    files = {}
    for part in ("train", "heldout"):
        configs = []
        for n in sizes[part]:
            t = time.time()
            new = nacl_configurations(n, args, rng, labeller)
            configs += new
            print(f"NaCl {n:3d} atoms: {len(new):3d} configurations ({time.time() - t:.0f} s)", flush=True)
        if part == "train":
            for m in (int(s) for s in args.water.split(",") if s):
                t = time.time()
                new = water_configurations(m, args, rng, labeller)
                configs += new
                print(f"water x{m}: {len(new):3d} configurations ({time.time() - t:.0f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"xtb-{part}.xyz"
        tmp = path.with_suffix(".xyz.tmp")
        write(tmp, configs, format="extxyz")
        os.replace(tmp, path)
        files[part] = (path, len(configs))
    from importlib.metadata import version

    for part, (path, count) in files.items():
        print(f"wrote {path} ({count} configurations, {path.stat().st_size / 1e6:.2f} MB)")
    print(
        f"{labeller.calls} single points, {labeller.failed} skipped (SCF not converged); "
        f"tblite {version('tblite')}; {time.time() - t0:.0f} s"
    )
    meta = dict(vars(args), out=str(args.out), failed=labeller.failed, counts={p: c for p, (_, c) in files.items()})
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
