"""Checks of geometries, cells, memory and results: nonsense is refused with an error that names it.

Three kinds, all on the host and all run where a structure or its cell changes, never per step:

- **before anything is built** (:func:`check_cell`, :func:`check_memory`): an atom closer than
  ``min_distance`` to its own periodic image (the shortest lattice translation, from a reduced
  basis), more atoms in a cell than spheres of diameter ``min_distance`` could fill (close
  packing, √2/d³ per Å³: some pair must then be closer), and the memory that the periodic images,
  neighbour slots, reciprocal vectors or mesh points would take, estimated from the cell and the
  cutoff (:func:`estimate_memory`) and refused beyond ``max_memory``;
- **on the pairs the energy saw** (:func:`check_distances`, triggered by the evaluation's
  ``min_distance``): the closest pairs, named by index, element and distance;
- **on the result** (:func:`check_charges`): a charge beyond max_f |Q_f| + ``charge_margin``
  means the model broke down at this geometry; the atoms concerned are named.

Units: Å, e, bytes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import jax
import numpy as np

from .errors import QEqInputError, QEqRangeError, QEqResourceError
from .periodic import AXES, frame, heights, image_range

#: Two atoms closer than this (Å) coincide: always an error, whatever ``Limits.min_distance`` says.
COINCIDENT = 1e-6


@dataclasses.dataclass(frozen=True)
class Limits:
    """What counts as a meaningful structure and result.

    min_distance (Å): two atoms, or an atom and a periodic image, closer than this are an error.
    The default 0.5 Å lies below the shortest bond in chemistry (H₂, 0.74 Å): a closer pair is a
    unit slip or a duplicated atom, and the shielded kernels stop meaning anything there (reaxff
    gives Na–Cl at 0.05 Å charges of ±5.7 e). 0 checks coincidence (< 1e-6 Å) only.
    charge_margin (e): a charge beyond max_f |Q_f| + charge_margin (Q_f the fragment charges) is
    an error. max_memory (bytes): the largest estimated memory a structure may take (None: the
    default device's memory, :func:`device_memory`)."""

    min_distance: float = 0.5
    charge_margin: float = 4.0
    max_memory: float | None = None

    def __post_init__(self):
        for name in ("min_distance", "charge_margin"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise QEqInputError(f"limit {name} must be a non-negative number, got {value!r}")
        if self.max_memory is not None and not (math.isfinite(self.max_memory) and self.max_memory > 0):
            raise QEqInputError(f"limit max_memory must be a positive number of bytes or None, got {self.max_memory!r}")

    def charge_bound(self, fragment_charges) -> float:
        """Largest |q_i| accepted (e)."""
        return float(np.max(np.abs(np.asarray(fragment_charges, dtype=float)), initial=0.0)) + self.charge_margin

    def memory(self) -> float:
        """``max_memory``, or the default device's memory."""
        return device_memory() if self.max_memory is None else float(self.max_memory)


def device_memory() -> float:
    """Bytes of memory of JAX's default device: the allocator's limit on an accelerator, the
    physical memory on a CPU."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# --- the cell ------------------------------------------------------------------------------------


def _lll(basis, delta=0.75):
    """LLL-reduced rows of ``basis`` (k, 3) and the integer matrix U with reduced = U basis."""
    b = np.array(basis, dtype=np.float64)
    u = np.eye(len(b), dtype=np.int64)
    k = 1
    while k < len(b):
        for j in range(k - 1, -1, -1):
            star = _gram_schmidt(b)
            mu = round(float(b[k] @ star[j] / (star[j] @ star[j])))
            if mu:
                b[k] -= mu * b[j]
                u[k] -= mu * u[j]
        star = _gram_schmidt(b)
        mu = b[k] @ star[k - 1] / (star[k - 1] @ star[k - 1])
        if star[k] @ star[k] >= (delta - mu * mu) * (star[k - 1] @ star[k - 1]):
            k += 1
        else:
            b[[k - 1, k]] = b[[k, k - 1]]
            u[[k - 1, k]] = u[[k, k - 1]]
            k = max(k - 1, 1)
    return b, u


def _gram_schmidt(b):
    star = np.zeros_like(b)
    for i in range(len(b)):
        star[i] = b[i] - sum((b[i] @ star[j]) / (star[j] @ star[j]) * star[j] for j in range(i))
    return star


def shortest_translation(cell, pbc) -> tuple[float, np.ndarray]:
    """The shortest non-zero lattice translation along the periodic directions: ``(length Å, n)``
    with n (3,) its integer coefficients of the cell vectors (zero along non-periodic ones)."""
    periodic = [k for k in range(3) if pbc[k]]
    reduced, u = _lll(np.asarray(cell, dtype=np.float64)[periodic])
    best, best_n = math.inf, None
    # an LLL-reduced basis in 3D has its shortest vector among small combinations
    for c in itertools.product(range(-2, 3), repeat=len(periodic)):
        if any(c):
            length = float(np.linalg.norm(np.asarray(c) @ reduced))
            if length < best:
                best, best_n = length, np.asarray(c) @ u
    n = np.zeros(3, dtype=np.int64)
    n[periodic] = best_n
    return best, n


def _combination(n):
    """'a + b − c' for the integer coefficients n (3,)."""
    out = ""
    for k, c in enumerate(n):
        if c:
            sign = ("−" if c < 0 else "") if not out else (" − " if c < 0 else " + ")
            out += f"{sign}{'' if abs(c) == 1 else abs(c)}{AXES[k]}"
    return out


def _describe_cell(cell, pbc):
    cell = np.asarray(cell, dtype=np.float64)
    vol = abs(np.linalg.det(frame(cell, pbc, xp=np)))
    rows = ", ".join(f"{AXES[k]} = [{', '.join(f'{x:.4g}' for x in cell[k])}]" for k in range(3))
    return f"cell {rows} Å (volume {vol:.4g} Å³, pbc {''.join(AXES[k] for k in range(3) if pbc[k])})"


def check_cell(cell, pbc, n_atoms, limits: Limits) -> None:
    """Refuse a periodic cell in which atoms must sit closer than ``limits.min_distance`` (host,
    before anything is built): a lattice translation shorter than that puts every atom that close
    to its own image, and a fully periodic cell holding more than √2/d³ atoms per Å³ (close packing
    of spheres of diameter d) has a pair closer than d."""
    d = max(limits.min_distance, COINCIDENT)
    length, n = shortest_translation(cell, pbc)
    if length < d:
        name = _combination(n)
        raise QEqInputError(
            f"every atom is {length:.3g} Å from its own periodic image (lattice translation {name}), closer "
            f"than min_distance {limits.min_distance} Å: {_describe_cell(cell, pbc)}. Check that the cell is "
            "in Å and that its vectors are the rows"
        )
    if all(pbc):
        vol = abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
        most = math.sqrt(2.0) / d**3 * vol
        if n_atoms > most:
            raise QEqInputError(
                f"{n_atoms} atoms in {_describe_cell(cell, pbc)}: atoms at least min_distance {limits.min_distance} Å "
                f"apart fill at most {most:.3g} such a cell (close packing), so some are closer. Check the "
                "cell's units (Å) and the atoms' positions"
            )


# --- memory ---------------------------------------------------------------------------------------

#: Bytes held per pair of a dense layout (free-space all pairs, image lists): the distance, mask,
#: coupling and its derivative, the hardness entry and their cotangents.
PAIR_BYTES = 96
#: Bytes per neighbour-list slot: partner, shift, distance, mask, coupling and derivatives.
SLOT_BYTES = 48
#: Bytes per atom of the replicated system of a neighbour search, and per candidate it screens.
SEARCH_ATOM_BYTES, CANDIDATE_BYTES = 64, 32
#: Bytes per (atom, reciprocal vector) of the exact Ewald sum: cosines, sines and derivatives.
KVECTOR_BYTES = 48
#: Bytes per PME mesh point (mesh, its spectrum, their cotangents) and per B-spline weight.
MESH_POINT_BYTES, SPLINE_BYTES = 64, 48


def replication(cell, pbc, reach) -> tuple[int, int, int]:
    """Copies of the cell along each direction that a neighbour search within ``reach`` Å needs
    (every image within reach a distinct atom): ceil(2 reach / h_k) along periodic directions."""
    h = heights(cell, pbc) if any(pbc) else np.ones(3)
    return tuple(max(1, int(math.ceil(2.0 * reach / h[k]))) if pbc[k] else 1 for k in range(3))


def estimate_memory(n_atoms, cell, pbc, reach, layout, reciprocal=None, batch=1024) -> dict:
    """Estimated bytes of the pair structures and their use in one energy and forces evaluation:
    ``{part: bytes}`` for ``layout`` "dense" (free space, all pairs), "images" or "list" within
    ``reach`` Å, plus the reciprocal part of an Ewald ``reciprocal`` plan (a ``Reciprocal``: its
    k-vectors, or a ``pme.Mesh``: its points)."""
    parts = {}
    if layout == "dense":
        parts["all pairs"] = n_atoms**2 * PAIR_BYTES
    elif layout == "images":
        shifts = math.prod(2 * m + 1 for m in image_range(cell, pbc, reach))
        parts[f"{shifts} lattice images × {n_atoms}² pairs"] = shifts * n_atoms**2 * PAIR_BYTES
    else:
        copies = math.prod(replication(cell, pbc, reach))
        if all(pbc):
            density = n_atoms / abs(float(np.linalg.det(np.asarray(cell, dtype=np.float64))))
            slots = min(n_atoms * copies, 1.25 * density * 4.0 / 3.0 * math.pi * reach**3 + 1)
        else:
            slots = n_atoms * copies
        parts[f"{slots:.3g} neighbour slots per atom"] = n_atoms * slots * SLOT_BYTES
        parts[f"neighbour search over {copies} cell copies"] = n_atoms * copies * SEARCH_ATOM_BYTES + min(
            batch, n_atoms
        ) * min(n_atoms * copies, 27 * slots) * CANDIDATE_BYTES
    if reciprocal is not None:
        shape = getattr(reciprocal, "shape", None)
        if shape is None:
            count = int(reciprocal.miller.shape[0])
            parts[f"{count} reciprocal vectors"] = n_atoms * count * KVECTOR_BYTES
        else:
            points = math.prod(shape)
            parts[f"{'×'.join(map(str, shape))} PME mesh"] = (
                points * MESH_POINT_BYTES + n_atoms * reciprocal.order**3 * SPLINE_BYTES
            )
    return parts


def check_memory(parts, limits: Limits, cell=None, pbc=(False,) * 3, cutoff=None, n_atoms=0) -> None:
    """Refuse a structure whose estimated memory (``estimate_memory``'s parts) exceeds the limit,
    naming the cell, its volume, the cutoff and the estimate."""
    total = float(sum(parts.values()))
    limit = limits.memory()
    if total <= limit:
        return
    what = ", ".join(f"{name}: {_gib(b)}" for name, b in parts.items())
    where = _describe_cell(cell, pbc) if cell is not None else "free space (all pairs)"
    reach = "" if cutoff is None else f", cutoff {cutoff:.4g} Å,"
    raise QEqResourceError(
        f"{n_atoms} atoms in {where}{reach} would need about {_gib(total)} ({what}), more "
        f"than the limit of {_gib(limit)} (max_memory). Check the cell's units (Å) and the cutoff, or "
        "raise max_memory"
    )


def _gib(b):
    return f"{b / 2**30:.3g} GiB"


# --- pairs ------------------------------------------------------------------------------------------


def closest_pairs(positions, cell=None, pbc=(False,) * 3, shifts=None, partner=None, count=3, mask=None):
    """The ``count`` closest pairs (host): ``[(i, j, r Å), ...]``, shortest first. Free space: all
    pairs; periodic: over the lattice ``shifts`` (S, 3) of an image list, or the slots of a
    neighbour list (``partner`` (M, N), ``shifts`` (M, 3, N)); an atom's own images count."""
    x = np.asarray(positions, dtype=np.float64)
    n = len(x)
    real = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    if partner is not None:
        partner = np.asarray(partner)
        ok = (partner < n) & real[None, :]
        j = np.where(ok, partner, 0)
        t = np.einsum("man,ak->mnk", np.asarray(shifts, np.float64), np.asarray(cell, np.float64))
        r = np.linalg.norm(x[j] - x[None, :, :] + t, axis=-1)
        r = np.where(ok & real[j], r, np.inf)
        flat = np.argsort(r, axis=None)[: 2 * count]
        found = [(int(i), int(j[m, i]), float(r[m, i])) for m, i in zip(*np.unravel_index(flat, r.shape))]
    else:
        lattice = np.zeros((1, 3)) if shifts is None else np.asarray(shifts, np.float64) @ np.asarray(cell, np.float64)
        d = x[None, None, :, :] - x[None, :, None, :] + lattice[:, None, None, :]
        r = np.linalg.norm(d, axis=-1)
        r[0][np.diag_indices(n)] = np.inf
        r[:, ~real, :] = np.inf
        r[:, :, ~real] = np.inf
        flat = np.argsort(r, axis=None)[: 2 * count]
        found = [(int(i), int(j), float(r[s, i, j])) for s, i, j in zip(*np.unravel_index(flat, r.shape))]
    unique, seen = [], set()
    for i, j, dist in found:
        if np.isfinite(dist) and (min(i, j), max(i, j)) not in seen:
            seen.add((min(i, j), max(i, j)))
            unique.append((i, j, dist))
    return unique[:count]


def describe_pairs(pairs, symbols) -> str:
    """'atoms 0 (Na) and 1 (Cl) at 0.05 Å; ...' (an atom and its own image: 'atom 3 (O) and its
    own image at ...')."""
    out = []
    for i, j, r in pairs:
        if i == j:
            out.append(f"atom {i} ({symbols[i]}) and its own periodic image at {r:.3g} Å")
        else:
            out.append(f"atoms {min(i, j)} ({symbols[min(i, j)]}) and {max(i, j)} ({symbols[max(i, j)]}) at {r:.3g} Å")
    return "; ".join(out)


def check_distances(shortest, pairs_fn, symbols, limits: Limits) -> None:
    """Refuse a geometry whose shortest pair (``shortest`` Å, from the evaluation) is below
    ``limits.min_distance`` (or coincident), naming the closest pairs found by ``pairs_fn()``
    (host, called only then)."""
    d = max(limits.min_distance, COINCIDENT)
    if not shortest < d:
        return
    what = "on top of each other" if shortest < COINCIDENT else f"closer than min_distance {limits.min_distance} Å"
    close = [p for p in pairs_fn() if p[2] < d] or pairs_fn()[:1]
    raise QEqInputError(
        f"atoms {what}: {describe_pairs(close, symbols)}. Check for duplicated atoms and the units of the "
        "positions (Å)"
    )


def check_charges(charges, fragment_charges, symbols, limits: Limits, count=4) -> None:
    """Refuse charges (e) beyond ``limits.charge_bound``, naming the atoms that exceed it most."""
    q = np.asarray(charges, dtype=np.float64)
    bound = limits.charge_bound(fragment_charges)
    over = np.flatnonzero(~(np.abs(q) <= bound))
    if not len(over):
        return
    worst = over[np.argsort(-np.nan_to_num(np.abs(q[over]), nan=np.inf))][:count]
    named = ", ".join(f"atom {i} ({symbols[i]}) {q[i]:+.4g} e" for i in worst)
    raise QEqRangeError(
        f"{len(over)} charge(s) beyond ±{bound:.3g} e (largest |fragment charge| + charge_margin "
        f"{limits.charge_margin} e): {named}. The charge model has broken down at this geometry"
    )
