"""Atom-centred symmetry functions: each atom's environment as a vector of numbers invariant under
translation, rotation and permutation of like atoms.

Behler–Parrinello functions (J. Behler, J. Chem. Phys. 134, 074106 (2011)), resolved by the
element of the neighbours, within a smooth cutoff r_c:

- cutoff    f_c(r) = ½ (cos(π r / r_c) + 1) for r < r_c, else 0 (value and slope vanish at r_c);
- radial    G2_i[e, a] = Σ_{j of element e} exp(−η_a (r_ij − r_a)²) f_c(r_ij);
- angular   G4_i[ef, b] = 2^(1−ζ_b) Σ_{j<k, elements {e, f}} (1 + λ_b cos θ_ijk)^ζ_b
            exp(−η_b (r_ij² + r_ik² + r_jk²)) f_c(r_ij) f_c(r_ik) f_c(r_jk).

Distances in Å, η in 1/Å². The functions read any pair layout of ``geometry.Pairs`` (free space,
lattice images, neighbour lists) through :func:`environment`, which gathers each atom's
neighbours within r_c into ``max_neighbors`` slots, nearest first. An atom with more neighbours
than slots cannot be described: ``environment`` counts them, and the caller reports it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError


class Environment(NamedTuple):
    """Each atom's neighbours within the cutoff, nearest first: vectors (N, M, 3) Å (x_j − x_i),
    r (N, M) Å (1 where empty), species (N, M), mask (N, M) True for a neighbour, count (N,) the
    number of neighbours within the cutoff (above M: the environment was cut)."""

    vectors: jax.Array
    r: jax.Array
    species: jax.Array
    mask: jax.Array
    count: jax.Array


def _candidates(pairs, species):
    """Per atom, every partner of the layout: (N, C) distances, mask, species and (N, C, 3) vectors."""
    r, mask, vec = pairs.r, pairs.mask, pairs.vectors
    n = species.shape[0]
    if pairs.neighbors is not None:  # (M, N) slot-major list
        return r.T, mask.T, species[pairs.neighbors].T, jnp.swapaxes(vec, 0, 1)
    if r.ndim == 2:  # free space (N, N)
        return r, mask, jnp.broadcast_to(species[None, :], (n, n)), vec
    s = r.shape[0]  # lattice images (S, N, N) -> (N, S·N)
    flat = lambda a: jnp.moveaxis(a, 0, 1).reshape((n, s * n) + a.shape[3:])  # noqa: E731
    return flat(r), flat(mask), jnp.broadcast_to(species[None, None, :], (n, s, n)).reshape(n, s * n), flat(vec)


def environment(pairs, species, cutoff: float, max_neighbors: int) -> Environment:
    """The neighbours of every atom within ``cutoff`` Å from ``pairs`` (a ``geometry.Pairs`` whose
    own cutoff is at least ``cutoff``), in ``max_neighbors`` slots."""
    if pairs.vectors is None:
        raise QEqInputError("environment descriptors need the pair vectors of the layout")
    if pairs.cutoff is not None and pairs.cutoff < cutoff * (1 - 1e-12):
        raise QEqInputError(
            f"the descriptors need every pair within {cutoff} Å, the neighbours hold those within {pairs.cutoff} Å: "
            "use a kernel cutoff at least as long as the descriptor cutoff"
        )
    r, mask, sp, vec = _candidates(pairs, species)
    within = mask & (r < cutoff)
    count = jnp.sum(within, axis=1)
    k = min(max_neighbors, r.shape[1])
    _, idx = jax.lax.top_k(jnp.where(within, -r, -jnp.inf), k)
    take = lambda a: jnp.take_along_axis(a, idx if a.ndim == 2 else idx[..., None], axis=1)  # noqa: E731
    within, sp, vec = take(within), take(sp), take(vec)
    if k < max_neighbors:
        pad = ((0, 0), (0, max_neighbors - k))
        within, sp = jnp.pad(within, pad), jnp.pad(sp, pad)
        vec = jnp.pad(vec, pad + ((0, 0),))
    # empty slots get a harmless unit vector, so no 0/0 reaches a gradient; the distances come
    # from the vectors, not from the layout's r, whose derivative on a neighbour list assumes a
    # use symmetric in i and j (each atom's descriptors are not)
    vec = jnp.where(within[..., None], vec, jnp.asarray([1.0, 0.0, 0.0], vec.dtype))
    return Environment(vec, jnp.sqrt(jnp.sum(vec * vec, axis=-1)), sp, within, count)


def cutoff_function(r, cutoff):
    """f_c(r) = ½ (cos(π r / r_c) + 1) below r_c, 0 beyond."""
    return jnp.where(r < cutoff, 0.5 * (jnp.cos(jnp.pi * r / cutoff) + 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class SymmetryFunctions:
    """Element-resolved G2 and G4 functions (static settings, hashable).

    n_elements: elements of the model; cutoff: r_c in Å; radial: ((η, r_s), ...) in 1/Å² and Å;
    angular: ((η, ζ, λ), ...) with λ = ±1; max_neighbors: slots per atom (neighbours within r_c)."""

    n_elements: int
    cutoff: float = 6.0
    radial: tuple = ()
    angular: tuple = ()
    max_neighbors: int = 48

    @property
    def n_pairs(self) -> int:
        return self.n_elements * (self.n_elements + 1) // 2

    @property
    def size(self) -> int:
        """Features per atom: elements × radial + element pairs × angular."""
        return self.n_elements * len(self.radial) + self.n_pairs * len(self.angular)

    def __call__(self, pairs, species):
        """``(G, count)``: (N, size) features of every atom and (N,) its neighbour count."""
        env = environment(pairs, species, self.cutoff, self.max_neighbors)
        onehot = jax.nn.one_hot(env.species, self.n_elements, dtype=env.r.dtype) * env.mask[..., None]
        fc = cutoff_function(env.r, self.cutoff) * env.mask
        parts = []
        if self.radial:
            parts.append(self._radial(env, fc, onehot))
        if self.angular:
            parts.append(self._angular(env, fc, onehot))
        return jnp.concatenate(parts, axis=1), env.count

    def _radial(self, env, fc, onehot):
        eta, shift = (jnp.asarray(c, env.r.dtype) for c in np.asarray(self.radial, dtype=float).T)
        g = jnp.exp(-eta * (env.r[..., None] - shift) ** 2) * fc[..., None]  # (N, M, A)
        return jnp.einsum("nma,nme->nea", g, onehot).reshape(env.r.shape[0], -1)

    def _angular(self, env, fc, onehot):
        v, r = env.vectors, env.r
        cos = jnp.einsum("njx,nkx->njk", v, v) / (r[:, :, None] * r[:, None, :])
        d = v[:, :, None, :] - v[:, None, :, :]
        m = v.shape[1]
        real = env.mask[:, :, None] & env.mask[:, None, :] & ~jnp.eye(m, dtype=bool)
        rjk = jnp.sqrt(jnp.where(real, jnp.sum(d * d, axis=-1), 1.0))
        f3 = fc[:, :, None] * fc[:, None, :] * cutoff_function(rjk, self.cutoff) * real
        r2 = r[:, :, None] ** 2 + r[:, None, :] ** 2 + rjk**2
        eta, zeta, lam = (jnp.asarray(c, r.dtype) for c in np.asarray(self.angular, dtype=float).T)
        base = jnp.maximum(1.0 + lam * cos[..., None], 0.0)
        g = 2.0 ** (1.0 - zeta) * base**zeta * jnp.exp(-eta * r2[..., None]) * f3[..., None]  # (N, M, M, B)
        full = jnp.einsum("njkb,nje,nkf->nefb", g, onehot, onehot)  # ordered pairs j ≠ k
        e, f = np.triu_indices(self.n_elements)
        # Σ_{j<k} over the unordered element pair {e, f}: half the ordered sum for e = f, and one
        # of the two equal ordered sums (e, f) and (f, e) otherwise
        weight = jnp.where(jnp.asarray(e == f), 0.5, 1.0).astype(r.dtype)
        return (full[:, e, f, :] * weight[None, :, None]).reshape(r.shape[0], -1)


def default_symmetry_functions(n_elements: int, cutoff: float = 6.0, n_radial: int = 8, max_neighbors: int = 48):
    """Radial Gaussians on an even grid of centres 0.8 Å .. r_c − 0.5 Å, each as wide as the
    spacing (η = 1/(2 Δ²)), and four angular functions (η = 0.005 1/Å², ζ ∈ {1, 4}, λ = ±1)."""
    centres = np.linspace(0.8, cutoff - 0.5, n_radial)
    eta = 1.0 / (2.0 * (centres[1] - centres[0]) ** 2)
    radial = tuple((float(eta), float(c)) for c in centres)
    angular = tuple((0.005, float(z), float(lam)) for z in (1.0, 4.0) for lam in (-1.0, 1.0))
    return SymmetryFunctions(n_elements, float(cutoff), radial, angular, int(max_neighbors))
