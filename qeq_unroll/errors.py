"""Exceptions and warnings raised by qeq-unroll.

Every error names the offending input: the element, the parameter, the set, the option.
"""


class QEqInputError(ValueError):
    """Bad user input: unknown element, missing or non-physical parameter, bad geometry, bad option."""


class QEqConvergenceError(RuntimeError):
    """A charge solve whose result cannot be trusted (not converged where convergence is required,
    or a hardness matrix that is not positive definite)."""


class QEqConvergenceWarning(RuntimeWarning):
    """A charge solve run to a tolerance stopped at its iteration limit before reaching it."""
