"""Short-range pair energies from ``Params.pairs`` (eV, r in Å).

Forms: ``born_mayer`` A e^(−r/ρ); ``buckingham`` A e^(−r/ρ) − C/r⁶; ``morse``
D[(1 − e^(−a(r − r0)))² − 1] (zero at infinity, −D at r0). Element-pair coefficients are laid out
as (n_elements, n_elements) tables once, so the whole sum is one vectorised pass per form.
"""

from __future__ import annotations

import jax.numpy as jnp


def _table(params, form, coeff, fill):
    n = len(params.elements)
    index = {e: i for i, e in enumerate(params.elements)}
    table = jnp.full((n, n), fill, dtype=params.chi.dtype)
    for key, forms in params.pairs.items():
        if form in forms:
            a, b = (index[e] for e in key.split("-"))
            v = forms[form][coeff]
            table = table.at[a, b].set(v).at[b, a].set(v)
    return table


def _uses(params, form):
    return any(form in forms for forms in params.pairs.values())


def pair_energy(params, species, r, pair_mask, neighbors=None):
    """Total short-range energy (eV) over the real pairs i < j: half the sum over the directed
    pairs of ``r`` (Å), which is (N, N), (S, N, N) (periodic images) or, with ``neighbors``
    (M, N) partner indices, a slot-major neighbour list. In periodic cells the pairs are those
    within the kernel's cutoff (the short-range terms are truncated there). Zero, with no pass
    over the pairs, when ``params`` has no pair terms."""
    if not any(_uses(params, form) for form in ("born_mayer", "buckingham", "morse")):
        return jnp.zeros((), r.dtype)
    si, sj = (species[:, None], species[None, :]) if neighbors is None else (species[None, :], species[neighbors])
    e = jnp.zeros_like(r)
    for form in ("born_mayer", "buckingham"):
        if _uses(params, form):
            A = _table(params, form, "A", 0.0)[si, sj]
            rho = _table(params, form, "rho", 1.0)[si, sj]
            e = e + A * jnp.exp(-r / rho)
            if form == "buckingham":
                e = e - _table(params, form, "C", 0.0)[si, sj] / r**6
    if _uses(params, "morse"):
        D = _table(params, "morse", "D", 0.0)[si, sj]
        a = _table(params, "morse", "a", 1.0)[si, sj]
        r0 = _table(params, "morse", "r0", 1.0)[si, sj]
        x = 1.0 - jnp.exp(-a * (r - r0))
        e = e + D * (x * x - 1.0)
    return 0.5 * jnp.sum(jnp.where(pair_mask, e, 0.0))
