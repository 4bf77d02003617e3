"""GPU benchmark: periodic NaCl at N = 10³..10⁶ on one GPU, float32 and float64.

Rattled rock-salt NaCl as in ``bench_periodic.py`` (reaxff kernel, r_c = 10 Å, k_e = 14.4) over a
neighbour list (``qeq_unroll.neighbors``: skin 1 Å, capacity factor 1.1). Per N and precision: the list allocation
(s, host call), ms per energy + forces + charges with CG to tol 1e-6 (float64) / 1e-5 (float32)
and implicit forces (median of repeats after warm-up), its CG iterations and whether it converged,
the sum of its charges (the cell is neutral: 0 up to rounding),
ms per energy + forces with CG K = 4 unrolled (the MD setting), memory of the evaluation (XLA:
arguments + outputs + scratch) and of the list, per atom; a size whose list or evaluation does
not fit in GPU memory is reported as such. MD steps/s (``qeq_unroll.md.run``, NVE, CG K = 4
unrolled, XL charges, list updated every step) for N ≤ ``--md-max``; the float32 NVE drift of a
4096-atom run against float64 on the same start. Absolute numbers with the device named. The
ratio to LAMMPS uses LAMMPS ``fix qeq/reaxff`` times per solve on one CPU thread for the same
structures, measured on the CPU machine with ``python benchmarks/bench_gpu.py --lammps`` (written
to ``benchmarks/lammps_cpu.json``).

Without a GPU the script leaves RESULTS.md as it is (``--cpu`` runs the small sizes on the CPU
as a check and writes nothing).

    python benchmarks/bench_gpu.py [--sizes 1000,8000,64000,216000,1000000] [--json rows.json] [--no-write]
    python benchmarks/bench_gpu.py --lammps [--sizes ...]     # on the CPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import qeq_unroll as qu  # noqa: E402
from bench_periodic import CUTOFF, KE, PARAMS, Lammps, compiled_bytes, median_time, nbytes, rock_salt  # noqa: E402
from qeq_unroll import md  # noqa: E402
from results import write_section  # noqa: E402

LAMMPS_JSON = ROOT / "benchmarks" / "lammps_cpu.json"
#: bench_periodic's charge parameters with Born–Mayer repulsion between all ion pairs, for MD.
MD_PARAMS = qu.Params.from_dict(
    {
        "name": "bench-gpu-md",
        "elements": {e: dict(chi=float(PARAMS.chi[i]), hardness=float(PARAMS.hardness[i]), gamma=float(PARAMS.gamma[i]))
                     for i, e in enumerate(PARAMS.elements)},
        "pairs": {p: {"born_mayer": {"A": a, "rho": 0.32}} for p, a in (("Cl-Na", 300.0), ("Na-Na", 200.0), ("Cl-Cl", 200.0))},
    }
)
MASSES = np.array([22.99, 35.45])


def structure(n_target):
    """Rock salt with about ``n_target`` atoms: (8 reps³ atoms, reps)."""
    reps = max(1, round((n_target / 8) ** (1 / 3)))
    return rock_salt(reps), reps


def cast(params, dtype):
    return jax.tree_util.tree_map(lambda x: jax.numpy.asarray(x, dtype), params)


def evaluation(system, nbrs, energy):
    evaluate = jax.jit(qu.energy_and_forces(energy))
    params = cast(MD_PARAMS, system.positions.dtype)
    return lambda: jax.block_until_ready(evaluate(params, system, nbrs)), compiled_bytes(evaluate, params, system, nbrs)


def too_large(error):
    """Why a size could not run (a result, not a bug), or None for any other error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "out of GPU memory"
    return None


