"""Energy conservation of device MD (``qeq_unroll.md``) for the charge-solver settings MD users pick.

Two periodic systems, each 10 ps of NVE from the same start (same positions, same momenta):

- NaCl melt: 64 atoms of rock salt (a = 5.64 Å), reaxff kernel with r_c = 8 Å over a jax-md
  neighbour list, the salt parameters of ``tests/test_md.py`` with Born–Mayer repulsion between
  all ion pairs, started at 2500 K so that it melts (dt = 2 fs).
- Water box: 27 waters (81 atoms, 9.3 Å cell, about 1 g/cm³), relaxed with FIRE from random
  orientations, ``demo-nacl-water``, gaussian kernel with Ewald/PME (accuracy 1e-5, real-space
  cutoff 5 Å) over a neighbour list, started at 300 K (dt = 0.5 fs).

Settings: converged (CG to a relative residual of 1e-10, implicit forces: exact to that
tolerance; a dense factorisation of these matrix-free operators costs far more); CG to tol 1e-6 warm-started from the previous
step's charges with envelope forces (what LAMMPS ``fix qeq`` users do); CG K = 2 envelope; CG K = 2
and K = 4 unrolled; extended-Lagrangian charges with CG K = 1 and K = 2 (unrolled at fixed auxiliary
charges). The learned solver is left out: it supports free-space systems only.

Reported: drift (least-squares slope of E_tot, meV/atom/ps), the largest |E_tot − E_tot(0)|
(meV/atom), mean solver iterations, and the cost per step relative to the converged solve in the same
run (absolute ms printed too; the machine is a shared 2-core CPU). A plot of E_tot(t) − E_tot(0)
goes to ``benchmarks/md_conservation.png``. A second part runs 10⁵ NVE steps of a free 64-atom NaCl
cluster (gaussian kernel, CG K = 3 unrolled, dt = 2 fs) and reports its drift and stability.
Writes the ``bench_md`` section of ``benchmarks/RESULTS.md``.

    python benchmarks/bench_md.py [--ps 10] [--long-steps 100000] [--no-write]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qeq_unroll as qu  # noqa: E402
from calculators import QEqCalculator  # noqa: E402
from calculators.structures import nacl_cluster, rock_salt, water_box  # noqa: E402
from qeq_unroll import md  # noqa: E402
from results import write_section  # noqa: E402

SALT = qu.Params.from_dict(
    {
        "name": "salt",
        "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60}, "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}},
        "pairs": {
            "Cl-Na": {"born_mayer": {"A": 300.0, "rho": 0.32}},
            "Na-Na": {"born_mayer": {"A": 200.0, "rho": 0.32}},
            "Cl-Cl": {"born_mayer": {"A": 200.0, "rho": 0.32}},
        },
    }
)

REFERENCE = "converged: CG tol 1e-10, implicit"
SETTINGS = [
    (REFERENCE, qu.CG(tol=1e-10), "implicit", "geometry"),
    ("CG tol 1e-6 warm start, envelope", qu.CG(tol=1e-6), "envelope", "warm"),
    ("CG K=2, envelope", qu.CG(iterations=2), "envelope", "geometry"),
    ("CG K=2, unrolled", qu.CG(iterations=2), "unrolled", "geometry"),
    ("CG K=4, unrolled", qu.CG(iterations=4), "unrolled", "geometry"),
    ("XL + CG K=1, unrolled", qu.CG(iterations=1), "unrolled", "xl"),
    ("XL + CG K=2, unrolled", qu.CG(iterations=2), "unrolled", "xl"),
]


def systems():
    salt = rock_salt(2, rattle=0.05, seed=1)
    water = water_box(3, seed=0)
    from ase.optimize import FIRE

    water.calc = QEqCalculator(params="demo-nacl-water", kernel="gaussian", solver="exact", gradient="implicit")
    FIRE(water, logfile=None).run(fmax=0.05, steps=400)  # random orientations put H atoms too close
    return [
        ("NaCl melt (64 atoms)", salt, SALT, qu.ReaxFF(cutoff=8.0), 2.0, 2500.0),
        ("water box (81 atoms)", water, qu.load_params("demo-nacl-water"), qu.Gaussian(cutoff=5.0, accuracy=1e-5), 0.5, 300.0),
    ]


def run_one(atoms, params, kernel, solver, gradient, charges, dt_fs, steps, temperature, report_every):
    system = qu.make_system(
        atoms.positions, params.species_indices(atoms.get_chemical_symbols()), cell=np.asarray(atoms.cell[:]),
        pbc=tuple(bool(b) for b in atoms.pbc),
    )
    energy = qu.qeq_energy(kernel, solver, gradient)
    block = 20
    settings = md.Settings(steps=steps, dt_fs=dt_fs, temperature_K=temperature, charges=charges,
                           report_every=report_every, block=block, seed=11, max_energy_change=1.0)
    records, compiled = [], None
    try:
        layout = "list" if atoms.pbc.any() else "auto"
        for rec in md.run(settings, energy, params, system, atoms.get_masses(), layout=layout):
            records.append(rec)
            if len(records) == 2:
                compiled = time.perf_counter()
        error = None
    except md.MDError as exc:
        error = str(exc)
    end = time.perf_counter()
    step = np.concatenate([r.step for r in records])
    e_tot = np.concatenate([r.e_pot + r.e_kin for r in records])
    later = step[-1] - report_every * block
    return dict(
        step=step, e_tot=e_tot, error=error,
        temperature=float(np.concatenate([r.temperature for r in records])[1:].mean()),
        iterations=float(np.concatenate([r.iterations for r in records]).mean()),
        ms_per_step=1e3 * (end - compiled) / later if compiled and later > 0 else float("nan"),
    )


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2))
    for ax, (name, n, dt_fs, runs) in zip(np.atleast_1d(axes), results):
        for label, r in runs.items():
            t = r["step"] * dt_fs * 1e-3
            ax.plot(t, 1e3 * (r["e_tot"] - r["e_tot"][0]) / n, label=label, lw=1)
        ax.set_title(name)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("E_tot − E_tot(0) (meV/atom)")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def long_run(steps):
    atoms = nacl_cluster(64)
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.05, atoms.positions.shape)
    params = qu.load_params("demo-nacl-water")
    return run_one(atoms, params, qu.Gaussian(), qu.CG(iterations=3), "unrolled", "geometry", 2.0, steps, 600.0, 100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ps", type=float, default=10.0, help="simulated time per run (ps)")
    ap.add_argument("--long-steps", type=int, default=100_000, help="steps of the long free-cluster run")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    t_all = time.perf_counter()
    results = []
    for name, atoms, params, kernel, dt_fs, temperature in systems():
        steps = int(round(args.ps * 1000 / dt_fs))
        runs = {}
        for label, solver, gradient, charges in SETTINGS:
            r = run_one(atoms, params, kernel, solver, gradient, charges, dt_fs, steps, temperature, 10)
            runs[label] = r
            slope, worst = md.drift(r["step"] * dt_fs * 1e-3, r["e_tot"], len(atoms))
            r.update(slope=slope, worst=worst)
            print(f"{name} | {label}: drift {slope:.3g} meV/atom/ps, max {worst:.3g}, T {r['temperature']:.0f} K, "
                  f"{r['iterations']:.1f} it, {r['ms_per_step']:.2f} ms/step {r['error'] or ''}", flush=True)
        results.append((name, len(atoms), dt_fs, runs))
    plot(results, ROOT / "benchmarks" / "md_conservation.png")
    long = long_run(args.long_steps)
    long_slope, long_worst = md.drift(long["step"] * 2e-3, long["e_tot"], 64)
    print(f"long run: {long['step'][-1]} steps, drift {long_slope:.3g} meV/atom/ps, max {long_worst:.3g}, "
          f"{long['error'] or 'stable'}")
    minutes = (time.perf_counter() - t_all) / 60
    lines = [
        "## bench_md: energy conservation of device MD",
        "",
        f"`python benchmarks/bench_md.py` (jax {jax.__version__}, {platform.machine()} CPU, {jax.devices()[0]}; whole run "
        f"{minutes:.0f} min; no GPU was available for this run). {args.ps:g} ps of NVE per setting from the same "
        "positions and momenta; drift = least-squares slope of E_tot(t); cost per step relative to the converged "
        "solve (CG tol 1e-10, implicit) in the same run (the machine is a shared 2-core CPU: absolute ms move with its load). Plot: "
        "`benchmarks/md_conservation.png`. Unrolled and XL forces are the exact derivative of their own energy "
        "surface, but a K-step surface can be stiffer than the converged one where the solve is far from converged "
        "(close contacts in the hot melt): steps in E_tot there are velocity-Verlet error at this dt, as are the "
        "spikes of the converged run. In the water box the steep H–H repulsion at 0.5 fs limits every setting, "
        "the converged solve included.",
        "",
    ]
    for name, n, dt_fs, runs in results:
        ref = runs[REFERENCE]["ms_per_step"]
        lines += [
            f"**{name}**, dt = {dt_fs:g} fs, mean T over the run {runs[REFERENCE]['temperature']:.0f} K (converged solve)",
            "",
            "| setting | drift (meV/atom/ps) | max \\|ΔE_tot\\| (meV/atom) | solver iterations | cost per step / converged | ms per step |",
            "|---|---|---|---|---|---|",
        ]
        for label, r in runs.items():
            note = " (stopped: blew up)" if r["error"] else ""
            lines.append(f"| {label}{note} | {r['slope']:.3g} | {r['worst']:.3g} | {r['iterations']:.1f} | "
                         f"{r['ms_per_step'] / ref:.2f} | {r['ms_per_step']:.2f} |")
        lines.append("")
    lines += [
        f"Long run: free 64-atom NaCl cluster, demo set, gaussian kernel, CG K = 3 unrolled, dt = 2 fs, from 600 K: "
        f"{long['step'][-1]} steps ({long['step'][-1] * 2e-3:g} ps), "
        f"{'stable' if long['error'] is None else 'stopped: ' + long['error']}; drift {long_slope:.3g} meV/atom/ps, "
        f"max |ΔE_tot| {long_worst:.3g} meV/atom, mean T {long['temperature']:.0f} K, {long['ms_per_step']:.2f} ms per step.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("bench_md", text)


if __name__ == "__main__":
    main()
