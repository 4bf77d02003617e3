"""Learned parts of an unrolled charge solver (``solver="learned"``).

Krylov optimality says K steps of CG are already the best K-step polynomial method for a given
start and preconditioner, so what is learned here is what CG takes as given, plus the step sizes
and momenta of the gradient families:

- a starting guess q0(R): the diagonal-model start plus pairwise charge transfer
  Σ_j t_{ab}(r_ij), t_{ab} = −t_{ba} a radial expansion per element pair within ``cutoff`` (Å),
  then projected back onto the charge constraints;
- a preconditioner M = G Gᵀ, G = D^(-1/2) (E + B), E a positive per-element diagonal and B a
  radial expansion per element pair within ``cutoff``. Every row of B is scaled below 0.9 of its
  diagonal, so G is strictly diagonally dominant, hence invertible, and M is SPD by construction;
- per-iteration step sizes (GD: (0, 1.9)/L̂, NAG: (0, 1)/L̂) and momenta (NAG: (0, 1)), with L̂ the
  power-iteration estimate of the largest eigenvalue of the preconditioned hardness, so no step
  can expand the error.

Every part is a function of the current positions only (no history): the forces of an unrolled
learned solve are the exact derivative of its energy. All learned arrays are raw (unconstrained)
numbers; the maps above put them in their ranges. ``LearnedSolverParams`` is a pytree; its static
fields record what it was trained for (family, K, kernel, elements).
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from .constraints import diagonal_start, indicator
from .errors import QEqInputError
from .kernels import taper
from .params import write_atomic
from .solvers import CG, GD, NAG, tangent

FAMILIES = ("gd", "nag", "cg")
_ROW_BOUND = 0.9


@dataclasses.dataclass(frozen=True)
class LearnedSolverParams:
    """start (E, E, B), precond (E, E, B): radial coefficients per element pair; precond_diag
    (E,): log of the diagonal factor; steps, momenta (K,): raw per-iteration values."""

    start: jax.Array
    precond: jax.Array
    precond_diag: jax.Array
    steps: jax.Array
    momenta: jax.Array
    family: str = "cg"
    iterations: int = 4
    kernel: str = "gaussian"
    elements: tuple = ()
    cutoff: float = 4.0

    @property
    def n_basis(self) -> int:
        return self.start.shape[-1]

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("family", "iterations", "kernel", "cutoff")}
        out["elements"] = list(self.elements)
        for k in ("start", "precond", "precond_diag", "steps", "momenta"):
            out[k] = np.asarray(getattr(self, k), dtype=float).tolist()
        return out

    @classmethod
    def from_dict(cls, data) -> "LearnedSolverParams":
        arrays = {k: jnp.asarray(np.asarray(data[k], dtype=float)) for k in ("start", "precond", "precond_diag", "steps", "momenta")}
        return cls(
            family=str(data["family"]),
            iterations=int(data["iterations"]),
            kernel=str(data["kernel"]),
            elements=tuple(data["elements"]),
            cutoff=float(data["cutoff"]),
            **arrays,
        )


jax.tree_util.register_dataclass(
    LearnedSolverParams,
    data_fields=["start", "precond", "precond_diag", "steps", "momenta"],
    meta_fields=["family", "iterations", "kernel", "elements", "cutoff"],
)


def init_learned(family, iterations, kernel, elements, cutoff=4.0, n_basis=4, dtype=None):
    """Untrained parameters: no charge transfer, Jacobi preconditioner, default steps/momenta."""
    if family not in FAMILIES:
        raise QEqInputError(f"unknown learned solver family '{family}' (valid: {', '.join(FAMILIES)})")
    if int(iterations) < 1:
        raise QEqInputError(f"a learned solver needs iterations >= 1, got {iterations}")
    dtype = dtype or jnp.asarray(0.0).dtype
    e, k = len(elements), int(iterations)
    logit = lambda p: float(np.log(p / (1.0 - p)))  # noqa: E731
    step0 = {"gd": logit(1.0 / 1.9), "nag": logit(1.0 / 1.1), "cg": 0.0}[family]
    momenta0 = [logit(j / (j + 3.0)) if j else -5.0 for j in range(k)]
    return LearnedSolverParams(
        start=jnp.zeros((e, e, n_basis), dtype),
        precond=jnp.zeros((e, e, n_basis), dtype),
        precond_diag=jnp.zeros((e,), dtype),
        steps=jnp.full((k,), step0, dtype),
        momenta=jnp.asarray(momenta0, dtype),
        family=family,
        iterations=k,
        kernel=kernel,
        elements=tuple(elements),
        cutoff=float(cutoff),
    )


def radial_basis(r, cutoff, n_basis):
    """Gaussians centred evenly on [1 Å, cutoff], times the 7th-order taper: (..., n_basis)."""
    centres = jnp.linspace(1.0, cutoff, n_basis)
    width = (cutoff - 1.0) / max(n_basis - 1, 1)
    return jnp.exp(-(((r[..., None] - centres) / width) ** 2)) * taper(r, cutoff)[..., None]


def _pair_expansion(table, problem, cutoff):
    """Σ_k table[s_i, s_j, k] φ_k(r_ij) on real pairs, zero elsewhere: (N, N)."""
    s = problem.species
    phi = radial_basis(problem.distances, cutoff, table.shape[-1])
    values = jnp.sum(table[s[:, None], s[None, :]] * phi, axis=-1)
    return jnp.where(problem.pair_mask, values, 0.0)


@dataclasses.dataclass(frozen=True)
class LearnedStart:
    """q0 = diagonal-model start + antisymmetric pairwise charge transfer, on the constraint plane."""

    params: LearnedSolverParams

    def __call__(self, problem):
        q = diagonal_start(problem.chi, problem.hardness.diagonal, problem.fragments, problem.targets)
        antisym = self.params.start - jnp.swapaxes(self.params.start, 0, 1)
        transfer = _pair_expansion(antisym, problem, self.params.cutoff)
        return q + tangent(jnp.sum(transfer, axis=1), problem)


@dataclasses.dataclass(frozen=True)
class LearnedPreconditioner:
    """M = G Gᵀ with G = D^(-1/2)(E + B), SPD by construction; applied on the constraint plane as
    z = M r − u S⁻¹ uᵀ r with u = M C, S = Cᵀ M C."""

    params: LearnedSolverParams

    def setup(self, problem):
        lp = self.params
        real = problem.fragments >= 0
        e = jnp.exp(lp.precond_diag)[problem.species]
        b = _pair_expansion(lp.precond, problem, lp.cutoff)
        row = jnp.sum(jnp.sqrt(b * b + 1e-30), axis=1)
        b = b * (_ROW_BOUND * e / (_ROW_BOUND * e + row))[:, None]
        inv_sqrt_d = jnp.where(real, 1.0 / jnp.sqrt(problem.hardness.diagonal), 0.0)
        g = inv_sqrt_d[:, None] * (jnp.diag(e) + b)
        c = indicator(problem.fragments, problem.n_fragments, g.dtype)
        u = g @ (g.T @ c)
        return g, u, jnp.linalg.inv(c.T @ u)

    def apply(self, setup, residual, problem):
        g, u, s_inv = setup
        z = g @ (g.T @ residual) - u @ (s_inv @ (u.T @ residual))
        return jnp.where(problem.fragments >= 0, z, 0.0)


def learned_solver(lp: LearnedSolverParams, tol=0.0):
    """The solver object that runs ``lp``: K iterations of its family with the learned parts."""
    common = dict(iterations=lp.iterations, tol=tol, start=LearnedStart(lp), preconditioner=LearnedPreconditioner(lp))
    if lp.family == "cg":
        return CG(**common)
    if lp.family == "gd":
        return GD(steps=1.9 * jax.nn.sigmoid(lp.steps), **common)
    return NAG(steps=jax.nn.sigmoid(lp.steps), momenta=jax.nn.sigmoid(lp.momenta), **common)


def save_learned(lp: LearnedSolverParams, path) -> None:
    """Write a solver file (JSON, atomically)."""
    write_atomic(path, json.dumps(lp.to_dict()) + "\n")


def load_learned(path) -> LearnedSolverParams:
    try:
        with open(path) as fh:
            return LearnedSolverParams.from_dict(json.load(fh))
    except (OSError, KeyError, ValueError) as exc:
        raise QEqInputError(f"cannot read solver file {path}: {exc}") from exc


def check_compatible(lp: LearnedSolverParams, kernel_name, elements, iterations=None, source="solver file"):
    """A learned solver only makes sense for what it was trained on: same kernel, same element
    table (species indices), same K. Raises ``QEqInputError`` naming the mismatch."""
    if lp.kernel != kernel_name:
        raise QEqInputError(f"{source} was trained for kernel '{lp.kernel}', not '{kernel_name}'")
    if tuple(lp.elements) != tuple(elements):
        raise QEqInputError(
            f"{source} was trained for elements {list(lp.elements)}, but the parameter set has {list(elements)}"
        )
    if iterations is not None and int(iterations) != lp.iterations:
        raise QEqInputError(f"{source} was trained for K = {lp.iterations} iterations, not {iterations}")
