"""The charge solver as a reasoning layer: how the algorithm and its K shape what the neural QEq
model learns, after Chen, Zhang, Reisinger and Song, "Understanding Deep Architectures with
Reasoning Layer", NeurIPS 2020 (arXiv:2006.13401).

    python benchmarks/bench_reasoning.py --quick     # < 15 min on 2 CPU cores: K ∈ {1, 4}, one width
    python benchmarks/bench_reasoning.py             # K ∈ {1, 2, 4, 8, 16, 32}, widths 8 and 32, seeds 0-2
    python benchmarks/bench_reasoning.py --seeds 0 --no-write   # one seed, print only

Every model is the neural QEq model of ``qeq-unroll fit --model neural`` (the command users run,
in-process), trained end to end through K steps of

- ``gd``: preconditioned projected gradient descent, per-iteration step sizes learned with the
  network (in (0, 1.9)/L̂, L̂ the power-iteration estimate of the largest eigenvalue);
- ``nag``: Nesterov's method, learned steps in (0, 1)/L̂ and momenta in (0, 1);
- ``cg``: conjugate gradients (nothing to learn: its steps are exact line searches);
- ``implicit``: CG to a relative residual of 1e-10 with implicit gradients (K → ∞);

on a small training set (``--n-train`` structures of the shipped GFN2-xTB charge-transfer set
``ct-train``, drawn at random per family), with a fixed budget (``--epochs`` of Adam, no early
stopping). Tested on the rest of ``ct-train`` plus ``ct-heldout`` (same distribution) and on
``ct-shifted`` (larger structures: Na8Cl8, Na9Cl8⁺, C14H2, C14H3⁺).

On each trained model, over the first ``--probe`` test structures, the properties the theory
uses: *convergence* ‖q_K − q*‖ (RMS per atom, e; q* the exact minimiser of the trained model's
charge energy), *stability* ‖q_K(χ + δ) − q_K(χ)‖ / ‖δ‖ for random δχ (0.1 eV per atom) and
‖q_K(J(1 + ε)) − q_K(J)‖ / (ε ‖q_K‖) for a relative change ε = 1e-3 of every hardness (the
same ratios of the exact solution in the row of ``implicit``), and *sensitivity to the step size*
‖q_K(s(1 + ε)) − q_K(s)‖ / ε for all learned steps scaled by 1 + ε (ε = 0.05; gd and nag).

"Train for the solver you run": CG at K = 3, trained at K = 3 or to convergence (implicit), each run
at K = 3 and converged: held-out errors and the energy drift of NVE on a held-out C10H3⁺ chain.
"Solver and model learned together": ``--solver learned`` (CG with learned start,
preconditioner and steps) at K = 3 against plain CG at K = 3, in accuracy and evaluation time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qeq_unroll as qu  # noqa: E402
from calculators import QEqCalculator  # noqa: E402
from calculators.cli import main as cli  # noqa: E402
from calculators.data import read_reference, shipped_reference  # noqa: E402
from calculators.md import drift_stats, run_nve  # noqa: E402
from qeq_unroll import fit as F  # noqa: E402
from qeq_unroll.energy import qeq_problem  # noqa: E402
from qeq_unroll.learned import TrainedSolver  # noqa: E402
from qeq_unroll.neural import load_model  # noqa: E402
from results import write_section  # noqa: E402

FAMILIES = ("gd", "nag", "cg")
PLOT = Path(__file__).resolve().parent / "reasoning.png"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training: algorithm ("gd" | "nag" | "cg" | "implicit" | "learned"), K (None: implicit),
    hidden width, seed."""

    algorithm: str
    k: int | None
    width: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.algorithm}-K{self.k or 'inf'}-w{self.width}-s{self.seed}"

    def options(self) -> list[str]:
        if self.algorithm == "implicit":
            solver = ["--solver", "cg", "-K", "none", "--gradient", "implicit"]
        elif self.algorithm == "learned":
            solver = ["--solver", "learned", "--learned-family", "cg", "-K", str(self.k)]
        else:
            solver = ["--solver", self.algorithm, "-K", str(self.k)]
        return ["--model", "neural", "--hidden", f"{self.width},{self.width}", "--seed", str(self.seed), *solver]


