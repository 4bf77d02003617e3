"""The model options of the command line, in one place: every command that builds a model takes
them spelled the same, with the valid names from the registries of kernels, solvers and gradient
modes (``qeq_unroll.KERNELS``, ``SOLVERS``, ``gradients.GRADIENT_NAMES``)."""

from __future__ import annotations

from qeq_unroll import KERNELS, SOLVERS
from qeq_unroll.gradients import GRADIENT_NAMES
from qeq_unroll.errors import QEqInputError
from qeq_unroll.neural import is_model_file

#: Solver names of the command line: the registry's plus the learned solver (from a solver file).
SOLVER_NAMES = (*SOLVERS, "learned")
#: The defaults of the options that a model file (``qeq_unroll.neural``) fixes itself.
FIXED_BY_MODEL_FILE = {"kernel": "gaussian", "cutoff": None, "solver": "cg"}
#: Every model option, in the order ``--help`` lists them.
MODEL_OPTIONS = ("params", "kernel", "cutoff", "solver", "iterations", "tol", "max_iterations", "gradient")


def iterations(text):
    """A fixed K, or None for 'none', 'tol' or 0 (iterate to the tolerance)."""
    if str(text).lower() in ("none", "0", "tol"):
        return None
    try:
        return int(text)
    except ValueError:
        raise QEqInputError(f"--iterations must be a positive integer or 'none', got '{text}'") from None


def add_model_options(parser, params, iterations_default=None, solvers=SOLVER_NAMES, gradients=GRADIENT_NAMES,
                      gradient="auto", tol_help="default 1e-10 in float64, 1e-5 in float32", tol=None,
                      only=MODEL_OPTIONS, params_help=None) -> None:  # fmt: skip
    """Add the model options named in ``only`` to ``parser`` with these defaults (``params_help``:
    the help text's default of ``--params``, where it is not ``params`` itself)."""
    adders = {
        "params": lambda: parser.add_argument("--params", default=params,
                                              help=f"parameter set: built-in name or JSON file (default {params_help or params})"),
        "kernel": lambda: parser.add_argument("--kernel", default=FIXED_BY_MODEL_FILE["kernel"], choices=tuple(KERNELS),
                                              help="Coulomb kernel (default gaussian)"),
        "cutoff": lambda: parser.add_argument("--cutoff", type=float, default=None,
                                              help="kernel cutoff in Å (default: the kernel's)"),
        "solver": lambda: parser.add_argument("--solver", default=FIXED_BY_MODEL_FILE["solver"], choices=solvers,
                                              help="charge solver (default cg)"),
        "iterations": lambda: parser.add_argument(
            "--iterations", "-K", type=iterations, default=iterations_default,
            help=f"fixed solver iterations K, or 'none' to iterate to --tol (default {iterations_default or 'none'})"),
        "tol": lambda: parser.add_argument("--tol", type=float, default=tol, help=f"solver tolerance, relative residual ({tol_help})"),
        "max_iterations": lambda: parser.add_argument("--max-iterations", type=int, default=1000,
                                                      help="iteration cap when iterating to --tol (default 1000)"),
        "gradient": lambda: parser.add_argument("--gradient", default=gradient, choices=gradients,
                                                help=f"how the solver is differentiated (default {gradient}: implicit when iterating to "
                                                     "--tol, unrolled for a fixed K)"),
    }  # fmt: skip
    for name in only:
        adders[name]()


def model_settings(args) -> dict:
    """The calculator keywords of the model options present in ``args``. With a model file as
    ``--params``, the options it fixes (kernel, cutoff and, for a model without charges, solver)
    are left to it where they keep their defaults."""
    settings = {name: getattr(args, name) for name in MODEL_OPTIONS if hasattr(args, name)}
    if is_model_file(settings.get("params")):
        for name, default in FIXED_BY_MODEL_FILE.items():
            if name in settings and settings[name] == default:
                del settings[name]
    return settings