def measure(n_target, dtype, repeats):
    """One row: list, evaluation at tolerance (implicit) and at K = 4 (unrolled)."""
    (pos, kinds, cell), _ = structure(n_target)
    row = dict(n=len(pos), dtype=np.dtype(dtype).name)
    system = qu.make_system(pos, kinds, cell=cell, pbc=True, dtype=dtype)
    tol = 1e-6 if dtype == np.float64 else 1e-5
    at_tol = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(tol=tol), "implicit", KE)
    start = time.perf_counter()
    nbrs = jax.block_until_ready(at_tol.neighbors(system, layout="list", skin=1.0, capacity_multiplier=1.1))
    row.update(list_s=time.perf_counter() - start, slots=nbrs.pairs.capacity, overflow=bool(nbrs.overflow),
               list_bytes=nbytes(nbrs.pairs) / len(pos))
    call, memory = evaluation(system, nbrs, at_tol)
    out = call()
    row.update(ms=1e3 * median_time(call, repeats), iterations=int(out[2]["iterations"]),
               converged=bool(out[2]["converged"]), bytes=memory / len(pos),
               charge_sum=float(np.sum(np.asarray(out[2]["charges"], np.float64))))
    k4 = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(iterations=4), "unrolled", KE)
    call, _ = evaluation(system, nbrs, k4)
    call()
    row["ms_k4"] = 1e3 * median_time(call, repeats)
    return row


def md_rate(n_target, dtype, steps=300):
    """MD steps/s after the first block (which compiles)."""
    (pos, kinds, cell), _ = structure(n_target)
    system = qu.make_system(pos, kinds, cell=cell, pbc=True, dtype=dtype)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(iterations=4), "unrolled", KE)
    settings = md.Settings(steps=steps, dt_fs=2.0, temperature_K=300.0, report_every=20, block=5)
    stamps = [time.perf_counter() for _ in md.run(settings, energy, cast(MD_PARAMS, dtype), system, MASSES[kinds], layout="list")]
    return (steps - 100) / (stamps[-1] - stamps[1])


def gpu_rows(sizes, repeats, md_max, json_path=None):
    lammps = json.loads(LAMMPS_JSON.read_text()) if LAMMPS_JSON.exists() else {}
    rows, full = [], set()
    for n_target in sizes:
        for dtype in (np.float32, np.float64):
            if dtype in full:
                continue
            try:
                row = measure(n_target, dtype, repeats)
                if n_target <= md_max:
                    row["steps_per_s"] = md_rate(n_target, dtype)
            except Exception as error:  # noqa: BLE001 - only a size limit is a result
                if too_large(error) is None:
                    raise
                row = dict(n=len(structure(n_target)[0][0]), dtype=np.dtype(dtype).name, failed=too_large(error))
                full.update((dtype, np.float64))  # float64 needs at least as much as float32
            row["lammps_ms"] = lammps.get(str(row["n"]))
            rows.append(row)
            print(row, flush=True)
            if json_path:
                Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def float32_drift(n_target=4096, ps=2.0):
    (pos, kinds, cell), _ = structure(n_target)
    out = {}
    for dtype in (np.float32, np.float64):
        system = qu.make_system(pos, kinds, cell=cell, pbc=True, dtype=dtype)
        params = cast(MD_PARAMS, dtype)
        energy = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(iterations=4), "unrolled", KE)
        steps = int(ps * 1000 / 2.0)
        settings = md.Settings(steps=steps, dt_fs=2.0, temperature_K=600.0, report_every=20, block=25)
        recs = list(md.run(settings, energy, params, system, MASSES[kinds], layout="list"))
        step = np.concatenate([r.step for r in recs])
        e = np.concatenate([r.e_pot.astype(np.float64) + r.e_kin for r in recs])
        out[np.dtype(dtype).name] = md.drift(step * 2e-3, e, len(pos))
    return len(pos), out


