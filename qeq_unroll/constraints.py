"""Linear charge constraints: every fragment's charges sum to its target (e).

Fragments are labels per atom (``-1`` = padding, in no fragment). These helpers project vectors
onto the constraint plane's tangent space, in a diagonal metric ``w`` (a Jacobi preconditioner)
or the Euclidean one (w = 1), and build feasible starting charges.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


#: integer levels of ``fragment_sums`` below float64, each taking the next 30 bits of every term
#: exactly (two keep a sum of 4·10⁶ alike float32 terms within one rounding; one level drifts by
#: 35-190 ε there). float64 adds plainly: its drift, N ε₆₄ of the sum (5·10⁻¹¹ e per atom at 10⁶
#: atoms), is below anything observable, and the levels cost compile time (+30-65 % for a small
#: system's energy and forces).
SUM_LEVELS = 2


def fragment_sums(v, fragments, n_fragments):
    """Σ_{i ∈ f} v_i for each fragment f; padding (label -1) is left out.

    Below float64, accurate to a few roundings of each sum, however many atoms a fragment has
    and in whatever order a device adds them. A floating-point scatter-add accumulates term by
    term, and a running sum of many alike terms (every Na of a crystal alike) drifts by about ε
    per term: in float32, 10⁻³ of Σ_i χ_i/J_ii over 64000 atoms, which the projections hand on
    to the charges as a total-charge error (9 e there). So each term is split, ``SUM_LEVELS``
    times, into an integer multiple k·u of a power of two u, with Σ|v|/u = 2³⁰, and the rest.
    The k add up exactly in int32 (wrapping in between is harmless while |Σk| < 2³¹), and each
    level's rest is 2⁻³⁰·N of the last, so the last rest's float sum is tiny. The splits are
    constants under differentiation: the derivative is the plain sum."""
    ids = jnp.where(fragments >= 0, fragments, n_fragments)
    rest = jnp.where(fragments >= 0, v, 0.0)

    def segments(x):
        return jax.ops.segment_sum(x, ids, num_segments=n_fragments + 1)[:n_fragments]

    exact = jnp.zeros((n_fragments,), v.dtype)
    for _ in range(SUM_LEVELS if jnp.finfo(v.dtype).bits < 64 else 0):
        _, exponent = jnp.frexp(lax.stop_gradient(jnp.sum(jnp.abs(rest))))
        u = jnp.ldexp(jnp.ones((), v.dtype), exponent - 30)
        k = lax.stop_gradient(jnp.round(rest / u)).astype(jnp.int32)
        exact = exact + segments(k).astype(v.dtype) * u
        rest = rest - lax.stop_gradient(k.astype(v.dtype) * u)  # exact: |rest − k u| ≤ u/2
    return exact + segments(rest)


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
