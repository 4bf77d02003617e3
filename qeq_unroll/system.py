"""A system of atoms as the core sees it: positions, species, charge constraints, padding, cell.

Units: positions and cell in Å, charges in e, external field in V/Å.

Periodic systems carry ``cell`` ((3, 3), cell vectors as rows) and ``pbc`` (three static bools);
free-space systems have ``cell = None`` and ``pbc = (False, False, False)``. A uniform external
electric field ``field`` (3,) (None: no field) may point along non-periodic directions only.

Charge constraints are fragments: every real atom carries a fragment label ``0..F-1`` and each
fragment's charges sum to its target. One fragment holding every atom is the usual total-charge
constraint. Padding atoms (label ``-1``) take part in nothing: their charge is exactly zero and
their coordinates never enter an energy. Padding lets structures of different sizes share one
compiled function (size buckets).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError
from .periodic import as_pbc, check_cell


@dataclasses.dataclass(frozen=True)
class System:
    """positions (N, 3) Å; species (N,) int indices into ``Params.elements``; fragments (N,) int
    labels, -1 for padding; fragment_charges (F,) target charge of each fragment in e; cell (3, 3)
    Å (rows a, b, c) or None; field (3,) V/Å or None; pbc: three static bools."""

    positions: jax.Array
    species: jax.Array
    fragments: jax.Array
    fragment_charges: jax.Array
    cell: jax.Array | None = None
    field: jax.Array | None = None
    pbc: tuple = (False, False, False)

    @property
    def mask(self) -> jax.Array:
        """True for real atoms, False for padding."""
        return self.fragments >= 0

    @property
    def n_fragments(self) -> int:
        return self.fragment_charges.shape[0]

    @property
    def periodic(self) -> bool:
        """True when any direction is periodic."""
        return any(self.pbc)


jax.tree_util.register_dataclass(
    System,
    data_fields=["positions", "species", "fragments", "fragment_charges", "cell", "field"],
    meta_fields=["pbc"],
)


def size_bucket(n_atoms: int) -> int:
    """Padded size for ``n_atoms``: a power of two up to 64, then steps of a quarter of the
    enclosing power of two (at most 25 % padding), so a growing system recompiles rarely."""
    if n_atoms <= 8:
        return 8
    p = 1 << (n_atoms - 1).bit_length()
    if p <= 64:
        return p
    step = p // 8
    return int(math.ceil(n_atoms / step) * step)


def check_positions(positions: np.ndarray) -> None:
    """Reject non-finite coordinates before they reach a solver."""
    positions = np.asarray(positions, dtype=float)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise QEqInputError(f"positions must have shape (N, 3), got {positions.shape}")
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        raise QEqInputError(f"non-finite positions for atom(s) {np.flatnonzero(bad)[:10].tolist()}")


def make_system(
    positions,
    species,
    total_charge: float = 0.0,
    fragments=None,
    fragment_charges=None,
    pad_to: int | None = None,
    dtype=None,
    cell=None,
    pbc=None,
    field=None,
) -> System:
    """Build a (padded) ``System`` on the host.

    ``fragments``/``fragment_charges`` replace the single total-charge constraint when given.
    ``pad_to``: total length after padding (``None``: no padding). Padding atoms sit far away on
    a line so they never coincide with anything (they take part in no pair, periodic or not).
    ``cell``: (3, 3) Å, rows are cell vectors (or (3,) for an orthorhombic cell); ``pbc``: a bool or
    three (None: periodic exactly when a cell is given). Periodic directions need non-zero,
    linearly independent cell vectors (``periodic.check_cell``). ``field``: uniform external
    electric field (3,) in V/Å, zero along periodic directions.
    """
    positions = np.asarray(positions, dtype=np.float64)
    check_positions(positions)
    n = positions.shape[0]
    species = np.asarray(species, dtype=np.int32)
    if fragments is None:
        fragments = np.zeros(n, dtype=np.int32)
        fragment_charges = np.asarray([total_charge], dtype=np.float64)
    else:
        fragments = np.asarray(fragments, dtype=np.int32)
        fragment_charges = np.asarray(fragment_charges, dtype=np.float64)
        if fragments.shape != (n,) or fragments.min() < 0 or fragments.max() >= len(fragment_charges):
            raise QEqInputError("fragments must give every atom a label 0..F-1 with F = len(fragment_charges)")
        empty = sorted(set(range(len(fragment_charges))) - set(fragments.tolist()))
        if empty:
            raise QEqInputError(f"fragment(s) {empty} hold no atoms")
    total = n if pad_to is None else pad_to
    if total < n:
        raise QEqInputError(f"cannot pad {n} atoms to {total}")
    extra = total - n
    if extra:
        far = positions.max(initial=0.0) + 1.0e4
        pad_pos = far + 100.0 * np.arange(1, extra + 1)[:, None] * np.ones((1, 3))
        positions = np.concatenate([positions, pad_pos])
        species = np.concatenate([species, np.zeros(extra, np.int32)])
        fragments = np.concatenate([fragments, -np.ones(extra, np.int32)])
    pbc = as_pbc(cell is not None if pbc is None else pbc)
    cell = check_cell(cell, pbc)
    if field is not None:
        field = np.asarray(field, dtype=np.float64).reshape(-1)
        if field.shape != (3,) or not np.all(np.isfinite(field)):
            raise QEqInputError(f"field must be three finite numbers (V/Å), got {field.tolist()}")
        check_field(field, cell, pbc)
    dtype = dtype or jnp.asarray(0.0).dtype
    return System(
        positions=jnp.asarray(positions, dtype=dtype),
        species=jnp.asarray(species),
        fragments=jnp.asarray(fragments),
        fragment_charges=jnp.asarray(fragment_charges, dtype=dtype),
        cell=None if cell is None else jnp.asarray(cell, dtype=dtype),
        field=None if field is None else jnp.asarray(field, dtype=dtype),
        pbc=pbc,
    )


def check_field(field, cell, pbc) -> None:
    """A uniform field may not have a component along a periodic direction (the potential −E·r
    would not be periodic): E·a_k must vanish for every periodic cell vector a_k."""
    for k in range(3):
        if pbc[k]:
            along = float(np.dot(field, cell[k])) / float(np.linalg.norm(cell[k]))
            if abs(along) > 1e-12 * max(1.0, float(np.linalg.norm(field))):
                raise QEqInputError(
                    f"the external field has a component {along:.3g} V/Å along the periodic cell vector "
                    f"{'abc'[k]}: a uniform field is only allowed along non-periodic directions"
                )
