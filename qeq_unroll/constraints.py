"""Linear charge constraints: every fragment's charges sum to its target (e).

Fragments are labels per atom (``-1`` = padding, in no fragment). These helpers project vectors
onto the constraint plane's tangent space, in a diagonal metric ``w`` (a Jacobi preconditioner)
or the Euclidean one (w = 1), and build feasible starting charges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def fragment_sums(v, fragments, n_fragments):
    """Σ_{i ∈ f} v_i for each fragment f; padding (label -1) is left out.

    Accurate to a few roundings of each sum, however many atoms a fragment has. A scatter-add
    accumulates in order, and a running sum of many same-sign terms loses about ε per term
    (float32: 5·10⁻⁴ of Σ_i χ_i/J_ii over 64000 atoms), which the projections hand on to the
    charges as a total-charge error of ~N ε |q| and a residual floor that CG cannot get below.
    So each v_i is split into a multiple of a power of two u, whose sums are exact (integers of
    at most the mantissa's bits while Σ|v|/u ≤ 2^(m−1), N ≤ 2^m: 1.7·10⁷ atoms in float32), and a
    rest of at most u/2, whose sum is small. The split is a constant under differentiation: the
    derivative is the plain sum."""
    ids = jnp.where(fragments >= 0, fragments, n_fragments)
    mantissa = jnp.finfo(v.dtype).nmant + 1
    _, exponent = jnp.frexp(lax.stop_gradient(jnp.sum(jnp.where(fragments >= 0, jnp.abs(v), 0.0))))
    u = jnp.ldexp(jnp.ones((), v.dtype), exponent - (mantissa - 1))
    coarse = lax.stop_gradient(jnp.round(v / u) * u)
    parts = jnp.stack([coarse, v - coarse], axis=-1)
    sums = jax.ops.segment_sum(parts, ids, num_segments=n_fragments + 1)[:n_fragments]
    return sums[:, 0] + sums[:, 1]


def _per_atom(values, fragments):
    """Spread per-fragment values back onto atoms (0 on padding)."""
    return jnp.where(fragments >= 0, values[jnp.maximum(fragments, 0)], 0.0)


def project(v, w, fragments, n_fragments):
    """w·v minus its component along w·1_f per fragment: the result sums to zero on every fragment.
    With w = diag(H)⁻¹ this is the Jacobi-preconditioned projected gradient; w = 1 gives the
    Euclidean projection. Zero on padding."""
    wv = w * v
    lam = fragment_sums(wv, fragments, n_fragments) / fragment_sums(w, fragments, n_fragments)
    return jnp.where(fragments >= 0, wv - w * _per_atom(lam, fragments), 0.0)


def fragment_means(v, fragments, n_fragments):
    """Mean of v over each fragment (the Lagrange multipliers of a stationary point)."""
    count = fragment_sums(jnp.ones_like(v), fragments, n_fragments)
    return fragment_sums(v, fragments, n_fragments) / count


def diagonal_start(chi, diagonal, fragments, targets):
    """The exact minimiser when H is replaced by its diagonal D: q_i = (μ_f − χ_i)/D_ii with μ_f set
    by the fragment sums. Depends on the current geometry only (never on earlier calls)."""
    n_f = targets.shape[0]
    w = jnp.where(fragments >= 0, 1.0 / diagonal, 0.0)
    share = w * _per_atom(targets / fragment_sums(w, fragments, n_f), fragments)
    return project(-chi, w, fragments, n_f) + share


def feasible(q, fragments, targets):
    """The point of the constraint plane nearest to ``q`` (Euclidean): each fragment's excess
    spread evenly over its atoms; 0 on padding."""
    n_f = targets.shape[0]
    excess = (fragment_sums(q, fragments, n_f) - targets) / fragment_sums(jnp.ones_like(q), fragments, n_f)
    return jnp.where(fragments >= 0, q - _per_atom(excess, fragments), 0.0)


def indicator(fragments, n_fragments, dtype):
    """The (N, F) 0/1 matrix C with Cᵀq = fragment sums of q."""
    return (fragments[:, None] == jnp.arange(n_fragments)[None, :]).astype(dtype)
