"""Fitting benchmark: accuracy on held-out GFN2-xTB NaCl clusters, throughput of unrolled vs
implicit fitting, and compiled memory of a fitting step vs the number K of solver iterations.

    python benchmarks/bench_fit.py            # ~5 min on 2 CPU cores; writes the "fit" section of RESULTS.md
    python benchmarks/bench_fit.py --no-write # print only

1. Accuracy (the acceptance figure of issue 4): fit the shipped training set (NaCl clusters of 8,
   16, 24, 32 atoms and water clusters; 10 % held out for validation and early stopping) from the
   built-in start ``demo-nacl-water`` (Rappé–Goddard χ, J; this project's widths and pair terms),
   then compare force RMSE, force MAE, energy MAE and charge RMSE on the held-out NaCl clusters
   of 12, 20 and 28 atoms, sizes absent from training. The model is the ``qeq-unroll fit``
   default: gaussian kernel, CG with K = 20, unrolled gradients. Start energies use per-element
   offsets fitted by least squares on the training set; the fitted set uses its fitted offsets.
2. Throughput: configurations per second of Adam steps on the NaCl training clusters (batches of
   16 padded to 8/16/32 atoms), unrolled vs implicit gradients through CG (K = 20, converged),
   median of repeated epochs after JIT warm-up. CPU times on a shared 2-core machine: the ratio
   is the figure to trust.
3. Memory: XLA's compiled scratch memory (``memory_analysis().temp_size_in_bytes``) of one Adam
   step (loss, forces, second-order parameter gradient) on a batch of 16 structures of 32 atoms,
   vs K, unrolled and implicit.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qeq_unroll as qu  # noqa: E402
from calculators.data import read_reference, shipped_reference  # noqa: E402
from qeq_unroll import fit as F  # noqa: E402
from qeq_unroll.dataset import Batcher, epoch_plan, persisted_split, plan_batches  # noqa: E402
from results import write_section  # noqa: E402

START = "demo-nacl-water"


def nacl_only(data):
    return data.subset([i for i, c in enumerate(data.configurations) if set(int(s) for s in c.species) <= {2, 3}])


def accuracy(echo, epochs, optimizer="adam"):
    params = qu.load_params(START)
    train_all, _ = read_reference(shipped_reference("train"), params)
    held, _ = read_reference(shipped_reference("heldout"), params)
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=20), "unrolled")
    with tempfile.TemporaryDirectory() as tmp:
        tr, va = persisted_split(Path(tmp) / "split.json", train_all, 0.1, seed=0)
    train, val = train_all.subset(tr), train_all.subset(va)
    config = F.FitConfig(epochs=epochs, optimizer=optimizer, batch_size=16)
    t0 = time.perf_counter()
    result = F.fit(params, train, energy, config, validation=val)
    seconds = time.perf_counter() - t0
    offsets0 = F.fit_offsets(params, train, energy)
    rows = []
    sizes = sorted({c.n_atoms for c in held.configurations})
    for label, subset in [("all held-out", held)] + [
        (f"{n} atoms", held.subset([i for i, c in enumerate(held.configurations) if c.n_atoms == n])) for n in sizes
    ]:
        m0 = F.evaluate(params, subset, energy, offsets=offsets0)
        m1 = F.evaluate(result.params, subset, energy, offsets=result.offsets)
        rows.append((label, len(subset), m0, m1))
    echo(f"accuracy ({optimizer}): {seconds:.0f} s, {result.steps} steps, best epoch {result.best_epoch}")
    for label, n, m0, m1 in rows:
        echo(f"  {label}: F RMSE {m0['force_rmse']:.4f} -> {m1['force_rmse']:.4f} eV/A "
             f"({100 * (1 - m1['force_rmse'] / m0['force_rmse']):.1f} % lower)")
    return dict(rows=rows, result=result, seconds=seconds, n_train=len(train), n_val=len(val), optimizer=optimizer,
                epochs=epochs)


def throughput(echo, repeats):
    params = qu.load_params(START)
    train_all, _ = read_reference(shipped_reference("train"), params)
    data = nacl_only(train_all)
    out = []
    for gradient in ("unrolled", "implicit"):
        energy = qu.qeq_energy("gaussian", qu.CG(iterations=20), gradient)
        config = F.FitConfig(batch_size=16)
        par = F.make_parametrisation(params, config.train, data.species_present(), True, F.pair_reference_distances(data))
        anchor = par.anchor(params, F.pair_reference_distances(data))
        fitter = F.Fitter(energy, par, anchor, config, 1000)
        raw = F._strong(par.raw(anchor, jnp.zeros(len(params.elements))))
        opt = fitter.init(raw)
        batcher = Batcher(data, 16)
        times = []
        for epoch in range(repeats + 1):  # epoch 0 compiles
            plans = epoch_plan(data, 16, 0, epoch)
            batches = [batcher.batch(p) for p in plans]
            t0 = time.perf_counter()
            r, o = raw, opt
            for b in batches:
                r, o, loss = fitter.adam_step(r, o, raw, b, 0)
            jax.block_until_ready(r)
            if epoch:
                times.append(time.perf_counter() - t0)
        per_epoch = statistics.median(times)
        out.append((gradient, len(data), per_epoch, len(data) / per_epoch, float(loss)))
        echo(f"throughput {gradient}: {len(data) / per_epoch:.1f} configurations/s ({per_epoch:.3f} s per epoch of {len(data)})")
    return out


def memory(echo, ks):
    params = qu.load_params(START)
    train_all, _ = read_reference(shipped_reference("train"), params)
    data = nacl_only(train_all)
    big = data.subset([i for i, c in enumerate(data.configurations) if c.n_atoms == 32][:16])
    batch = Batcher(big, 16).batch(plan_batches(big, 16)[0])
    rows = []
    for k in ks:
        row = [k]
        for gradient in ("unrolled", "implicit"):
            energy = qu.qeq_energy("gaussian", qu.CG(iterations=k), gradient)
            config = F.FitConfig(batch_size=16)
            par = F.make_parametrisation(params, config.train, data.species_present(), True)
            anchor = par.anchor(params)
            fitter = F.Fitter(energy, par, anchor, config, 1000)
            raw = F._strong(par.raw(anchor, jnp.zeros(len(params.elements))))
            opt = fitter.init(raw)
            lr = jnp.asarray(0.01)
            t0 = time.perf_counter()
            compiled = F._adam_step.lower(fitter.spec, raw, opt, fitter.anchor, raw, batch, lr).compile()
            scratch = compiled.memory_analysis().temp_size_in_bytes
            row.append(scratch)
            echo(f"memory K={k} {gradient}: {scratch / 2**20:.2f} MiB (compiled in {time.perf_counter() - t0:.1f} s)")
        rows.append(row)
    return rows


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def report(acc, lbfgs, thr, mem, quick) -> str:
    cpu = f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    lines = [
        "## bench_fit: fitting to GFN2-xTB references through the solver",
        "",
        f"`python benchmarks/bench_fit.py` (jax {jax.__version__}, {cpu}, float64{', --quick' if quick else ''}). "
        "Data: the shipped GFN2-xTB set (tblite; `qeq_unroll/data/reference`, made by "
        "`examples/make_reference_data.py`). Start: built-in `demo-nacl-water` (Rappé–Goddard χ and J, "
        "this project's widths and Born–Mayer/Morse pair terms). Model: gaussian kernel, CG with K = 20 "
        "(converged to 1e-10 on these clusters), unrolled gradients — the `qeq-unroll fit` defaults; "
        "trained: χ, J, σ and the pair terms of the elements present, plus per-element energy offsets.",
        "",
        "### Held-out NaCl clusters (sizes 12, 20, 28 atoms; training has 8, 16, 24, 32)",
        "",
    ]
    for run in (acc, lbfgs):
        if run is None:
            continue
        lines += [
            f"{run['optimizer']}: {run['n_train']} training / {run['n_val']} validation configurations "
            f"(NaCl and water, 10 % random split), up to {run['epochs']} epochs with early stopping on the "
            f"validation loss (best epoch {run['result'].best_epoch}, {run['result'].steps} steps, "
            f"{run['seconds']:.0f} s on this CPU including compilation). Loss weights energy 1 (eV/atom)⁻², forces 1 (eV/Å)⁻².",
            "",
            "| held-out set | configs | force RMSE start (eV/Å) | force RMSE fitted | reduction | force MAE start → fitted | energy MAE start → fitted (meV/atom) | charge RMSE start → fitted (e) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, n, m0, m1 in run["rows"]:
            red = 100 * (1 - m1["force_rmse"] / m0["force_rmse"])
            lines.append(
                f"| {label} | {n} | {m0['force_rmse']:.4f} | {m1['force_rmse']:.4f} | {red:.1f} % | "
                f"{m0['force_mae']:.4f} → {m1['force_mae']:.4f} | {m0['energy_mae']:.1f} → {m1['energy_mae']:.1f} | "
                f"{m0['charge_rmse']:.3f} → {m1['charge_rmse']:.3f} |"
            )
        lines.append("")
    best = acc["rows"][0]
    red = 100 * (1 - best[3]["force_rmse"] / best[2]["force_rmse"])
    lines += [
        f"Acceptance (held-out force RMSE at least 40 % below the start): {red:.1f} % with the defaults — "
        + ("met." if red >= 40 else "NOT met."),
        "",
        "### Throughput: unrolled vs implicit",
        "",
        "Adam steps over the NaCl training clusters (112 configurations, batches of 16 padded to 8/16/32 "
        "atoms), CG K = 20; median of repeated epochs after compilation. Absolute rates are for this "
        "shared CPU; the ratio is what carries over.",
        "",
        "| gradient | configurations/s | s per epoch | relative to unrolled |",
        "|---|---|---|---|",
    ]
    base = thr[0][3]
    for gradient, n, per_epoch, rate, _ in thr:
        lines.append(f"| {gradient} | {rate:.1f} | {per_epoch:.3f} | {rate / base:.2f} |")
    lines += [
        "",
        "### Compiled scratch memory of one fitting step vs K",
        "",
        "`jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes` of one Adam step "
        "(energies, forces, loss and its second-order parameter gradient) on 16 NaCl clusters of 32 atoms, CG with K iterations.",
        "",
        "| K | unrolled (MiB) | implicit (MiB) | unrolled / implicit |",
        "|---|---|---|---|",
    ]
    for k, u, i in mem:
        lines.append(f"| {k} | {u / 2**20:.2f} | {i / 2**20:.2f} | {u / i:.2f} |")
    lines += [
        "",
        "Unrolled gradients keep every iteration's state for the backward pass, so their memory grows "
        "linearly with K; implicit gradients solve one adjoint system at the solution and stay flat.",
    ]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and K values (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    ap.add_argument("--no-lbfgs", action="store_true", help="skip the L-BFGS accuracy run")
    args = ap.parse_args(argv)
    echo = lambda s: print(s, flush=True)  # noqa: E731
    acc = accuracy(echo, 5 if args.quick else 50)
    lbfgs = None if (args.no_lbfgs or args.quick) else accuracy(echo, 60, optimizer="lbfgs")
    thr = throughput(echo, 1 if args.quick else 3)
    mem = memory(echo, (2, 8) if args.quick else (2, 4, 8, 16, 32, 64))
    text = report(acc, lbfgs, thr, mem, args.quick)
    print("\n" + text)
    if not args.no_write:
        write_section("fit", text)
        print("\nwrote the 'fit' section of benchmarks/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
