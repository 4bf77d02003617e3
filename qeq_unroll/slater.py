"""Coulomb integrals of spherical ns Slater densities (Rappé–Goddard QEq shielding).

Atom a carries the normalised density of an ns Slater orbital squared,

    ρ_a(r) = (2ζ_a)^(2n_a+1) / (4π (2n_a)!) · r^(2n_a−2) e^(−2ζ_a r),

with ζ_a = λ (2n_a + 1) / (2 R_a), λ = 0.4913 (Rappé & Goddard, J. Phys. Chem. 95, 3358 (1991)),
R_a the atom's radius (Å). The coupling of two atoms is the Coulomb integral
J_ab(R) = ∫∫ ρ_a(r₁) ρ_b(r₂) / |r₁ − r₂| (1/Å), exact up to quadrature rounding:

- the potential of ρ_a (β = 2ζ_a, m = 2n_a − 2) is V_a(s) = [1 − e^(−βs) P(βs)] / s with
  P(x) = Σ_{i=0}^{m+1} d_i x^i / i!, d_i = (m+2−i)(m+3−i) / (2(m+2));
  its antiderivative s V_a(s) integrates in closed form: F_a(s) = s − [(m+3)/2 − e^(−βs) P(βs)] / β;
- averaging V_a over a sphere of radius r around b (shell theorem) and integrating over ρ_b:
  J_ab(R) = c_b / (2R) ∫_0^∞ r^(m_b+1) e^(−β_b r) [F_a(R + r) − F_a(|R − r|)] dr,
  c_b = β_b^(m_b+3) / (m_b+2)!. The integrand is smooth on [0, R] and on [R, ∞) separately:
  Gauss–Legendre on the first, Gauss–Laguerre (weight e^(−β_b (r−R))) on the second.

J_ab(R) → 1/R at large R; it is finite at R = 0. Everything is vectorised over pairs with
traced principal quantum numbers (n ≤ 7), and differentiable in R, ζ_a, ζ_b.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

#: λ of ζ = λ (2n + 1) / (2R).
ZETA_LAMBDA = 0.4913
#: Highest principal quantum number supported.
MAX_N = 7
_DEGREE = 2 * MAX_N  # highest power in P is m + 1 = 2n − 1 <= 13

_LEGENDRE = np.polynomial.legendre.leggauss(64)
_LAGUERRE = np.polynomial.laguerre.laggauss(64)


def zeta(radius, n):
    """Slater exponent ζ = λ (2n + 1) / (2R) in 1/Å for radius R in Å."""
    return ZETA_LAMBDA * (2.0 * n + 1.0) / (2.0 * radius)


def _potential_antiderivative(s, beta, m):
    """F(s) = ∫_0^s t V(t) dt of the density with exponent β = 2ζ and power m (broadcasting)."""
    x = beta * s
    i = jnp.arange(_DEGREE, dtype=s.dtype)
    shape = (1,) * x.ndim
    i = i.reshape(shape + (-1,))
    mm = m[..., None]
    d = jnp.where(i <= mm + 1, (mm + 2 - i) * (mm + 3 - i) / (2 * (mm + 2)), 0.0)
    terms = d * jnp.exp(i * jnp.log(jnp.maximum(x[..., None], 1e-300)) - gammaln(i + 1.0))
    terms = jnp.where((i == 0) & (x[..., None] <= 0), d, terms)
    p = jnp.sum(terms, axis=-1)
    return s - ((m + 3) / 2 - jnp.exp(-x) * p) / beta


def coulomb_integral(r, zeta_a, n_a, zeta_b, n_b):
    """J_ab(r) in 1/Å for distances r (Å), exponents ζ (1/Å) and principal quantum numbers n
    (all broadcastable; n may be traced integers or floats). Multiply by k_e for eV."""
    dtype = jnp.result_type(r, zeta_a, zeta_b, 1.0)
    r = jnp.asarray(r, dtype)
    shape = jnp.broadcast_shapes(r.shape, jnp.shape(zeta_a), jnp.shape(zeta_b), jnp.shape(n_a), jnp.shape(n_b))
    r = jnp.broadcast_to(r, shape)
    beta_a = jnp.broadcast_to(2.0 * jnp.asarray(zeta_a, dtype), shape)
    beta_b = jnp.broadcast_to(2.0 * jnp.asarray(zeta_b, dtype), shape)
    m_a = jnp.broadcast_to(2.0 * jnp.asarray(n_a, dtype) - 2.0, shape)
    m_b = jnp.broadcast_to(2.0 * jnp.asarray(n_b, dtype) - 2.0, shape)
    power = m_b + 1.0
    log_cb = (m_b + 3.0) * jnp.log(beta_b) - gammaln(m_b + 3.0)

    def integrand(x, log_weight_shift):
        """r^(m_b+1) e^(−β_b r) c_b [F_a(R+r) − F_a(|R−r|)] with an exponential shift taken out."""
        diff = _potential_antiderivative(r[..., None] + x, beta_a[..., None], m_a[..., None]) - _potential_antiderivative(
            jnp.abs(r[..., None] - x), beta_a[..., None], m_a[..., None]
        )
        log_w = power[..., None] * jnp.log(jnp.maximum(x, 1e-300)) + log_cb[..., None] - log_weight_shift
        return jnp.exp(log_w) * diff

    # [0, R]: Gauss–Legendre, weight r^M e^(−β_b r) kept in the integrand
    nodes, weights = (jnp.asarray(a, dtype) for a in _LEGENDRE)
    half = 0.5 * r[..., None]
    x = half * (nodes + 1.0)
    inner = jnp.sum(weights * half * integrand(x, beta_b[..., None] * x), axis=-1)
    # [R, ∞): r = R + t / β_b, Gauss–Laguerre in t (weight e^(−t))
    t, w = (jnp.asarray(a, dtype) for a in _LAGUERRE)
    x = r[..., None] + t / beta_b[..., None]
    outer = jnp.sum(w * integrand(x, beta_b[..., None] * r[..., None]) / beta_b[..., None], axis=-1)
    return (inner + outer) / (2.0 * r)


def coulomb_integral_reference(r, zeta_a, n_a, zeta_b, n_b):
    """The same integral by adaptive quadrature of its Fourier representation (SciPy, host, slow):
    J(R) = (2/π) ∫_0^∞ ρ̂_a(k) ρ̂_b(k) sin(kR) / (kR) dk, ρ̂(k) = β^(m+3) Im[(β − ik)^−(m+2)] / (k (m+2)).
    For tests only."""
    from scipy.integrate import quad  # noqa: PLC0415

    def ft(k, zeta_, n):
        beta, m = 2 * zeta_, 2 * n - 2
        return beta ** (m + 3) * np.imag((beta - 1j * k) ** (-(m + 2))) / (k * (m + 2))

    def f(k):
        return ft(k, zeta_a, n_a) * ft(k, zeta_b, n_b) / (k * r)

    split = 20.0 / r
    head, _ = quad(lambda k: f(k) * math.sin(k * r), 1e-12, split, limit=400, epsabs=1e-14, epsrel=1e-12)
    tail, _ = quad(lambda k: f(k + split), 0.0, np.inf, weight="sin", wvar=r, limlst=400)
    # the tail integrates f(k + split) sin(k r); shift the phase back: sin((k+s) r) = ...
    tail_cos, _ = quad(lambda k: f(k + split), 0.0, np.inf, weight="cos", wvar=r, limlst=400)
    tail = tail * math.cos(split * r) + tail_cos * math.sin(split * r)
    return 2.0 / math.pi * (head + tail)
