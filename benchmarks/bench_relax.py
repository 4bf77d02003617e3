"""Relaxation throughput: device FIRE (``qeq-unroll relax``'s path, batched) against ASE's loop.

    python benchmarks/bench_relax.py            # 64 clusters; a few minutes on 2 CPU cores
    python benchmarks/bench_relax.py --n 16 --no-write

The same structures — rattled Na_nCl_n clusters of 24-32 atoms cut from rock salt (one padded
size), ``demo-nacl-water`` set, gaussian kernel, CG to 1e-10 with the default (auto: implicit)
gradients — relaxed to fmax = 0.01 eV/Å:
- device: ``calculators.device_relax.relax_structures`` (FIRE on the device, ``--batch-size``
  structures together), timed after a first call of the same size that compiles;
- ASE: ``QEqCalculator`` with ASE's ``FIRE`` and ``BFGS``, one structure after the other (compiled
  once before timing).
Reported: structures per second, the mean steps and the largest energy difference per atom to
BFGS's minimum of the same structure. The device is named (the CPU here; a GPU when lent).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from ase import Atoms
from ase.optimize import BFGS, FIRE

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calculators import QEqCalculator  # noqa: E402
from calculators.device_relax import relax_structures  # noqa: E402
from results import write_section  # noqa: E402

FMAX = 0.01  # eV/Å


def clusters(n, seed=0):
    """``n`` rattled rock-salt fragments of 24-32 atoms (even, neutral), 2.8 Å spacing."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    out = []
    for _ in range(n):
        size = int(rng.choice([24, 28, 32]))
        order = np.argsort(np.linalg.norm(grid - 1.5 + rng.normal(0, 0.3, 3), axis=1))
        na = [g for g in grid[order] if g.sum() % 2 == 0][: size // 2]
        cl = [g for g in grid[order] if g.sum() % 2 == 1][: size // 2]
        atoms = Atoms(["Na"] * len(na) + ["Cl"] * len(cl), positions=2.8 * np.array(na + cl, float))
        atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        out.append(atoms)
    return out


def ase_loop(frames, calc, optimizer):
    """(seconds, energies, steps) of relaxing ``frames`` one by one with an ASE optimiser."""
    energies, steps = [], []
    started = time.perf_counter()
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        opt = optimizer(atoms, logfile=None)
        opt.run(fmax=FMAX, steps=3000)
        energies.append(atoms.get_potential_energy())
        steps.append(opt.nsteps)
    return time.perf_counter() - started, np.array(energies), np.array(steps)


def cell_params(kernel):
    """A NaCl model that binds rock salt with ``kernel``: Born–Mayer repulsion between Na and Cl
    only, its prefactor (eV) chosen per kernel (the gaussian kernel's wide charges attract less)."""
    a = {"gaussian": 100.0, "reaxff": 1200.0}[kernel]
    return {"name": f"bench-cell-{kernel}", "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.6, "sigma": 1.0},
                                                          "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65, "sigma": 1.0}},
            "pairs": {"Cl-Na": {"born_mayer": {"A": a, "rho": 0.32}}}}  # fmt: skip


def strained_cell(kernel, options):
    """The 64-atom rock-salt cell at the model's own minimum (cell and positions relaxed first,
    untimed), then strained by 3 % and rattled by 0.05 Å."""
    from ase.build import bulk
    from ase.filters import FrechetCellFilter

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(2)
    atoms.calc = QEqCalculator(params=cell_params(kernel), kernel=kernel, **options)
    BFGS(FrechetCellFilter(atoms), logfile=None).run(fmax=1e-4, steps=500)
    atoms.set_cell(atoms.cell * 1.03, scale_atoms=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = None
    return atoms


class CompileCounter(logging.Handler):
    """Counts the compilations of the calculator's periodic step (``jax.log_compiles``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += "Finished XLA compilation of jit(periodic_step)" in record.getMessage()


def cell_steps(kernel, options, steps=60):
    """``(whole, calculator, compilations)`` per BFGS step of the strained 64-atom cell of
    :func:`strained_cell` (after a first call that compiles), ``steps`` steps each, for positions
    only, for positions with the stress asked at every step (a ``FrechetCellFilter`` whose mask
    holds the cell) and for positions and cell (FrechetCellFilter): seconds of the whole step and of
    the part spent in the calculator (the rest is ASE: the filter's matrix logarithms and BFGS's
    eigensolve), and the compilations of the periodic step during the timed steps."""
    from ase.filters import FrechetCellFilter

    start = strained_cell(kernel, options)
    out = []
    for with_cell in (False, "stress", True):
        atoms = start.copy()
        calc = QEqCalculator(params=cell_params(kernel), kernel=kernel, **options)
        atoms.calc = calc
        atoms.get_forces()
        if with_cell:  # compile the step with the stress before timing
            atoms.get_stress()
        spent = [0.0]
        calculate = calc.calculate

        def timed(*args, **kwargs):
            started = time.perf_counter()
            calculate(*args, **kwargs)
            spent[0] += time.perf_counter() - started

        calc.calculate = timed
        target = atoms if not with_cell else FrechetCellFilter(atoms, mask=None if with_cell is True else [0] * 6)
        opt = BFGS(target, logfile=None)
        counter = CompileCounter()
        logging.getLogger("jax").addHandler(counter)
        started = time.perf_counter()
        with jax.log_compiles():
            opt.run(fmax=1e-6, steps=steps)
        elapsed = time.perf_counter() - started
        logging.getLogger("jax").removeHandler(counter)
        out.append((elapsed / max(opt.nsteps, 1), spent[0] / max(opt.nsteps, 1), counter.count))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="structures (default 64)")
    ap.add_argument("--batch-size", type=int, default=64, help="structures relaxed together (default 64)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    frames = clusters(args.n)
    calc = QEqCalculator(params="demo-nacl-water")
    relax_structures(frames[:1], calc, FMAX, 3000, progress=False)  # compile the single path
    relax_structures(frames[: min(args.batch_size, len(frames))], calc, FMAX, 3000, args.batch_size, progress=False)
    started = time.perf_counter()
    device = relax_structures(frames, calc, FMAX, 3000, args.batch_size, progress=False)
    device_s = time.perf_counter() - started
    e_device = np.array([a.get_potential_energy() for a in device])
    ase_loop(frames[:1], calc, BFGS)  # compile the calculator's path
    rows = {"BFGS": ase_loop(frames, calc, BFGS), "FIRE": ase_loop(frames, calc, FIRE)}
    e_bfgs = rows["BFGS"][1]
    natoms = np.array([len(a) for a in frames])

    def same(energies):  # how many reached the minimum BFGS reached (these clusters have several)
        return int(np.sum(np.abs(energies - e_bfgs) / natoms < 1e-4))

    lines = [
        "## bench_relax: relaxation throughput, device FIRE against ASE's loop",
        "",
        f"`python benchmarks/bench_relax.py --n {args.n} --batch-size {args.batch_size}` (jax {jax.__version__}, "
        f"device {jax.devices()[0].device_kind} ({os.cpu_count()} cores, {platform.machine()}), float64): {args.n} rattled "
        f"Na_nCl_n clusters of 24-32 atoms, `demo-nacl-water`, gaussian kernel, CG to 1e-10 (auto gradients), to "
        f"fmax {FMAX} eV/Å. ΔE: the largest |E − E_BFGS| per atom over the structures (a different local minimum shows "
        "as a large value).",
        "",
        "| path | structures/s | mean steps | converged | at BFGS's minimum (|ΔE| < 1e-4 eV/atom) | max ΔE vs BFGS (eV/atom) |",
        "|---|---|---|---|---|---|",
        f"| device FIRE, batches of {args.batch_size} (`qeq-unroll relax`) | {args.n / device_s:.2f} | "
        f"{np.mean([a.info['relax_steps'] for a in device]):.0f} | {sum(a.info['relax_converged'] for a in device)}/{args.n} | "
        f"{same(e_device)}/{args.n} | {np.max(np.abs(e_device - e_bfgs) / natoms):.1e} |",
    ]
    for name, (seconds, energies, steps) in rows.items():
        lines.append(f"| ASE {name} + QEqCalculator, one by one | {args.n / seconds:.2f} | {steps.mean():.0f} | – | "
                     f"{same(energies)}/{args.n} | {np.max(np.abs(energies - e_bfgs) / natoms):.1e} |")  # fmt: skip
    lines += ["", f"Device batch against the ASE FIRE loop: {rows['FIRE'][0] / device_s:.1f}× the structures per second; "
              f"against BFGS: {rows['BFGS'][0] / device_s:.1f}×. Rattled clusters of this size have several minima: "
              "where FIRE (either) and BFGS end in different ones, ΔE is large; `tests/test_relax.py` checks the same "
              "minimum on structures that have one. No GPU was lent for this run."]  # fmt: skip
    lines += ["", "Variable-cell relaxation through `QEqCalculator` (ASE BFGS, 60 steps after the first call): a 64-atom NaCl "
              "cell at the model's own minimum (`bench_relax.strained_cell`: a Na–Cl Born–Mayer model that binds rock salt "
              "with each kernel, cell relaxed first), strained by 3 % and rattled. Milliseconds per step (whole step / "
              "calculator) with the cell fixed, with the cell fixed but the stress asked at every step, and with "
              "`FrechetCellFilter`; in brackets the compilations of the periodic step during the 60 timed steps. Once the "
              "stress is asked for, the images and Ewald k-vectors serve every cell within 3 % strain "
              "(`CELL_STRAIN_SKIN`) and are rebuilt on the host only beyond it, then padded so that the compiled step "
              "is kept. The step with the stress costs more than the forces alone: the strain derivative, and the "
              "k-vectors of the strained cells.",
              "", "| kernel | fixed cell | fixed cell, stress asked | FrechetCellFilter | calculator time against fixed, "
              "against fixed with stress (goal ≤ 1.5) |", "|---|---|---|---|---|"]  # fmt: skip
    for kernel, options in (("gaussian", {}), ("reaxff", {"cutoff": 8.0})):
        rows = cell_steps(kernel, options)
        cells = [f"{1e3 * whole:.0f} / {1e3 * calc:.0f} ({n})" for whole, calc, n in rows]
        (_, fixed_calc, _), (_, stressed_calc, _), (_, variable_calc, _) = rows
        lines.append(f"| {kernel} | {' | '.join(cells)} | {variable_calc / fixed_calc:.2f}, {variable_calc / stressed_calc:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("relax", text)


if __name__ == "__main__":
    main()
