"""NVE energy conservation of a NaCl cluster: exact charges vs a few CG iterations.

A 32-atom rock-salt NaCl cluster (built-in ``demo-nacl-water`` set, gaussian kernel) is relaxed,
given Maxwell–Boltzmann velocities at 600 K (fixed seed, no net translation or rotation) and run
with velocity Verlet (1 fs) from that same start with:

- exact charges, implicit-function forces (the reference), and
- CG with K = 2, 3, 4 iterations, forces ``unrolled`` through the K iterations (the exact
  derivative of the energy reported) or ``envelope`` (charges held fixed: not the derivative).

Prints the largest |E_tot(t) − E_tot(0)| (meV/atom) and the linear drift (meV/atom/ps) of each run
and plots E_tot(t) − E_tot(0). Expectation: CG K=3 unrolled stays within 1.5× the reference's
deviation; envelope at the same K is far worse.

With the demo set's NaCl pair terms the cluster is weakly bound (about 0.2 eV/atom against
separation into far-apart atoms): from 600 K it melts, expands and starts to shed small fragments
within 2 ps (final temperature about 140 K, see the "extent" column). Energy conservation is
measured through those events, close Na–Cl approaches down to about 2.1 Å included.

    python examples/nve_energy_conservation.py [--steps 2000] [--out nve_energy_conservation.png]

Any model and structure: ``--params`` takes a parameter set or a model file of ``qeq-unroll fit
--model neural`` (its kernel comes with it), ``--structure`` an extended XYZ file (its first
configuration, relaxed first), e.g. after ``qeq-unroll fit $(python -c "from calculators.data import
shipped_reference as s; print(s('ct-train'))") --model neural --out model.json``::

    python examples/nve_energy_conservation.py --params model.json --structure cluster.xyz --iterations 3

A model whose short-range energy takes the charges (``--charge-in-short``) has no envelope runs:
its envelope forces are wrong at any tolerance, and the calculator refuses them.

Units: energies eV (tables in meV/atom), time fs/ps, temperature K.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ase.io import read  # noqa: E402

from calculators import QEqCalculator  # noqa: E402
from calculators.md import REFERENCE_LABEL, compare_nve, relax, setup_label, solver_setups  # noqa: E402
from calculators.structures import nacl_cluster  # noqa: E402
from qeq_unroll.neural import is_model_file, load_model  # noqa: E402


def model_settings(params: str):
    """``(calculator keywords, gradient modes)``: a model file brings its kernel, and envelope
    forces only where its energy is stationary in the charges."""
    if not is_model_file(params):
        return dict(params=params, kernel="gaussian"), ("unrolled", "envelope")
    terms = load_model(params)[0]
    return dict(params=params), ("unrolled",) if terms.charge_dependent else ("unrolled", "envelope")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000, help="MD steps (default 2000)")
    ap.add_argument("--dt", type=float, default=1.0, help="time step in fs (default 1)")
    ap.add_argument("--temperature", type=float, default=600.0, help="initial temperature in K (default 600)")
    ap.add_argument("--seed", type=int, default=7, help="velocity seed (default 7)")
    ap.add_argument("--atoms", type=int, default=32, help="NaCl cluster size (default 32)")
    ap.add_argument("--params", default="demo-nacl-water", help="parameter set or model file (default demo-nacl-water)")
    ap.add_argument("--structure", default=None, help="extended XYZ file whose first configuration to run (default: NaCl cluster)")
    ap.add_argument("--iterations", default="2,3,4", help="CG iteration counts K, comma-separated")
    ap.add_argument("--out", default="nve_energy_conservation.png", help="plot file (PNG)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    ks = [int(k) for k in args.iterations.split(",") if k.strip()]
    calc, gradients = model_settings(args.params)
    atoms = nacl_cluster(args.atoms) if args.structure is None else read(args.structure, 0)
    start = relax(atoms, QEqCalculator(solver="exact", gradient="implicit", **calc), fmax=1e-3)
    n = len(start)
    print(f"{start.get_chemical_formula()}: {n} atoms, relaxed in {start.info['relax_steps']} BFGS steps; NVE "
          f"{args.steps} steps x {args.dt:g} fs from {args.temperature:g} K (seed {args.seed}), {args.params}")

    def progress(label, run):
        print(f"  done {label:<20s} {run.seconds:6.1f} s", flush=True)

    t0 = time.perf_counter()
    runs = compare_nve(start, solver_setups(ks, gradients), args.steps, args.dt, args.temperature, args.seed,
                       calc_kwargs=calc, progress=progress)
    print(f"  total {time.perf_counter() - t0:.1f} s\n")

    ref = runs[REFERENCE_LABEL].drift.max_dev
    head = f"{'setting':<20s} {'max|dE| meV/atom':>17s} {'x ref':>8s} {'drift meV/atom/ps':>18s} {'final T K':>10s} {'extent A':>9s}"
    print(head)
    print("-" * len(head))
    for label, run in runs.items():
        d = run.drift
        print(f"{label:<20s} {d.max_dev:17.3e} {d.max_dev / ref:8.2f} {d.slope:18.3e} {run.temperature:10.0f} {run.extent:9.2f}")
    print("(extent: largest distance of an atom from the centre of mass at the end; relaxed start "
          f"{np.max(np.linalg.norm(start.positions - start.get_center_of_mass(), axis=1)):.2f} A)")

    ok = True
    if 3 in ks:
        u3 = runs[setup_label(3, "unrolled")].drift.max_dev
        ok = u3 <= 1.5 * ref
        print(f"\ncg K=3 unrolled / reference = {u3 / ref:.2f} (acceptance <= 1.5: {'PASS' if ok else 'FAIL'})")
        if "envelope" in gradients:
            print(f"cg K=3 envelope / cg K=3 unrolled = {runs[setup_label(3, 'envelope')].drift.max_dev / u3:.1f}")

    plot(runs, n, args)
    print(f"plot written to {args.out}")
    return 0 if ok else 1


def plot(runs, n_atoms, args):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    t_ps = np.arange(args.steps + 1) * args.dt / 1000.0
    colors = {label: f"C{i}" for i, label in enumerate(runs)}
    for ax, which in zip(axes, ("all", "conservative")):
        for label, run in runs.items():
            if which == "conservative" and "envelope" in label:
                continue
            style = "--" if "envelope" in label else "-"
            lw = 2.5 if label == REFERENCE_LABEL else 1.0
            ax.plot(t_ps, (run.etot - run.etot[0]) * 1000.0 / n_atoms, style, lw=lw, color=colors[label], label=label)
        ax.set_xlabel("time (ps)")
        ax.set_ylabel("E_tot(t) - E_tot(0) (meV/atom)")
        ax.grid(alpha=0.3)
    axes[0].set_title("all settings")
    axes[1].set_title("exact + implicit and unrolled only")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"NVE, {args.params} ({n_atoms} atoms), {args.temperature:g} K start, dt = {args.dt:g} fs")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
