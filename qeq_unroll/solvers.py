"""Solvers of the QEq minimisation: min_q χᵀq + ½ qᵀHq subject to the fragment sums.

Each solver is a frozen strategy object with ``run(problem) -> (charges, Diagnostics)``, pure and
jit-friendly, differentiable end to end (the gradient modes in ``gradients`` decide how it is
differentiated). Iterative solvers work on the constraint plane: they start from a feasible guess
that depends on the current geometry only and take steps along directions that keep every
fragment sum fixed, so Σq = Q holds to rounding after any number of iterations.

- ``exact``: dense Cholesky of H, two-level solve for the constraints.
- ``cg``: preconditioned projected conjugate gradient (matrix-free: only H q products).
- ``gd``: preconditioned projected steepest descent with exact line search.
- ``nag``: Nesterov's accelerated projected gradient, step 1/L with L from a short power iteration.

The default preconditioner, :class:`OperatorPreconditioner`, is Jacobi, or the one that the
matrix-free term of H brings with it (``Hardness.operator.preconditioner``: for particle-mesh
Ewald the long-wavelength mesh preconditioner ``pme.MeshPreconditioner``, which keeps the
iterations about constant as the cell grows).

``iterations=K`` runs exactly K iterations (stopping early only once the residual is at ``tol``);
``iterations=None`` runs to ``tol`` or ``max_iterations``. The residual is the Euclidean norm of the
projected gradient relative to ‖χ‖ (dimensionless). Every division is guarded, and a converged
solver freezes, so iterating past convergence stays finite and its gradients stay exact.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .constraints import diagonal_start, feasible, indicator, project
from .errors import QEqInputError
from .hardness import Hardness


class Problem(NamedTuple):
    """min_q χᵀq + ½ qᵀHq subject to Σ_{i∈f} q_i = targets[f]. ``species``, ``distances`` (Å)
    and ``pair_mask`` describe the geometry, for solver parts that are functions of it. ``guess``
    (N,) e: charges the caller supplies as the starting point of iterative solvers (MD history:
    the previous step's charges or extended-Lagrangian auxiliary charges), replacing the solver's
    own start; it is made feasible and treated as a constant (never differentiated). ``scale``
    (eV/e): the norm that residuals are relative to, ‖χ‖ when None (the adjoint solve of the
    implicit gradient mode sets it, see ``gradients``)."""

    hardness: Hardness
    chi: jax.Array
    fragments: jax.Array
    targets: jax.Array
    species: jax.Array | None = None
    distances: jax.Array | None = None
    pair_mask: jax.Array | None = None
    guess: jax.Array | None = None
    scale: jax.Array | None = None

    @property
    def n_fragments(self) -> int:
        return self.targets.shape[0]


class Diagnostics(NamedTuple):
    """residual: relative projected-gradient norm; iterations: iterations used; converged:
    residual ≤ tol; positive_definite: no direction of non-positive curvature was met."""

    residual: jax.Array
    iterations: jax.Array
    converged: jax.Array
    positive_definite: jax.Array


def _safe_div(num, den):
    """num/den, and 0 where den is not positive; safe under differentiation (double where)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def tangent(gradient, problem):
    """The gradient's component in the constraint tangent space (Euclidean projection): the
    KKT residual. Taking it before preconditioning keeps rounding relative to the residual, not to
    the Lagrange multiplier, so the iterations stay on the plane to the last digit."""
    return project(gradient, jnp.ones_like(gradient), problem.fragments, problem.n_fragments)


def relative_residual(residual, problem):
    """‖r‖ / ‖χ‖ (or ‖r‖ / ``problem.scale``) for a tangent residual r (dimensionless)."""
    scale = jnp.linalg.norm(problem.chi) if problem.scale is None else problem.scale
    return jnp.linalg.norm(residual) / jnp.where(scale > 0, scale, 1.0)


def product(hardness, q):
    """H q, skipping the product when q is zero (the implicit adjoint's start and, when it needed
    no iteration, its solution; see ``gradients``)."""
    return lax.cond(jnp.any(q != 0), hardness.matvec, jnp.zeros_like, q)


@dataclasses.dataclass(frozen=True)
class Jacobi:
    """Preconditioner M = diag(H)⁻¹, applied on the plane: z = M r − M 1_f λ_f (Σ_f z = 0)."""

    needs_distances = False

    def setup(self, problem):
        return jnp.where(problem.fragments >= 0, 1.0 / problem.hardness.diagonal, 0.0)

    def apply(self, w, residual, problem):
        return project(residual, w, problem.fragments, problem.n_fragments)


@dataclasses.dataclass(frozen=True)
class OperatorPreconditioner:
    """Jacobi, or the preconditioner of the matrix-free term of H when it has one
    (``Hardness.operator.preconditioner``); the choice follows the structure of H, so it is static
    under jit."""

    needs_distances = False

    def choice(self, problem):
        operator = problem.hardness.operator
        return Jacobi() if operator is None else operator.preconditioner

    def setup(self, problem):
        return self.choice(problem).setup(problem)

    def apply(self, pre, residual, problem):
        return self.choice(problem).apply(pre, residual, problem)


@dataclasses.dataclass(frozen=True)
class DiagonalStart:
    """Start from the minimiser of the diagonal model (see ``constraints.diagonal_start``)."""

    needs_distances = False

    def __call__(self, problem):
        return diagonal_start(problem.chi, problem.hardness.diagonal, problem.fragments, problem.targets)


@dataclasses.dataclass(frozen=True)
class UniformStart:
    """Start from each fragment's charge spread evenly (q = 0 for neutral fragments): the plain
    textbook start, kept as a baseline."""

    needs_distances = False

    def __call__(self, problem):
        chi = problem.chi
        return diagonal_start(jnp.zeros_like(chi), jnp.ones_like(chi), problem.fragments, problem.targets)


def min_tol(dtype) -> float:
    """The smallest relative residual the iterations go to in ``dtype``: 10 ε (1.2e-6 in float32,
    2.2e-15 in float64). A smaller ``tol`` stops there and reports the solve as not converged."""
    return 10.0 * float(jnp.finfo(dtype).eps)


@dataclasses.dataclass(frozen=True)
class _Iterative:
    """Shared driver: K fixed iterations or iterate-to-tol, as a ``lax.scan`` whose steps freeze
    (``lax.cond``) once the residual reaches ``tol``. ``preconditioner`` and ``start`` are
    strategies (by default :class:`OperatorPreconditioner`, which is Jacobi unless H has a
    matrix-free term with its own preconditioner, and the diagonal-model start; learned ones in
    ``learned``)."""

    iterations: int | None = None
    tol: float = 1e-10
    max_iterations: int = 1000
    preconditioner: object = OperatorPreconditioner()
    start: object = DiagonalStart()

    def __post_init__(self):
        if self.iterations is not None and (int(self.iterations) != self.iterations or self.iterations < 1):
            raise QEqInputError(f"iterations must be a positive integer or None, got {self.iterations}")
        if not self.tol >= 0:
            raise QEqInputError(f"tol must be non-negative, got {self.tol}")

    @property
    def needs_distances(self) -> bool:
        """Whether a part reads the dense pair distances of the problem (free space only)."""
        return self.start.needs_distances or self.preconditioner.needs_distances

    @property
    def n_steps(self) -> int:
        return self.max_iterations if self.iterations is None else int(self.iterations)

    def init(self, problem, pre):
        """``(state, residual)`` at the start; ``pre`` is the preconditioner's setup."""
        raise NotImplementedError

    def step(self, problem, pre, state, k):
        """One iteration: ``(state, residual, positive_definite)``."""
        raise NotImplementedError

    def initial(self, problem):
        """Starting charges: the caller's ``problem.guess`` made feasible, else the ``start``
        strategy's."""
        if problem.guess is None:
            return self.start(problem)
        guess = lax.stop_gradient(problem.guess)
        return feasible(guess, problem.fragments, problem.targets)

    def precondition(self, pre, residual, problem):
        return self.preconditioner.apply(pre, residual, problem)

    def _threshold(self, dtype):
        return jnp.asarray(max(self.tol, min_tol(dtype)), dtype)

    def _scan(self, problem, length):
        """``length`` iterations as a ``lax.scan``; a step whose residual is already at ``tol``
        leaves the state as it is (``where``, not ``cond``: a cond would hand the loop-invariant
        hardness matrix out of every step and the scan would stack ``length`` copies of it)."""
        threshold = self._threshold(problem.chi.dtype)
        pre = self.preconditioner.setup(problem)
        state, res0 = self.init(problem, pre)

        def body(carry, k):
            state, res, used, pd = carry
            done = ~(res > threshold)  # NaN counts as done: never iterate on garbage
            new_state, new_res, pd_k = self.step(problem, pre, state, k)
            keep = lambda new, old: jnp.where(done, old, new)  # noqa: E731
            state = jax.tree_util.tree_map(keep, new_state, state)
            return (state, keep(new_res, res), used + jnp.where(done, 0, 1), pd & (done | pd_k)), None

        carry0 = (state, res0, jnp.asarray(0, jnp.int32), jnp.asarray(True))
        (state, res, used, pd), _ = lax.scan(body, carry0, jnp.arange(length))
        return state[0], Diagnostics(res, used, res <= self.tol, pd)

    def run_forward(self, problem):
        """``run`` for callers that never differentiate through the iterations (the implicit and
        envelope gradient modes): the same iterations in one ``lax.while_loop`` that stops at
        ``tol`` or after ``iterations`` (``max_iterations``), with no second, differentiable pass.
        Run to a tolerance on a non-differentiated copy of the problem, it also counts the
        iterations that ``run`` needs."""
        threshold = self._threshold(problem.chi.dtype)
        pre = self.preconditioner.setup(problem)
        state, res0 = self.init(problem, pre)

        def cond(carry):
            _, res, k, _ = carry
            return (k < self.n_steps) & (res > threshold)

        def body(carry):
            state, _, k, pd = carry
            state, res, pd_k = self.step(problem, pre, state, k)
            return state, res, k + 1, pd & pd_k

        carry0 = (state, res0, jnp.asarray(0, jnp.int32), jnp.asarray(True))
        state, res, used, pd = lax.while_loop(cond, body, carry0)
        return state[0], Diagnostics(res, used, res <= self.tol, pd)

    def run(self, problem):
        """Charges and diagnostics. Fixed K: one scan of K steps. To tolerance: the iterations
        needed are counted first, then the differentiable scan runs with the shortest of a few
        static lengths (powers of two, then ``max_iterations``) that covers them, so unrolled
        gradients cost at most about twice the iterations actually used."""
        if self.iterations is not None:
            return self._scan(problem, int(self.iterations))
        lengths = [n for n in (2**j for j in range(3, 20)) if n < self.max_iterations] + [self.max_iterations]
        needed = self.run_forward(jax.tree_util.tree_map(lax.stop_gradient, problem))[1].iterations
        index = jnp.searchsorted(jnp.asarray(lengths), needed + 2)
        branches = [functools.partial(self._scan, length=n) for n in lengths]
        return lax.switch(jnp.minimum(index, len(lengths) - 1), branches, problem)


@dataclasses.dataclass(frozen=True)
class CG(_Iterative):
    """Preconditioned projected conjugate gradient (one H·p product per iteration)."""

    name: str = dataclasses.field(default="cg", init=False)

    def init(self, problem, pre):
        q = self.initial(problem)
        r = tangent(product(problem.hardness, q) + problem.chi, problem)
        z = self.precondition(pre, r, problem)
        return (q, r, -z, jnp.vdot(r, z)), relative_residual(r, problem)

    def step(self, problem, pre, state, k):
        q, r, p, rz = state
        hp = problem.hardness.matvec(p)
        php = jnp.vdot(p, hp)
        alpha = _safe_div(rz, php)
        q = q + alpha * p
        r = r + alpha * tangent(hp, problem)
        z = self.precondition(pre, r, problem)
        rz_new = jnp.vdot(r, z)
        p = -z + _safe_div(rz_new, rz) * p
        pd = (php > 0) | (rz <= 0)
        return (q, r, p, rz_new), relative_residual(r, problem), pd


def largest_eigenvalue(problem, precondition, start, iterations=20):
    """Estimate of the largest eigenvalue of the preconditioned hardness P_M H on the constraint
    plane. P_M H is self-adjoint in the H inner product, so the Rayleigh quotient
    ⟨v, P_M H v⟩_H / ⟨v, v⟩_H after power iterations from ``start`` is a lower bound that converges
    fast. Started from the solver's first search direction it is equivariant under permutations
    and covers every direction the iterations can take."""

    def body(v, _):
        hv = problem.hardness.matvec(v)
        v = v / jnp.sqrt(jnp.abs(jnp.vdot(v, hv)) + jnp.finfo(v.dtype).tiny)
        return precondition(tangent(problem.hardness.matvec(v), problem)), None

    v, _ = lax.scan(body, start, None, length=iterations)
    hv = problem.hardness.matvec(v)
    return _safe_div(jnp.vdot(hv, precondition(tangent(hv, problem))), jnp.vdot(v, hv))


@dataclasses.dataclass(frozen=True)
class GD(_Iterative):
    """Preconditioned projected gradient descent. ``steps`` None: exact line search (steepest
    descent). ``steps`` (K,) in (0, 2): step k is steps[k] / L̂, L̂ the estimated largest
    eigenvalue of the preconditioned hardness, so every step is non-expansive."""

    steps: jax.Array | None = None
    power_iterations: int = 20
    name: str = dataclasses.field(default="gd", init=False)

    def init(self, problem, pre):
        q = self.initial(problem)
        r = tangent(problem.hardness.matvec(q) + problem.chi, problem)
        if self.steps is None:
            scale = jnp.asarray(0.0, q.dtype)
        else:
            pc = functools.partial(self.precondition, pre, problem=problem)
            scale = _safe_div(1.0, largest_eigenvalue(problem, pc, pc(r), self.power_iterations))
        return (q, r, scale), relative_residual(r, problem)

    def step(self, problem, pre, state, k):
        q, r, scale = state
        z = self.precondition(pre, r, problem)
        hz = problem.hardness.matvec(z)
        zhz = jnp.vdot(z, hz)
        alpha = _safe_div(jnp.vdot(r, z), zhz) if self.steps is None else self.steps[k] * scale
        q = q - alpha * z
        r = r - alpha * tangent(hz, problem)
        return (q, r, scale), relative_residual(r, problem), (zhz > 0) | (jnp.vdot(z, z) == 0)


@dataclasses.dataclass(frozen=True)
class NAG(_Iterative):
    """Nesterov-accelerated projected gradient. Defaults: step 1/(1.1 L̂), momentum k/(k+3).
    ``steps`` (K,) in (0, 1] and ``momenta`` (K,) in [0, 1) replace them per iteration (step k is
    steps[k] / L̂). ``power_iterations`` H products per solve go into L̂."""

    steps: jax.Array | None = None
    momenta: jax.Array | None = None
    power_iterations: int = 20
    name: str = dataclasses.field(default="nag", init=False)

    def init(self, problem, pre):
        q = self.initial(problem)
        hq = problem.hardness.matvec(q)
        r = tangent(hq + problem.chi, problem)
        pc = functools.partial(self.precondition, pre, problem=problem)
        scale = _safe_div(1.0, largest_eigenvalue(problem, pc, pc(r), self.power_iterations))
        return (q, q, hq, hq, scale), relative_residual(r, problem)

    def step(self, problem, pre, state, k):
        q, q_prev, hq, hq_prev, scale = state
        beta = k / (k + 3.0) if self.momenta is None else self.momenta[k]
        step_size = scale / 1.1 if self.steps is None else self.steps[k] * scale
        y = q + beta * (q - q_prev)
        hy = hq + beta * (hq - hq_prev)
        z = self.precondition(pre, tangent(hy + problem.chi, problem), problem)
        q_new = y - step_size * z
        hq_new = hy - step_size * problem.hardness.matvec(z)
        residual = relative_residual(tangent(hq_new + problem.chi, problem), problem)
        return (q_new, q, hq_new, hq, scale), residual, scale > 0


@dataclasses.dataclass(frozen=True)
class Exact:
    """Dense Cholesky factorisation of H; the constraints through an (F, F) Schur complement. The
    solve counts as converged when its residual is at ``tol`` (at least ``min_tol`` of the dtype):
    an ill-conditioned H says so instead of passing for exact."""

    tol: float = 1e-10
    name: str = dataclasses.field(default="exact", init=False)
    needs_distances = False

    def run(self, problem):
        h = problem.hardness.dense()
        c = indicator(problem.fragments, problem.n_fragments, h.dtype)
        factor = jax.scipy.linalg.cho_factor(h, lower=True)
        s = jax.scipy.linalg.cho_solve(factor, -problem.chi)
        t = jax.scipy.linalg.cho_solve(factor, c)
        lam = jnp.linalg.solve(c.T @ t, problem.targets - c.T @ s)
        q = s + t @ lam
        res = relative_residual(tangent(problem.hardness.matvec(q) + problem.chi, problem), problem)
        pd = jnp.all(jnp.isfinite(factor[0]))
        one = jnp.asarray(1, jnp.int32)
        return q, Diagnostics(res, one, pd & (res <= max(self.tol, min_tol(h.dtype))), pd)


@dataclasses.dataclass(frozen=True)
class NoCharges:
    """No charges at all: q = 0, so the QEq energy vanishes and only the short-range energy is
    left. With a short-range network this is a purely local model (a second-generation HDNNP),
    the baseline a charge model is measured against; the charge constraints are not honoured."""

    tol: float = 0.0
    name: str = dataclasses.field(default="none", init=False)
    needs_distances = False

    def run(self, problem):
        zero = jnp.zeros((), problem.chi.dtype)
        true = jnp.asarray(True)
        return jnp.zeros_like(problem.chi), Diagnostics(zero, jnp.asarray(0, jnp.int32), true, true)


SOLVERS = {"exact": Exact, "cg": CG, "gd": GD, "nag": NAG, "none": NoCharges}


def get_solver(name, iterations=None, tol=1e-10, max_iterations=1000):
    """A solver by name (a solver object is returned as is). A learned solver comes from its
    file: ``learned.solver_from_file``."""
    if not isinstance(name, str):
        return name
    if name == "learned":
        raise QEqInputError("solver 'learned' is built from a solver file: qeq_unroll.learned.solver_from_file(path)")
    if name not in SOLVERS:
        raise QEqInputError(f"unknown solver '{name}' (valid: {', '.join(SOLVERS)}, learned)")
    if name == "exact":
        return Exact(tol=tol)
    if name == "none":
        return NoCharges()
    return SOLVERS[name](iterations=iterations, tol=tol, max_iterations=max_iterations)
