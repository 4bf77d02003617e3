"""Coulomb kernels K_ij(r): how two charge distributions couple (in units of the Coulomb constant).

H_ij = k_e K_ij(r_ij) off the diagonal; H_ii = J_i + k_e S_i with S_i the kernel's self term.
r in Å, K in 1/Å. Each kernel is a small frozen strategy object naming the parameter keys it needs.

- ``gaussian``: erf(r / (√2 γ_ij)) / r with γ_ij = √(σ_i² + σ_j²); self term 1 / (σ_i √π).
  Free space: all pairs. Periodic cells: Ewald summation (``ewald``), ``cutoff`` being its
  real-space cutoff (None: chosen from the widths) and ``accuracy`` its relative accuracy; its
  reciprocal part exact (``reciprocal="ewald"``), on a mesh (``"pme"``, ``pme``, B-spline order
  ``mesh_order``, ``mesh_spacing`` Å or None to pick it from the accuracy) or the cheaper of the
  two for the system (``"auto"``).
- ``reaxff``: Tap(r) / (r³ + (γ_i γ_j)^(-3/2))^(1/3), Tap the 7th-order taper of LAMMPS
  ``fix qeq/reaxff`` with lower radius 0 and upper radius ``cutoff``.
- ``point``: 1/r, optionally cut at ``cutoff``: multiplied by the same taper (``taper=True``) or
  truncated hard (``taper=False``, what LAMMPS ``fix qeq/point`` does).
- ``slater``: the exact Coulomb integral of ns Slater densities (Rappé–Goddard 1991, ``slater``),
  ζ = λ (2n + 1) / (2R); optionally tapered at ``cutoff`` (periodic cells).

Periodic cells: a cutoff kernel sums every image within its cutoff (an atom's own images
included, on the diagonal of H); it has no neutralising background, so the cell must be neutral.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from . import slater
from .errors import QEqInputError

#: Default cutoff of the reaxff kernel (Å), the usual ReaxFF/LAMMPS choice.
REAXFF_DEFAULT_CUTOFF = 10.0


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def taper(r, cutoff):
    """7th-order taper 20x⁷ − 70x⁶ + 84x⁵ − 35x⁴ + 1, x = r/cutoff; zero beyond the cutoff.
    Value and first three derivatives are 1, 0, 0, 0 at r = 0 and 0, 0, 0, 0 at the cutoff.
    Its derivative is written out, 140 x³ (x − 1)³ / cutoff: one fused expression (XLA's own
    derivative of the clipped polynomial costs several times the value on CPU)."""
    x = jnp.minimum(r / cutoff, 1.0)
    x4 = x**4
    return (((20.0 * x - 70.0) * x + 84.0) * x - 35.0) * x4 + 1.0


@taper.defjvp
def _taper_jvp(cutoff, primals, tangents):
    (r,), (r_dot,) = primals, tangents
    x = jnp.minimum(r / cutoff, 1.0)
    y = x * (x - 1.0)
    return taper(r, cutoff), (140.0 / cutoff) * (y * y * y) * r_dot


#: Initial guess of a^(−1/3) from the bits of a float32 a: bits(y) ≈ C − bits(a)/3, with C near
#: 4/3 · 127 · 2²³ (the exponent bias under the −1/3 power) and tuned so the guess is within 4 % of
#: the root for every normal float32 a.
_INVERSE_CUBE_ROOT_BITS = 0x54A2FA8C


@jax.custom_jvp
def shielding(r, g):
    """(r³ + g)^(−1/3) in 1/Å for r in Å and g in Å³ (the reaxff shielded 1/r), with its
    derivative written out: −s⁴ (r² ṙ + ġ/3). The inverse cube root runs as four Newton steps
    y ← y (4 − a y³)/3 in the input precision from a guess read off the float32 bits of a (error
    4 % → 3e-3 → 2e-5 → 1e-9 → rounding): a few multiplications, where XLA's float64 log, exp,
    pow and cbrt are scalar library calls on CPU. Valid for r³ + g within the normal float32
    range (1e-38 to 3e38 Å³, any physical distance)."""
    a = r * r * r + g
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)
    guess = jnp.int32(_INVERSE_CUBE_ROOT_BITS) - jax.lax.div(bits, jnp.int32(3))
    y = jax.lax.bitcast_convert_type(guess, jnp.float32).astype(a.dtype)
    for _ in range(4):
        y = y * (4.0 - a * (y * y * y)) * (1.0 / 3.0)
    return y


@shielding.defjvp
def _shielding_jvp(primals, tangents):
    (r, g), (r_dot, g_dot) = primals, tangents
    s = shielding(r, g)
    s2 = s * s
    return s, -(s2 * s2) * (r * r * r_dot + g_dot * (1.0 / 3.0))


#: Reciprocal-space methods of the periodic gaussian kernel.
RECIPROCAL = ("auto", "ewald", "pme")


def _check_cutoff(name, cutoff):
    if cutoff is not None and not (math.isfinite(cutoff) and cutoff > 0):
        raise QEqInputError(f"{name} kernel: cutoff must be a positive number of Å, got {cutoff}")


@dataclasses.dataclass(frozen=True)
class Gaussian:
    """Spherical Gaussian charge densities of width σ (4G-HDNNP / kQEq form). Free space: all
    pairs. Periodic: Ewald sum with real-space ``cutoff`` (Å; None: from the widths) and relative
    ``accuracy``; reciprocal space by ``reciprocal`` = "ewald" (exact k-sum), "pme" (particle-mesh
    Ewald of B-spline order ``mesh_order`` and spacing ``mesh_spacing`` Å, None: from the
    accuracy) or "auto" (whichever costs less for the system)."""

    cutoff: float | None = None
    name: str = "gaussian"
    required: tuple = ("chi", "hardness", "sigma")
    accuracy: float = 1e-8
    reciprocal: str = "auto"
    mesh_order: int = 6
    mesh_spacing: float | None = None
    ewald: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self):
        _check_cutoff(self.name, self.cutoff)
        if self.reciprocal not in RECIPROCAL:
            raise QEqInputError(
                f"gaussian kernel: unknown reciprocal-space method '{self.reciprocal}' (valid: {', '.join(RECIPROCAL)})"
            )

    def coupling(self, params, si, sj, r):
        s_i, s_j = params.sigma[si], params.sigma[sj]
        g = jnp.sqrt(s_i**2 + s_j**2)
        return erf(r / (math.sqrt(2.0) * g)) / r

    def self_term(self, params, s):
        return 1.0 / (params.sigma[s] * math.sqrt(math.pi))


@dataclasses.dataclass(frozen=True)
class ReaxFF:
    """Shielded Coulomb of ReaxFF / LAMMPS ``fix qeq/reaxff`` and ``fix qeq/shielded``."""

    cutoff: float = REAXFF_DEFAULT_CUTOFF
    name: str = "reaxff"
    required: tuple = ("chi", "hardness", "gamma")
    ewald: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_cutoff(self.name, self.cutoff)
        if self.cutoff is None:
            raise QEqInputError("reaxff kernel needs a cutoff (Å); the taper is defined by it")

    def coupling(self, params, si, sj, r):
        # (γ_i γ_j)^(-3/2) = γ_i^(-3/2) γ_j^(-3/2): powers per element, not per pair
        g = params.gamma**-1.5
        return taper(r, self.cutoff) * shielding(r, g[si] * g[sj])

    def self_term(self, params, s):
        return jnp.zeros(s.shape, params.hardness.dtype)


@dataclasses.dataclass(frozen=True)
class Point:
    """Bare point charges 1/r; with a ``cutoff`` tapered to zero there (``taper=True``) or cut
    hard (``taper=False``: zero beyond the cutoff, as LAMMPS ``fix qeq/point``)."""

    cutoff: float | None = None
    name: str = "point"
    required: tuple = ("chi", "hardness")
    taper: bool = True
    ewald: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_cutoff(self.name, self.cutoff)

    def coupling(self, params, si, sj, r):
        k = 1.0 / r
        if self.cutoff is None:
            return k
        if self.taper:
            return k * taper(r, self.cutoff)
        return jnp.where(r <= self.cutoff, k, 0.0)

    def self_term(self, params, s):
        return jnp.zeros(s.shape, params.hardness.dtype)


@dataclasses.dataclass(frozen=True)
class Slater:
    """Rappé–Goddard shielding: the exact Coulomb integral of the two atoms' ns Slater densities,
    ζ = λ (2n + 1) / (2R) with λ = 0.4913, R = ``radius`` (Å), n the principal quantum number
    (``slater``). No self term: H_ii = J_i, as in QEq. With a ``cutoff`` (periodic cells) the
    integral is multiplied by the 7th-order taper, like ``point``."""

    cutoff: float | None = None
    name: str = "slater"
    required: tuple = ("chi", "hardness", "radius", "n")
    ewald: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self):
        _check_cutoff(self.name, self.cutoff)

    def coupling(self, params, si, sj, r):
        n = jnp.asarray(params.n, dtype=r.dtype)
        z = slater.zeta(params.radius, n)
        k = slater.coulomb_integral(r, z[si], n[si], z[sj], n[sj])
        return k if self.cutoff is None else k * taper(r, self.cutoff)

    def self_term(self, params, s):
        return jnp.zeros(s.shape, params.hardness.dtype)


KERNELS = {"gaussian": Gaussian, "reaxff": ReaxFF, "point": Point, "slater": Slater}


def get_kernel(name, cutoff=None):
    """A kernel by name; ``cutoff`` None picks the kernel's default."""
    if not isinstance(name, str):
        return name
    if name not in KERNELS:
        raise QEqInputError(f"unknown kernel '{name}' (valid: {', '.join(KERNELS)})")
    cls = KERNELS[name]
    return cls() if cutoff is None else cls(cutoff=cutoff)
