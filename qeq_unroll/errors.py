"""Exceptions and warnings raised by qeq-unroll.

Every error names the offending input: the element, the parameter, the set, the option, the atoms.
All errors derive from :class:`QEqError`, so ``except QEqError`` catches every refusal of the
library and nothing else.
"""


class QEqError(Exception):
    """Base of every error qeq-unroll raises on purpose."""


class QEqInputError(QEqError, ValueError):
    """Bad user input: unknown element, missing or non-physical parameter, bad geometry, bad option."""


class QEqResourceError(QEqInputError):
    """A structure whose periodic images, neighbour slots, reciprocal vectors or mesh points would
    need more memory than allowed (``checks.Limits.max_memory``); found before anything is built."""


class QEqNeighborError(QEqError, RuntimeError):
    """A neighbour list that kept overflowing while its capacity grew to the allowed maximum
    (``neighbors.until_it_fits``); ``error`` holds the bits of ``neighbors.REASONS``."""

    def __init__(self, message: str, error: int = 0):
        super().__init__(message)
        self.error = int(error)


class QEqConvergenceError(QEqError, RuntimeError):
    """A charge solve whose result cannot be trusted (not converged where convergence is required,
    or a hardness matrix that is not positive definite)."""


class QEqRangeError(QEqConvergenceError):
    """A solve that returned charges beyond the physical bound (``checks.Limits``): the model has
    broken down at this geometry."""


def require_positive_integers(settings, names) -> None:
    """Refuse settings (a dataclass) whose fields ``names`` are not positive integers, naming the field."""
    for name in names:
        value = getattr(settings, name)
        if int(value) != value or value < 1:
            raise QEqInputError(f"{name} must be a positive integer, got {value}")


class QEqConvergenceWarning(RuntimeWarning):
    """A charge solve run to a tolerance stopped at its iteration limit before reaching it."""


class QEqShortRangeWarning(UserWarning):
    """A model with no short-range terms between the elements of a structure (no pair terms, no
    short-range network): its energies and forces are the electrostatics alone, and structures
    collapse under relaxation or MD."""
