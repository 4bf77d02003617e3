"""The ``qeq-unroll demo`` job: relax the built-in NaCl and water clusters and report.

Both structures use one ``QEqCalculator`` (built-in ``demo-nacl-water`` set, gaussian kernel, CG to
tolerance, unrolled forces by default) and ASE's BFGS. Reported per structure: energy (eV),
charges per element (e) and their sum, the largest remaining force (eV/Å), the solver's
diagnostics (relative residual, iterations) and timings: the first evaluation (tracing + JIT
compilation) and the median of repeated evaluations at the relaxed geometry.

Needs JAX's 64-bit mode for the default dtype (the command line switches it on).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from ase.calculators.calculator import all_changes

from .md import relax
from .qeq import QEqCalculator
from .structures import nacl_cluster, water_cluster, water_geometry

#: Calculator keywords of the demo: CG to tolerance, unrolled forces.
DEMO_SETTINGS = dict(params="demo-nacl-water", kernel="gaussian", solver="cg", iterations=None, gradient="auto")


def _time_call(calc, atoms) -> float:
    start = time.perf_counter()
    calc.calculate(atoms, ["energy", "forces"], all_changes)
    return time.perf_counter() - start


def relax_and_report(name, atoms, calc, fmax, steps, repeats=5):
    """Relax ``atoms`` with ``calc`` and collect the demo's numbers (a dict)."""
    first = _time_call(calc, atoms)  # first call of this size bucket compiles
    start = time.perf_counter()
    relaxed = relax(atoms, calc, fmax=fmax, steps=steps)
    relax_s = time.perf_counter() - start
    per_call = float(np.median([_time_call(calc, relaxed) for _ in range(repeats)]))
    forces = calc.results["forces"]
    charges = calc.results["charges"]
    symbols = np.asarray(relaxed.get_chemical_symbols())
    out = dict(
        name=name,
        formula=relaxed.get_chemical_formula(),
        n_atoms=len(relaxed),
        steps=relaxed.info["relax_steps"],
        converged=relaxed.info["relax_converged"],
        energy=float(calc.results["energy"]),
        fmax=float(np.max(np.linalg.norm(forces, axis=1))),
        charges={el: charges[symbols == el] for el in dict.fromkeys(symbols)},
        charge_sum=float(np.sum(charges)),
        residual=float(calc.results["qeq_residual"]),
        iterations=int(calc.results["qeq_iterations"]),
        first_s=first,
        per_call_s=per_call,
        relax_s=relax_s,
        atoms=relaxed,
    )
    return out


def run_demo(fmax: float = 0.01, steps: int = 1000, settings: dict | None = None,
             echo: Callable[[str], None] = print, fit: bool = True):
    """Relax the 32-atom NaCl cluster and the water hexamer and print the tables. Returns the list
    of per-structure result dicts. ``settings`` override :data:`DEMO_SETTINGS` (calculator keywords).
    ``fit``: then fit the parameters to the shipped GFN2-xTB NaCl data and relax a held-out cluster
    with them (``calculators.fitting.demo_fit``)."""
    settings = {**DEMO_SETTINGS, **(settings or {})}
    calc = QEqCalculator(**settings)
    solver = settings["solver"] + (f", K = {settings['iterations']}" if settings.get("iterations") else
                                   f" to tol {calc.solver.tol:g}")
    echo(f"qeq-unroll demo: params {settings['params']}, kernel {settings['kernel']}, solver {solver}, "
         f"gradient {settings['gradient']}; BFGS to fmax {fmax:g} eV/A")
    structures = [("NaCl cluster", nacl_cluster(32)), ("water hexamer", water_cluster(6))]
    results = []
    for name, atoms in structures:
        results.append(relax_and_report(name, atoms, calc, fmax, steps))
    echo("")
    echo(format_table(results))
    echo("")
    echo(format_charges(results))
    echo("")
    echo(format_geometry(results))
    echo("")
    echo("Timings: 'first call' includes tracing and JIT compilation of the padded size bucket (both "
         "structures pad to the same bucket, so the second one reuses the compiled function); "
         "'per call' is the median energy+forces evaluation afterwards.")
    if fit:
        from .fitting import demo_fit

        echo("")
        demo_fit(echo=echo, fmax=fmax, steps=steps)
    return results


def format_table(results) -> str:
    head = (f"{'structure':<14s} {'atoms':>5s} {'BFGS':>5s} {'E (eV)':>11s} {'E/atom':>9s} {'max|F| eV/A':>12s} "
            f"{'sum q (e)':>10s} {'residual':>9s} {'iters':>5s} {'first call s':>12s} {'per call ms':>11s} {'relax s':>8s}")
    lines = [head, "-" * len(head)]
    for r in results:
        steps = f"{r['steps']}{'' if r['converged'] else '!'}"
        lines.append(
            f"{r['name']:<14s} {r['n_atoms']:>5d} {steps:>5s} {r['energy']:11.5f} {r['energy'] / r['n_atoms']:9.5f} "
            f"{r['fmax']:12.2e} {r['charge_sum']:10.1e} {r['residual']:9.1e} {r['iterations']:5d} "
            f"{r['first_s']:12.2f} {1000 * r['per_call_s']:11.2f} {r['relax_s']:8.2f}"
        )
    if not all(r["converged"] for r in results):
        lines.append("! BFGS stopped at the step limit before reaching fmax")
    return "\n".join(lines)


def format_charges(results) -> str:
    head = f"{'structure':<14s} {'element':<7s} {'count':>5s} {'mean q (e)':>11s} {'min':>9s} {'max':>9s}"
    lines = [head, "-" * len(head)]
    for r in results:
        for el, q in r["charges"].items():
            lines.append(f"{r['name']:<14s} {el:<7s} {len(q):5d} {q.mean():11.4f} {q.min():9.4f} {q.max():9.4f}")
    return "\n".join(lines)


def format_geometry(results) -> str:
    lines = ["Relaxed geometry:"]
    for r in results:
        atoms = r["atoms"]
        if r["name"].startswith("water"):
            oh, hoh = water_geometry(atoms)
            o = np.flatnonzero(np.asarray(atoms.get_chemical_symbols()) == "O")
            d = atoms.get_all_distances()[np.ix_(o, o)] + 1e9 * np.eye(len(o))
            lines.append(f"  {r['name']}: O-H {oh.min():.3f}-{oh.max():.3f} A, H-O-H {hoh.min():.1f}-{hoh.max():.1f} deg, "
                         f"nearest O...O {d.min(axis=1).min():.2f}-{d.min(axis=1).max():.2f} A")
        else:
            symbols = np.asarray(atoms.get_chemical_symbols())
            na, cl = np.flatnonzero(symbols == "Na"), np.flatnonzero(symbols == "Cl")
            d = atoms.get_all_distances()[np.ix_(na, cl)]
            lines.append(f"  {r['name']}: nearest Na-Cl {d.min():.3f} A (per Na: {d.min(axis=1).min():.3f}-"
                         f"{d.min(axis=1).max():.3f} A)")
    return "\n".join(lines)
