"""The hardness operator H of the charge problem: dense, or matrix-free over a neighbour list,
plus optional low-rank (Ewald reciprocal space) and matrix-free (PME reciprocal space) parts.

H_ii = J_i + k_e S_i (kernel self term) + k_e Σ_{images n≠0} K_ii(|n|); H_ij = k_e Σ_n K_ij(|r_ij + n|)
(free space: n = 0 only); units eV/e². Padding rows are the identity with χ = 0, so padded charges
solve to exactly zero and decouple from the real atoms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .geometry import slot_sum


class Hardness(NamedTuple):
    """A hardness operator in eV/e².

    ``matrix`` (N, N): the dense part (dense layouts; None for lists). ``diagonal`` (N,): diag(H),
    every part included. List layout: ``values`` (M, N) couplings to ``neighbors`` (M, N)
    (slot-major, see ``neighbors.NeighborList``), ``base`` (N,) the diagonal without self-image
    couplings and ``occupied`` the leading slots that hold every non-zero value (``geometry.Pairs``).
    ``lowrank`` (N, P): adds U Uᵀ (Ewald reciprocal space). ``operator``: adds a symmetric matrix-free
    term with ``matvec(q)``, ``quadratic(q)`` and ``dense()`` (``pme.MeshOperator``)."""

    matrix: jax.Array | None
    diagonal: jax.Array
    values: jax.Array | None = None
    neighbors: jax.Array | None = None
    base: jax.Array | None = None
    lowrank: jax.Array | None = None
    operator: object = None
    occupied: jax.Array | None = None

    def matvec(self, q):
        """H q (eV/e for q in e)."""
        out = self._local_matvec(q)
        if self.operator is not None:
            out = out + self.operator.matvec(q)
        return out

    def quadratic(self, q):
        """½ qᵀ H q (eV for q in e); the matrix-free term's own ``quadratic`` keeps its derivative
        to one product."""
        out = 0.5 * jnp.vdot(q, self._local_matvec(q))
        if self.operator is not None:
            out = out + self.operator.quadratic(q)
        return out

    def _local_matvec(self, q):
        """H q without the matrix-free term."""
        if self.matrix is not None:
            out = self.matrix @ q
        else:
            out = self.base * q + symmetric_list_matvec(self.values, self.neighbors, q, self.occupied)
        if self.lowrank is not None:
            out = out + self.lowrank @ (self.lowrank.T @ q)
        return out

    def dense(self):
        """H as an (N, N) matrix (for dense factorisations; O(N²) memory)."""
        if self.matrix is not None:
            h = self.matrix
        else:
            n = self.base.shape[0]
            rows = jnp.broadcast_to(jnp.arange(n)[None, :], self.neighbors.shape)
            h = jnp.zeros((n, n), self.base.dtype).at[rows, self.neighbors].add(self.values)
            h = 0.5 * (h + h.T) + jnp.diag(self.base)  # symmetric in value, and in its cotangent
        if self.lowrank is not None:
            h = h + self.lowrank @ self.lowrank.T
        if self.operator is not None:
            h = h + self.operator.dense()
        return h


@jax.custom_vjp
def symmetric_list_matvec(values, neighbors, q, occupied=None):
    """y_i = Σ_m values_mi q_{neighbors_mi} for a *symmetric* slot-major neighbour list (every
    pair stored in both directions with equal values, as ``neighbors.NeighborList`` builds it),
    a loop of fused vector updates over the slots (``geometry.slot_sum``). Its transpose is
    itself, so the derivative with respect to q is one more gather (no scatter); the derivative
    with respect to the values is split evenly between a pair's two slots, ½(ȳ_i q_j + q_i ȳ_j),
    the derivative along symmetric changes of H (the only ones there are), which keeps the
    cotangents of a pair's two distances equal (see ``geometry.list_pairs``). ``occupied``: values
    are zero from that slot on, and the pass stops there."""
    return slot_sum(lambda m: values[m] * q[neighbors[m]], values.shape[0], stop=occupied)


def _matvec_fwd(values, neighbors, q, occupied):
    return symmetric_list_matvec(values, neighbors, q, occupied), (values, neighbors, q, occupied)


def _matvec_bwd(res, ybar):
    values, neighbors, q, occupied = res
    vbar = 0.5 * (ybar * q[neighbors] + q * ybar[neighbors])
    return vbar, None, symmetric_list_matvec(values, neighbors, ybar, occupied), None


symmetric_list_matvec.defvjp(_matvec_fwd, _matvec_bwd)


def dense_hardness(kernel, params, system, r, pair_mask, hardness, coulomb_constant) -> Hardness:
    """Dense H of a free-space ``system`` for ``kernel`` from its pair distances ``r`` (Å),
    ``pair_mask`` and the atoms' hardness J (N,) eV/e²."""
    s = system.species
    coupling = kernel.coupling(params, s[:, None], s[None, :], r)
    off = jnp.where(pair_mask, coulomb_constant * coupling, 0.0)
    diag = hardness + coulomb_constant * kernel.self_term(params, s)
    diag = jnp.where(system.mask, diag, 1.0)
    return Hardness(matrix=off + jnp.diag(diag), diagonal=diag)


def pair_hardness(kernel, params, system, pairs, hardness, coulomb_constant, coupling=None) -> Hardness:
    """H from a ``geometry.Pairs`` of any layout and the atoms' hardness J (N,) eV/e²: dense
    all-images (S, N, N) slabs are summed into one matrix whose diagonal holds the self-image
    couplings; a neighbour list stays matrix-free. ``coupling``: K(params, s_i, s_j, r) in 1/Å
    (default ``kernel.coupling``)."""
    coupling = kernel.coupling if coupling is None else coupling
    s = system.species
    si, sj = pairs.species(s)
    values = jnp.where(pairs.mask, coulomb_constant * coupling(params, si, sj, pairs.r), 0.0)
    base = hardness + coulomb_constant * kernel.self_term(params, s)
    base = jnp.where(system.mask, base, 1.0)
    if pairs.neighbors is None:
        off = values if values.ndim == 2 else jnp.sum(values, axis=0)
        matrix = off + jnp.diag(base)
        return Hardness(matrix=matrix, diagonal=jnp.diagonal(matrix))
    diagonal = base
    if pairs.self_images:  # an atom's own images within the cutoff: their couplings are on the diagonal
        atoms = jnp.arange(s.shape[0])
        diagonal = base + slot_sum(lambda m: jnp.where(pairs.neighbors[m] == atoms, values[m], 0.0), values.shape[0])
    return Hardness(
        matrix=None, diagonal=diagonal, values=values, neighbors=pairs.neighbors, base=base, occupied=pairs.occupied
    )


def add_lowrank(hardness: Hardness, factor) -> Hardness:
    """H + U Uᵀ for U = ``factor`` (N, P) (zero rows on padding)."""
    diag = hardness.diagonal + jnp.sum(factor * factor, axis=1)
    return hardness._replace(lowrank=factor, diagonal=diag)


def add_operator(hardness: Hardness, term) -> Hardness:
    """H + T for a symmetric matrix-free ``term`` with ``matvec``, ``dense`` and ``diagonal``."""
    return hardness._replace(operator=term, diagonal=hardness.diagonal + term.diagonal())


def electronegativity(chi, system):
    """The atoms' χ (N,) eV/e as the charge problem sees it: zero on padding; with an external
    field E (V/Å) the potential −E·r_i of the field adds −E·r_i (eV/e) to each atom's χ."""
    if system.field is not None:
        chi = chi - system.positions @ system.field
    return jnp.where(system.mask, chi, 0.0)
