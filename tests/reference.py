"""Independent dense float64 reference of the QEq model, in plain NumPy (no code shared with the
package): hardness matrix per kernel, bordered (N+1) solve, energy."""

import math

import numpy as np
from scipy.special import erf

KE = 14.399645


def taper(r, rc):
    x = np.minimum(r / rc, 1.0)
    return 20 * x**7 - 70 * x**6 + 84 * x**5 - 35 * x**4 + 1


def hardness(kernel, pos, chi, J, width, cutoff=None, ke=KE):
    n = len(pos)
    r = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    H = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i == j:
                H[i, i] = J[i] + (ke / (width[i] * math.sqrt(math.pi)) if kernel == "gaussian" else 0.0)
                continue
            if kernel == "gaussian":
                g = math.sqrt(width[i] ** 2 + width[j] ** 2)
                H[i, j] = ke * erf(r[i, j] / (math.sqrt(2) * g)) / r[i, j]
            elif kernel == "reaxff":
                shield = (width[i] * width[j]) ** -1.5
                H[i, j] = ke * taper(r[i, j], cutoff) / np.cbrt(r[i, j] ** 3 + shield)
            elif kernel == "point":
                H[i, j] = ke / r[i, j] * (1.0 if cutoff is None else taper(r[i, j], cutoff))
    return H


def solve(H, chi, total):
    n = len(chi)
    A = np.zeros((n + 1, n + 1))
    A[:n, :n] = H
    A[:n, n] = A[n, :n] = 1.0
    x = np.linalg.solve(A, np.concatenate([-chi, [total]]))
    q = x[:n]
    return q, chi @ q + 0.5 * q @ H @ q
