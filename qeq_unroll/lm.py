"""Levenberg–Marquardt iterations for a fit: the loss as a sum of squared residuals.

The fit's loss is L(θ) = Σ_b |r_b(θ)|² + |p(θ)|²: the weighted errors of every batch b
(``loss.weighted_residuals``) and the pull toward the start (``Parametrisation.pull_residuals``).
One iteration forms the Gauss–Newton normal equations over the whole training set,

    A = Σ_b J_bᵀ J_b,    g = Σ_b J_bᵀ r_b,    J_b = ∂r_b/∂θ  (forward mode, one tangent per coordinate),

and tries the step δ = −(A + λ D)⁻¹ g with D = diag(A) (Marquardt's scaling, which makes the step
independent of the units of each coordinate). A step that lowers L is taken and λ shrinks by
``SHRINK``; otherwise λ grows by ``GROW`` and the step is tried again, up to ``TRIES`` times. A
step that would change a raw coordinate by more than ``MAX_STEP`` is shortened to that length
first (a trust region in the raw coordinates: along directions the data hardly constrain, the
Gauss–Newton step can be far longer than the region where its model holds); after a shortened
step λ grows instead of shrinking, so that the next steps damp that direction. On
data the model represents exactly (zero residual at the optimum) the iterations converge
quadratically, where first-order methods crawl along the ill-conditioned directions (Δχ against J
against σ). When no step lowers the loss any more, the fit has reached a minimum (``converged``).

References: K. Levenberg, Q. Appl. Math. 2, 164 (1944); D. W. Marquardt, J. SIAM 11, 431 (1963).
The cost of an iteration is one forward-mode pass per raw coordinate over the data, so this suits
models with tens of parameters, not neural networks.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

#: Starting damping λ, its factors after a taken and a refused step, and the tries per iteration.
START_DAMPING, SHRINK, GROW, TRIES = 1.0e-3, 3.0, 4.0, 12
#: Largest change of a raw coordinate in one iteration (a factor e for the logarithmic ones);
#: longer steps are shortened to it.
MAX_STEP = 1.0
#: Damping beyond which no step is sought (the gradient is resolved to rounding).
MAX_DAMPING = 1.0e10
#: An iteration makes no progress (the minimum is reached) when the loss falls by less than
#: ``PROGRESS`` (relative) or the step is shorter than ``STEP`` relative to the coordinates.
PROGRESS, STEP = 1.0e-9, 1.0e-10
#: Floor of D relative to its largest entry (a coordinate the data hardly see still gets damped).
DIAGONAL_FLOOR = 1.0e-8


def solve(a: np.ndarray, g: np.ndarray, damping: float) -> np.ndarray:
    """The damped Gauss–Newton step δ = −(A + λ D)⁻¹ g (host, float64)."""
    d = np.diag(a).copy()
    d = np.maximum(d, DIAGONAL_FLOOR * max(float(d.max(initial=0.0)), 1e-300))
    m = a + damping * np.diag(d)
    try:
        return -np.linalg.solve(m, g)
    except np.linalg.LinAlgError:
        return -np.linalg.lstsq(m, g, rcond=None)[0]


def iterate(normal: Callable, value: Callable, x: np.ndarray, damping: float) -> tuple[np.ndarray, float, float, bool]:
    """One Levenberg–Marquardt iteration from ``x``: ``normal(x) -> (A, g, L)`` and ``value(x) ->
    L`` over the whole data. Returns ``(x, damping, L, moved)``: the new point (``x`` when no
    tried step lowered the loss), the damping for the next iteration, its loss, and whether it
    made progress (``PROGRESS``, ``STEP``): False at a minimum."""
    a, g, loss = normal(x)
    for _ in range(TRIES):
        if damping > MAX_DAMPING:
            break
        step = solve(a, g, damping)
        longest = np.max(np.abs(step), initial=0.0)
        if longest > MAX_STEP:
            step *= MAX_STEP / longest
        new = value(x + step)
        if np.isfinite(new) and new < loss:
            moved = new < loss * (1.0 - PROGRESS) and np.linalg.norm(step) > STEP * (np.linalg.norm(x) + STEP)
            # a shortened step leaves the damping to grow: Marquardt's scaling then holds back the
            # weakly constrained direction that made it long, and the others move freely again
            damping = damping * GROW if longest > MAX_STEP else max(damping / SHRINK, 1e-15)
            return x + step, damping, float(new), bool(moved)
        damping *= GROW
    return x, damping, float(loss), False


def accumulate(parts: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, float]:
    """Σ of the ``(A, g, L)`` of batches (host)."""
    a = sum(np.asarray(p[0], np.float64) for p in parts)
    g = sum(np.asarray(p[1], np.float64) for p in parts)
    return a, g, float(sum(float(p[2]) for p in parts))
