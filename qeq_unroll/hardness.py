"""The hardness operator H of a free-space system (dense, all pairs).

H_ii = J_i + k_e S_i (kernel self term), H_ij = k_e K_ij(r_ij); units eV/e². Padding rows are the
identity with χ = 0, so padded charges solve to exactly zero and decouple from the real atoms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Hardness(NamedTuple):
    """A hardness operator: ``matrix`` (N, N) in eV/e² and its ``diagonal`` (N,)."""

    matrix: jax.Array
    diagonal: jax.Array

    def matvec(self, q):
        """H q (eV/e for q in e)."""
        return self.matrix @ q


def dense_hardness(kernel, params, system, r, pair_mask, coulomb_constant) -> Hardness:
    """Dense H of ``system`` for ``kernel`` from its pair distances ``r`` (Å) and ``pair_mask``."""
    s = system.species
    coupling = kernel.coupling(params, s[:, None], s[None, :], r)
    off = jnp.where(pair_mask, coulomb_constant * coupling, 0.0)
    diag = params.hardness[s] + coulomb_constant * kernel.self_term(params, s)
    diag = jnp.where(system.mask, diag, 1.0)
    return Hardness(matrix=off + jnp.diag(diag), diagonal=diag)


def electronegativity(params, system):
    """χ per atom (eV/e), zero on padding."""
    return jnp.where(system.mask, params.chi[system.species], 0.0)
