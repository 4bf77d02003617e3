"""Generate xTB reference data (tblite) for fitting QEq parameters: clusters, periodic cells, charge transfer.

    pip install -e ".[reference]"                       # tblite
    python examples/make_reference_data.py              # GFN2-xTB clusters, ~10 min on 2 cores
    python examples/make_reference_data.py --periodic   # GFN1-xTB periodic cells, ~2 min on 1 core
    python examples/make_reference_data.py --charge-transfer  # GFN2-xTB charged/neutral pairs, ~20 s

All three write to qeq_unroll/data/reference/ (``--out`` to change).

Free space (the default run), GFN2-xTB.

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

Periodic cells (``--periodic``), GFN1-xTB rather than GFN2-xTB: both give a stress that matches a
finite difference of the energy, but GFN2-xTB's charges in rock-salt MgO fall from 0.64 e (8-atom
cell) to 0.21 e (64-atom cell) and its pressure swings from +36 to -55 GPa, while GFN1-xTB's stay
at 0.85-0.79 e. All cells are periodic in 3D and computed at the Gamma point only, as tblite's ASE
calculator does:

- rock-salt NaCl (a = 5.64 Å) and MgO (a = 4.21 Å), conventional 8-atom cubic cells, and NaCl's
  16-atom 2x1x1 cell: the ideal cell, ``--cell-rattles`` rattled copies (Gaussian noise
  0.03-0.12 Å) and ``--cell-strains`` strained copies (a random symmetric strain, each component
  uniform in ±3 %, plus 0.02 Å noise);
- ``--water-boxes`` boxes of 8 randomly placed and oriented waters (24 atoms, cubic, 1 g/cm³,
  edge 6.21 Å, O-O >= 2.5 Å and other intermolecular pairs >= 1.5 Å over the periodic images),
  relaxed with GFN1-xTB at fixed cell (at most ``--relax-steps`` BFGS steps), then labelled with
  ``--cell-rattles`` rattled copies (0.02-0.08 Å);
- held out: the 64-atom 2x2x2 NaCl cell (a size absent from training), ideal, rattled and strained.

Keys as above, except that ``REF_stress`` (eV/Å³, ASE's Voigt order xx yy zz yz xz xy, the
derivative of the energy with respect to strain over the volume) replaces ``REF_dipole``, ``system``
(``nacl``/``mgo``/``water``) replaces ``cluster``, ``total_charge`` is 0 and strained copies carry
their ``strain`` (Voigt order, dimensionless). Files: ``xtb-periodic-train.xyz`` and
``xtb-periodic-heldout.xyz``. The run ends by comparing ``REF_stress`` of one cell per system with a
central finite difference of the energy under strains of ±``--fd-strain``.

Charge transfer (``--charge-transfer``), GFN2-xTB in free space, in the spirit of the 4G-HDNNP
benchmarks (Ko et al., Nat. Commun. 12, 398 (2021)): pairs of structures that differ by one charged
atom, so the charges far from it must move. The total charge is passed to tblite:

- ``nacl``: neutral NaCl clusters of ``--ct-nacl-sizes`` atoms (``nacl_cluster``); ``nacl+``: the
  same clusters plus one Na at the vacant rock-salt site next to a Cl nearest the centre, charge +1;
- ``c10h2``: linear H-C≡C-...-C≡C-H with 10 carbons (bonds 1.21/1.35 Å, C-H 1.06 Å), neutral;
  ``c10h3+``: the same chain with a second H on its first carbon (a CH2 end), charge +1.

Each structure is relaxed at its charge (BFGS, 0.05 eV/Å), then labelled: the relaxed structure,
``--ct-rattles`` rattled copies (Gaussian noise 0.03-0.12 Å; chains 0.01-``--ct-chain-rattle``,
default 0.04 Å: at 0.1 Å their stiff C-C bonds reach 10 eV/Å RMS), for the chains ``--ct-bends``
compressed/stretched (0.98-1.02 along the chain) and bent copies (a parabolic arch of 0-1 Å, plus
0.02 Å noise), and ``--ct-md-snapshots`` snapshots of an NVE run started at 2 x ``--temperature``
(NaCl 2 fs steps, every ``--md-every``; chains 0.5 fs, every 2 x ``--md-every``). Keys as in free
space, plus ``total_charge`` (0 or 1), with ``system`` (``nacl``/``nacl+``/``c10h2``/``c10h3+``) in
place of ``cluster``; ``config_type`` is ``relaxed``/``rattle``/``bend``/``md`` (bent copies carry
``scale`` and ``bend``, Å). Files: of each structure's configurations other than the relaxed one,
a random ``--ct-heldout`` fraction goes to ``xtb-ct-heldout.xyz``, the rest to ``xtb-ct-train.xyz``.
The run ends with checks per structure: Mulliken charges sum to ``total_charge``, finite forces,
the RMS force, the spread of the energy per atom and the charge of the chains' unprotonated end.

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
from ase.build import bulk  # noqa: E402
from ase.calculators.calculator import CalculationFailed  # noqa: E402
from ase.geometry import get_distances  # noqa: E402
from ase.io import write  # noqa: E402
from ase.md import velocitydistribution  # noqa: E402
from ase.md.velocitydistribution import Stationary, ZeroRotation  # noqa: E402
from ase.md.verlet import VelocityVerlet  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

#: Where the shipped set lives (package data of qeq_unroll; read through calculators.data).
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "qeq_unroll" / "data" / "reference"
NACL_SPACING = 2.82  # Å, bulk nearest-neighbour distance, the starting point before relaxation
WATER_OH, WATER_HOH = 0.96, 104.5  # Å, degrees
POLYYNE_CC, POLYYNE_CH = (1.21, 1.35), 1.06  # Å: alternating C≡C and C-C bonds, C-H
#: The periodic set's method: GFN2-xTB's charges in MgO depend strongly on the cell size (docstring).
PERIODIC_METHOD = "GFN1-xTB"
NACL_A, MGO_A = 5.64, 4.21  # Å, conventional rock-salt lattice constants (experiment)
WATER_DENSITY = 1.0  # g/cm³
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # ASE's stress order


def xtb_calculator(method: str = "GFN2-xTB", charge: int | None = None):
    """tblite's ASE calculator; ``charge`` (e) is the total charge (None: tblite's default, the sum of
    the initial charges, 0 here)."""
    from tblite.ase import TBLite

    return TBLite(method=method, charge=charge, verbosity=0, max_iterations=300)


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


def nacl_plus_cluster(n: int, spacing: float = NACL_SPACING) -> Atoms:
    """``nacl_cluster(n)`` plus one Na (n + 1 atoms, Na_{n/2+1} Cl_{n/2}, total charge +1 in use) at
    the vacant rock-salt site next to a Cl that lies nearest the centre (ties broken by coordinates)."""
    atoms = nacl_cluster(n, spacing)
    steps = spacing * np.vstack([np.eye(3), -np.eye(3)])
    sites = (atoms.positions[atoms.symbols == "Cl"][:, None] + steps).reshape(-1, 3)
    sites = sites[np.linalg.norm(sites[:, None] - atoms.positions, axis=-1).min(axis=1) > 0.5 * spacing]
    key = np.round(sites, 6)
    site = sites[np.lexsort((key[:, 2], key[:, 1], key[:, 0], np.round(np.linalg.norm(sites, axis=1), 6)))[0]]
    return atoms + Atoms("Na", positions=[site])


def polyyne(n_carbons: int, protonated: bool = False) -> Atoms:
    """Linear H-C≡C-...-C≡C-H along z (bonds alternate 1.21/1.35 Å, C-H 1.06 Å). ``protonated``
    gives the first carbon a second H (a CH2 end, H-C-H 120° in the xz plane; total charge +1 in
    use). The unprotonated end's carbon and H are always the last two atoms."""
    z = np.concatenate([[0.0], np.cumsum([POLYYNE_CC[k % 2] for k in range(n_carbons - 1)])])
    x, dz = POLYYNE_CH * math.sin(math.pi / 3), POLYYNE_CH * math.cos(math.pi / 3)
    first = [[-x, 0.0, -dz], [x, 0.0, -dz]] if protonated else [[0.0, 0.0, -POLYYNE_CH]]
    pos = first + [[0.0, 0.0, c] for c in z] + [[0.0, 0.0, z[-1] + POLYYNE_CH]]
    return Atoms(["H"] * len(first) + ["C"] * n_carbons + ["H"], positions=pos)


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


