"""Ewald summation for Gaussian charges in a cell periodic in all three directions.

Atom i carries a spherical Gaussian density of width σ_i; two of them interact through
φ_ij(r) = erf(r / (√2 γ_ij)) / r, γ_ij² = σ_i² + σ_j², and one with itself through 1/(σ_i √π).
The periodic energy (k_e times, in eV for charges in e and lengths in Å) is defined in reciprocal
space, the only unambiguous definition for a charged cell (a uniform neutralising background
removes k = 0; the mean electrostatic potential is zero, "tin-foil" boundary conditions):

    E = (2π/V) Σ_{k≠0} |Σ_j q_j exp(i k·r_j − k² σ_j² / 2)|² / k²
      = ½ Σ_ij q_i q_j H^C_ij,     H^C_ij = (4π/V) Σ_{k≠0} cos(k·r_ij) exp(−k² γ_ij² / 2) / k².

Splitting exp(−k²γ²/2)/k² = exp(−k²/4α²)/k² + [exp(−k²γ²/2) − exp(−k²/4α²)]/k² and summing the
second, short-ranged part in real space (Poisson; its k = 0 value (4π/V)(1/4α² − γ²/2) is what
the k ≠ 0 sum leaves out) gives, for any splitting parameter α (1/Å),

    H^C_ij = Σ_n [erfc(α |r_ij + n|) − erfc(|r_ij + n| / (√2 γ_ij))] / |r_ij + n|       real space
           + (4π/V) Σ_{k≠0} cos(k·r_ij) exp(−k²/4α²) / k²                           reciprocal space
           − π / (V α²) + 2π γ_ij² / V                                              background
    H^C_ii gets the n = 0 term as its limit: 1/(σ_i √π) − 2α/√π                     self terms.

With the total charge Q = Σ q fixed, the background part adds −π Q²/(2Vα²) to the energy and
2π Q σ_i² / V to χ_i (times k_e): zero for a neutral cell. H^C is positive semi-definite, so
H = diag(J) + k_e H^C is positive definite for J > 0.

Accuracy ε (``accuracy``): α = √(−ln ε) / r_c for the real-space cutoff r_c, reciprocal vectors
up to |k| = 2 α √(−ln ε): both truncations are then of relative size ε (Kolafa–Perram style). The
Gaussian part of the real-space term needs r_c ≥ 2 σ_max √(−ln ε); a shorter cutoff, an ε out of
(1e-15, 0.1], or more than ``max_kvectors`` reciprocal vectors is an error naming the problem.

Point charges are the limit σ → 0 (the ``madelung`` helper uses it).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erfc

from .errors import QEqInputError
from .hardness import add_lowrank
from .periodic import volume

#: Default relative accuracy of Ewald sums.
DEFAULT_ACCURACY = 1e-8
#: Most reciprocal vectors (half space) allowed by default.
MAX_KVECTORS = 200_000
#: Smallest real-space cutoff chosen automatically (Å).
MIN_REAL_CUTOFF = 8.0


@dataclasses.dataclass(frozen=True)
class Reciprocal:
    """Reciprocal-space plan of an Ewald sum: ``miller`` (K, 3) integer-valued indices of the
    half space of reciprocal vectors k = 2π m A⁻ᵀ; static ``alpha`` (1/Å), ``real_cutoff`` (Å),
    ``accuracy``."""

    miller: jax.Array
    alpha: float = 0.0
    real_cutoff: float = 0.0
    accuracy: float = DEFAULT_ACCURACY

    def add_to(self, hardness, positions, cell, mask, coulomb_constant):
        """``hardness`` plus the reciprocal part of H, kept low-rank (``reciprocal_factor``)."""
        return add_lowrank(hardness, reciprocal_factor(positions, cell, self, mask, coulomb_constant))

    def energy(self, charges, positions, cell, coulomb_constant):
        """Reciprocal-space energy (eV) of fixed charges (e), the exact k-sum."""
        u = reciprocal_factor(positions, cell, self, jnp.ones(positions.shape[0], bool), coulomb_constant)
        return 0.5 * jnp.sum((u.T @ charges) ** 2)


jax.tree_util.register_dataclass(Reciprocal, data_fields=["miller"], meta_fields=["alpha", "real_cutoff", "accuracy"])


def log_accuracy(accuracy) -> float:
    """√(−ln ε), checking that ε can be reached in float64."""
    if not (isinstance(accuracy, (int, float)) and 1e-15 <= accuracy <= 0.1):
        raise QEqInputError(
            f"Ewald accuracy {accuracy} cannot be reached: it must lie in [1e-15, 0.1] (relative; "
            "float64 rounding limits it below)"
        )
    return math.sqrt(-math.log(accuracy))


def required_real_cutoff(sigma_max, accuracy) -> float:
    """Shortest real-space cutoff (Å) at which the Gaussian term erfc(r/(√2 γ)) is below ε for
    widths up to ``sigma_max`` Å (γ ≤ √2 σ_max)."""
    return 2.0 * sigma_max * log_accuracy(accuracy)


def default_real_cutoff(sigma_max, accuracy) -> float:
    return max(MIN_REAL_CUTOFF, 1.01 * required_real_cutoff(sigma_max, accuracy))


def splitting(pbc, accuracy=DEFAULT_ACCURACY, real_cutoff=None, sigma_max=None):
    """``(alpha, real_cutoff)``: the splitting parameter α (1/Å) and the real-space cutoff (Å) for
    ``accuracy`` (host; ``real_cutoff`` None: the default for ``sigma_max`` Å). Raises
    ``QEqInputError`` when the cell is not periodic in 3D or the accuracy is out of reach."""
    if not all(pbc):
        raise QEqInputError(
            "the gaussian kernel sums periodic cells by Ewald, which needs all three directions "
            f"periodic (pbc = {list(pbc)}); use a cutoff kernel (reaxff, point, slater) for slabs and wires"
        )
    root = log_accuracy(accuracy)
    if real_cutoff is None:
        real_cutoff = default_real_cutoff(0.0 if sigma_max is None else sigma_max, accuracy)
    if not (math.isfinite(real_cutoff) and real_cutoff > 0):
        raise QEqInputError(f"Ewald real-space cutoff must be a positive number of Å, got {real_cutoff}")
    if sigma_max is not None and real_cutoff < required_real_cutoff(sigma_max, accuracy):
        raise QEqInputError(
            f"Ewald accuracy {accuracy:g} cannot be reached with a real-space cutoff of {real_cutoff} Å for "
            f"Gaussian widths up to σ = {sigma_max:.4g} Å: it needs a cutoff of at least "
            f"{required_real_cutoff(sigma_max, accuracy):.4g} Å (or a looser accuracy)"
        )
    return root / real_cutoff, float(real_cutoff)


def plan(cell, pbc, accuracy=DEFAULT_ACCURACY, real_cutoff=None, sigma_max=None, max_kvectors=MAX_KVECTORS, strain=0.0):
    """The :class:`Reciprocal` plan for ``cell`` (host). ``real_cutoff`` None: the default for
    ``sigma_max`` (Å). ``strain``: the plan also serves every cell ``cell (1 + ε)`` with
    ‖ε‖₂ ≤ ``strain`` (its Miller indices cover the k-cutoff sphere of each: |k| changes by at most
    a factor 1 + ‖ε‖₂), so a relaxing cell keeps it. Raises ``QEqInputError`` when the accuracy is
    out of reach."""
    alpha, real_cutoff = splitting(pbc, accuracy, real_cutoff, sigma_max)
    kcut = 2.0 * alpha * log_accuracy(accuracy) * (1.0 + strain)
    cell = np.asarray(cell, dtype=np.float64)
    recip = np.linalg.inv(cell).T  # rows b_k with a_i·b_j = δ_ij
    mmax = [int(math.floor(kcut * (1 + 1e-3) * np.linalg.norm(cell[k]) / (2 * math.pi))) for k in range(3)]
    estimate = (2 * mmax[0] + 1) * (2 * mmax[1] + 1) * (2 * mmax[2] + 1)
    if estimate > 40 * max_kvectors:
        raise QEqInputError(
            f"Ewald accuracy {accuracy:g} cannot be reached: this cell needs about {estimate // 2} reciprocal "
            f"vectors (limit {max_kvectors}); use a looser accuracy or a longer real-space cutoff"
        )
    grid = np.stack(np.meshgrid(*[np.arange(-m, m + 1) for m in mmax], indexing="ij"), -1).reshape(-1, 3)
    # half space: first non-zero index positive
    first = np.where(grid[:, 0] != 0, grid[:, 0], np.where(grid[:, 1] != 0, grid[:, 1], grid[:, 2]))
    grid = grid[first > 0]
    k = 2 * math.pi * grid @ recip
    grid = grid[np.linalg.norm(k, axis=1) <= kcut * (1 + 1e-3)]
    if len(grid) > max_kvectors:
        raise QEqInputError(
            f"Ewald accuracy {accuracy:g} cannot be reached: this cell needs {len(grid)} reciprocal vectors "
            f"(limit {max_kvectors}); use a looser accuracy or a longer real-space cutoff"
        )
    # device_put, not jnp.asarray: the latter compiles a staging program for every new length (a
    # cell relaxation makes one per step)
    return Reciprocal(jax.device_put(grid.astype(np.float64)), float(alpha), float(real_cutoff), float(accuracy))


def kvectors(cell, miller):
    """k = 2π m A⁻ᵀ (K, 3) in 1/Å for the current cell."""
    return 2.0 * math.pi * miller.astype(cell.dtype) @ jnp.linalg.inv(cell).T


def real_coupling(alpha):
    """The real-space pair function [erfc(α r) − erfc(r/(√2 γ_ij))]/r (1/Å) as a kernel coupling."""

    def coupling(params, si, sj, r):
        g = jnp.sqrt(params.sigma[si] ** 2 + params.sigma[sj] ** 2)
        return (erfc(alpha * r) - erfc(r / (math.sqrt(2.0) * g))) / r

    return coupling


def self_term(alpha):
    """Ewald self correction −2α/√π (1/Å), added to each atom's Gaussian self term."""
    return -2.0 * alpha / math.sqrt(math.pi)


