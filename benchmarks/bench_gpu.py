"""GPU benchmark: periodic NaCl at N = 10³..10⁶ on one GPU, float32 and float64.

Rattled rock-salt NaCl as in ``bench_periodic.py`` (reaxff kernel, r_c = 10 Å, k_e = 14.4, CG to
tol 1e-6 with implicit forces over a jax-md neighbour list). Per N and precision: ms per
energy + forces + charges (median of repeats after warm-up), MD steps/s of the device loop
(``qeq_unroll.md.run``, NVE, CG K = 4 unrolled, neighbour list updated every step), and peak GPU
memory (``device.memory_stats()``); the float32 NVE energy drift of a 4096-atom run against float64
on the same start. Absolute numbers with the device named. The ratio to LAMMPS uses LAMMPS ``fix
qeq/reaxff`` times per solve on one CPU thread for the same structures, measured on the CPU machine
with ``python benchmarks/bench_gpu.py --lammps`` (written to ``benchmarks/lammps_cpu.json``).

Without a GPU the script writes a ``bench_gpu`` section saying that no GPU run was made
(``--cpu`` runs the small sizes on the CPU as a check and writes nothing).

    python benchmarks/bench_gpu.py [--sizes 1000,8000,64000,216000,1000000] [--no-write]
    python benchmarks/bench_gpu.py --lammps [--sizes ...]     # on the CPU machine
"""

from __future__ import annotations

import argparse
import json
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
from bench_periodic import CUTOFF, KE, PARAMS, Lammps, median_time, rock_salt  # noqa: E402
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


def evaluation(pos, kinds, cell, dtype):
    system = qu.make_system(pos, kinds, cell=cell, pbc=True, dtype=dtype)
    params = cast(MD_PARAMS, dtype)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(tol=1e-6 if dtype == np.float64 else 1e-5), "implicit", KE)
    nbrs = energy.neighbors(system, layout="list", skin=1.0, capacity_multiplier=1.1)
    evaluate = jax.jit(qu.energy_and_forces(energy))
    return system, params, energy, nbrs, evaluate


def peak_memory():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def gpu_rows(sizes, repeats):
    lammps = json.loads(LAMMPS_JSON.read_text()) if LAMMPS_JSON.exists() else {}
    rows = []
    for n_target in sizes:
        (pos, kinds, cell), _ = structure(n_target)
        n = len(pos)
        for dtype in (np.float32, np.float64):
            system, params, energy, nbrs, evaluate = evaluation(pos, kinds, cell, dtype)
            out = jax.block_until_ready(evaluate(params, system, nbrs))
            ms = 1e3 * median_time(lambda: jax.block_until_ready(evaluate(params, system, nbrs)), repeats)
            md_energy = qu.qeq_energy(qu.ReaxFF(cutoff=CUTOFF), qu.CG(iterations=4), "unrolled", KE)
            settings = md.Settings(steps=200, dt_fs=2.0, temperature_K=300.0, report_every=20, block=5)
            t_first = None
            for i, _ in enumerate(md.run(settings, md_energy, params, system, MASSES[kinds], layout="list")):
                if i == 1:
                    t_first = time.perf_counter()
            steps_per_s = (settings.steps - 100) / (time.perf_counter() - t_first)
            ref = lammps.get(str(n))
            rows.append(dict(n=n, dtype=np.dtype(dtype).name, ms=ms, iterations=int(out[2]["iterations"]),
                             steps_per_s=steps_per_s, peak=peak_memory(), lammps_ms=ref))
            print(rows[-1], flush=True)
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
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.lammps:
        lammps_times(sizes, args.repeats)
        return
    device = jax.devices()[0]
    if device.platform != "gpu" and not args.cpu:
        text = (
            "## bench_gpu: periodic NaCl on a GPU\n\n"
            "No GPU run was made: the sessions so far had no GPU. `python benchmarks/bench_gpu.py` on a machine with "
            "one (`pip install -e '.[gpu]'`) measures ms per energy + forces, MD steps/s, peak GPU memory and the "
            "float32 drift for N = 10³..10⁶ and writes this section."
        )
        print(text)
        if not args.no_write:
            write_section("bench_gpu", text)
        return
    rows = gpu_rows(sizes if not args.cpu else [s for s in sizes if s <= 8000], args.repeats)
    n_drift, drift = float32_drift(4096 if not args.cpu else 512, 2.0 if not args.cpu else 0.2)
    lines = [
        "## bench_gpu: periodic NaCl on a GPU",
        "",
        f"`python benchmarks/bench_gpu.py` on **{device.device_kind}** (jax {jax.__version__}). Rattled rock-salt NaCl, "
        "reaxff kernel, r_c = 10 Å, CG to tol 1e-6 (float64) / 1e-5 (float32) with implicit forces over a jax-md "
        "neighbour list; MD: NVE, CG K = 4 unrolled, list updated every step. LAMMPS: fix qeq/reaxff on one CPU "
        "thread of the CPU machine, same structures.",
        "",
        "| N | precision | ms per energy+forces | CG iterations | MD steps/s | peak GPU memory (MB) | LAMMPS 1 thread / ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak'] / 2**20:.0f}" if r["peak"] else "n/a"
        ratio = f"{r['lammps_ms'] / r['ms']:.1f}×" if r["lammps_ms"] else "not measured"
        lines.append(f"| {r['n']} | {r['dtype']} | {r['ms']:.2f} | {r['iterations']} | {r['steps_per_s']:.0f} | {peak} | {ratio} |")
    lines += ["", f"NVE drift ({n_drift} atoms, 2 fs, CG K = 4 unrolled): float32 {drift['float32'][0]:.3g} meV/atom/ps, "
              f"float64 {drift['float64'][0]:.3g} meV/atom/ps."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write and not args.cpu:
        write_section("bench_gpu", text)


if __name__ == "__main__":
    main()