def rocksalt_cell(formula: str, a: float, repeat=(1, 1, 1)) -> Atoms:
    """The conventional cubic rock-salt cell of ``formula`` (lattice constant ``a`` in Å, 8 atoms),
    repeated ``repeat`` times; periodic in 3D."""
    return bulk(formula, "rocksalt", a=a, cubic=True).repeat(repeat)


def water_box(n_molecules: int, rng, density: float = WATER_DENSITY, min_oo: float = 2.5, min_other: float = 1.5) -> Atoms:
    """``n_molecules`` randomly oriented waters at random places in a cubic periodic box of
    ``density`` g/cm³. A molecule is drawn again while an O-O distance to the molecules placed (over
    the periodic images) is under ``min_oo`` Å or any other intermolecular distance under
    ``min_other`` Å. Molecules are kept whole, so atoms may lie just outside the box."""
    mass = n_molecules * Atoms("OH2").get_masses().sum()  # amu
    volume = mass * units._amu * 1e3 / density * 1e24  # amu -> kg -> g, then cm³ -> Å³
    edge = volume ** (1.0 / 3.0)
    out = Atoms(cell=[edge] * 3, pbc=True)
    for _ in range(n_molecules):
        for _ in range(1000):
            mol = water_molecule(rng.uniform(0.0, edge, 3), rng)
            if len(out) == 0:
                break
            d = get_distances(mol.positions, out.positions, cell=out.cell, pbc=True)[1]
            is_oo = np.outer(np.array(mol.get_chemical_symbols()) == "O", np.array(out.get_chemical_symbols()) == "O")
            if np.all(d[is_oo] >= min_oo) and np.all(d[~is_oo] >= min_other):
                break
        else:
            raise RuntimeError(f"no room for {n_molecules} waters in a {edge:.2f} Å box")
        out += mol
    return out


