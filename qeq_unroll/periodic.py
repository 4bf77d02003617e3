"""Periodic cells: validation, volume, face heights, fractional coordinates, lattice images, strain.

Conventions (as in ASE): ``cell`` is (3, 3) in Å with the cell vectors a, b, c as *rows*; ``pbc``
is three static bools. A Cartesian row vector x has fractional coordinates s = x A⁻¹ and x = s A.
Lattice translations are n A with integer n that is zero along every non-periodic direction.

A non-periodic direction's cell vector never enters an energy (no translation runs along it): it
may be zero. Internally such directions are replaced by the orthonormal complement of the periodic
vectors (:func:`frame`), which is what fractional coordinates and image searches use. The volume
(stress) needs the cell as given and is an error when that cell is singular.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError

AXES = "abc"


def as_pbc(pbc) -> tuple[bool, bool, bool]:
    """Three Python bools from None (all False), a bool or a length-3 sequence."""
    if pbc is None:
        return (False, False, False)
    if isinstance(pbc, (bool, np.bool_)):
        return (bool(pbc),) * 3
    pbc = tuple(bool(p) for p in np.asarray(pbc, dtype=bool).reshape(-1))
    if len(pbc) != 3:
        raise QEqInputError(f"pbc must be one bool or three, got {len(pbc)}")
    return pbc


def check_cell(cell, pbc) -> np.ndarray:
    """Validate a cell for ``pbc`` on the host; returns it as float64 (3, 3).

    Errors (``QEqInputError``) name the problem: wrong shape, non-finite entries, a zero cell
    vector along a periodic direction, or periodic cell vectors that are linearly dependent
    (a singular cell)."""
    pbc = as_pbc(pbc)
    if cell is None:
        if any(pbc):
            raise QEqInputError(f"periodic directions {_names(pbc)} need a cell, got none")
        return None
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (3,):
        cell = np.diag(cell)
    if cell.shape != (3, 3):
        raise QEqInputError(f"cell must be (3, 3) with the cell vectors as rows, got shape {cell.shape}")
    if not np.all(np.isfinite(cell)):
        raise QEqInputError("cell has non-finite entries")
    periodic = [k for k in range(3) if pbc[k]]
    for k in periodic:
        if np.linalg.norm(cell[k]) < 1e-8:
            raise QEqInputError(
                f"cell vector {AXES[k]} is zero but direction {AXES[k]} is periodic: give a cell "
                "vector or set that direction non-periodic"
            )
    if periodic:
        rows = cell[periodic]
        sv = np.linalg.svd(rows, compute_uv=False)
        if sv[-1] < 1e-8 * sv[0]:
            raise QEqInputError(
                f"singular cell: the periodic cell vectors {_names(pbc)} are linearly dependent "
                f"(cell = {cell.tolist()})"
            )
    return cell


def _names(pbc):
    return "".join(AXES[k] for k in range(3) if pbc[k])


def frame(cell, pbc, xp=jnp):
    """The cell with every non-periodic row replaced by an orthonormal vector perpendicular to the
    periodic ones: a full-rank frame for fractional coordinates (works on NumPy or JAX arrays,
    ``xp`` the array module). Its periodic rows are the cell's."""
    pbc = as_pbc(pbc)
    if all(pbc):
        return cell
    periodic = [k for k in range(3) if pbc[k]]
    if not periodic:
        return xp.eye(3, dtype=cell.dtype)
    rows = cell[np.asarray(periodic)]
    # complete the span of the periodic rows with an orthonormal basis of its complement
    q, _ = xp.linalg.qr(rows.T, mode="complete")
    complement = q[:, len(periodic):].T
    out, c = [], 0
    for k in range(3):
        if pbc[k]:
            out.append(cell[k])
        else:
            out.append(complement[c])
            c += 1
    return xp.stack(out)


def volume(cell):
    """|det A| in Å³."""
    return jnp.abs(jnp.linalg.det(cell))


def heights(cell, pbc) -> np.ndarray:
    """Distance between opposite faces of the cell for each direction (Å), from the frame (host).
    Along a non-periodic direction the value is meaningless (1)."""
    f = np.asarray(frame(np.asarray(cell, np.float64), pbc, xp=np), dtype=np.float64)
    vol = abs(np.linalg.det(f))
    out = np.empty(3)
    for k in range(3):
        out[k] = vol / np.linalg.norm(np.cross(f[(k + 1) % 3], f[(k + 2) % 3]))
    return out


def image_range(cell, pbc, reach) -> tuple[int, int, int]:
    """Per direction, the largest |n_k| of a lattice translation that can bring two atoms of one
    (wrapped) cell within ``reach`` Å of each other: floor(reach / h_k) + 1, with a small margin so
    a slightly strained cell (finite-difference stress) needs no more. Zero along non-periodic."""
    pbc = as_pbc(pbc)
    h = heights(cell, pbc)
    return tuple(int(math.floor(reach * (1.0 + 1e-3) / h[k])) + 1 if pbc[k] else 0 for k in range(3))


def image_shifts(cell, pbc, reach) -> np.ndarray:
    """All integer lattice translations (S, 3) (float64, integer-valued) that can matter for pairs
    of wrapped atoms within ``reach`` Å, (0, 0, 0) first."""
    m = image_range(cell, pbc, reach)
    grid = np.stack(np.meshgrid(*[np.arange(-mk, mk + 1) for mk in m], indexing="ij"), -1).reshape(-1, 3)
    order = np.argsort(np.abs(grid).sum(axis=1), kind="stable")
    return grid[order].astype(np.float64)


def wrap(positions, cell, pbc):
    """Positions moved by lattice translations into the cell along periodic directions. The
    translation is piecewise constant (no gradient through the choice of image), so energies of
    wrapped and unwrapped positions and their derivatives with respect to positions and cell agree."""
    pbc = as_pbc(pbc)
    f = jax.lax.stop_gradient(frame(cell, pbc))
    s = jax.lax.stop_gradient(positions) @ jnp.linalg.inv(f)
    n = jnp.floor(s) * jnp.asarray(pbc, positions.dtype)
    return positions - jax.lax.stop_gradient(n) @ cell


def deform(positions, cell, strain):
    """Apply the homogeneous deformation x → x (1 + ε) to positions and cell (rows). ``strain`` is
    (3, 3); its symmetric part is the strain of the stress tensor."""
    m = jnp.eye(3, dtype=positions.dtype) + strain
    return positions @ m, cell @ m
