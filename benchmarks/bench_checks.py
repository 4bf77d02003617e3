"""Checks of bad input: how fast and how small a refusal is, what the checks cost a sound
structure, and a long property run.

1. The bad inputs of the issue, each through ``QEqCalculator`` as a user calls it: the seconds to
   the error and the growth of this process's peak resident memory (VmHWM, reset before each case
   through /proc/self/clear_refs).
2. What the checks cost a sound structure, against the work they guard, in the same run: the
   pre-build checks (``checks.check_cell`` + ``estimate_memory``) against ``neighbors.build`` on
   rattled rock-salt NaCl (reaxff, r_c = 10 Å), and the host checks after an evaluation
   (``QEqCalculator._check``) against one calculator call (energy + forces), free space and periodic.
   Medians of repeats after warm-up.
3. The property tests of ``tests/test_checks.py`` at ``--free`` and ``--periodic`` examples (random
   seed 0), with hypothesis's statistics: how many examples returned charges and which errors
   refused the others.

Writes its section of ``benchmarks/RESULTS.md`` (``<!-- bench_checks:start -->`` .. ``end``).

    python benchmarks/bench_checks.py [--free 400] [--periodic 60] [--repeats 7] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import bulk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qeq_unroll as qu  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from calculators import QEqCalculator  # noqa: E402
from qeq_unroll import checks  # noqa: E402
from qeq_unroll.errors import QEqError  # noqa: E402

#: the set of bench_periodic (J and γ that keep bulk NaCl positive definite under reaxff)
SALT = {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60}, "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}}
TINY = dict(symbols="NaCl", positions=[[0, 0, 0], [0.1, 0.05, 0.03]], cell=[[0.2, 0, 0], [0.05, 0.2, 0], [0.03, 0.04, 0.125]], pbc=True)
FLAT = dict(symbols="NaCl", positions=[[0, 0, 0], [1, 1, 1]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 9e-6]], pbc=True)
CASES = [
    ("0.005 Å³ triclinic cell, gaussian", TINY, {}),
    ("0.005 Å³ triclinic cell, reaxff", TINY, {"kernel": "reaxff"}),
    ("8.1e-5 Å³ near-singular cell, gaussian", FLAT, {}),
    ("Na–Cl 0.05 Å apart, reaxff", dict(symbols="NaCl", positions=[[0, 0, 0], [0.05, 0, 0]]), {"kernel": "reaxff"}),
    ("4-atom cluster, Na–Cl 0.05 Å, reaxff", dict(symbols="NaClNaCl", positions=[[0, 0, 0], [0.05, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]]), {"kernel": "reaxff"}),
    ("the same, min_distance=0 (charge bound)", dict(symbols="NaClNaCl", positions=[[0, 0, 0], [0.05, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]]), {"kernel": "reaxff", "min_distance": 0.0}),
    ("coincident atoms, reaxff", dict(symbols="NaClNaCl", positions=[[0, 0, 0], [0, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]]), {"kernel": "reaxff"}),
]


def peak_kb():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1])


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def refusals():
    rows = []
    for name, atoms_kw, calc_kw in CASES:
        reset_peak()
        before = peak_kb()
        t = time.perf_counter()
        atoms = Atoms(**atoms_kw)
        atoms.calc = QEqCalculator(**calc_kw)
        try:
            atoms.get_potential_energy()
            outcome = "returned (not refused)"
        except QEqError as error:
            outcome = f"{type(error).__name__}: {str(error)[:110]}…"
        rows.append((name, time.perf_counter() - t, (peak_kb() - before) / 1024, outcome))
        print(rows[-1])
    return rows


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def salt(n_cells, rattle=0.1, seed=0):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(n_cells)
    atoms.positions += np.random.default_rng(seed).normal(0, rattle, atoms.positions.shape)
    return atoms


def costs(repeats):
    rows = []
    atoms = salt(8)  # 4096 atoms
    params = qu.Params.from_dict({"name": "bench-periodic", "elements": SALT})
    calc = QEqCalculator(params=params, kernel="reaxff", cutoff=10.0, coulomb_constant=14.4, tol=1e-6, gradient="implicit")
    atoms.calc = calc
    atoms.get_potential_energy()
    system = calc.system(atoms)
    kernel = calc.kernel
    cell = np.asarray(system.cell)
    n = len(atoms)

    def pre():
        checks.check_cell(cell, system.pbc, n, calc.limits)
        checks.estimate_memory(n, cell, system.pbc, 11.0, "list")

    t_pre = median_time(pre, repeats)
    t_build = median_time(lambda: qu.neighbors.build(kernel, system, calc.qeq_params, limits=calc.limits), max(3, repeats // 2))
    rows.append((f"periodic NaCl, {n} atoms (reaxff, r_c = 10 Å): check_cell + estimate_memory / neighbors.build", t_pre / t_build))

    def call():
        calc.reset()
        atoms.get_forces()

    aux = {"min_distance": 2.0, "positive_definite": True, "converged": True, "charges": calc.results["charges"]}
    t_call = median_time(call, repeats)
    t_check = median_time(lambda: calc._check(atoms, system, aux, calc._neighbors), repeats)
    rows.append((f"periodic NaCl, {n} atoms: host checks after an evaluation / one calculator call", t_check / t_call))

    cluster = salt(5)  # a 1000-atom cut of rock salt, free space
    cluster.pbc = False
    free = QEqCalculator(kernel="gaussian", solver="cg", tol=1e-8, gradient="implicit")
    cluster.calc = free
    cluster.get_potential_energy()
    free_system = free.system(cluster)
    free_aux = {"min_distance": 2.0, "positive_definite": True, "converged": True, "charges": free.results["charges"]}

    def free_call():
        free.reset()
        cluster.get_forces()

    t_call = median_time(free_call, repeats)
    t_check = median_time(lambda: free._check(cluster, free_system, free_aux), repeats)
    rows.append((f"free-space NaCl, {len(cluster)} atoms: host checks after an evaluation / one calculator call", t_check / t_call))
    for row in rows:
        print(row)
    return rows


def fuzz(name, examples):
    """Run one property test at ``examples`` examples; (passed, seconds, events)."""
    env = dict(os.environ, QEQ_FUZZ_EXAMPLES=str(examples))
    t = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_checks.py"), "-k", name,
         "--hypothesis-seed=0", "--hypothesis-show-statistics", "-p", "no:cacheprovider"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    events = re.findall(r"^\s*[-*]\s*([\d.]+)%, (refused: \w+|returned charges)$", run.stdout, re.M)
    generated = re.findall(r"(\d+) passing(?: examples)?, (\d+) failing", run.stdout)
    print(run.stdout[-3000:])
    return run.returncode == 0, seconds, events, generated


def write(refused, overhead, fuzzed, args):
    lines = [
        "## bench_checks: refusing bad input, and what the checks cost",
        "",
        f"`python benchmarks/bench_checks.py --free {args.free} --periodic {args.periodic}` (jax {jax.__version__}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores). Each bad input goes through `QEqCalculator` as a user "
        "calls it, in one process; peak memory is the growth of its resident high-water mark (VmHWM, reset "
        "before each case), time includes compiling where the check needs an evaluation.",
        "",
        "| bad input | seconds to the error | peak memory growth (MiB) | outcome |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {t:.2f} | {mib:.0f} | {outcome.replace('|', '¦')} |" for name, t, mib, outcome in refused]
    lines += ["", "What the checks cost a sound structure (medians, same run):", "", "| comparison | ratio |", "|---|---|"]
    lines += [f"| {name} | {ratio:.2e} |" for name, ratio in overhead]
    lines += ["", "Property tests (`tests/test_checks.py`, hypothesis seed 0):", "",
              "| property | examples run (passing / failing) | passed | minutes | outcomes |", "|---|---|---|---|---|"]
    for name, (ok, seconds, events, generated) in fuzzed.items():
        counts = ", ".join(f"{p} / {f}" for p, f in generated)
        outcomes = "; ".join(f"{label} {pct}%" for pct, label in events)
        lines.append(f"| {name} | {counts} | {'yes' if ok else 'NO'} | {seconds / 60:.1f} | {outcomes} |")
    write_section("bench_checks", "\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--free", type=int, default=400, help="examples of the free-space property")
    parser.add_argument("--periodic", type=int, default=60, help="examples of the periodic property")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    refused = refusals()
    overhead = costs(args.repeats)
    fuzzed = {
        "free-space clusters": fuzz("free_space", args.free),
        "periodic cells": fuzz("periodic_cells", args.periodic),
    }
    if not args.no_write:
        write(refused, overhead, fuzzed, args)


if __name__ == "__main__":
    main()