def reciprocal_factor(positions, cell, reciprocal, mask, coulomb_constant):
    """U (N, 2K) with U Uᵀ = k_e (4π/V) Σ_{k≠0} cos(k·r_ij) exp(−k²/4α²)/k² (eV/e²), zero rows on
    padding atoms and zero columns for the Miller index (0, 0, 0): the reciprocal part of H, kept
    low-rank (matrix-free, O(N K))."""
    k = kvectors(cell, reciprocal.miller)
    k2 = jnp.sum(k * k, axis=1)
    used = k2 > 0  # Miller index (0, 0, 0) pads a plan to a common length (neighbors.stackable)
    k2 = jnp.where(used, k2, 1.0)
    weight = 2.0 * 4.0 * math.pi * coulomb_constant / volume(cell) * jnp.exp(-k2 / (4 * reciprocal.alpha**2)) / k2
    phase = positions @ k.T
    scale = jnp.where(used, jnp.sqrt(weight), 0.0)[None, :]
    factor = jnp.concatenate([jnp.cos(phase) * scale, jnp.sin(phase) * scale], axis=1)
    return jnp.where(mask[:, None], factor, 0.0)


def background(params, system, reciprocal, coulomb_constant):
    """``(dchi, energy)``: the neutralising-background terms for the total charge Q = Σ targets:
    2π k_e Q σ_i² / V added to χ_i (eV/e), and −π k_e Q² / (2 V α²) (eV)."""
    vol = volume(system.cell)
    total = jnp.sum(system.fragment_charges)
    dchi = 2.0 * math.pi * coulomb_constant * total * params.sigma[system.species] ** 2 / vol
    energy = -math.pi * coulomb_constant * total**2 / (2.0 * vol * reciprocal.alpha**2)
    return jnp.where(system.mask, dchi, 0.0), energy


