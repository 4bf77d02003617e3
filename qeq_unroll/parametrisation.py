"""Raw coordinates of the fittable parameters: what an optimiser updates, and the map back to
``Params`` that keeps the physics by construction.

J, σ, γ and the positive pair coefficients (A, ρ, a, r0, D) are fitted as logarithms, so they
stay positive at every step; the prefactor A of an exponential repulsion as the logarithm of the
repulsion at the pair's typical contact distance (which decouples it from ρ); χ and the
Buckingham C as they are. χ is only defined up to a common shift per charge constraint (a uniform
shift leaves neutral systems unchanged); with ``chi_gauge`` the mean χ of the trained elements is
held at its start value. The weights of a neural model (``networks``: ``params.networks["chi"]``
and ``["short"]``, see ``neural``) are raw coordinates as they are; their feature standardisation
is not trained. Units: χ eV/e, J eV/e², σ Å, γ 1/Å, pair coefficients as in ``params``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .dataset import Dataset
from .errors import QEqInputError
from .params import PAIR_FORMS, Params, pair_key

#: Groups of parameters that can be trained.
GROUPS = ("chi", "hardness", "sigma", "gamma", "pairs", "networks")
#: The trained networks of a neural model (``params.networks``), and the arrays of a solver trained
#: with it (``learned.TrainedSolver``) where it has one.
NETWORKS = ("chi", "short", "solver")
#: Element keys trained as logarithms (positive by construction).
LOG_ELEMENT_KEYS = ("hardness", "sigma", "gamma")
#: Pair coefficients trained as logarithms (positive by construction); A only when it starts > 0.
LOG_PAIR_KEYS = ("A", "rho", "a", "r0", "D")


@dataclasses.dataclass(frozen=True)
class Parametrisation:
    """Maps ``Params`` to the raw, unconstrained coordinates the optimiser updates and back.

    Static (hashable) part: groups: trained groups (subset of ``GROUPS``); elements: indices of
    the trained elements; chi_gauge: hold the mean χ of the trained elements at its start value;
    pair_coeffs: the trained pair coefficients as ``(pair_key, form, coeff, kind)`` with kind
    "log" (the raw value is the logarithm), "linear", or "log_at_ref" for the prefactor A of an
    exponential repulsion A e^(−r/ρ), whose raw value is log(A e^(−r_ref/ρ)), the logarithm of the
    repulsion at the pair's typical contact distance r_ref (Å). A and ρ are nearly degenerate over
    the narrow range of distances in the data; the energy at r_ref and ρ are not.

    The numbers the mapping needs (the start ``Params``, the χ mean, the r_ref) form the
    *anchor* (:meth:`anchor`), a pytree passed to compiled functions as data, so fits that differ
    only in those numbers share one compiled step.
    """

    groups: tuple[str, ...]
    elements: tuple[int, ...]
    chi_gauge: bool
    pair_coeffs: tuple[tuple[str, str, str, str], ...]

    def anchor(self, params: Params, pair_distances: Mapping[str, float] | None = None) -> dict:
        """``{"params", "chi_mean", "r_ref"}`` for start ``params`` and contact distances (Å)."""
        pair_distances = pair_distances or {}
        chi = np.asarray(params.chi)[list(self.elements)] if self.elements else np.zeros(1)
        dtype = jnp.asarray(params.chi).dtype
        r_ref = {
            _pair_name(k, f, c): jnp.asarray(float(pair_distances[k]), dtype)
            for k, f, c, kind in self.pair_coeffs
            if kind == "log_at_ref"
        }
        return {"params": params, "chi_mean": jnp.asarray(float(np.mean(chi)), dtype), "r_ref": r_ref}

    def raw(self, anchor: Mapping, offsets) -> dict:
        """Raw coordinates of the anchor's parameters, and the energy offsets (eV per element)."""
        params = anchor["params"]
        idx = np.asarray(self.elements, dtype=np.int32)
        raw = {"offsets": jnp.asarray(offsets)}
        if "chi" in self.groups:
            raw["chi"] = jnp.asarray(params.chi)[idx]
        for key in LOG_ELEMENT_KEYS:
            if key in self.groups:
                raw[key] = jnp.log(jnp.asarray(getattr(params, key))[idx])
        if self.pair_coeffs:
            out = {}
            for k, f, c, kind in self.pair_coeffs:
                name = _pair_name(k, f, c)
                v = jnp.asarray(params.pairs[k][f][c])
                if kind == "log":
                    v = jnp.log(v)
                elif kind == "log_at_ref":
                    v = jnp.log(v) - anchor["r_ref"][name] / params.pairs[k][f]["rho"]
                out[name] = v
            raw["pairs"] = out
        if "networks" in self.groups:
            raw["networks"] = {k: params.networks[k] for k in NETWORKS if k in params.networks}
        return raw

    def params(self, raw: Mapping, anchor: Mapping) -> Params:
        """The ``Params`` of raw coordinates ``raw``; untrained entries come from the anchor."""
        base = anchor["params"]
        idx = np.asarray(self.elements, dtype=np.int32)
        changes = {}
        if "chi" in raw:
            chi = raw["chi"]
            if self.chi_gauge:
                chi = chi - jnp.mean(chi) + anchor["chi_mean"]
            changes["chi"] = base.chi.at[idx].set(chi)
        for key in LOG_ELEMENT_KEYS:
            if key in raw:
                changes[key] = getattr(base, key).at[idx].set(jnp.exp(raw[key]))
        if "pairs" in raw:
            pairs = {k: {f: dict(c) for f, c in forms.items()} for k, forms in base.pairs.items()}
            for k, f, c, kind in self.pair_coeffs:
                v = raw["pairs"][_pair_name(k, f, c)]
                if kind != "log_at_ref":
                    pairs[k][f][c] = jnp.exp(v) if kind == "log" else v
            for k, f, c, kind in self.pair_coeffs:  # after rho is known
                if kind == "log_at_ref":
                    name = _pair_name(k, f, c)
                    pairs[k][f][c] = jnp.exp(raw["pairs"][name] + anchor["r_ref"][name] / pairs[k][f]["rho"])
            changes["pairs"] = pairs
        if "networks" in raw:
            changes["networks"] = dict(base.networks, **raw["networks"])
        return base.replace(**changes)

    def pull(self, raw: Mapping, raw0: Mapping):
        """Σ ((θ − θ₀)/s)² over the trained coordinates (offsets left out)."""
        return jnp.sum(self.pull_residuals(raw, raw0) ** 2)

    def pull_residuals(self, raw: Mapping, raw0: Mapping):
        """The terms (θ − θ₀)/s of :meth:`pull` as one vector."""
        out = []
        for key in ("chi",) + LOG_ELEMENT_KEYS:
            if key in raw:
                scale = 1.0 if key != "chi" else jnp.maximum(jnp.abs(raw0[key]), 1.0)
                out.append(jnp.ravel((raw[key] - raw0[key]) / scale))
        if "pairs" in raw:
            for k, f, c, kind in self.pair_coeffs:
                name = _pair_name(k, f, c)
                scale = 1.0 if kind != "linear" else jnp.maximum(jnp.abs(raw0["pairs"][name]), 1.0)
                out.append(jnp.ravel((raw["pairs"][name] - raw0["pairs"][name]) / scale))
        if "networks" in raw:
            out.append(ravel_pytree(jax.tree_util.tree_map(jnp.subtract, raw["networks"], raw0["networks"]))[0])
        return jnp.concatenate(out) if out else jnp.zeros(0, raw["offsets"].dtype)


