"""Reference data from extended XYZ files (through ``ase.io``) as a ``qeq_unroll.dataset.Dataset``.

Units as in ASE: energies eV, forces eV/Å, charges e, dipoles e·Å, stress eV/Å³ (Voigt order xx,
yy, zz, yz, xz, xy; a 3 × 3 tensor is accepted too).

    from calculators.data import read_reference, shipped_reference
    data, report = read_reference(shipped_reference("train"), params)

Each property is looked up under its key (defaults ``REF_energy``, ``REF_forces``, ``REF_charges``,
``REF_dipole``, ``REF_stress``; configurable) in ``atoms.info`` (energy, dipole) or ``atoms.arrays`` (forces,
charges), and failing that in the results of a calculator attached by the reader (e.g. the
``energy``/``forces`` columns ASE turns into a single-point calculator), under the key itself or the
property's plain name. The total charge of a structure is ``info["total_charge"]``, else
``info["charge"]``, else the sum of the initial charges, else 0. A structure with any periodic
direction keeps its cell and ``pbc``; free-space and periodic structures mix freely.

Errors name the file and the configuration: a *required* property missing, elements the parameter
set lacks, a singular cell or one so small that atoms meet their own images, a stress on a
structure that is not periodic in 3D, atoms closer than ``min_distance`` (images included;
``qeq_unroll.checks``). Configurations with non-finite coordinates or reference values are
skipped and counted in the report (``on_nonfinite="error"`` makes them an error).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from ase.io import read

from qeq_unroll import checks
from qeq_unroll.dataset import PROPERTIES, Configuration, Dataset, is_finite
from qeq_unroll.errors import QEqInputError
from qeq_unroll.periodic import check_cell, frame, image_shifts
from qeq_unroll.params import Params

#: Default keys of the reference properties.
DEFAULT_KEYS = {"energy": "REF_energy", "forces": "REF_forces", "charges": "REF_charges", "dipole": "REF_dipole",
                "stress": "REF_stress"}
#: The shipped xTB sets (see examples/make_reference_data.py and data/reference/README.md): GFN2-xTB
#: clusters ("train", "heldout") and GFN1-xTB periodic cells with stress ("periodic-train",
#: "periodic-heldout"; two methods: never fit both on one energy scale) and the GFN2-xTB
#: charge-transfer set ("ct-train", "ct-heldout": NaCl clusters with and without an extra Na⁺,
#: the C10H2 chain neutral and protonated at one end).
SHIPPED = {"train": "xtb-train.xyz", "heldout": "xtb-heldout.xyz",
           "periodic-train": "xtb-periodic-train.xyz", "periodic-heldout": "xtb-periodic-heldout.xyz",
           "ct-train": "xtb-ct-train.xyz", "ct-heldout": "xtb-ct-heldout.xyz", "ct-shifted": "xtb-ct-shifted.xyz"}
_PER_ATOM = {"forces": (3,), "charges": ()}


def shipped_reference(part: str = "train") -> Path:
    """Path of a shipped reference file: ``"train"`` (GFN2-xTB NaCl clusters of 8, 16, 24, 32
    atoms and water clusters of 1-6 molecules), ``"heldout"`` (NaCl clusters of 12, 20, 28 atoms),
    ``"periodic-train"`` (GFN1-xTB rock-salt NaCl cells of 8 and 16 atoms, MgO cells of 8, water
    boxes of 24 atoms, with stress), ``"periodic-heldout"`` (NaCl cells of 64 atoms), or the
    charge-transfer set ``"ct-train"``/``"ct-heldout"`` (GFN2-xTB Na_nCl_n and Na_(n+1)Cl_n⁺
    clusters, C10H2 and C10H3⁺ chains; the held-out part is a random quarter of each structure's
    perturbed copies) and ``"ct-shifted"`` (larger structures of the same families, for
    extrapolation: Na8Cl8, Na9Cl8⁺, C14H2, C14H3⁺)."""
    if part not in SHIPPED:
        raise QEqInputError(f"unknown shipped reference part '{part}' (valid: {', '.join(SHIPPED)})")
    return Path(str(resources.files("qeq_unroll.data").joinpath("reference", SHIPPED[part])))


def _lookup(atoms, term: str, key: str):
    """The value of ``term`` stored under ``key`` (info/arrays, then calculator results)."""
    where = atoms.arrays if term in _PER_ATOM else atoms.info
    if key in where:
        return np.asarray(where[key], dtype=float)
    results = getattr(atoms.calc, "results", None) or {}
    for name in (key, term):
        if name in results:
            return np.asarray(results[name], dtype=float)
    return None


def total_charge(atoms) -> float:
    """``info["total_charge"]``, else ``info["charge"]``, else the sum of the initial charges, else 0 (e)."""
    for key in ("total_charge", "charge"):
        if key in atoms.info:
            return float(atoms.info[key])
    if "initial_charges" in atoms.arrays:
        return float(np.sum(atoms.arrays["initial_charges"]))
    return 0.0


def _stress(value):
    """Voigt (6,) eV/Å³ from a (6,) or (3, 3) stress (None stays None)."""
    if value is None or np.shape(value) == (6,):
        return value
    if np.shape(value) == (3, 3):
        return value[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return np.reshape(value, -1)  # a wrong length is named by the data set's shape check


def _check_geometry(c: Configuration, symbols, limits, source):
    """Refuse a cell in which atoms meet their own images, and atoms closer than
    ``limits.min_distance`` (over the lattice images of a periodic structure)."""
    try:
        shifts = None
        positions = c.positions
        if c.periodic:
            check_cell(c.cell, c.pbc)
            checks.check_cell(c.cell, c.pbc, c.n_atoms, limits)
            base = np.asarray(frame(c.cell, c.pbc, xp=np), dtype=float)
            frac = positions @ np.linalg.inv(base)
            frac[:, list(c.pbc)] %= 1.0
            positions = frac @ base
            shifts = image_shifts(c.cell, c.pbc, limits.min_distance)
        pairs = checks.closest_pairs(positions, c.cell, c.pbc, shifts)
        checks.check_distances(pairs[0][2] if pairs else np.inf, lambda: pairs, symbols, limits)
    except QEqInputError as error:
        raise QEqInputError(f"{source}: {error}") from None


def read_reference(
    paths: "str | os.PathLike | Sequence[str | os.PathLike]",
    params: Params,
    keys: Mapping[str, str] | None = None,
    required: Sequence[str] = ("energy", "forces"),
    index: str = ":",
    on_nonfinite: str = "skip",
    min_distance: float = checks.Limits.min_distance,
) -> tuple[Dataset, dict]:
    """Read extended XYZ file(s) into a ``Dataset`` over ``params.elements``.

    keys: ``{property: key}`` overriding ``DEFAULT_KEYS`` (properties: energy, forces, charges,
    dipole). required: properties every configuration must have (others are read where present).
    index: ASE index string of the configurations to read. on_nonfinite: "skip" (count and report)
    or "error". min_distance: Å, closer atoms are an error naming them. Returns ``(dataset, report)``; the report has ``files``, ``configurations`` (read),
    ``skipped_nonfinite`` (``file:index`` of skipped ones) and ``properties`` (how many have each).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    keys = {**DEFAULT_KEYS, **(keys or {})}
    unknown = set(keys) - set(PROPERTIES)
    if unknown:
        raise QEqInputError(f"unknown reference propert(ies) {sorted(unknown)} (valid: {', '.join(PROPERTIES)})")
    bad_required = set(required) - set(PROPERTIES)
    if bad_required:
        raise QEqInputError(f"unknown required propert(ies) {sorted(bad_required)} (valid: {', '.join(PROPERTIES)})")
    if on_nonfinite not in ("skip", "error"):
        raise QEqInputError(f"on_nonfinite must be 'skip' or 'error', got '{on_nonfinite}'")
    index_of = {e: i for i, e in enumerate(params.elements)}
    limits = checks.Limits(min_distance=min_distance)
    configurations, skipped = [], []
    counts = {p: 0 for p in PROPERTIES}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise QEqInputError(f"reference data file {path} does not exist")
        try:
            frames = read(path, index=index, format="extxyz")
        except Exception as exc:  # ASE raises many kinds on malformed files
            raise QEqInputError(f"cannot read {path} as extended XYZ: {exc}") from exc
        if not isinstance(frames, list):
            frames = [frames]
        missing_el = sorted({s for a in frames for s in a.get_chemical_symbols() if s not in index_of})
        if missing_el:
            raise QEqInputError(f"{path}: {params.missing_error(missing_el)}")
        for k, atoms in enumerate(frames):
            source = f"{path}:{k}"
            values = {}
            for term in PROPERTIES:
                v = _lookup(atoms, term, keys[term])
                if v is None and term in required:
                    raise QEqInputError(
                        f"{path}: configuration {k} has no '{keys[term]}' ({term}); "
                        f"keys present: info {sorted(atoms.info)}, arrays {sorted(atoms.arrays)}"
                    )
                values[term] = v
            c = Configuration(
                positions=np.asarray(atoms.positions, dtype=float),
                species=np.asarray([index_of[s] for s in atoms.get_chemical_symbols()], dtype=np.int32),
                total_charge=total_charge(atoms),
                energy=None if values["energy"] is None else float(np.reshape(values["energy"], ())),
                forces=values["forces"],
                charges=values["charges"],
                dipole=values["dipole"],
                source=source,
                cell=np.asarray(atoms.cell.array, dtype=float) if atoms.pbc.any() else None,
                pbc=tuple(bool(p) for p in atoms.pbc),
                stress=_stress(values["stress"]),
            )
            if not is_finite(c):
                if on_nonfinite == "error":
                    raise QEqInputError(f"{source}: non-finite coordinates or reference values")
                skipped.append(source)
                continue
            _check_geometry(c, atoms.get_chemical_symbols(), limits, source)
            for term in PROPERTIES:
                counts[term] += values[term] is not None
            configurations.append(c)
    report = dict(
        files=[str(p) for p in paths],
        configurations=len(configurations),
        skipped_nonfinite=skipped,
        properties=counts,
    )
    return Dataset(tuple(params.elements), tuple(configurations)), report
