"""First-call latency: a fresh process's first energy + forces, with a cold and a warm persistent
compilation cache, against LAMMPS's whole ``run 0`` in a fresh process.

    python benchmarks/bench_first_call.py                 # 4096 and 32768 atoms, ~5 min on 2 cores
    python benchmarks/bench_first_call.py --sizes 4096 --no-write

Rattled rock-salt NaCl as in ``bench_periodic`` (reaxff kernel, r_c = 10 Å, k_e = 14.4, CG to 1e-6),
one CPU thread for both codes. Each row runs new processes:
- cold: ``QEqCalculator`` with ``qeq_unroll.enable_compilation_cache`` on an empty folder; the time
  from the calculator's construction to the first forces (compilation, neighbour list, the solve),
  then one more call after a 1e-6 Å nudge (one evaluation);
- warm: the same in a new process with the folder the cold run filled;
- LAMMPS: ``lmp -in`` of the exported deck (``qeq-unroll export-lammps``: fix qeq/reaxff and the
  Coulomb energy) with ``run 0``, the wall time of the whole process;
- import: the seconds ``import qeq_unroll, calculators`` takes in the cold process (not in the
  first-call time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUTOFF, KE, TOL = 10.0, 14.4, 1e-6
PARAMS = {"name": "bench-first-call",
          "elements": {"Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60}, "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65}},
          "pairs": {"Cl-Na": {"born_mayer": {"A": 1200.0, "rho": 0.32}}}}  # fmt: skip
ONE_THREAD = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1", "OMP_NUM_THREADS": "1"}


def structure(n):
    from ase.build import bulk

    reps = round((n / 8) ** (1 / 3))
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat(reps)
    atoms.rattle(0.1, seed=0)
    return atoms


def child(n, cache) -> None:
    """One fresh process: print the import, first-call and one-evaluation seconds as JSON."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    started = time.perf_counter()
    import jax

    import qeq_unroll as qu
    from calculators import QEqCalculator

    imported = time.perf_counter() - started
    jax.config.update("jax_enable_x64", True)
    qu.enable_compilation_cache(cache)
    atoms = structure(n)
    started = time.perf_counter()
    import jax_md  # noqa: F401 - what the first neighbour list imports, timed on its own

    jax_md_import = time.perf_counter() - started
    atoms.calc = QEqCalculator(params=PARAMS, kernel="reaxff", cutoff=CUTOFF, coulomb_constant=KE, tol=TOL)
    atoms.get_forces()
    first = time.perf_counter() - started
    atoms.positions[0, 0] += 1e-6
    started = time.perf_counter()
    atoms.get_forces()
    print(json.dumps(dict(imported=imported, jax_md=jax_md_import, first=first, one=time.perf_counter() - started)))


def run_child(n, cache) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(n), "--cache", str(cache)], capture_output=True,
                          text=True, env={**os.environ, **ONE_THREAD}, cwd=ROOT)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def lammps_run0(n, folder: Path) -> float:
    """Wall seconds of a fresh ``lmp -in`` process: read_data, the exported deck, ``run 0``."""
    import ase.io

    import qeq_unroll as qu
    from qeq_unroll.lammps_export import export_lammps

    export_lammps(qu.Params.from_dict(PARAMS), qu.ReaxFF(cutoff=CUTOFF), ["Na", "Cl"], folder / "deck", KE, tolerance=TOL)
    ase.io.write(folder / "data.lmp", structure(n), format="lammps-data", atom_style="charge", specorder=["Na", "Cl"],
                 masses=True, units="metal")  # fmt: skip
    (folder / "in.run").write_text(f"units metal\natom_style charge\nboundary p p p\nread_data {folder / 'data.lmp'}\n"
                                   f"include {folder / 'deck' / 'in.qeq'}\nrun 0\n")  # fmt: skip
    lmp = str(Path(sys.prefix) / "bin" / "lmp")
    started = time.perf_counter()
    done = subprocess.run([lmp, "-in", str(folder / "in.run"), "-log", "none", "-screen", "none", "-nocite"],
                          capture_output=True, text=True, env={**os.environ, **ONE_THREAD})  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - started


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,32768")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.cache)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            cold = run_child(n, Path(tmp) / "cache")
            warm = run_child(n, Path(tmp) / "cache")
            t_lammps = lammps_run0(n, Path(tmp))
        rows.append((n, cold, warm, t_lammps))
        print(n, cold, warm, t_lammps, flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from results import write_section

    import jax

    lines = [
        "## bench_first_call: the first energy + forces of a fresh process",
        "",
        f"`python benchmarks/bench_first_call.py --sizes {args.sizes}` (jax {jax.__version__}, {platform.machine()} CPU, one "
        f"thread for both codes, {os.cpu_count()} cores shared). Rattled rock-salt NaCl, reaxff kernel, r_c = 10 Å, CG "
        "to 1e-6 through `QEqCalculator` (defaults otherwise). First call: construction to the first forces in a new "
        "process (compilation, neighbour list, solve); one evaluation: the next call after a 1e-6 Å nudge; cold: an "
        "empty compilation cache (`qeq_unroll.enable_compilation_cache`, as the command line does), warm: a new process "
        "on the cache the cold one filled. LAMMPS: a new `lmp -in` process with the exported deck and `run 0`, "
        "read_data included. Import: `import qeq_unroll, calculators` (not in the first call); jax-md: the import of "
        "`jax_md`, which the first neighbour list needs (in the first call, timed on its own in the warm process: its "
        "package imports all its modules, e3nn-jax included, and runs jitted code at import).",
        "",
        "| N | import (s) | first call cold (s) | first call warm (s) | of which jax-md import (s) | one evaluation (s) | warm / one evaluation | LAMMPS whole `run 0` (s) | warm / LAMMPS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, cold, warm, t_lammps in rows:
        lines.append(f"| {n} | {cold['imported']:.1f} | {cold['first']:.1f} | {warm['first']:.1f} | {warm['jax_md']:.1f} | "
                     f"{warm['one']:.2f} | {warm['first'] / warm['one']:.1f} | {t_lammps:.2f} | {warm['first'] / t_lammps:.1f} |")  # fmt: skip
    goal = [f"N = {n}: {'met' if w['first'] <= 5 * w['one'] else 'not met'} ({w['first'] / w['one']:.1f}×)" for n, _, w, _ in rows]
    lines += ["", "Goal (issue 23): a warm-cache first call within 5× one evaluation: " + "; ".join(goal) + "."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("first_call", text)


if __name__ == "__main__":
    main()