def rattled(atoms: Atoms, sigma: float, rng) -> Atoms:
    """A copy with Gaussian noise of standard deviation ``sigma`` (Å) on every coordinate."""
    atoms = atoms.copy()
    atoms.positions += rng.normal(0.0, sigma, atoms.positions.shape)
    return atoms


def bent_chain(atoms: Atoms, scale: float, bend: float) -> Atoms:
    """A copy of a chain along z, compressed or stretched along z by ``scale`` about its middle and
    bent into a parabolic arch whose middle moves ``bend`` Å along x (the two end atoms do not)."""
    atoms = atoms.copy()
    z = atoms.positions[:, 2]
    half, u = 0.5 * np.ptp(z), z - 0.5 * (z.max() + z.min())
    atoms.positions[:, 2] += (scale - 1.0) * u
    atoms.positions[:, 0] += bend * (1.0 - (u / half) ** 2)
    return atoms


def strain_cell(atoms: Atoms, strain) -> Atoms:
    """A copy deformed by the symmetric 3 x 3 ``strain`` (dimensionless): cell and positions both
    become x (1 + strain)."""
    atoms = atoms.copy()
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
    return atoms


def random_strain(max_strain: float, rng) -> np.ndarray:
    """A symmetric 3 x 3 strain whose components lie in ±``max_strain``."""
    e = rng.uniform(-max_strain, max_strain, (3, 3))
    return 0.5 * (e + e.T)


