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
    )


def batch_sums(model, params: Params, offsets, batch: Batch) -> dict:
    """Sums of squared and absolute errors of a batch, and how many values each sum holds.
    Weight-zero fillers and padding atoms take no part."""
    return sums_of_errors(predict(model, params, offsets, batch), batch)


def sums_of_errors(p: Mapping, batch: Batch) -> dict:
    """The sums of :func:`batch_sums` from predictions ``p`` (see :func:`predict`)."""
    atom = batch.system.fragments >= 0
    real = batch.weight > 0

    def masked(mask, x):
        return jnp.where(mask, x, 0.0)

    we = real & (batch.has_energy > 0)
    de = masked(we, (p["energy"] - batch.energy) / batch.n_atoms)
    wf = (real & (batch.has_forces > 0))[:, None] & atom
    df = masked(wf[..., None], p["forces"] - batch.forces)
    wq = (real & (batch.has_charges > 0))[:, None] & atom
    dq = masked(wq, p["charges"] - batch.charges)
    wd = real & (batch.has_dipole > 0)
    dd = masked(wd[:, None], p["dipole"] - batch.dipole)
    ws = real & (batch.has_stress > 0)
    ds = masked(ws[:, None], p["stress"] - batch.stress)
    return dict(
        energy_sq=jnp.sum(de**2),
        energy_abs=jnp.sum(jnp.abs(de)),
        energy_n=jnp.sum(we),
        forces_sq=jnp.sum(df**2),
        forces_abs=jnp.sum(jnp.abs(df)),
        forces_n=3.0 * jnp.sum(wf),
        charges_sq=jnp.sum(dq**2),
        charges_n=jnp.sum(wq),
        dipole_sq=jnp.sum(dd**2),
        dipole_n=3.0 * jnp.sum(wd),
        stress_sq=jnp.sum(ds**2),
        stress_n=6.0 * jnp.sum(ws),
        configurations=jnp.sum(real),
        unconverged=jnp.sum(real & ~p["converged"]),
        max_residual=jnp.max(jnp.where(real, p["residual"], 0.0)),
    )


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
    GPa (over the six Voigt components), the loss (no pull), the number of structures and of
    unconverged solves. ``None`` where no reference."""
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
