"""Particle-mesh Ewald against the exact Ewald k-sum: the periodic gaussian kernel on rattled NaCl.

Rattled rock-salt NaCl (a = 5.64 Å, 0.1 Å rattle), the gaussian kernel with σ_Na = 1.0 Å,
σ_Cl = 1.2 Å (χ, J as in ``tests/test_periodic.py``), Ewald accuracy 1e-6 (real-space cutoff
chosen from the widths, 9.0 Å; pairs from a jax-md neighbour list, skin 1 Å, built beforehand as
in MD), CG to a relative residual of 1e-7 with implicit forces and its default preconditioner
(Jacobi for exact Ewald; the long-wavelength ``pme.MeshPreconditioner`` for PME), everything on one
CPU thread (the process is pinned to one core and XLA runs single-threaded; glibc malloc keeps freed
memory, see ``bench_periodic.MALLOC_TUNABLES``). For each N, in one run:

- exact Ewald (``reciprocal="ewald"``: the reciprocal sum as a low-rank term over every k-vector
  of the Ewald sphere; memory O(N K) with K ∝ N, so only the smaller sizes) and PME
  (``reciprocal="pme"``, B-spline order 6, mesh from the accuracy): one jitted call of energy +
  forces + charges (``energy_and_forces``), median of repeats after JIT warm-up;
- where both run, PME's errors against exact Ewald: relative energy, max |Δq|, max |ΔF|;
- the iterations Jacobi-preconditioned CG needs on the same PME problem (iterations only, not timed).

Reported: the time ratio PME / Ewald, each method's time relative to its own smallest size, CG
iterations, and the time-vs-N exponents (least squares in log-log), also per CG iteration (the
Coulomb operator's condition number grows with the cell, ∝ L²: Jacobi-CG's iterations grow ∝ N^(1/3),
the mesh preconditioner's stay about constant).
Absolute times are printed; the table keeps ratios. Writes the ``bench_pme`` section of
``benchmarks/RESULTS.md``.

    python benchmarks/bench_pme.py [--sizes 512,...] [--ewald-max 1728] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

# bench_periodic pins this process to one core and XLA to one thread before JAX starts
from bench_periodic import EXPONENT_SPAN, MALLOC_TUNABLES, exponent, median_time, rock_salt, span_exponent  # noqa: I001

import jax  # noqa: E402
import numpy as np  # noqa: E402

import qeq_unroll as qu  # noqa: E402
from results import RESULTS, write_section  # noqa: E402

ACCURACY = 1e-6
TOL = 1e-7
ORDER = 6
PARAMS = qu.Params.from_dict(
    {
        "name": "bench-pme",
        "elements": {
            "Na": {"chi": 2.84, "hardness": 9.0, "sigma": 1.0},
            "Cl": {"chi": 8.56, "hardness": 12.0, "sigma": 1.2},
        },
    }
)


def kernel_of(method):
    return qu.Gaussian(accuracy=ACCURACY, reciprocal=method, mesh_order=ORDER)


def solver_of(**kw):
    return qu.CG(tol=TOL, max_iterations=2000, **kw)


def measure(system, method, repeats):
    """Time (s), CG iterations, plan, and the outputs of one energy + forces + charges call."""
    kernel = kernel_of(method)
    energy = qu.qeq_energy(kernel, solver_of(), "implicit")
    nbrs = energy.neighbors(system, PARAMS, layout="list", skin=1.0, capacity_multiplier=1.1)
    evaluate = jax.jit(qu.energy_and_forces(energy))
    e, f, aux = jax.block_until_ready(evaluate(PARAMS, system, nbrs))
    assert not bool(aux["neighbors_overflow"]) and bool(aux["converged"])
    t = median_time(lambda: jax.block_until_ready(evaluate(PARAMS, system, nbrs)), repeats)
    out = dict(e=float(e), f=np.asarray(f), q=np.asarray(aux["charges"]), nbrs=nbrs)
    return t, int(aux["iterations"]), nbrs.reciprocal, out


def jacobi_iterations(system, method, nbrs):
    """CG iterations with the Jacobi preconditioner on the same problem (forward solve only)."""
    kernel = kernel_of(method)
    solver = solver_of(preconditioner=qu.solvers.Jacobi())

    def solve(system, nbrs):
        return solver.run_forward(qu.energy.qeq_problem(kernel, PARAMS, system, neighbors=nbrs))[1]

    diagnostics = jax.jit(solve)(system, nbrs)
    assert bool(diagnostics.converged)
    return int(diagnostics.iterations)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1000,1728,4096,13824,32768,110592", help="atom counts (8 reps³)")
    ap.add_argument("--ewald-max", type=int, default=1728, help="largest N run with the exact k-sum")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    wall = time.perf_counter()
    rows, data = [], {"ewald": ([], [], []), "pme": ([], [], [])}
    for n in sizes:
        reps = round((n / 8) ** (1 / 3))
        if 8 * reps**3 != n:
            raise SystemExit(f"N = {n} is not 8 reps³")
        pos, kinds, cell = rock_salt(reps)
        system = qu.make_system(pos, kinds, cell=cell, pbc=True)
        res = {}
        for method in ("ewald", "pme"):
            if method == "ewald" and n > args.ewald_max:
                continue
            t, iters, plan, out = measure(system, method, args.repeats)
            res[method] = (t, iters, plan, out)
            for col, v in zip(data[method], (n, t, t / iters)):
                col.append(v)
            print(f"N={n} {method}: {1e3 * t:.1f} ms, {iters} iterations, plan {plan if method == 'pme' else len(plan.miller)}", flush=True)
        t_pme, it_pme, mesh, out_pme = res["pme"]
        it_jac = jacobi_iterations(system, "pme", out_pme["nbrs"])
        print(f"N={n} pme with Jacobi-CG: {it_jac} iterations", flush=True)
        row = dict(n=n, mesh="×".join(map(str, mesh.shape)), it_pme=it_pme, it_jac=it_jac, t_pme=t_pme)
        if "ewald" in res:
            t_ew, it_ew, plan, out_ew = res["ewald"]
            row.update(
                k=len(plan.miller), it_ew=it_ew, ratio=t_pme / t_ew,
                de=abs(out_pme["e"] - out_ew["e"]) / abs(out_ew["e"]),
                dq=float(np.abs(out_pme["q"] - out_ew["q"]).max()),
                df=float(np.abs(out_pme["f"] - out_ew["f"]).max()),
            )  # fmt: skip
        rows.append(row)
    wall = time.perf_counter() - wall
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    t0 = {m: data[m][1][0] for m in data if data[m][1]}
    lines = [
        f"Rattled rock-salt NaCl, gaussian kernel (σ 1.0/1.2 Å), Ewald accuracy {ACCURACY:g} (real-space "
        f"cutoff {mesh.real_cutoff:.2f} Å), CG tol {TOL:g} with implicit forces, energy + forces + charges per "
        f"call, one CPU thread ({platform.processor() or platform.machine()}; glibc malloc keeps freed memory: `GLIBC_TUNABLES={MALLOC_TUNABLES}`). PME: B-spline order {ORDER}, mesh "
        "from the accuracy, CG with the long-wavelength mesh preconditioner (default; `pme.MeshPreconditioner`), "
        "and for comparison the iterations Jacobi-CG needs on the same PME problem (not timed). Times relative to each method's N = "
        f"{sizes[0]} (absolute: exact Ewald {1e3 * t0.get('ewald', float('nan')):.0f} ms, PME {1e3 * t0['pme']:.0f} ms "
        "there; absolute times are machine-dependent). Errors: PME against exact Ewald.",
        "",
        "| N | mesh | Ewald k-vectors | CG iter. (Ewald / PME / PME with Jacobi) | t PME / t Ewald | t / t(N₀) Ewald | t / t(N₀) PME "
        "| rel. ΔE | max Δq (e) | max ΔF (eV/Å) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ratio" in r:
            t_ew = data["ewald"][1][data["ewald"][0].index(r["n"])]
            ewald_cols = [str(r["k"]), f"{r['it_ew']} / {r['it_pme']} / {r['it_jac']}", f"{r['ratio']:.3f}", f"{t_ew / t0['ewald']:.2f}"]
            errors = [f"{r['de']:.1e}", f"{r['dq']:.1e}", f"{r['df']:.1e}"]
        else:
            ewald_cols = ["—", f"— / {r['it_pme']} / {r['it_jac']}", "—", "—"]
            errors = ["—"] * 3
        cols = [str(r["n"]), r["mesh"], *ewald_cols, f"{r['t_pme'] / t0['pme']:.2f}", *errors]
        lines.append("| " + " | ".join(cols) + " |")
    lines.append("")
    for m, label in (("ewald", "exact Ewald"), ("pme", "PME")):
        ns, ts, per = data[m]
        if len(ns) >= 2:
            lines.append(
                f"- Time-vs-N exponent, {label} (N = {ns[0]}..{ns[-1]}): {exponent(ns, ts):.2f} per call, "
                f"{exponent(ns, per):.2f} per CG iteration."
            )
    its = [r["it_jac"] for r in rows]
    if len(rows) >= 2:
        lines.append(
            f"- CG iterations vs N exponent on PME (N = {rows[0]['n']}..{rows[-1]['n']}): "
            f"{round(exponent([r['n'] for r in rows], [r['it_pme'] for r in rows]), 2) + 0.0:.2f} with the mesh preconditioner, "  # no "-0.00"
            f"{exponent([r['n'] for r in rows], its):.2f} with Jacobi."
        )
    ns, ts, per = data["pme"]
    inside = [n for n in ns if EXPONENT_SPAN[0] <= n <= EXPONENT_SPAN[1]]
    if len(inside) >= 2:
        k = span_exponent(ns, ts)
        lines.append(
            f"- PME exponent over the issue's span (N = {min(inside)}..{max(inside)}): {k:.2f} per call "
            f"(goal 1.0 ± 0.1: {'met' if abs(k - 1.0) <= 0.1 else 'not met'}), {span_exponent(ns, per):.2f} per CG iteration."
        )
    lines.append(
        f"- Whole run {wall:.0f} s; load average at its end {load:.1f} on {os.cpu_count()} cores (other jobs "
        f"on the machine make the times noisy, the ratios less so). Command: `python benchmarks/bench_pme.py --sizes {args.sizes} "
        f"--ewald-max {args.ewald_max} --repeats {args.repeats}`."
    )
    text = "## bench_pme: particle-mesh Ewald vs exact Ewald (gaussian kernel)\n\n" + "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("bench_pme", text)


if __name__ == "__main__":
    main()
