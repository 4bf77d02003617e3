"""Core benchmark: energy + forces of a free-space NaCl cluster against a dense NumPy solve.

For N = 100, 1000, 3000 atoms (a rock-salt NaCl cube cut to N atoms and rattled by 0.05 Å;
built-in ``demo-nacl-water`` set, gaussian kernel, all pairs, float64) this times one jitted
``qeq_unroll.energy_and_forces`` evaluation (build H, solve the charges, forces by ``jax.grad``) for

- ``cg`` to tol 1e-8 with implicit forces and with unrolled forces,
- ``cg`` with K = 4 iterations, unrolled forces,
- ``exact`` (dense Cholesky) with implicit forces (reference),

against the peer in the same run: ``numpy.linalg.solve`` of the same bordered (N+1) QEq system
[[H, −1], [1ᵀ, 0]] (q, μ) = (−χ, Q), with H built once in NumPy beforehand and only the solve timed.
The JAX timings therefore include everything (H, solve, forces), the peer only the solve.
Medians of repeats after a JIT warm-up; the table gives ratios to the peer (absolute times only
on a GPU, with the device named). A setting whose compiled scratch memory exceeds
``--max-memory-gb`` is skipped and the table says so. Writes its section of ``benchmarks/RESULTS.md`` between
``<!-- bench_core:start -->`` and ``<!-- bench_core:end -->`` (other sections are kept).

    python benchmarks/bench_core.py [--sizes 100,1000,3000] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.special import erf  # noqa: E402

import qeq_unroll  # noqa: E402
from calculators.structures import nacl_cut  # noqa: E402
from results import RESULTS, write_section  # noqa: E402

PARAMS = "demo-nacl-water"
SETTINGS = [
    ("cg tol 1e-8, implicit", lambda: qeq_unroll.CG(tol=1e-8), "implicit"),
    ("cg tol 1e-8, unrolled", lambda: qeq_unroll.CG(tol=1e-8), "unrolled"),
    ("cg K=4, unrolled", lambda: qeq_unroll.CG(iterations=4), "unrolled"),
    ("exact, implicit", lambda: qeq_unroll.Exact(), "implicit"),
]


def repeats_for(n):
    return 21 if n <= 300 else (9 if n <= 1500 else 5)


def time_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def numpy_bordered(params, symbols, positions, total_charge=0.0, k_e=qeq_unroll.COULOMB_CONSTANT):
    """The bordered (N+1) QEq system of the gaussian kernel, built in NumPy float64."""
    species = params.species_indices(symbols)
    chi = np.asarray(params.chi, dtype=float)[species]
    j = np.asarray(params.hardness, dtype=float)[species]
    sigma = np.asarray(params.sigma, dtype=float)[species]
    n = len(species)
    r = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    gamma = np.sqrt(sigma[:, None] ** 2 + sigma[None, :] ** 2)
    np.fill_diagonal(r, 1.0)
    h = k_e * erf(r / (math.sqrt(2.0) * gamma)) / r
    np.fill_diagonal(h, j + k_e / (sigma * math.sqrt(math.pi)))
    a = np.zeros((n + 1, n + 1))
    a[:n, :n] = h
    a[:n, n] = -1.0
    a[n, :n] = 1.0
    b = np.concatenate([-chi, [total_charge]])
    return a, b


def bench_size(n, params, max_bytes):
    atoms = nacl_cut(n, rattle=0.05, seed=0)
    symbols = atoms.get_chemical_symbols()
    species = params.species_indices(symbols)
    system = qeq_unroll.make_system(atoms.positions, species, total_charge=0.0, dtype=jnp.float64)
    reps = repeats_for(n)

    a, b = numpy_bordered(params, symbols, atoms.positions)
    q_ref = np.linalg.solve(a, b)[:n]

    # Compile every setting (skipping those needing too much scratch memory) and warm it up.
    compiled, skipped, info = {}, {}, {}
    for label, make_solver, mode in SETTINGS:
        energy = qeq_unroll.qeq_energy("gaussian", make_solver(), mode)
        fn = jax.jit(qeq_unroll.energy_and_forces(energy)).lower(params, system).compile()
        scratch = fn.memory_analysis().temp_size_in_bytes
        if scratch > max_bytes:
            skipped[label] = scratch
            continue
        e, f, aux = jax.block_until_ready(fn(params, system))
        compiled[label] = fn
        info[label] = aux

    # Interleave the peer and the settings in every round, so that all see the same machine load.
    times = {"peer": [], **{label: [] for label in compiled}}
    for _ in range(reps):
        times["peer"].append(time_once(lambda: np.linalg.solve(a, b)))
        for label, fn in compiled.items():
            times[label].append(time_once(lambda: jax.block_until_ready(fn(params, system))))
    peer = statistics.median(times["peer"])

    rows = [dict(n=n, method="numpy.linalg.solve (N+1), solve only", seconds=peer, ratio=1.0, iters="-",
                 residual="-", dq="-")]
    for label, _, _ in SETTINGS:
        if label in skipped:
            rows.append(dict(n=n, method=f"{label} (E+F)", seconds=math.nan, ratio=math.nan, iters="-",
                             residual="-", dq=f"skipped: needs {skipped[label] / 1e9:.0f} GB scratch"))
            continue
        aux = info[label]
        seconds = statistics.median(times[label])
        dq = float(np.max(np.abs(np.asarray(aux["charges"]) - q_ref)))
        rows.append(dict(n=n, method=f"{label} (E+F)", seconds=seconds, ratio=seconds / peer,
                         iters=int(aux["iterations"]), residual=f"{float(aux['residual']):.0e}", dq=f"{dq:.0e}"))
    return rows


def device_name():
    d = jax.devices()[0]
    return d.platform, getattr(d, "device_kind", d.platform)


def format_table(rows, absolute):
    cols = ["N", "method", "time / numpy solve", "solver iterations", "residual", "max abs(q - q_numpy) (e)"]
    if absolute:
        cols.insert(2, "median time (ms)")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        vals = [str(r["n"]), r["method"], "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.2f}", str(r["iters"]), r["residual"], r["dq"]]
        if absolute:
            vals.insert(2, "-" if math.isnan(r["seconds"]) else f"{1000 * r['seconds']:.2f}")
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,3000", help="atom counts, comma-separated")
    ap.add_argument("--max-memory-gb", type=float, default=8.0,
                    help="skip a setting whose compiled scratch memory exceeds this (default 8 GB)")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), qeq_unroll.load_params(PARAMS))
    platform_name, kind = device_name()
    absolute = platform_name != "cpu"
    start = time.perf_counter()
    rows = []
    for n in sizes:
        rows.extend(bench_size(n, params, args.max_memory_gb * 1e9))
        print(f"N = {n} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    table = format_table(rows, absolute)
    max_gb = args.max_memory_gb
    where = (f"device: {kind}" if absolute else
             f"CPU ({os.cpu_count()} cores, {platform.machine()}); absolute times not recorded (ratios only)")
    text = "\n".join([
        "## bench_core: energy + forces vs a dense NumPy solve",
        "",
        f"`python benchmarks/bench_core.py` (jax {jax.__version__}, numpy {np.__version__}, {where}). "
        f"Free-space NaCl cluster cut from rock salt (2.82 A) and rattled by 0.05 A, `{PARAMS}`, gaussian kernel, "
        "all pairs, float64. Each qeq-unroll row is one jitted `energy_and_forces` call: building H, solving the "
        "charges and the forces by `jax.grad`. The peer, `numpy.linalg.solve` of the bordered (N+1) system with H "
        "built once beforehand in NumPy, is timed for the solve only, so ratios favour the peer. Medians of "
        f"repeats after JIT warm-up (21 for N <= 300, 9 for N <= 1500, 5 above), the peer and all settings interleaved in each round; ratio = time / peer time. "
        f"Settings needing more than {max_gb:g} GB of compiled scratch memory would be skipped. "
        "On a small shared CPU machine the ratios move by tens of percent from run to run.",
        "",
        table,
    ])
    print(text)
    if not absolute:
        print("\nraw median times on this machine (ms, not recorded):",
              ", ".join(f"N={r['n']} {r['method'].split(' (')[0]}: {1000 * r['seconds']:.2f}" for r in rows))
    if not args.no_write:
        write_section("bench_core", text)
        print(f"\nwritten to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
