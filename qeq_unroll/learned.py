"""Learned parts of an unrolled charge solver (``solver="learned"``).

Krylov optimality says K steps of CG are already the best K-step polynomial method for a given
start and preconditioner, so what is learned here is what CG takes as given, plus the step sizes
and momenta of the gradient families:

- a starting guess q0(R): the minimiser on the constraint plane of the model energy
  χᵀq + ½ qᵀM₁⁻¹q (M₁ the one-level preconditioner below) plus pairwise charge transfer
  Σ_j t_{ab}(r_ij), t_{ab} = −t_{ba} a radial expansion per element pair within ``cutoff`` (Å),
  projected onto the constraint tangent;
- a one-level preconditioner M₁ = D^(-1/2) [(E + B)(E + B)ᵀ + L_W] D^(-1/2), E a positive per-element
  diagonal and B a radial expansion per element pair within ``cutoff``, every row of B scaled
  below 0.9 of its diagonal (so E + B is strictly diagonally dominant, hence invertible), and
  L_W = Σ_{i<j} w_ij (e_i − e_j)(e_i − e_j)ᵀ the graph Laplacian of non-negative pair weights
  w_ij (a radial expansion with non-negative coefficients): positive semi-definite, it lengthens
  the steps along charge transfer between near atoms, the soft modes of a molecule. M₁ is SPD by
  construction;
- optionally a coarse level (``coarse_centres``: element symbols): every atom of those elements is
  the centre of an aggregate; the other atoms join the centres within ``cutoff`` with the smooth
  weights w_ic ∝ exp(−β_{s_i s_c} r_ic²) Tap(r_ic) (β learned per element pair, Σ_c w_ic ≈ 1),
  centres belong to themselves only. With P (N, N_c) these weights and A_c = Pᵀ H P (SPD: P has
  full column rank), the preconditioner becomes the balanced two-level one
  M = (I − Q H) M₁ (I − H Q) + σ Q, Q = P A_c⁻¹ Pᵀ, M₁ the one-level preconditioner above and
  σ > 0 learned (SPD for every SPD M₁; the coarse modes get the eigenvalue σ), and the start is
  corrected by the exact solve on the coarse space (charge constraints kept), then by one
  smoothing step ω M r along the preconditioned residual r = −(H q + χ) (ω > 0 learned; r costs no
  product with H, since H P is known), so the start also answers the field of far atoms. The coarse level
  takes the long-wavelength modes (charge moving between aggregates) that a short-range M₁
  cannot reach. Costs: setup N_c products with H (H P), a Cholesky of A_c; per iteration four
  products with P or H P and two triangular solves with A_c;
- per-iteration step sizes (GD: (0, 1.9)/L̂, NAG: (0, 1)/L̂) and momenta (NAG: (0, 1)), with L̂ the
  power-iteration estimate of the largest eigenvalue of the preconditioned hardness, so no step
  can expand the error.

Every part is a function of the current positions only (no history): the forces of an unrolled
learned solve are the exact derivative of its energy. All learned arrays are raw (unconstrained)
numbers; the maps above put them in their ranges. ``LearnedSolverParams`` is a pytree; its static
fields record what it was trained for (family, K, kernel, elements) and its coarse centres.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from .constraints import indicator
from .errors import QEqInputError
from .kernels import taper
from .params import write_atomic
from .solvers import CG, GD, NAG, tangent

FAMILIES = ("gd", "nag", "cg")
_ROW_BOUND = 0.9
_ARRAYS = ("start", "precond", "precond_diag", "transfer", "steps", "momenta", "coarse", "coarse_scale", "smoothing")
_OFF = -30.0  # softplus(_OFF) ≈ 1e-13: a Laplacian weight switched off


@dataclasses.dataclass(frozen=True)
class LearnedSolverParams:
    """start (E, E, B), precond (E, E, B): radial coefficients per element pair; precond_diag
    (E,): log of the diagonal factor; transfer (E, E, B): raw (softplus) coefficients of the
    Laplacian pair weights; steps, momenta (K,): raw per-iteration values; coarse
    (E, E): raw sharpness of the aggregate weights (β = softplus, 1/Å²) of an atom of element a
    joining a centre of element b; coarse_scale (): log of σ, the weight of the coarse part;
    smoothing (): raw step ω = softplus(smoothing) of the start's smoothing step (coarse level only);
    coarse_centres: element symbols whose atoms are centres (empty:
    no coarse level)."""

    start: jax.Array
    precond: jax.Array
    precond_diag: jax.Array
    transfer: jax.Array
    steps: jax.Array
    momenta: jax.Array
    coarse: jax.Array
    coarse_scale: jax.Array
    smoothing: jax.Array
    family: str = "cg"
    iterations: int = 4
    kernel: str = "gaussian"
    elements: tuple = ()
    cutoff: float = 4.0
    coarse_centres: tuple = ()

    @property
    def n_basis(self) -> int:
        return self.start.shape[-1]

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("family", "iterations", "kernel", "cutoff")}
        out["elements"] = list(self.elements)
        out["coarse_centres"] = list(self.coarse_centres)
        for k in _ARRAYS:
            out[k] = np.asarray(getattr(self, k), dtype=float).tolist()
        return out

    @classmethod
    def from_dict(cls, data) -> "LearnedSolverParams":
        e = len(data["elements"])
        nb = np.shape(data["start"])[-1]
        # files written before the Laplacian term and the coarse level
        data = {"coarse": np.zeros((e, e)), "coarse_scale": 0.0, "transfer": np.full((e, e, nb), _OFF), "smoothing": _OFF, **data}
        arrays = {k: jnp.asarray(np.asarray(data[k], dtype=float)) for k in _ARRAYS}
        return cls(
            family=str(data["family"]),
            iterations=int(data["iterations"]),
            kernel=str(data["kernel"]),
            elements=tuple(data["elements"]),
            cutoff=float(data["cutoff"]),
            coarse_centres=tuple(data.get("coarse_centres", ())),
            **arrays,
        )


jax.tree_util.register_dataclass(
    LearnedSolverParams,
    data_fields=list(_ARRAYS),
    meta_fields=["family", "iterations", "kernel", "elements", "cutoff", "coarse_centres"],
)


def init_learned(family, iterations, kernel, elements, cutoff=4.0, n_basis=4, dtype=None, coarse_centres=()):
    """Untrained parameters: no charge transfer, Jacobi preconditioner (Laplacian weights
    softplus(−6) ≈ 0.0025 per basis function), default steps/momenta,
    aggregate weights exp(−r²/Å²) (a coarse level only if ``coarse_centres`` names elements),
    smoothing step ω = ln 2."""
    if family not in FAMILIES:
        raise QEqInputError(f"unknown learned solver family '{family}' (valid: {', '.join(FAMILIES)})")
    unknown = [c for c in coarse_centres if c not in elements]
    if unknown:
        raise QEqInputError(f"coarse centres {unknown} are not elements of the parameter set {list(elements)}")
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
        transfer=jnp.full((e, e, n_basis), -6.0, dtype),
        steps=jnp.full((k,), step0, dtype),
        momenta=jnp.asarray(momenta0, dtype),
        coarse=jnp.full((e, e), float(np.log(np.expm1(1.0))), dtype),
        coarse_scale=jnp.zeros((), dtype),
        smoothing=jnp.zeros((), dtype),
        family=family,
        iterations=k,
        kernel=kernel,
        elements=tuple(elements),
        cutoff=float(cutoff),
        coarse_centres=tuple(coarse_centres),
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


class Coarse(NamedTuple):
    """The coarse level of one structure: aggregate weights ``p`` (N, N_c), ``hp`` = H P (eV/e²)
    and ``chol``, the lower Cholesky factor of A_c = Pᵀ H P (arrays only: a jit argument)."""

    p: jax.Array
    hp: jax.Array
    chol: jax.Array

    def solve(self, v):
        """A_c⁻¹ v."""
        return jax.scipy.linalg.cho_solve((self.chol, True), v)


def coarse_level(lp: LearnedSolverParams, problem):
    """The coarse level of ``problem`` (None without coarse centres). At most N/2 centres (N the
    padded size) are kept, the first ones in atom order (a fixed choice per structure, so P stays
    smooth in the positions); centres beyond that join the kept ones like other atoms."""
    if not lp.coarse_centres:
        return None
    s = problem.species
    n = s.shape[0]
    m = max(1, n // 2)
    real = problem.fragments >= 0
    is_centre = jnp.asarray([e in lp.coarse_centres for e in lp.elements])[s] & real
    idx = jnp.nonzero(is_centre, size=m, fill_value=0)[0]
    valid = jnp.arange(m) < jnp.sum(is_centre)
    own = (jnp.arange(n)[:, None] == idx[None, :]) & valid[None, :]
    kept = jnp.any(own, axis=1)
    r = problem.distances[:, idx]
    beta = jax.nn.softplus(lp.coarse)[s[:, None], s[idx][None, :]]
    near = problem.pair_mask[:, idx] & valid[None, :]
    f = jnp.where(near, jnp.exp(-beta * r * r) * taper(r, lp.cutoff), 0.0)
    soft = f / (jnp.sum(f, axis=1, keepdims=True) + 1e-9)
    p = jnp.where(kept[:, None], own.astype(f.dtype), jnp.where(real[:, None], soft, 0.0))
    hp = jax.vmap(problem.hardness.matvec, in_axes=1, out_axes=1)(p)
    a = p.T @ hp
    a = 0.5 * (a + a.T) + jnp.diag(jnp.where(valid, 0.0, 1.0))
    return Coarse(p, hp, jnp.linalg.cholesky(a))


@dataclasses.dataclass(frozen=True)
class LearnedStart:
    """q0 = the minimiser of the model χᵀq + ½ qᵀM₁⁻¹q on the constraint plane (M₁ the learned
    one-level preconditioner; with M₁ = D⁻¹ the diagonal-model start) + antisymmetric pairwise
    charge transfer, on the constraint plane;
    with a coarse level, then the exact minimiser of the energy over q0 + P y with every fragment
    sum kept (one H product and a few coarse solves), then one step ω z along the preconditioned
    residual z of that point (no further H product: H P y comes from the coarse level)."""

    params: LearnedSolverParams
    needs_distances = True

    def __call__(self, problem):
        fine = fine_level(self.params, problem)
        c = indicator(problem.fragments, problem.n_fragments, problem.chi.dtype)
        u = jax.vmap(fine, in_axes=1, out_axes=1)(c)
        lam = jnp.linalg.solve(c.T @ u, problem.targets + u.T @ problem.chi)
        q = jnp.where(problem.fragments >= 0, u @ lam - fine(problem.chi), 0.0)
        antisym = self.params.start - jnp.swapaxes(self.params.start, 0, 1)
        transfer = _pair_expansion(antisym, problem, self.params.cutoff)
        q = q + tangent(jnp.sum(transfer, axis=1), problem)
        coarse = coarse_level(self.params, problem)
        if coarse is None:
            return q
        cp = c.T @ coarse.p  # (F, N_c)
        gradient = problem.hardness.matvec(q) + problem.chi
        a = coarse.solve(-coarse.p.T @ gradient)
        b = coarse.solve(cp.T)
        s = cp @ b
        s = s + jnp.diag(jnp.where(jnp.diag(s) > 0, 0.0, 1.0))  # a fragment without aggregates
        y = a - b @ jnp.linalg.solve(s, cp @ a)
        residual = -(gradient + coarse.hp @ y)  # −(H q + χ) at q + P y, without a product with H
        pre = LearnedPreconditioner(self.params)
        smooth = jax.nn.softplus(self.params.smoothing) * pre.apply(pre.setup(problem), residual, problem)
        return q + coarse.p @ y + smooth


@dataclasses.dataclass(frozen=True)
class LearnedPreconditioner:
    """M = M₁ = D^(-1/2)[(E + B)(E + B)ᵀ + L_W]D^(-1/2), or with a coarse level the balanced
    two-level M = (I − Q H) M₁ (I − H Q) + σ Q, Q = P A_c⁻¹ Pᵀ; SPD by construction either way. Applied on
    the constraint plane as z = M r − u S⁻¹ uᵀ r with u = M C, S = Cᵀ M C."""

    params: LearnedSolverParams
    needs_distances = True

    def setup(self, problem):
        lp = self.params
        fine = fine_level(lp, problem)
        coarse = coarse_level(lp, problem)
        c = indicator(problem.fragments, problem.n_fragments, fine.g.dtype)
        sigma = jnp.exp(lp.coarse_scale)
        u = jax.vmap(lambda v: _apply_m(fine, coarse, sigma, v), in_axes=1, out_axes=1)(c)
        return fine, coarse, sigma, u, jnp.linalg.inv(c.T @ u)

    def apply(self, setup, residual, problem):
        fine, coarse, sigma, u, s_inv = setup
        z = _apply_m(fine, coarse, sigma, residual) - u @ (s_inv @ (u.T @ residual))
        return jnp.where(problem.fragments >= 0, z, 0.0)


class Fine(NamedTuple):
    """The one-level preconditioner M₁ = G Gᵀ + D^(-1/2) L_W D^(-1/2): ``g`` (N, N), the scaled
    Laplacian weights ``w`` (N, N) and their row sums ``degree`` (N,)."""

    g: jax.Array
    w: jax.Array
    degree: jax.Array

    def __call__(self, r):
        return self.g @ (self.g.T @ r) + self.degree * r - self.w @ r


def fine_level(lp: LearnedSolverParams, problem):
    """The one-level preconditioner ``Fine`` of ``problem``."""
    real = problem.fragments >= 0
    e = jnp.exp(lp.precond_diag)[problem.species]
    b = _pair_expansion(lp.precond, problem, lp.cutoff)
    row = jnp.sum(jnp.sqrt(b * b + 1e-30), axis=1)
    b = b * (_ROW_BOUND * e / (_ROW_BOUND * e + row))[:, None]
    inv_sqrt_d = jnp.where(real, 1.0 / jnp.sqrt(problem.hardness.diagonal), 0.0)
    g = inv_sqrt_d[:, None] * (jnp.diag(e) + b)
    sym = 0.5 * (lp.transfer + jnp.swapaxes(lp.transfer, 0, 1))
    w = _pair_expansion(jax.nn.softplus(sym), problem, lp.cutoff)
    w = inv_sqrt_d[:, None] * w * inv_sqrt_d[None, :]  # D^(-1/2) W D^(-1/2), diagonal 0
    return Fine(g, w, jnp.sum(w, axis=1))


def _apply_m(fine, coarse, sigma, r):
    """M r for the preconditioner of ``LearnedPreconditioner`` (no constraint)."""
    if coarse is None:
        return fine(r)
    y = coarse.solve(coarse.p.T @ r)
    v = fine(r - coarse.hp @ y)
    return v + coarse.p @ (sigma * y - coarse.solve(coarse.hp.T @ v))


def stepped_solver(family, raw_steps, raw_momenta, **common):
    """GD or NAG with learned per-iteration step sizes and momenta mapped from unbounded raw values
    (shape (K,)) into their stable ranges: GD steps in (0, 1.9)/L̂, NAG steps in (0, 1)/L̂ and
    momenta in (0, 1). ``common`` passes iterations, tol, start and preconditioner through."""
    if family == "gd":
        return GD(steps=1.9 * jax.nn.sigmoid(raw_steps), **common)
    return NAG(steps=jax.nn.sigmoid(raw_steps), momenta=jax.nn.sigmoid(raw_momenta), **common)


def learned_solver(lp: LearnedSolverParams, tol=0.0):
    """The solver object that runs ``lp``: K iterations of its family with the learned parts."""
    common = dict(iterations=lp.iterations, tol=tol, start=LearnedStart(lp), preconditioner=LearnedPreconditioner(lp))
    if lp.family == "cg":
        return CG(**common)
    return stepped_solver(lp.family, lp.steps, lp.momenta, **common)


#: The learned arrays of each kind of :class:`TrainedSolver`.
TRAINED_PARTS = {"steps": ("steps", "momenta"), "all": _ARRAYS}


@dataclasses.dataclass(frozen=True)
class TrainedSolver:
    """K iterations of a solver whose learned arrays are parameters of the model, trained with it
    (``qeq-unroll fit --model neural``): they live in ``params.networks["solver"]`` as the raw
    arrays of :class:`LearnedSolverParams`, and :meth:`bind` builds the solver of their current
    values inside the energy function, so gradients reach them.

    parts "steps": GD or NAG with the default start and preconditioner and learned per-iteration
    step sizes in (0, 1.9)/L̂ (GD) or (0, 1)/L̂ and momenta in (0, 1) (NAG); "all": the learned
    solver of this module (start, preconditioner and steps; free space only). Static and hashable:
    family, iterations, parts, kernel, elements, cutoff (Å, the learned pair expansions'), n_basis, tol."""

    family: str
    iterations: int
    parts: str = "steps"
    kernel: str = "gaussian"
    elements: tuple = ()
    cutoff: float = 4.0
    n_basis: int = 4
    tol: float = 0.0

    def __post_init__(self):
        if self.parts not in TRAINED_PARTS:
            raise QEqInputError(f"unknown trained-solver parts '{self.parts}' (valid: {', '.join(TRAINED_PARTS)})")
        if self.parts == "steps" and self.family not in ("gd", "nag"):
            raise QEqInputError(f"solver '{self.family}' has no step sizes to learn: train its steps with gd or nag, or all "
                                "its parts with --solver learned")  # fmt: skip
        init_learned(self.family, self.iterations, self.kernel, self.elements)  # checks family and K

    @property
    def name(self) -> str:
        return "learned" if self.parts == "all" else self.family

    @property
    def needs_distances(self) -> bool:
        return self.parts == "all"

    def init_arrays(self, dtype=None) -> dict:
        """The untrained raw arrays (the default steps and momenta; Jacobi start and preconditioner)."""
        lp = init_learned(self.family, self.iterations, self.kernel, self.elements, self.cutoff, self.n_basis, dtype)
        return {k: getattr(lp, k) for k in TRAINED_PARTS[self.parts]}

    def learned_params(self, arrays) -> LearnedSolverParams:
        """The :class:`LearnedSolverParams` of raw ``arrays`` (parts "all")."""
        static = dict(family=self.family, iterations=self.iterations, kernel=self.kernel, elements=tuple(self.elements),
                      cutoff=self.cutoff)  # fmt: skip
        return LearnedSolverParams(**{k: arrays[k] for k in _ARRAYS}, **static)

    def bind(self, params):
        """The solver of the arrays in ``params.networks["solver"]`` (traced: gradients reach them)."""
        arrays = params.networks.get("solver") if params.networks else None
        if arrays is None:
            raise QEqInputError("this trained solver reads its arrays from params.networks['solver'], which is missing")
        if self.parts == "all":
            return learned_solver(self.learned_params(arrays), tol=self.tol)
        return stepped_solver(self.family, arrays["steps"], arrays["momenta"], iterations=self.iterations, tol=self.tol)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["elements"] = list(self.elements)
        return out

    @classmethod
    def from_dict(cls, data, tol=0.0) -> "TrainedSolver":
        data = dict(data)
        data["elements"] = tuple(data.get("elements", ()))
        data["tol"] = tol
        return cls(**data)


def solver_from_file(solver_params, iterations=None, tol=0.0):
    """The solver of a solver file (path) or ``LearnedSolverParams``; it runs the K it was
    trained for (``iterations`` must be None or equal to it)."""
    if solver_params is None:
        raise QEqInputError("solver 'learned' needs solver_params: a solver file from 'qeq-unroll train-solver'")
    lp = solver_params if isinstance(solver_params, LearnedSolverParams) else load_learned(solver_params)
    if iterations is not None and int(iterations) != lp.iterations:
        raise QEqInputError(f"solver file was trained for K = {lp.iterations} iterations, not {iterations}")
    return learned_solver(lp, tol=tol)


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