def split_data(folder: Path, n_train: int, seed: int = 0) -> dict:
    """Files of the small training set (``n_train`` of ct-train, the same share of each family),
    the same-distribution test set (the rest of ct-train and ct-heldout) and the shifted set."""
    frames = ase.io.read(shipped_reference("ct-train"), ":")
    rng = np.random.default_rng(seed)
    kinds = sorted({a.info["system"] for a in frames})
    chosen = []
    for kind in kinds:
        idx = [i for i, a in enumerate(frames) if a.info["system"] == kind]
        chosen += list(rng.permutation(idx)[: round(n_train * len(idx) / len(frames))])
    rest = [a for i, a in enumerate(frames) if i not in set(chosen)]
    files = {"train": [frames[i] for i in sorted(chosen)], "test": rest + ase.io.read(shipped_reference("ct-heldout"), ":"),
             "shifted": ase.io.read(shipped_reference("ct-shifted"), ":")}  # fmt: skip
    out = {}
    for part, configs in files.items():
        out[part] = folder / f"{part}.xyz"
        ase.io.write(out[part], configs)
    return out


def train(run: Run, files: dict, folder: Path, epochs: int) -> Path:
    out = folder / f"{run.name}.json"
    args = ["fit", str(files["train"]), *run.options(), "--out", str(out), "--epochs", str(epochs), "--validation", "0",
            "--patience", "0", "--min-bucket", "16", "--no-progress"]  # fmt: skip
    started = time.time()
    if cli(args) != 0:
        raise SystemExit(f"qeq-unroll {' '.join(args)} failed")
    print(f"{run.name}: trained in {time.time() - started:.0f} s", flush=True)
    return out


def model_of(path: Path, solver=None):
    """``(params, energy, offsets)`` of a model file, run with ``solver`` (None: its own)."""
    terms, params, settings = load_model(path)
    record = settings["solver"]
    own = record.get("trained") or (qu.CG(tol=1e-10) if record["iterations"] is None else qu.CG(iterations=record["iterations"]))
    energy = qu.qeq_energy(settings["kernel"]["name"], solver or own, "auto", settings["coulomb_constant"], terms=terms)
    return params, energy, settings["energy_offsets"]


def errors(path: Path, files: dict, solver=None) -> dict:
    params, energy, offsets = model_of(path, solver)
    out = {}
    for part in ("train", "test", "shifted"):
        data, _ = read_reference(files[part], params)
        m = F.evaluate(params, data, energy, offsets)
        out[part] = {k: m[k] for k in ("energy_rmse", "force_rmse", "charge_rmse")}
    return out


def properties(path: Path, files: dict, n_probe: int) -> dict:
    """Convergence, stability and step-size sensitivity of the trained solver (module docstring)."""
    params, energy, _ = model_of(path)

    @jax.jit
    def probe(params, system, delta):
        solver = energy.solver.bind(params) if hasattr(energy.solver, "bind") else energy.solver
        problem = qeq_problem(energy.kernel, params, system, energy.coulomb_constant, terms=energy.terms)
        q = solver.run(problem)[0]
        exact = qu.Exact().run(problem)[0]
        n = jnp.sum(system.mask)
        out = {"convergence": jnp.sqrt(jnp.sum((q - exact) ** 2) / n),
               "stability_chi": jnp.linalg.norm(solver.run(problem._replace(chi=problem.chi + delta))[0] - q) / jnp.linalg.norm(delta)}  # fmt: skip
        eps = 1e-3
        stiffer = qeq_problem(energy.kernel, params.replace(hardness=params.hardness * (1 + eps)), system,
                              energy.coulomb_constant, terms=energy.terms)  # fmt: skip
        out["stability_hardness"] = jnp.linalg.norm(solver.run(stiffer)[0] - q) / (eps * jnp.linalg.norm(q))
        if getattr(solver, "steps", None) is not None:
            longer = dataclasses.replace(solver, steps=solver.steps * 1.05)
            out["step_sensitivity"] = jnp.linalg.norm(longer.run(problem)[0] - q) / 0.05
        return out

    data, _ = read_reference(files["test"], params)
    rng = np.random.default_rng(0)
    rows = []
    for c in data.configurations[:n_probe]:
        system = qu.make_system(c.positions, c.species, total_charge=c.total_charge, pad_to=16)
        delta = jnp.asarray(rng.normal(0.0, 0.1, 16)) * system.mask
        rows.append({k: float(v) for k, v in probe(params, system, delta).items()})
    keys = ("convergence", "stability_chi", "stability_hardness", "step_sensitivity")
    return {k: (statistics.mean(r[k] for r in rows) if k in rows[0] else None) for k in keys}


def train_and_measure(run: Run, files: dict, folder: Path, epochs: int, n_probe: int) -> tuple[str, dict]:
    """One sweep entry (in a worker process): train, then errors and solver properties."""
    path = train(run, files, folder, epochs)
    return run.name, dict(errors(path, files), props=properties(path, files, n_probe), path=str(path))