def _pair_name(key, form, coeff):
    return f"{key}.{form}.{coeff}"


def pair_reference_distances(dataset: Dataset) -> dict:
    """For each element pair in the data, the median over structures of the shortest distance
    between two such atoms (Å): the typical contact distance of that pair."""
    shortest: dict[str, list[float]] = {}
    els = dataset.elements
    for c in dataset.configurations:
        d = np.linalg.norm(c.positions[:, None, :] - c.positions[None, :, :], axis=-1)
        np.fill_diagonal(d, np.inf)
        present = sorted(set(int(s) for s in c.species))
        for a in present:
            for b in present:
                if a > b:
                    continue
                sub = d[np.ix_(c.species == a, c.species == b)]
                if np.isfinite(sub).any():
                    shortest.setdefault(pair_key(els[a], els[b]), []).append(float(np.min(sub)))
    return {k: float(np.median(v)) for k, v in shortest.items()}


def make_parametrisation(
    params: Params,
    groups: Sequence[str],
    elements: Sequence[int],
    chi_gauge: bool,
    pair_distances: Mapping[str, float] | None = None,
) -> Parametrisation:
    """Check that ``params`` has what ``groups`` train for ``elements`` and build the mapping.
    pair_distances: typical contact distance per pair key (Å, e.g. from
    :func:`pair_reference_distances`); without one a prefactor A is trained as log A."""
    groups = tuple(dict.fromkeys(groups))
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise QEqInputError(f"unknown parameter group(s) {unknown} to train (valid: {', '.join(GROUPS)})")
    if not groups:
        raise QEqInputError("nothing to train: give at least one of " + ", ".join(GROUPS))
    elements = tuple(int(e) for e in elements)
    if "networks" in groups and not params.networks:
        raise QEqInputError(
            f"'networks' is to be trained but parameter set '{params.name}' has no networks: start from a neural "
            "model (qeq-unroll fit --model neural)"
        )
    element_keys = [g for g in groups if g not in ("pairs", "networks")]
    if element_keys:
        params.require(element_keys, elements)
    pair_distances = pair_distances or {}
    pair_coeffs = []
    if "pairs" in groups:
        names = {params.elements[e] for e in elements}
        for key in sorted(params.pairs):
            if not set(key.split("-")) <= names:
                continue  # a pair of elements absent from the data: nothing to learn
            for form in sorted(params.pairs[key]):
                for coeff in PAIR_FORMS[form]:
                    value = float(params.pairs[key][form][coeff])
                    kind = "log" if (coeff in LOG_PAIR_KEYS and value > 0) else "linear"
                    if coeff == "A" and kind == "log" and form in ("born_mayer", "buckingham") and pair_distances.get(key):
                        kind = "log_at_ref"
                    pair_coeffs.append((key, form, coeff, kind))
        if not pair_coeffs:
            raise QEqInputError(
                f"'pairs' is to be trained but parameter set '{params.name}' has no pair terms between "
                f"the elements of the data ({', '.join(sorted(names))}); add them to the start set"
            )
    return Parametrisation(groups, elements, bool(chi_gauge and "chi" in groups), tuple(pair_coeffs))
