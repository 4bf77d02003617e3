"""``qeq-unroll train-solver``: learn the parts of an unrolled charge solver from structures.

Reads structures (any format ``ase.io`` reads, e.g. extended XYZ), trains
``qeq_unroll.learned`` parameters against the exact solve with ``qeq_unroll.solver_training``,
and writes the solver file that ``QEqCalculator(solver="learned", solver_params=...)`` takes.
"""

from __future__ import annotations

import numpy as np

from qeq_unroll.errors import QEqInputError

from .options import add_model_options


def add_train_solver(subparsers) -> None:
    p = subparsers.add_parser(
        "train-solver",
        help="train a learned K-step charge solver on structures",
        description="Train the learned parts of solver='learned' (starting guess, preconditioner, "
        "step sizes and momenta) so that K iterations reproduce the exact charges of the given "
        "structures. Writes a solver file (JSON).",
    )
    p.add_argument("structures", help="structure file read by ase.io (all frames), e.g. train.xyz")
    add_model_options(p, params="rappe-goddard-1991", iterations_default=4, only=("params", "kernel", "cutoff", "iterations"))
    p.add_argument("--family", choices=("gd", "nag", "cg"), default="cg", help="iteration family (default cg)")
    p.add_argument("--objective", choices=("charges", "energy", "forces"), default="charges",
                   help="error minimised against the exact solve (default charges)")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps (default 2000)")
    p.add_argument("--lr", type=float, default=5e-2, help="initial Adam learning rate (default 0.05)")
    p.add_argument("--local-cutoff", type=float, default=6.0,
                   help="range in Å of the learned start and preconditioner (default 6)")
    p.add_argument("--basis", type=int, default=8, help="radial basis functions per element pair (default 8)")
    p.add_argument("--coarse-centres", default="",
                   help="comma-separated elements whose atoms centre the aggregates of a coarse level "
                   "(e.g. O for water; default: no coarse level)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="solver file to write (JSON)")
    p.set_defaults(func=run_train_solver)


def systems_from_atoms(frames, params, dtype=None):
    """Padded ``System`` objects of ASE frames (total charge: sum of the initial charges)."""
    import qeq_unroll as qu

    out = []
    for atoms in frames:
        if atoms.pbc.any():
            raise QEqInputError("train-solver handles free-space structures only (pbc must be False)")
        species = params.species_indices(atoms.get_chemical_symbols())
        out.append(
            qu.make_system(atoms.positions, species, total_charge=float(np.sum(atoms.get_initial_charges())),
                           pad_to=qu.size_bucket(len(atoms)), dtype=dtype)
        )
    return out


def run_train_solver(args) -> int:
    import ase.io
    from tqdm import tqdm

    import qeq_unroll as qu
    from qeq_unroll.learned import init_learned, save_learned
    from qeq_unroll.solver_training import train_solver

    if args.iterations is None:
        raise QEqInputError("train-solver trains a fixed number of iterations: give -K (e.g. -K 4)")
    params = qu.load_params(args.params)
    kernel = qu.get_kernel(args.kernel, args.cutoff)
    frames = ase.io.read(args.structures, index=":")
    systems = systems_from_atoms(frames, params)
    for s in systems:
        params.require(kernel.required, np.asarray(s.species)[np.asarray(s.mask)])
    centres = tuple(c.strip() for c in args.coarse_centres.split(",") if c.strip())
    lp = init_learned(args.family, args.iterations, kernel.name, params.elements, args.local_cutoff, args.basis,
                      coarse_centres=centres)
    with tqdm(total=args.steps, desc=f"train {args.family} K={args.iterations}", unit="step") as bar:

        def progress(step, value):
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix({args.objective: f"{value:.2e}"})

        lp, history = train_solver(lp, params, systems, kernel, qu.COULOMB_CONSTANT, args.objective,
                                   args.steps, args.lr, args.seed, callback=progress)
    save_learned(lp, args.out)
    window = max(1, len(history) // 10)
    print(f"{len(systems)} structures; {args.objective} error (mean of the first/last {window} steps): "
          f"{np.mean(history[:window]):.3e} -> {np.mean(history[-window:]):.3e}")
    print(f"wrote {args.out}")
    return 0
