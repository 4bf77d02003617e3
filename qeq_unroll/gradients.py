"""Gradient modes: how the charges returned by a solver are differentiated.

- ``unrolled``: through every iteration of the solver. The forces are then the exact derivative
  of the energy that is reported, for any number of iterations K (the start depends on the
  geometry only).
- ``implicit``: implicit-function theorem at the solution of the KKT system
  [[H, −C], [−Cᵀ, 0]] (q, λ) = (−χ, −Q), through ``jax.lax.custom_linear_solve``: memory independent
  of K, exact when the solve converged (check ``Diagnostics.converged``), differentiable to any order.
- ``envelope``: charges held fixed (Hellmann–Feynman). Exact only at the exact minimiser.

Each mode is a frozen strategy with ``charges(solver, problem) -> (q, Diagnostics)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .constraints import fragment_means, fragment_sums
from .errors import QEqInputError
from .solvers import product, tangent


def _forward(solver):
    """The solver's run for use without differentiating through its iterations."""
    return getattr(solver, "run_forward", solver.run)


@dataclasses.dataclass(frozen=True)
class Unrolled:
    name: str = "unrolled"

    def charges(self, solver, problem):
        return solver.run(problem)


@dataclasses.dataclass(frozen=True)
class Envelope:
    name: str = "envelope"

    def charges(self, solver, problem):
        q, diagnostics = _forward(solver)(jax.lax.stop_gradient(problem))
        return jax.lax.stop_gradient(q), diagnostics


@dataclasses.dataclass(frozen=True)
class Implicit:
    name: str = "implicit"

    def charges(self, solver, problem):
        h, frags, n_f = problem.hardness, problem.fragments, problem.n_fragments
        n = problem.chi.shape[0]

        # (q, λ) as one flat vector: JAX transposes a one-leaf right-hand side cleanly.
        def kkt(x):
            q, lam = x[:n], x[n:]
            per_atom = jnp.where(frags >= 0, lam[jnp.maximum(frags, 0)], 0.0)
            return jnp.concatenate([h.matvec(q) - per_atom, -fragment_sums(q, frags, n_f)])

        def solve(guess, multiply):
            def run(_, b):
                # The adjoint right-hand side b_q is ∂E/∂q = χ + Hq, at the solution a multiplier
                # per fragment plus the small tangent residual. Only its tangent part t moves q; the
                # rest shifts λ, which the line below recovers from b_q. Solving with χ = −t keeps
                # float32 from losing t under the large uniform part (solving with b_q itself, t
                # drowns in its rounding and the iteration cannot reach the tolerance); the residual
                # is measured relative to ‖b_q‖, the scale of the full right-hand side.
                b_q, b_lam = b[:n], b[n:]
                posed = problem._replace(chi=-tangent(b_q, problem), targets=-b_lam, scale=jnp.linalg.norm(b_q), guess=guess)
                q, diagnostics = _forward(solver)(posed)
                lam = fragment_means(multiply(q) - b_q, frags, n_f)
                return jnp.concatenate([q, lam]), diagnostics

            return run

        # The charges start from the caller's guess; the adjoint from zero (made feasible): the
        # guess holds charges, not multipliers (an MD warm start would cost it a whole cold solve),
        # and for forces t is the forward residual, mostly long waves, which the diagonal start
        # overshoots by the Coulomb stiffness (rattled NaCl with PME, 32768 atoms: relative
        # residual 1.5e-7 from the diagonal start, 8e-9 from zero). An adjoint that needed no
        # iteration is zero, and its product is skipped; the charges' product is the one the
        # energy takes anyway (XLA computes it once).
        rhs = jnp.concatenate([-problem.chi, -problem.targets])
        x, diagnostics = jax.lax.custom_linear_solve(
            kkt,
            rhs,
            solve(problem.guess, h.matvec),
            solve(jnp.zeros_like(problem.chi), functools.partial(product, h)),
            symmetric=True,
            has_aux=True,
        )
        return x[:n], diagnostics


GRADIENTS = {"unrolled": Unrolled, "implicit": Implicit, "envelope": Envelope}


#: The gradient-mode names the constructors take: the registry's and "auto".
GRADIENT_NAMES = (*GRADIENTS, "auto")


def get_gradient(name, solver=None):
    """A gradient mode by name (a mode object is returned as is). ``"auto"`` picks by ``solver``:
    ``implicit`` for a solver that iterates to a tolerance (``iterations`` None), whose backward
    pass is then one more solve of the same accuracy, whatever the forward pass took, with no
    tape of its iterations; ``unrolled`` for a fixed K (the forces are the exact derivative of
    the K-step energy, which the implicit fixed point is not) and for direct solvers."""
    if not isinstance(name, str):
        return name
    if name == "auto":
        to_tolerance = hasattr(solver, "iterations") and solver.iterations is None
        return Implicit() if to_tolerance else Unrolled()
    if name not in GRADIENTS:
        raise QEqInputError(f"unknown gradient mode '{name}' (valid: {', '.join(GRADIENT_NAMES)})")
    return GRADIENTS[name]()