def madelung_energy(charges, positions, cell, reciprocal, shifts, coulomb_constant=1.0):
    """Electrostatic energy (eV with k_e in eV·Å) of fixed *point* charges (e) in a periodic cell by
    the same Ewald pieces in the limit σ → 0: real space over the lattice translations ``shifts``
    (S, 3) within ``reciprocal.real_cutoff``, reciprocal space (exact for a :class:`Reciprocal`,
    particle-mesh for a ``pme.Mesh``), self and background terms."""
    alpha = reciprocal.alpha
    n = positions.shape[0]
    t = shifts @ cell
    d = positions[None, None, :, :] - positions[None, :, None, :] + t[:, None, None, :]
    not_self = ~(jnp.eye(n, dtype=bool)[None] & (jnp.arange(shifts.shape[0]) == 0)[:, None, None])
    r = jnp.sqrt(jnp.where(not_self, jnp.sum(d * d, axis=-1), 1.0))
    inside = not_self & (r < reciprocal.real_cutoff)
    real = 0.5 * jnp.sum(jnp.where(inside, charges[None, :, None] * charges[None, None, :] * erfc(alpha * r) / r, 0.0))
    recip = reciprocal.energy(charges, positions, cell, 1.0)
    own = self_term(alpha) * 0.5 * jnp.sum(charges**2)
    bg = -math.pi * jnp.sum(charges) ** 2 / (2.0 * volume(cell) * alpha**2)
    return coulomb_constant * (real + recip + own + bg)