def nve_drift(path: Path, solver_kw: dict, steps: int) -> float:
    """Energy drift (meV/atom/ps) of NVE on the first held-out C10H3⁺ chain (0.25 fs, 300 K)."""
    atoms = next(a for a in ase.io.read(shipped_reference("ct-heldout"), ":") if a.info["system"] == "c10h3+")
    etot = run_nve(atoms, QEqCalculator(params=str(path), **solver_kw), steps, dt_fs=0.25, temperature_K=300.0)
    return drift_stats(etot, len(atoms), dt_fs=0.25).slope


def evaluation_ms(path: Path, solver_kw: dict, repeats: int = 20) -> float:
    atoms = next(a for a in ase.io.read(shipped_reference("ct-heldout"), ":") if a.info["system"] == "c10h3+")
    atoms.calc = QEqCalculator(params=str(path), **solver_kw)
    atoms.get_forces()
    started = time.perf_counter()
    for k in range(repeats):
        atoms.positions[0, 0] += 1e-4 * (-1) ** k
        atoms.get_forces()
    return 1000.0 * (time.perf_counter() - started) / repeats


def sweep_runs(args) -> list[Run]:
    runs = [Run(a, k, w, s) for w in args.widths for s in args.seeds for a in FAMILIES for k in args.k]
    return runs + [Run("implicit", None, w, s) for w in args.widths for s in args.seeds]


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.mean(values)
    return f"{mean:.3g}" if len(values) == 1 else f"{mean:.3g} ± {statistics.stdev(values):.2g}"


