"""Neural charge equilibration against its two baselines on the shipped GFN2-xTB charge-transfer set.

    python benchmarks/bench_neural.py             # ~25 min on 2 CPU cores; writes the "neural"
                                                  # section of RESULTS.md
    python benchmarks/bench_neural.py --epochs 20 --no-write   # a quick look

Three models, each trained with ``qeq-unroll fit`` (the command line users run, in-process) on
``ct-train`` (NaCl clusters of 8 and 12 atoms with and without an extra Na⁺, the C10H2 chain neutral
and protonated at one end; 10 % of it held out for validation and early stopping) and tested on
``ct-heldout``:

(a) ``--model table``: per-element χ, J, σ and Born–Mayer pair terms from ``rappe-goddard-1991``
    (Levenberg–Marquardt, its default; it stops at its minimum);
(b) ``--model local``: the short-range network alone, no charges (a 2G HDNNP);
(c) ``--model neural``: χ_i and J_i from per-element networks on the same symmetry functions, QEq
    (gaussian kernel, CG K = 20 unrolled) and the same short-range network as (b);
(c') ``neural-q``: (c) with ``--charge-in-short``, the atom's charge an input of the short-range
    network, as in the 4G-HDNNP.

(b), (c) and (c') share descriptors, network widths, optimiser (Adam, cosine schedule), epochs, batch size
and seed: the same budget. Metrics on the held-out configurations, overall and per structure
family, with each model's own fitted energy offsets: energy RMSE (meV/atom), force RMSE (eV/Å),
charge RMSE (e; charges are not in the loss: what the models make of the charge distribution
unaided; the local model has none). Cost: median seconds per epoch after the first, and the time
of one energy + forces evaluation through ``QEqCalculator`` per atom (after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ase.io
import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qeq_unroll as qu  # noqa: E402
from calculators import QEqCalculator  # noqa: E402
from calculators.cli import main as cli  # noqa: E402
from calculators.data import read_reference, shipped_reference  # noqa: E402
from qeq_unroll import fit as F  # noqa: E402
from qeq_unroll.neural import load_model  # noqa: E402
from results import write_section  # noqa: E402

MODELS = ("table", "local", "neural", "neural-q")
#: ``qeq-unroll fit`` options of each model beyond the training file and ``--out``.
OPTIONS = {"table": ["--model", "table", "--params", "rappe-goddard-1991"], "local": ["--model", "local"],
           "neural": ["--model", "neural"], "neural-q": ["--model", "neural", "--charge-in-short"]}
FAMILIES = ("nacl", "nacl+", "c10h2", "c10h3+")
FAMILY_ELEMENTS = {"Na", "Cl", "C", "H"}


def train(model: str, folder: Path, epochs: int) -> Path:
    out = folder / f"{model}.json"
    args = ["fit", str(shipped_reference("ct-train")), *OPTIONS[model], "--out", str(out), "--no-progress"]
    args += ["--epochs", str(epochs)] if model != "table" else []
    started = time.time()
    if cli(args) != 0:
        raise SystemExit(f"qeq-unroll {' '.join(args)} failed")
    print(f"{model}: trained in {time.time() - started:.0f} s", flush=True)
    return out


def loaded(model: str, path: Path):
    """``(params, energy, offsets array, calculator keywords)`` of a fitted model."""
    log = [json.loads(line) for line in path.with_suffix(".log.jsonl").read_text().splitlines() if line.strip()]
    if model == "table":
        params = qu.load_params(path)
        energy = qu.qeq_energy("gaussian", qu.CG(iterations=20), "unrolled")
        offsets = json.loads(path.with_suffix(".ckpt.json").read_text())["final"]["offsets"]
    else:
        terms, params, settings = load_model(path)
        solver = qu.CG(iterations=20) if settings["charges"] else qu.get_solver("none")
        energy = qu.qeq_energy(settings["kernel"]["name"], solver, "unrolled", settings["coulomb_constant"], terms=terms)
        offsets = settings["energy_offsets"]
    return params, energy, np.asarray([offsets.get(e, 0.0) for e in params.elements]), log


def families(path) -> list[str]:
    return [a.info["system"] for a in ase.io.read(path, ":")]


def evaluate(model: str, path: Path) -> dict:
    params, energy, offsets, log = loaded(model, path)
    heldout, _ = read_reference(shipped_reference("ct-heldout"), params)
    kinds = families(shipped_reference("ct-heldout"))
    rows = {"all": F.evaluate(params, heldout, energy, offsets)}
    for fam in FAMILIES:
        rows[fam] = F.evaluate(params, heldout.subset([i for i, k in enumerate(kinds) if k == fam]), energy, offsets)
    epochs = [r["seconds"] for r in log if r.get("event") == "epoch"][1:]
    rows["epoch_s"] = statistics.median(epochs) if epochs else math.nan
    rows["epochs"] = len(epochs) + 1
    calc = dict(params=str(path)) if model != "table" else dict(params=str(path), solver="cg", iterations=20)
    rows["per_atom_ms"] = evaluation_ms_per_atom(calc)
    rows["parameters"] = trained_values(model, params)
    return rows


def trained_values(model: str, params) -> int:
    """How many numbers the fit trained: the table's χ, J, σ of the data's elements and pair
    coefficients; the local model's short-range network; the neural model's networks and σ."""
    size = lambda tree: sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(tree))  # noqa: E731
    n = len(FAMILY_ELEMENTS)
    if model == "table":
        return 3 * n + sum(len(c) for key, forms in params.pairs.items() if set(key.split("-")) <= FAMILY_ELEMENTS
                           for c in forms.values())  # fmt: skip
    short = size(params.networks["short"])
    return short if model == "local" else short + size(params.networks["chi"]) + n  # neural, neural-q


def evaluation_ms_per_atom(calc: dict, repeats: int = 20) -> float:
    atoms = ase.io.read(shipped_reference("ct-heldout"), 0)
    atoms.calc = QEqCalculator(**calc)
    atoms.get_forces()
    started = time.perf_counter()
    for k in range(repeats):
        atoms.positions[0, 0] += 1e-4 * (-1) ** k
        atoms.get_forces()
    return 1000.0 * (time.perf_counter() - started) / repeats / len(atoms)


def _cell(metrics, key, fmt):
    v = metrics.get(key)
    return "–" if v is None else format(v, fmt)


def report(results: dict, epochs: int) -> str:
    lines = [
        "## bench_neural: neural charge equilibration against per-element QEq and a local network",
        "",
        f"`python benchmarks/bench_neural.py --epochs {epochs}` (jax {jax.__version__}, CPU ({os.cpu_count()} cores, "
        f"{platform.machine()}), float64). Trained with `qeq-unroll fit` on the shipped GFN2-xTB charge-transfer set "
        "`ct-train` (246 configurations, 10 % held out for validation), tested on `ct-heldout` (76). (a) `--model table` "
        "(Levenberg–Marquardt to its minimum); (b) `--model local` (short-range network, no charges); (c) `--model neural` "
        f"(networks for χ_i, J_i and the short-range energy; CG K = 20 unrolled); (c') `neural-q`: (c) with "
        f"`--charge-in-short` (the 4G form); (b), (c) and (c') with the same descriptors, "
        f"widths, Adam schedule, {epochs} epochs, batch and seed. Held-out RMSE of the energy (meV/atom), forces (eV/Å) "
        "and charges (e, not in the loss); each model with its own fitted energy offsets.",
        "",
        "| model | part | E RMSE | F RMSE | q RMSE |",
        "|---|---|---|---|---|",
    ]
    for model in MODELS:
        for part in ("all",) + FAMILIES:
            m = results[model][part]
            lines.append(f"| {model} | {part} | {_cell(m, 'energy_rmse', '.2f')} | {_cell(m, 'force_rmse', '.3f')} | "
                         f"{_cell(m, 'charge_rmse', '.3f') if model != 'local' else '–'} |")  # fmt: skip
    lines += ["", "| model | trained values | epochs | s per epoch | evaluation ms per atom (QEqCalculator) |", "|---|---|---|---|---|"]
    for model in MODELS:
        r = results[model]
        lines.append(f"| {model} | {r['parameters']} | {r['epochs']} | {r['epoch_s']:.2f} | {r['per_atom_ms']:.3f} |")
    b = results["local"]["all"]
    for model in ("neural", "neural-q"):
        c = results[model]["all"]
        gain = lambda key: 100.0 * (1.0 - c[key] / b[key])  # noqa: E731
        lines += ["", f"{model} against the local network, held out: force RMSE {gain('force_rmse'):.0f} % lower, energy "
                  f"RMSE {gain('energy_rmse'):.0f} % lower (goal: 20 % each); against per-element QEq: force RMSE "
                  f"{c['force_rmse'] / results['table']['all']['force_rmse']:.2f}× (goal: at most 0.25×)."]  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=200, help="epochs of (b) and (c) (default 200, the CLI's)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            results[model] = evaluate(model, train(model, Path(tmp), args.epochs))
    text = report(results, args.epochs)
    print(text)
    if not args.no_write:
        write_section("neural", text)
        print("wrote the 'neural' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
