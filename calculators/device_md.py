"""MD on the device from ASE atoms: ``qeq_unroll.md.run`` with frames, a report and ``qeq-unroll md``.

Units: time steps fs, temperatures K, energies eV, drift meV/atom/ps.

    from calculators import QEqCalculator
    from calculators.device_md import run_md
    from qeq_unroll.md import Settings
    report = run_md(atoms, QEqCalculator(kernel="gaussian", solver="cg", iterations=3),
                    Settings(steps=10000, dt_fs=1.0, temperature_K=600.0), out="md.xyz", report="md.json")

Frames (extended XYZ, with charges and momenta) are appended after every block, so a run that
stops early keeps what it wrote; the JSON report is written atomically, also when the run stops
with an error (its ``error`` entry says why).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from qeq_unroll import md
from qeq_unroll.errors import QEqInputError
from qeq_unroll.params import write_atomic

from .options import add_model_options, model_settings


def _frames(atoms, rec, dt_fs):
    """ASE frames of a record (positions unwrapped, as integrated)."""
    from ase import Atoms

    for i in range(len(rec.step)):
        frame = Atoms(atoms.get_chemical_symbols(), positions=rec.positions[i], cell=atoms.cell, pbc=atoms.pbc)
        frame.set_momenta(rec.momenta[i])
        frame.set_initial_charges(rec.charges[i])
        frame.info.update(
            step=int(rec.step[i]), time_fs=float(rec.step[i] * dt_fs), e_pot=float(rec.e_pot[i]),
            e_kin=float(rec.e_kin[i]), temperature=float(rec.temperature[i]),
        )
        yield frame


def summarize(records, n_atoms, settings, wall_s, first_block_s):
    """The report's numbers from the collected records (see :func:`run_md`)."""
    step = np.concatenate([r.step for r in records])
    e_tot = np.concatenate([r.e_pot + r.e_kin for r in records])
    temperature = np.concatenate([r.temperature for r in records])
    iterations = np.concatenate([r.iterations for r in records])
    out = dict(
        n_atoms=n_atoms,
        steps_done=int(step[-1]),
        time_ps=float(step[-1] * settings.dt_fs * 1e-3),
        temperature_mean_K=float(temperature[1:].mean()) if len(temperature) > 1 else float(temperature[0]),
        solver_iterations_mean=float(iterations.mean()),
        wall_s=wall_s,
    )
    if settings.ensemble == "nve":
        slope, worst = md.drift(step * settings.dt_fs * 1e-3, e_tot, n_atoms)
        out.update(drift_meV_atom_ps=slope, max_abs_dE_meV_atom=worst)
    later = int(step[-1]) - settings.report_every * settings.block
    if len(records) > 2 and later > 0:  # steady state: leave out step 0 and the compiling first block
        out["ms_per_step"] = 1e3 * (wall_s - first_block_s) / later
    return out


def run_md(atoms, calc, settings, out=None, report=None, progress=True):
    """Run ``settings`` (``qeq_unroll.md.Settings``) from ``atoms`` with the model of ``calc`` (a
    ``QEqCalculator``); returns the report (dict). Momenta: those of ``atoms`` when any is
    non-zero, else drawn at ``settings.temperature_K``. out: extended XYZ path for frames
    (replaced); report: JSON path. Raises ``qeq_unroll.md.MDError`` when the run blows up or its
    neighbour list cannot be made to fit, after writing the frames and the report so far."""
    import ase.io
    from tqdm import tqdm

    if not np.all(np.isfinite(atoms.positions)):
        raise QEqInputError("non-finite atomic positions")
    system = calc.system(atoms, pad=False)
    momenta = atoms.get_momenta() if np.any(atoms.get_momenta()) else None
    if out is not None and os.path.exists(out):
        os.remove(out)
    records, info = [], dict(
        settings={k: getattr(settings, k) for k in settings.__dataclass_fields__},
        model={k: calc.parameters[k] for k in ("kernel", "cutoff", "solver", "iterations", "gradient")} | dict(tol=calc.solver.tol),
        device=str(jax.devices()[0]),
        dtype=calc.parameters["dtype"],
    )
    info["model"]["params"] = str(calc.parameters["params"])  # a name, a path or a Params object
    start = time.perf_counter()
    first_block_s = 0.0
    bar = tqdm(total=settings.steps, unit="step", disable=not progress, desc="md")
    try:
        for rec in md.run(settings, calc.energy_function, calc.qeq_params, system, atoms.get_masses(), momenta,
                          skin=calc.parameters.skin, layout=calc.parameters.neighbor_layout):
            records.append(rec)
            if len(records) == 2:
                first_block_s = time.perf_counter() - start
            if out is not None and len(rec.step):
                ase.io.write(out, list(_frames(atoms, rec, settings.dt_fs)), format="extxyz", append=True)
            if len(rec.step):
                bar.update(int(rec.step[-1]) - bar.n)
    except md.MDError as exc:
        info["error"] = str(exc)
        raise
    finally:
        bar.close()
        if records:
            info.update(summarize(records, len(atoms), settings, time.perf_counter() - start, first_block_s))
        if report is not None:
            write_atomic(report, json.dumps(info, indent=2, default=str) + "\n")
    return info