def sweep_table(results: dict, args) -> list[str]:
    lines = ["| width | algorithm | K | F train | F test | gap | F shifted | E test | q test | ‖q_K − q*‖ | stab. χ | stab. J | step sens. |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for w in args.widths:
        for a in (*FAMILIES, "implicit"):
            for k in (args.k if a != "implicit" else [None]):
                rs = [results[Run(a, k, w, s).name] for s in args.seeds]
                col = lambda f: spread([f(r) for r in rs])  # noqa: E731
                lines.append(
                    f"| {w} | {a} | {k or '∞'} | {col(lambda r: r['train']['force_rmse'])} | {col(lambda r: r['test']['force_rmse'])} | "
                    f"{col(lambda r: r['test']['force_rmse'] - r['train']['force_rmse'])} | {col(lambda r: r['shifted']['force_rmse'])} | "
                    f"{col(lambda r: r['test']['energy_rmse'])} | {col(lambda r: r['test']['charge_rmse'])} | "
                    f"{col(lambda r: r['props']['convergence'])} | {col(lambda r: r['props']['stability_chi'])} | "
                    f"{col(lambda r: r['props']['stability_hardness'])} | {col(lambda r: r['props']['step_sensitivity'])} |"
                )  # fmt: skip
    return lines


def plot(results: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for w, style in zip(args.widths, ("-", "--")):
        for a, colour in zip(FAMILIES, ("C0", "C1", "C2")):
            mean = lambda f: [statistics.mean(f(results[Run(a, k, w, s).name]) for s in args.seeds) for k in args.k]  # noqa: E731
            axes[0].plot(args.k, mean(lambda r: r["test"]["force_rmse"]), style, color=colour, marker="o", label=f"{a}, width {w}")
            axes[1].plot(args.k, mean(lambda r: r["test"]["force_rmse"] - r["train"]["force_rmse"]), style, color=colour, marker="o")
            axes[2].plot(args.k, mean(lambda r: r["props"]["convergence"]), style, color=colour, marker="o")
        implicit = [results[Run("implicit", None, w, s).name] for s in args.seeds]
        axes[0].axhline(statistics.mean(r["test"]["force_rmse"] for r in implicit), color="k", ls=style, lw=0.8)
        axes[1].axhline(statistics.mean(r["test"]["force_rmse"] - r["train"]["force_rmse"] for r in implicit), color="k", ls=style, lw=0.8)
    for ax, label in zip(axes, ("test force RMSE (eV/Å)", "generalization gap, forces (eV/Å)", "‖q_K − q*‖ RMS (e)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.set_ylabel(label)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("black: implicit (K → ∞)", fontsize=9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def practical(folder: Path, files: dict, args, results: dict) -> list[str]:
    """Train for the solver you run, and the solver learned with the model (module docstring)."""
    w, seed = args.widths[0], args.seeds[0]
    with pool(2) as workers:
        jobs = {name: workers.submit(train, Run(a, 3, w, seed), files, folder, args.epochs) for name, a in (("cg", "cg"), ("learned", "learned"))}
        paths = {name: job.result() for name, job in jobs.items()}
    trained = {"K = 3": paths["cg"], "converged (implicit)": Path(results[Run("implicit", None, w, seed).name]["path"])}
    runs = {"K = 3": ({"solver": "cg", "iterations": 3}, qu.CG(iterations=3)), "converged": ({"solver": "cg"}, qu.CG(tol=1e-10))}
    lines = ["| trained | run | F test | E test | F shifted | NVE drift (meV/atom/ps) |", "|---|---|---|---|---|---|"]
    for t_name, path in trained.items():
        for r_name, (kw, solver) in runs.items():
            e = errors(path, files, solver)
            lines.append(f"| {t_name} | {r_name} | {e['test']['force_rmse']:.3f} | {e['test']['energy_rmse']:.2f} | "
                         f"{e['shifted']['force_rmse']:.3f} | {nve_drift(path, kw, args.nve_steps):+.3g} |")  # fmt: skip
    lines += ["", "| solver (K = 3) | F test | E test | F shifted | ms per evaluation (QEqCalculator, C10H3⁺) |", "|---|---|---|---|---|"]
    for name, path in (("cg", paths["cg"]), ("learned with the model (cg family)", paths["learned"])):
        e = errors(path, files)
        lines.append(f"| {name} | {e['test']['force_rmse']:.3f} | {e['test']['energy_rmse']:.2f} | {e['shifted']['force_rmse']:.3f} | "
                     f"{evaluation_ms(path, {}):.2f} |")  # fmt: skip
    return lines


def pool(workers: int):
    """Worker processes (spawned: JAX does not survive a fork), each with x64 on and one thread."""
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K 1,4, width 8, seed 0, 20 epochs (< 15 min)")
    ap.add_argument("--k", default="1,2,4,8,16,32", help="iteration counts")
    ap.add_argument("--widths", default="8,32", help="hidden widths (two layers each)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--probe", type=int, default=20, help="test structures for the solver properties")
    ap.add_argument("--nve-steps", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2, help="trainings run side by side (default 2)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.k, args.widths, args.seeds, args.epochs, args.probe, args.nve_steps = "1,4", "8", "0", 20, 5, 100
    args.k, args.widths, args.seeds = ([int(v) for v in text.split(",")] for text in (args.k, args.widths, args.seeds))
    started = time.time()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = split_data(folder, args.n_train)
        with pool(args.workers) as workers:
            jobs = [workers.submit(train_and_measure, run, files, folder, args.epochs, args.probe) for run in sweep_runs(args)]
            results = dict(job.result() for job in jobs)
        lines_practical = practical(folder, files, args, results)
    minutes = (time.time() - started) / 60
    command = " ".join(["python benchmarks/bench_reasoning.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "## bench_reasoning: the solver as a reasoning layer",
        "",
        f"`{command}` (jax {jax.__version__}, CPU ({os.cpu_count()} cores, {platform.machine()}), float64, {minutes:.0f} min). "
        f"Neural QEq (`qeq-unroll fit --model neural`, hidden widths {args.widths}) trained on {args.n_train} structures of "
        f"`ct-train` for {args.epochs} epochs (Adam, no early stopping), seeds {args.seeds} (mean ± standard deviation); "
        "test: the rest of `ct-train` and `ct-heldout` (same distribution); shifted: `ct-shifted` (larger structures). "
        "F: force RMSE (eV/Å), E: energy RMSE (meV/atom), q: charge RMSE against the Mulliken charges (e, not trained on); "
        "gap = F test − F train. Solver properties on the trained models over "
        f"{args.probe} test structures: ‖q_K − q*‖ (RMS, e), stability under δχ (‖Δq‖/‖δχ‖, e²/eV) and under a relative "
        "change of every hardness (‖Δq‖/(ε‖q‖)), sensitivity to the learned step sizes (‖Δq‖/ε, e).",
        "",
        *sweep_table(results, args),
        "",
        f"![test error, generalization gap and solver error against K]({PLOT.name})",
        "",
        "Train for the solver you run: CG, trained at K = 3 or to convergence, run at K = 3 or converged; NVE of a held-out "
        f"C10H3⁺ chain, {args.nve_steps} steps of 0.25 fs from 300 K.",
        "",
        *lines_practical,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        plot(results, args)
        write_section("reasoning", text)
        print("wrote the 'reasoning' section of benchmarks/RESULTS.md and", PLOT.name)


if __name__ == "__main__":
    main()