# --- labelling -------------------------------------------------------------------------------
class Labeller:
    def __init__(self):
        self.failed = 0
        self.calls = 0

    def label(self, atoms: Atoms, calc, **info) -> Atoms | None:
        """A copy of ``atoms`` with REF_* properties from ``calc``, or None if the SCF failed. A
        periodic ``atoms`` keeps its cell and gets ``REF_stress`` (eV/Å³, Voigt) instead of
        ``REF_dipole``. ``total_charge`` is written for a periodic ``atoms`` (0) and whenever
        ``calc`` was given a charge (that charge). No calculator is attached to the copy, so
        extended XYZ holds the values only under the REF_* keys."""
        atoms = atoms.copy()
        atoms.calc = calc
        periodic = bool(atoms.pbc.any())
        charge = calc.parameters.get("charge")
        self.calls += 1
        try:
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces()
            charges = atoms.get_charges()
            extra = atoms.get_stress() if periodic else atoms.get_dipole_moment()
        except CalculationFailed:
            self.failed += 1
            return None
        out = Atoms(atoms.get_chemical_symbols(), positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.info.update(info)
        out.info["n_atoms"] = len(out)
        if periodic or charge is not None:
            out.info["total_charge"] = int(charge or 0)
        out.info["REF_energy"] = float(energy)
        out.info["REF_stress" if periodic else "REF_dipole"] = np.asarray(extra, dtype=float)
        out.arrays["REF_forces"] = np.asarray(forces, dtype=float)
        out.arrays["REF_charges"] = np.asarray(charges, dtype=float)
        return out


def relax(atoms: Atoms, fmax: float, steps: int, method: str = "GFN2-xTB", charge: int | None = None) -> Atoms:
    """BFGS relaxation of the positions (the cell stays fixed) to ``fmax`` eV/Å, at total ``charge``."""
    atoms = atoms.copy()
    atoms.calc = xtb_calculator(method, charge)
    BFGS(atoms, logfile=None).run(fmax=fmax, steps=steps)
    return atoms


def md_snapshots(atoms: Atoms, labeller, rng, temperature, timestep_fs, n_steps, every, charge=None, **info):
    """NVE velocity Verlet from Maxwell-Boltzmann velocities at 2 T (equipartition brings it to
    about T), at total ``charge``; the configurations every ``every`` steps are labelled."""
    atoms = atoms.copy()
    calc = xtb_calculator(charge=charge)
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


def crystal_configurations(base: Atoms, system: str, args, rng, labeller):
    """The ideal cell ``base``, ``args.cell_rattles`` rattled copies (noise 0.03-0.12 Å) and
    ``args.cell_strains`` strained copies (components within ±3 %, plus 0.02 Å noise)."""
    calc = xtb_calculator(PERIODIC_METHOD)
    configs = [labeller.label(base, calc, system=system, config_type="ideal")]
    for sigma in np.linspace(0.03, 0.12, args.cell_rattles):
        configs.append(labeller.label(rattled(base, sigma, rng), calc, system=system, config_type="rattle"))
    for _ in range(args.cell_strains):
        strain = random_strain(0.03, rng)
        atoms = rattled(strain_cell(base, strain), 0.02, rng)
        voigt = np.array([strain[i, j] for i, j in VOIGT])
        configs.append(labeller.label(atoms, calc, system=system, config_type="strain", strain=voigt))
    return [c for c in configs if c is not None]


def water_box_configurations(args, rng, labeller):
    """A box of 8 waters relaxed at fixed cell, and ``args.cell_rattles`` rattled copies (noise
    0.02-0.08 Å); nothing if the relaxation's SCF fails (counted)."""
    try:
        base = relax(water_box(8, rng), fmax=0.05, steps=args.relax_steps, method=PERIODIC_METHOD)
    except CalculationFailed:
        labeller.failed += 1
        return []
    calc = xtb_calculator(PERIODIC_METHOD)
    configs = [labeller.label(base, calc, system="water", config_type="relaxed")]
    for sigma in np.linspace(0.02, 0.08, args.cell_rattles):
        configs.append(labeller.label(rattled(base, sigma, rng), calc, system="water", config_type="rattle"))
    return [c for c in configs if c is not None]


def ct_configurations(atoms: Atoms, system: str, charge: int, args, rng, labeller, timestep_fs, every, bends=0,
                      rattle=(0.03, 0.12)):  # fmt: skip
    """``atoms`` relaxed at total ``charge``, ``args.ct_rattles`` rattled copies (noise in ``rattle``, Å),
    ``bends`` compressed/stretched and bent chains (``bent_chain``, scale 0.98-1.02, bend 0-1 Å,
    plus 0.02 Å noise) and ``args.ct_md_snapshots`` MD snapshots ``every`` steps of ``timestep_fs``."""
    base = relax(atoms, fmax=0.05, steps=args.relax_steps, charge=charge)
    calc = xtb_calculator(charge=charge)
    configs = [labeller.label(base, calc, system=system, config_type="relaxed")]
    for sigma in np.linspace(*rattle, args.ct_rattles):
        configs.append(labeller.label(rattled(base, sigma, rng), calc, system=system, config_type="rattle"))
    for scale, bend in zip(np.linspace(0.98, 1.02, bends), rng.uniform(0.0, 1.0, bends)):
        bent = rattled(bent_chain(base, scale, bend), 0.02, rng)
        configs.append(labeller.label(bent, calc, system=system, config_type="bend", scale=float(scale), bend=float(bend)))
    configs += md_snapshots(
        base, labeller, rng, args.temperature, timestep_fs, args.ct_md_snapshots * every, every, charge=charge, system=system
    )
    return [c for c in configs if c is not None]


def split_heldout(configs, fraction: float, rng):
    """(train, held out): a random ``fraction`` of the configurations other than the relaxed one is
    held out."""
    pool = [i for i, c in enumerate(configs) if c.info["config_type"] != "relaxed"]
    held = set(rng.choice(pool, size=round(fraction * len(pool)), replace=False).tolist())
    return [c for i, c in enumerate(configs) if i not in held], [c for i, c in enumerate(configs) if i in held]


def stress_fd_error(config: Atoms, step: float) -> float:
    """Largest |REF_stress - finite difference| (eV/Å³) of a labelled periodic configuration. Each
    Voigt component is (E(+h) - E(-h)) / (2 h V), E the energy (eV) under the symmetric strain whose
    (i, j) and (j, i) entries sum to h = ``step``, V the volume (Å³)."""
    fd = np.zeros(6)
    for k, (i, j) in enumerate(VOIGT):
        strain = np.zeros((3, 3))
        strain[i, j] += 0.5 * step
        strain[j, i] += 0.5 * step
        energies = []
        for sign in (1.0, -1.0):
            atoms = strain_cell(config, sign * strain)
            atoms.calc = xtb_calculator(PERIODIC_METHOD)
            energies.append(atoms.get_potential_energy())
        fd[k] = (energies[0] - energies[1]) / (2.0 * step * config.get_volume())
    return float(np.max(np.abs(fd - config.info["REF_stress"])))


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
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--periodic", action="store_true", help="make the periodic GFN1-xTB files instead")
    mode.add_argument("--charge-transfer", action="store_true", help="make the GFN2-xTB charge-transfer files instead")
    ap.add_argument("--cell-rattles", type=int, default=6, help="rattled copies per periodic cell")
    ap.add_argument("--cell-strains", type=int, default=6, help="strained copies per rock-salt cell")
    ap.add_argument("--water-boxes", type=int, default=3, help="periodic water boxes (8 molecules), training file")
    ap.add_argument("--fd-strain", type=float, default=1e-4, help="strain step of the stress check")
    ap.add_argument("--ct-nacl-sizes", default="8,12", help="NaCl cluster sizes (atoms) of the charge-transfer set")
    ap.add_argument("--ct-rattles", type=int, default=30, help="rattled copies per charge-transfer structure")
    ap.add_argument("--ct-chain-rattle", type=float, default=0.04,
                    help="largest rattle of the chains (Å; from 0.01): stiff C-C bonds reach 10 eV/Å at 0.1 Å")
    ap.add_argument("--ct-bends", type=int, default=8, help="compressed/stretched and bent copies per chain")
    ap.add_argument("--ct-md-snapshots", type=int, default=20, help="MD snapshots per charge-transfer structure")
    ap.add_argument("--ct-heldout", type=float, default=0.25, help="fraction of each structure's perturbed copies held out")
    ap.add_argument("--ct-shifted", action="store_true",
                    help="with --charge-transfer: write only xtb-ct-shifted.xyz, larger structures of the same families "
                         "(--ct-shifted-nacl-sizes, a chain of --ct-shifted-carbons)")
    ap.add_argument("--ct-shifted-nacl-sizes", default="16", help="NaCl cluster sizes (atoms) of the shifted set")
    ap.add_argument("--ct-shifted-carbons", type=int, default=14, help="carbons of the shifted set's chains")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    labeller = Labeller()
    t0 = time.time()
    if args.periodic:
        files, extra = periodic(args, rng, labeller)
    elif args.charge_transfer:
        files, extra = charge_transfer(args, rng, labeller)
    else:
        files, extra = free_space(args, rng, labeller, ap)
    from importlib.metadata import version

    for part, (path, count) in files.items():
        print(f"wrote {path} ({count} configurations, {path.stat().st_size / 1e6:.2f} MB)")
    print(
        f"{labeller.calls} single points, {labeller.failed} skipped (SCF not converged); "
        f"tblite {version('tblite')}; {time.time() - t0:.0f} s"
    )
    meta = dict(vars(args), out=str(args.out), failed=labeller.failed, counts={p: c for p, (_, c) in files.items()})
    print(json.dumps(dict(meta, **extra)))
    return 0


def write_atomic(path: Path, configs) -> None:
    """Extended XYZ through a temporary file, so ``path`` is never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".xyz.tmp")
    write(tmp, configs, format="extxyz")
    os.replace(tmp, path)


def free_space(args, rng, labeller, ap):
    """The GFN2-xTB cluster files; returns ({part: (path, count)}, {})."""
    sizes = {
        "train": [int(s) for s in args.train_sizes.split(",") if s],
        "heldout": [int(s) for s in args.heldout_sizes.split(",") if s],
    }
    overlap = set(sizes["train"]) & set(sizes["heldout"])
    if overlap:
        ap.error(f"sizes {sorted(overlap)} are both in training and held out")
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
        path = args.out / f"xtb-{part}.xyz"
        write_atomic(path, configs)
        files[part] = (path, len(configs))
    return files, {}


def periodic(args, rng, labeller):
    """The GFN1-xTB periodic files; returns ({part: (path, count)}, {"stress_fd_error": {system:
    largest |REF_stress - finite difference| in eV/Å³}})."""

    def crystal(formula, a, repeat, system):
        return lambda: crystal_configurations(rocksalt_cell(formula, a, repeat), system, args, rng, labeller)

    jobs = {
        "train": [crystal("NaCl", NACL_A, (1, 1, 1), "nacl"), crystal("NaCl", NACL_A, (2, 1, 1), "nacl"),
                  crystal("MgO", MGO_A, (1, 1, 1), "mgo")]
        + [lambda: water_box_configurations(args, rng, labeller)] * args.water_boxes,
        "heldout": [crystal("NaCl", NACL_A, (2, 2, 2), "nacl")],
    }
    files, written = {}, {}
    for part, makers in jobs.items():
        configs = []
        for make in makers:
            t = time.time()
            new = make()
            configs += new
            if new:
                print(f"{new[0].info['system']} {new[0].info['n_atoms']} atoms: {len(new):3d} configurations "
                      f"({time.time() - t:.0f} s)", flush=True)
        path = args.out / f"xtb-periodic-{part}.xyz"
        write_atomic(path, configs)
        files[part], written[part] = (path, len(configs)), configs
    return files, {"stress_fd_error": stress_checks(written["train"], args.fd_strain)}


def stress_checks(configs, step: float) -> dict:
    """``stress_fd_error`` of the first strained cell (water: the relaxed box) of each system."""
    checked = {}
    for c in configs:
        if c.info["config_type"] in ("strain", "relaxed"):
            checked.setdefault(c.info["system"], c)
    errors = {}
    for system, c in checked.items():
        errors[system] = stress_fd_error(c, step)
        print(f"stress check {system} ({c.info['n_atoms']} atoms): max |REF_stress - FD| = {errors[system]:.1e} "
              f"eV/Å³ (max |REF_stress| {np.max(np.abs(c.info['REF_stress'])):.1e})", flush=True)
    return errors


def charge_transfer(args, rng, labeller):
    """The GFN2-xTB charge-transfer files; returns ({part: (path, count)}, {"ct_checks": {structure:
    figures}})."""
    nacl = dict(timestep_fs=2.0, every=args.md_every)
    chain = dict(timestep_fs=0.5, every=2 * args.md_every, bends=args.ct_bends, rattle=(0.01, args.ct_chain_rattle))
    sizes = [int(s) for s in (args.ct_shifted_nacl_sizes if args.ct_shifted else args.ct_nacl_sizes).split(",") if s]
    carbons = args.ct_shifted_carbons if args.ct_shifted else 10
    jobs = (
        [(nacl_cluster(n), "nacl", 0, nacl) for n in sizes]
        + [(nacl_plus_cluster(n), "nacl+", 1, nacl) for n in sizes]
        + [(polyyne(carbons), f"c{carbons}h2", 0, chain), (polyyne(carbons, protonated=True), f"c{carbons}h3+", 1, chain)]
    )
    parts = {"shifted": []} if args.ct_shifted else {"train": [], "heldout": []}
    for atoms, system, charge, md in jobs:
        t = time.time()
        new = ct_configurations(atoms, system, charge, args, rng, labeller, **md)
        if args.ct_shifted:  # every configuration is a test of extrapolation
            heldout = []
            parts["shifted"] += new
        else:
            train, heldout = split_heldout(new, args.ct_heldout, rng)
            parts["train"] += train
            parts["heldout"] += heldout
        print(f"{system} {len(atoms)} atoms: {len(new):3d} configurations, {len(heldout)} held out "
              f"({time.time() - t:.0f} s)", flush=True)
    files = {}
    for part, configs in parts.items():
        path = args.out / f"xtb-ct-{part}.xyz"
        write_atomic(path, configs)
        files[part] = (path, len(configs))
    return files, {"ct_checks": ct_checks([c for configs in parts.values() for c in configs])}


def ct_checks(configs) -> dict:
    """Per structure (system and size): the largest |sum of REF_charges - total_charge| (e), whether
    every force is finite, the RMS of the REF_forces components (eV/Å, the error of guessing zero
    forces), the standard deviation and range of REF_energy per atom (eV) and, for the chains, the
    mean charge (e) of the carbon at the unprotonated end (the last but one atom, ``polyyne``)."""
    groups = {}
    for c in configs:
        groups.setdefault(f"{c.info['system']} {c.info['n_atoms']}", []).append(c)
    figures = {}
    for name, group in groups.items():
        forces = np.concatenate([c.arrays["REF_forces"] for c in group])
        e = np.array([c.info["REF_energy"] / c.info["n_atoms"] for c in group])
        row = figures[name] = dict(
            charge_sum_error=float(max(abs(c.arrays["REF_charges"].sum() - c.info["total_charge"]) for c in group)),
            forces_finite=bool(np.isfinite(forces).all()), force_rms=float(np.sqrt(np.mean(forces**2))),
            energy_per_atom_std=float(e.std()), energy_per_atom_range=float(np.ptp(e)),
        )
        if name.startswith("c10"):
            row["far_end_c_charge"] = float(np.mean([c.arrays["REF_charges"][-2] for c in group]))
        text = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
        print(f"check {name} atoms ({len(group)} configurations): {text}", flush=True)
    return figures


if __name__ == "__main__":
    sys.exit(main())
