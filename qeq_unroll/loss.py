"""Predictions of the model for a batch of structures and the error sums, losses and metrics
of a fit. Units: energies eV (metrics: meV/atom), forces eV/Å, charges e, dipoles e·Å, stress
eV/Å³ in the loss (Voigt components) and GPa in the metrics.

Predictions come from ``energy_and_forces(model)`` (free space) or ``energy_forces_stress(model)``
(periodic batches) mapped over the batch: forces and stress are derivatives of the energy the
model reports, so parameter gradients of a force or stress loss are second derivatives through
the charge solver.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .dataset import Batch
from .energy import dipole_moment, energy_and_forces, energy_forces_stress
from .params import Params

#: Terms of the loss, in the order of ``FitConfig.weights``.
TERMS = ("energy", "forces", "charges", "dipole", "stress")
#: GPa per eV/Å³.
GPA = 160.21766208


def sequential(energy) -> bool:
    """Whether a batch is better evaluated one structure after the other (``lax.map``) than
    vectorised (``vmap``): for solvers iterating to a tolerance, whose data-dependent loop and
    branch would, vectorised, run every branch for every structure."""
    return hasattr(energy.solver, "iterations") and energy.solver.iterations is None


def _evaluate(model) -> Callable:
    """``f(params, system, neighbors) -> (E, forces, stress (6,) Voigt eV/Å³ or zeros, aux)``."""
    with_stress = energy_forces_stress(model)
    without = energy_and_forces(model)

    def evaluate(params, system, neighbors):
        if system.cell is not None and all(system.pbc):
            e, f, stress, aux = with_stress(params, system, neighbors)
            return e, f, stress[VOIGT], aux
        e, f, aux = without(params, system, neighbors)
        return e, f, jnp.zeros(6, f.dtype), aux

    return evaluate


#: (row, column) of the Voigt components xx, yy, zz, yz, xz, xy.
VOIGT = (jnp.array([0, 1, 2, 1, 0, 0]), jnp.array([0, 1, 2, 2, 2, 1]))


def predict(model, params: Params, offsets, batch: Batch) -> dict:
    """Model predictions for a batch: ``energy`` (B,) eV including the offsets, ``forces``
    (B, N, 3), ``charges`` (B, N), ``dipole`` (B, 3), ``stress`` (B, 6) eV/Å³ (zero outside bulk
    cells) and the solver diagnostics. ``model``: an ``energy.QEqModel``; solvers iterating to a
    tolerance evaluate the structures one by one (:func:`sequential`)."""
    evaluate = _evaluate(model)
    if sequential(model):
        e, f, stress, aux = jax.lax.map(lambda a: evaluate(params, *a), (batch.system, batch.neighbors))
    else:
        e, f, stress, aux = jax.vmap(evaluate, in_axes=(None, 0, 0))(params, batch.system, batch.neighbors)
    q = aux["charges"]
    return dict(
        energy=e + batch.counts @ offsets,
        forces=f,
        charges=q,
        dipole=jax.vmap(dipole_moment)(q, batch.system.positions),
        stress=stress,
        residual=aux["residual"],
        converged=aux["converged"],
        positive_definite=aux["positive_definite"],
    )


def batch_sums(model, params: Params, offsets, batch: Batch) -> dict:
    """Sums of squared and absolute errors of a batch, and how many values each sum holds.
    Weight-zero fillers and padding atoms take no part."""
    return sums_of_errors(predict(model, params, offsets, batch), batch)


def errors(p: Mapping, batch: Batch) -> dict:
    """``{term: (error, mask)}`` of predictions ``p`` (:func:`predict`): the energy error per atom
    (B,) eV, forces (B, N, 3), charges (B, N), dipole (B, 3) and stress (B, 6), zero where the
    mask (broadcast to the error's shape) is False: weight-zero fillers, padding atoms, missing
    references."""
    atom = batch.system.fragments >= 0
    real = batch.weight > 0

    def term(flag, error, per_atom=False):
        mask = real & (flag > 0)
        mask = mask[:, None] & atom if per_atom else mask
        mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (error.ndim - mask.ndim)), error.shape)
        return jnp.where(mask, error, 0.0), mask

    return dict(
        energy=term(batch.has_energy, (p["energy"] - batch.energy) / batch.n_atoms),
        forces=term(batch.has_forces, p["forces"] - batch.forces, per_atom=True),
        charges=term(batch.has_charges, p["charges"] - batch.charges, per_atom=True),
        dipole=term(batch.has_dipole, p["dipole"] - batch.dipole),
        stress=term(batch.has_stress, p["stress"] - batch.stress),
    )


def sums_of_errors(p: Mapping, batch: Batch) -> dict:
    """The sums of :func:`batch_sums` from predictions ``p`` (see :func:`predict`)."""
    real = batch.weight > 0
    out = {}
    for term, (error, mask) in errors(p, batch).items():
        out[f"{term}_sq"] = jnp.sum(error**2)
        out[f"{term}_abs"] = jnp.sum(jnp.abs(error))
        out[f"{term}_n"] = jnp.sum(mask)
    return dict(
        out,
        configurations=jnp.sum(real),
        unconverged=jnp.sum(real & ~p["converged"]),
        indefinite=jnp.sum(real & ~p["positive_definite"]),
        max_residual=jnp.max(jnp.where(real, p["residual"], 0.0)),
    )


def term_counts(batch: Batch) -> dict:
    """``{term: how many values of the batch the term's mean runs over}`` (host or traced)."""
    zero = jnp.zeros_like(batch.forces)
    p = dict(energy=batch.energy * 0.0, forces=zero, charges=batch.charges * 0.0, dipole=batch.dipole * 0.0,
             stress=batch.stress * 0.0)  # fmt: skip
    return {t: jnp.sum(mask) for t, (_, mask) in errors(p, batch).items()}


def weighted_residuals(p: Mapping, batch: Batch, scales: Mapping):
    """One vector r of a batch's errors with r·r = its share of the loss: each term's errors times
    √``scales[term]`` (the term's weight over its count in the whole data set)."""
    return jnp.concatenate([jnp.sqrt(scales[t]) * jnp.ravel(e) for t, (e, _) in errors(p, batch).items() if t in scales])


def add_sums(a: Mapping, b: Mapping) -> dict:
    return {k: (jnp.maximum(a[k], b[k]) if k == "max_residual" else a[k] + b[k]) for k in a}


def loss_from_sums(sums: Mapping, weights: Mapping):
    """Σ_term w_term × (mean squared error of the term); terms without data contribute 0."""
    total = 0.0
    for term in TERMS:
        w = float(weights.get(term, 0.0))
        if w:
            total = total + w * sums[f"{term}_sq"] / jnp.maximum(sums[f"{term}_n"], 1.0)
    return total


def metrics_from_sums(sums: Mapping, weights: Mapping) -> dict:
    """Host-side metrics: energy MAE and RMSE in meV/atom, force RMSE and MAE in eV/Å (over
    Cartesian components), charge RMSE in e, dipole RMSE in e·Å (per component), stress RMSE in
    GPa (over the six Voigt components), the loss (no pull), the number of structures, of
    unconverged solves and of solves that met a hardness matrix that is not positive definite. ``None`` where no reference."""
    s = {k: float(v) for k, v in sums.items()}

    def ratio(num, den, f=lambda x: x):
        return f(s[num] / s[den]) if s[den] > 0 else None

    return dict(
        loss=float(loss_from_sums(s, weights)),
        energy_mae=None if s["energy_n"] == 0 else 1000.0 * s["energy_abs"] / s["energy_n"],
        energy_rmse=None if s["energy_n"] == 0 else 1000.0 * math.sqrt(s["energy_sq"] / s["energy_n"]),
        force_rmse=ratio("forces_sq", "forces_n", math.sqrt),
        force_mae=ratio("forces_abs", "forces_n"),
        charge_rmse=ratio("charges_sq", "charges_n", math.sqrt),
        dipole_rmse=ratio("dipole_sq", "dipole_n", math.sqrt),
        stress_rmse_gpa=ratio("stress_sq", "stress_n", lambda x: GPA * math.sqrt(x)),
        configurations=int(s["configurations"]),
        unconverged=int(s["unconverged"]),
        indefinite=int(s["indefinite"]),
        max_residual=s["max_residual"],
    )


def least_squares_offsets(model_energies, reference, counts, n_atoms) -> np.ndarray:
    """Per-element offsets b minimising Σ ((E_model + n·b − E_ref)/N)² (minimum-norm solution
    when the element counts do not determine every offset, e.g. always-stoichiometric NaCl)."""
    a = np.asarray(counts, float) / np.asarray(n_atoms, float)[:, None]
    y = (np.asarray(reference, float) - np.asarray(model_energies, float)) / np.asarray(n_atoms, float)
    if len(y) == 0:
        return np.zeros(a.shape[1])
    b, *_ = np.linalg.lstsq(a, y, rcond=None)
    return b