def add_md(subparsers) -> None:
    p = subparsers.add_parser(
        "md",
        help="molecular dynamics on the device (jax-md) with QEq charges",
        description="Run NVE or NVT molecular dynamics of a structure with the whole loop jitted on "
        "the device in blocks. Writes frames (extended XYZ) and a JSON report with the energy drift "
        "(meV/atom/ps), temperature and timing.",
    )
    p.add_argument("structure", help="structure file read by ase.io (its last frame), e.g. start.xyz")
    p.add_argument("--steps", type=int, default=1000, help="MD steps (default 1000)")
    p.add_argument("--dt", type=float, default=1.0, help="time step in fs (default 1)")
    p.add_argument("--temperature", type=float, default=300.0,
                   help="K: initial velocities (when the structure has none) and NVT target (default 300)")
    p.add_argument("--ensemble", choices=("nve", "nvt"), default="nve", help="ensemble (default nve)")
    p.add_argument("--thermostat", choices=("langevin", "nose-hoover"), default="langevin",
                   help="NVT thermostat (default langevin)")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs (default 0.01)")
    p.add_argument("--tau", type=float, default=100.0, help="Nose-Hoover time constant in fs (default 100)")
    p.add_argument("--charges", choices=("geometry", "warm", "xl"), default="geometry",
                   help="solver start: geometry (positions only; exact forces), warm (previous charges, "
                   "as LAMMPS), xl (extended-Lagrangian charges) (default geometry)")
    add_model_options(p, params="demo-nacl-water")
    p.add_argument("--solver-params", default=None, help="solver file of --solver learned")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision (default float64)")
    p.add_argument("--report-every", type=int, default=10, help="steps between recorded frames (default 10)")
    p.add_argument("--block", type=int, default=10, help="records per jitted block (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities (default 0)")
    p.add_argument("--out", default=None, help="trajectory to write (extended XYZ)")
    p.add_argument("--report", default=None, help="JSON report to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import ase.io

    from .qeq import QEqCalculator

    if not os.path.exists(args.structure):
        raise QEqInputError(f"structure file not found: {args.structure}")
    atoms = ase.io.read(args.structure)
    calc = QEqCalculator(
        solver_params=args.solver_params, dtype=args.dtype, **model_settings(args),
    )
    ensemble = "nve" if args.ensemble == "nve" else args.thermostat
    settings = md.Settings(
        steps=args.steps, dt_fs=args.dt, ensemble=ensemble, temperature_K=args.temperature, friction=args.friction,
        tau_fs=args.tau, charges=args.charges, report_every=args.report_every, block=args.block, seed=args.seed,
    )
    try:
        info = run_md(atoms, calc, settings, out=args.out, report=args.report, progress=not args.quiet)
    except md.MDError as exc:
        print(f"qeq-unroll md: stopped: {exc}")
        return 3
    keys = ("steps_done", "time_ps", "temperature_mean_K", "drift_meV_atom_ps", "max_abs_dE_meV_atom", "ms_per_step")
    print(json.dumps({k: info[k] for k in keys if k in info}, indent=2))
    return 0
