"""Command line of qeq-unroll: ``qeq-unroll <command> [options]`` (``--help`` on each command).

Commands:
    demo    relax the built-in NaCl and water clusters with the QEq calculator and report energies,
            charges, forces, solver diagnostics and timings.
    train-solver  train the learned parts of a K-step charge solver (solver="learned").
    fit     fit QEq and pair parameters to reference data (extended XYZ) through the solver.
    plot-fit  draw the learning curves of a fit log to PNG.
    md      molecular dynamics on the device (jax-md) with frames and a drift report.
    relax   relax structures on the device (FIRE), many at once.
    export-lammps  write a LAMMPS deck that computes a parameter set's energy, forces and charges.

The parser is a subcommand layout: a command is a function ``add_<name>(subparsers)`` that adds
its parser and sets ``func`` (called with the parsed arguments, returns an exit status).
"""

from __future__ import annotations

import argparse
import sys

from qeq_unroll import SOLVERS
from qeq_unroll.errors import QEqError

from .options import add_model_options, model_settings


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="relax the built-in NaCl and water clusters and report",
        description="Relax a 32-atom NaCl cluster and a water hexamer (built-in 'demo-nacl-water' set, "
        "gaussian kernel) with BFGS and print energies, charges, remaining forces, the charge solver's "
        "diagnostics and timings.",
    )
    p.add_argument("--fmax", type=float, default=0.01, help="BFGS force threshold in eV/A (default 0.01)")
    p.add_argument("--steps", type=int, default=1000, help="maximum BFGS steps per structure (default 1000)")
    add_model_options(p, params="demo-nacl-water", solvers=tuple(SOLVERS))
    p.add_argument("--no-fit", action="store_true",
                   help="skip the short fit to the shipped GFN2-xTB data and the relaxation with the fitted set")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    settings = model_settings(args)
    run_demo(fmax=args.fmax, steps=args.steps, settings=settings, fit=not args.no_fit)
    return 0


def add_train_solver(subparsers) -> None:
    from .train_solver import add_train_solver as add

    add(subparsers)


def add_fit(subparsers) -> None:
    from .fitting import add_fit as add

    add(subparsers)


def add_plot_fit(subparsers) -> None:
    from .fitting import add_plot_fit as add

    add(subparsers)


def add_md(subparsers) -> None:
    from .device_md import add_md as add

    add(subparsers)


def add_relax(subparsers) -> None:
    from .device_relax import add_relax as add

    add(subparsers)


def add_export_lammps(subparsers) -> None:
    from .export import add_export_lammps as add

    add(subparsers)


COMMANDS = (add_demo, add_train_solver, add_fit, add_plot_fit, add_md, add_relax, add_export_lammps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qeq-unroll",
        description="Differentiable charge equilibration (QEq) in JAX: solvers, exact forces, an ASE calculator.",
    )
    from qeq_unroll import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--compilation-cache", metavar="DIR", default=None,
                       help="folder of JAX's persistent compilation cache (default $QEQ_UNROLL_CACHE_DIR or "
                       "~/.cache/qeq-unroll/jax): later runs load compiled functions instead of compiling them")
    cache.add_argument("--no-compilation-cache", action="store_true", help="compile everything anew in this run")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    subparsers.required = True
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None, compilation_cache: bool = False) -> int:
    """Run a command line; returns the exit status. ``compilation_cache``: switch on JAX's
    persistent compilation cache (unless ``--no-compilation-cache``), as the console script does;
    off for calls from Python, whose process the cache setting would outlive."""
    args = build_parser().parse_args(argv)
    import jax

    if compilation_cache and not args.no_compilation_cache:
        from qeq_unroll.compilation_cache import enable_compilation_cache

        enable_compilation_cache(args.compilation_cache)

    try:
        with jax.enable_x64(True):  # the command works in float64; the process-wide setting is left alone
            return int(args.func(args) or 0)
    except QEqError as exc:
        print(f"qeq-unroll {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``qeq-unroll`` console script: :func:`main` with the compilation cache."""
    sys.exit(main(compilation_cache=True))


if __name__ == "__main__":
    entry()
