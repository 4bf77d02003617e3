"""Relaxation on the device from ASE atoms: ``qeq_unroll.relax`` for many structures and
``qeq-unroll relax``.

Free-space structures of one padded size are relaxed together in batches (``fire_batch``); periodic
ones one at a time (``fire``, the neighbour list updated inside). Every structure is written, with
``relax_converged``, ``relax_steps`` and ``relax_fmax`` (eV/Å) in its info, also those that did not
converge within the step budget.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from qeq_unroll import relax as R
from qeq_unroll.errors import QEqInputError
from qeq_unroll.system import size_bucket

from .options import add_model_options, model_settings


def _groups(frames, batch_size):
    """Lists of frame indices relaxed together: free frames by padded size, periodic ones alone."""
    by_size = defaultdict(list)
    alone = []
    for i, atoms in enumerate(frames):
        if atoms.pbc.any():
            alone.append([i])
        else:
            by_size[size_bucket(len(atoms))].append(i)
    batches = [ids[k : k + batch_size] for ids in by_size.values() for k in range(0, len(ids), batch_size)]
    return batches + alone


def _frame(atoms, result: R.Relaxed, offset: float):
    from ase.calculators.singlepoint import SinglePointCalculator

    out = atoms.copy()
    if result.cell is not None:
        out.set_cell(result.cell)
    out.positions = result.positions
    out.set_initial_charges(result.charges)
    out.calc = SinglePointCalculator(out, energy=result.energy + offset, forces=result.forces, charges=result.charges)
    out.info.update(relax_converged=bool(result.converged), relax_steps=int(result.steps), relax_fmax=float(result.fmax))
    return out


def relax_structures(frames, calc, fmax=0.05, steps=1000, batch_size=64, progress=True, cell=False) -> list:
    """Relaxed copies of ``frames`` (ASE atoms) with the model of ``calc`` (a ``QEqCalculator``):
    FIRE on the device until the largest force is below ``fmax`` eV/Å or ``steps`` steps (with
    ``cell``, the cells of periodic frames too, until V σ / N is below ``fmax`` eV), in the input order, each with a single-point calculator (energy eV, forces, charges) and its
    ``relax_*`` info."""
    from tqdm import tqdm

    energy, params, p = calc.energy_function, calc.qeq_params, calc.parameters
    results = [None] * len(frames)
    bar = tqdm(total=len(frames), unit="structure", disable=not progress, desc="relax")
    for ids in _groups(frames, batch_size):
        systems = [calc.system(frames[i], pad=True) for i in ids]
        if frames[ids[0]].pbc.any():
            done = [R.fire(energy, params, systems[0], fmax, steps, skin=p.skin, layout=p.neighbor_layout, cell=cell)]
        else:
            done = R.fire_batch(energy, params, systems, fmax, steps)
        for i, result in zip(ids, done):
            results[i] = _frame(frames[i], result, calc.energy_offset(frames[i]))
        bar.update(len(ids))
    bar.close()
    return results


def add_relax(subparsers) -> None:
    p = subparsers.add_parser(
        "relax",
        help="relax structures on the device (FIRE, batched)",
        description="Relax every structure of IN (any file ase.io reads) with FIRE jitted on the device: free-space "
        "structures of similar size together in batches, periodic ones one at a time (with --cell, their cells too). Writes all of them "
        "to OUT (extended XYZ) with energy, forces, charges and relax_converged / relax_steps / relax_fmax.",
    )
    p.add_argument("structures", help="input structures (all frames are relaxed)")
    p.add_argument("--out", required=True, help="output file (extended XYZ)")
    p.add_argument("--fmax", type=float, default=0.05, help="force threshold in eV/A (default 0.05)")
    p.add_argument("--steps", type=int, default=1000, help="FIRE steps per structure at most (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="free-space structures relaxed together (default 64)")
    p.add_argument("--cell", action="store_true",
                   help="relax the cells of periodic structures too (until the largest component of V*stress/N is below --fmax, eV)")
    add_model_options(p, params="demo-nacl-water", only=("params", "kernel", "cutoff", "solver", "iterations", "tol",
                                                         "max_iterations", "gradient"))  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args, echo=print) -> int:
    import ase.io

    from .qeq import QEqCalculator

    if not os.path.exists(args.structures):
        raise QEqInputError(f"structure file not found: {args.structures}")
    frames = ase.io.read(args.structures, ":")
    for k, atoms in enumerate(frames):
        if not np.all(np.isfinite(atoms.positions)):
            raise QEqInputError(f"{args.structures}:{k}: non-finite positions")
    calc = QEqCalculator(**model_settings(args))
    relaxed = relax_structures(frames, calc, args.fmax, args.steps, args.batch_size, progress=not args.quiet, cell=args.cell)
    tmp = f"{args.out}.tmp.xyz"
    ase.io.write(tmp, relaxed, format="extxyz")
    os.replace(tmp, args.out)
    missed = [k for k, a in enumerate(relaxed) if not a.info["relax_converged"]]
    echo(f"relaxed {len(relaxed) - len(missed)} of {len(relaxed)} structures to fmax {args.fmax} eV/A; wrote {args.out}")
    if missed:
        echo(f"not converged within {args.steps} steps: {', '.join(f'{args.structures}:{k}' for k in missed)}")
    return 0 if not missed else 4