def lammps_times(sizes, repeats):
    """LAMMPS ms per fix qeq/reaxff solve on one CPU thread, per N (written to LAMMPS_JSON)."""
    times = json.loads(LAMMPS_JSON.read_text()) if LAMMPS_JSON.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for n_target in sizes:
            (pos, kinds, cell), _ = structure(n_target)
            lmp = Lammps(pos, kinds, cell, tmp)
            t = median_time(lmp.solve, repeats) - median_time(lmp.baseline, repeats)
            lmp.close()
            times[str(len(pos))] = 1e3 * t
            print(len(pos), f"{1e3 * t:.1f} ms", flush=True)
    LAMMPS_JSON.write_text(json.dumps(times, indent=1) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,8000,64000,216000,1000000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lammps", action="store_true", help="measure LAMMPS on this (CPU) machine instead")
    ap.add_argument("--cpu", action="store_true", help="run the small sizes on the CPU as a check (writes nothing)")
    ap.add_argument("--md-max", type=int, default=8000, help="largest N whose MD steps/s are measured")
    ap.add_argument("--drift-ps", type=float, default=2.0, help="length of the float32/float64 drift runs (ps)")
    ap.add_argument("--json", help="also write the rows to this file as they come")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.lammps:
        lammps_times(sizes, args.repeats)
        return
    if hasattr(os, "sched_setaffinity"):  # bench_periodic pins to one core for its CPU timings; undo it here
        os.sched_setaffinity(0, range(os.cpu_count()))
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.cpu:
        print("no GPU here: RESULTS.md keeps its bench_gpu section (`--cpu` runs the small sizes as a check); on a "
              "machine with one (`pip install -e '.[gpu]'`) this script measures N = 10³..10⁶ and writes the section")
        return
    sizes = sizes if not args.cpu else [s for s in sizes if s <= 8000]
    rows = gpu_rows(sizes, args.repeats, args.md_max, args.json)
    n_drift, drift = float32_drift(4096 if not args.cpu else 512, args.drift_ps if not args.cpu else 0.2)
    text = report(rows, device, n_drift, args.drift_ps, drift)
    print(text)
    if not args.no_write and not args.cpu:
        write_section("bench_gpu", text)


def report(rows, device, n_drift, ps, drift):
    lines = [
        "## bench_gpu: periodic NaCl on a GPU",
        "",
        f"`python benchmarks/bench_gpu.py` on **{device.device_kind}** (jax {jax.__version__}). Rattled rock-salt NaCl, "
        "reaxff kernel, r_c = 10 Å, over a neighbour list (skin 1 Å, capacity factor 1.1). *At tol*: energy + "
        "forces + charges with CG to tol 1e-6 (float64) / 1e-5 (float32) and implicit forces; *K = 4*: CG K = 4 "
        "unrolled (the MD setting). Memory: XLA's arguments + outputs + scratch of the at-tol evaluation, and the "
        "stored list, per atom. MD: NVE, 2 fs, CG K = 4 unrolled with XL charges, list updated every step. LAMMPS: "
        "fix qeq/reaxff per solve on one CPU thread of the CPU machine, same structures (`--lammps`).",
        "",
        "| N | precision | list build (s) | ms at tol | CG iterations | Σq at tol (e) | ms K = 4 | memory (kB/atom) "
        "| list (kB/atom) | MD steps/s | LAMMPS 1 thread / ours at tol |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("failed"):
            lines.append(f"| {r['n']} | {r['dtype']} | {r['failed']} | | | | | | | | |")
            continue
        its = f"{r['iterations']}" + ("" if r["converged"] else " (not converged)")
        md_rate = f"{r['steps_per_s']:.0f}" if "steps_per_s" in r else "—"
        ratio = f"{r['lammps_ms'] / r['ms']:.0f}×" if r["lammps_ms"] else "not measured"
        over = " (overflow)" if r["overflow"] else ""
        lines.append(f"| {r['n']} | {r['dtype']} | {r['list_s']:.1f}{over} | {r['ms']:.2f} | {its} | {r['charge_sum']:.1e} | {r['ms_k4']:.2f} | "
                     f"{r['bytes'] / 1e3:.1f} | {r['list_bytes'] / 1e3:.1f} | {md_rate} | {ratio} |")
    if drift is not None:
        lines += ["", f"NVE drift ({n_drift} atoms, {ps:g} ps at 2 fs, CG K = 4 unrolled): float32 "
                  f"{drift['float32'][0]:.3g} meV/atom/ps, float64 {drift['float64'][0]:.3g} meV/atom/ps."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
