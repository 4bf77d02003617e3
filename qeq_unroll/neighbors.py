"""Which pairs (and which lattice images) a cutoff kernel couples: image lists and neighbour lists.

Two layouts, both pytrees that an energy function takes as its ``neighbors`` argument:

- :class:`ImageList` (small periodic cells, the clear and exact reference): every pair (i, j) for
  every lattice translation that can bring them within the cutoff. Memory O(S N²).
- :class:`NeighborList` (any size, memory O(N)): every pair within a cutoff plus a ``skin``,
  reused until an atom has moved more than skin/2. The search bins the atoms into a jax-md cell
  list (``jax_md.partition.cell_list``, in fractional coordinates of the search cell) and visits
  the atoms in batches of :data:`SEARCH_BATCH`, each against the 27 cells around it, so its
  scratch memory is bounded by the batch, not by N (a search over all atoms at once holds every
  atom's candidates: about 10⁵ bytes per atom). Cells thinner than 2 (cutoff + skin) are
  replicated R_a × R_b × R_c times before the search, so every image within the cutoff, an atom's
  own images included, is a distinct entry of the list; the image of each entry is recovered by
  the minimum-image rule of that supercell. Non-periodic directions are embedded in a vacuum
  slab twice as thick as needed.

A list is *allocated* on the host (:func:`neighbor_list`) and *updated* inside ``jax.jit``
(:func:`update_neighbors`): the update rebuilds it at its fixed capacity when needed and raises
``overflow`` when that capacity was too small, the cell changed, or an atom left the vacuum slab of
a non-periodic direction (``error`` says which, :func:`reasons` in words). An overflowed list is never used silently: the energy reports it
(``aux["neighbors_overflow"]``) and the caller reallocates (see ``calculators.qeq``).

Distances are in Å; ``cutoff`` is the largest pair distance that must be found, ``skin`` the margin.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, ewald, pme
from .errors import QEqInputError, QEqNeighborError
from .periodic import frame, heights, image_range, image_shifts
from .system import size_bucket

#: Default skin (Å) of neighbour lists.
DEFAULT_SKIN = 1.0
#: Atoms per batch of the neighbour search (its scratch memory is this many atoms' candidates).
SEARCH_BATCH = 1024
#: Why a neighbour list cannot be trusted: bits of ``NeighborList.error``.
CAPACITY, CELL_LIST, CELL_CHANGED, LEFT_SLAB = 1, 2, 4, 8
REASONS = {
    CAPACITY: "an atom has more neighbours within cutoff + skin than the list has slots (atoms crowded together)",
    CELL_LIST: "a cell of the cell list holds more atoms than it has room for (atoms crowded together)",
    CELL_CHANGED: "the cell changed since the list was built (a new cell needs a new list)",
    LEFT_SLAB: "an atom left the vacuum slab of a non-periodic direction (it moved too far)",
}


def reasons(error) -> list[str]:
    """The causes named by an ``error`` code (host)."""
    return [text for bit, text in REASONS.items() if int(error) & bit]


@dataclasses.dataclass(frozen=True)
class ImageList:
    """Dense all-images pairs: every (i, j) for every lattice translation in ``shifts`` (S, 3)
    (integer-valued, (0, 0, 0) first); ``cutoff`` Å (static)."""

    shifts: jax.Array
    cutoff: float = 0.0

    @property
    def error(self) -> jax.Array:
        """An image list is exact for its cell: never in error."""
        return jnp.asarray(0, jnp.int32)

    @property
    def overflow(self) -> jax.Array:
        return self.error != 0


jax.tree_util.register_dataclass(ImageList, data_fields=["shifts"], meta_fields=["cutoff"])


def image_list(system, cutoff) -> ImageList:
    """The dense all-images layout of a periodic ``system`` for pairs within ``cutoff`` Å (host)."""
    if not system.periodic:
        raise QEqInputError("image lists are for periodic systems; free space uses all pairs")
    cutoff = _check_cutoff(cutoff)
    shifts = image_shifts(np.asarray(system.cell), system.pbc, cutoff)
    return ImageList(jnp.asarray(shifts, dtype=system.positions.dtype), float(cutoff))


@dataclasses.dataclass(frozen=True)
class NeighborList:
    """A neighbour list in the layout the energy uses, plus what updating it needs.

    ``partner`` (M, N): the neighbour atom in slot m of atom i (``n_atoms`` marks an empty slot);
    ``shifts`` (M, 3, N) int8: the lattice translation n of the slot, so that the pair vector is
    x_partner − x_i + n A. Slot-major: slot m of every atom is one contiguous row, so a sum over
    an atom's slots is M vector updates of length N (see ``geometry.slot_sum``), which XLA fuses
    into one pass on CPU. Each atom's slots are in order of distance at the last build, empty
    ones last, so the pairs within the cutoff fill a leading block and passes over the list stop
    after it (``geometry.Pairs.occupied``). The list is *symmetric*: every pair within the
    cutoff is stored from both of its atoms (with opposite shifts), which the derivatives in
    ``geometry`` and ``hardness`` use to gather instead of scatter. ``reference_positions``
    (N, 3) Å: positions at the last build. ``cells``: the jax-md cell list of the replicated
    system (atom j of replica ρ is ρ N + j), None when the search cell is too thin for three cells
    a side (every atom is then a candidate). ``search`` (3, 3) Å (rows), ``to_fractional`` its
    inverse, ``origin`` (3,) Å: the search frame; ``replicas`` (R, 3) integer replica offsets;
    ``reference_cell``: the cell at allocation; ``slab_limit`` (3,): largest fractional
    coordinate allowed along non-periodic directions; ``error``: why the list cannot be
    trusted, bits of :data:`REASONS` (0: it can; ``overflow`` is ``error != 0``). Static:
    ``cutoff``, ``skin`` (Å), ``replicate`` (R_a, R_b, R_c), ``n_atoms``, ``grid`` (cells a side
    of the cell list, 0 without one)."""

    partner: jax.Array
    shifts: jax.Array
    reference_positions: jax.Array
    cells: object
    search: jax.Array
    to_fractional: jax.Array
    origin: jax.Array
    replicas: jax.Array
    reference_cell: jax.Array
    error: jax.Array
    slab_limit: jax.Array
    cutoff: float = 0.0
    skin: float = DEFAULT_SKIN
    replicate: tuple = (1, 1, 1)
    n_atoms: int = 0
    grid: int = 0

    @property
    def capacity(self) -> int:
        """Neighbour slots per atom (M)."""
        return self.partner.shape[0]

    @property
    def overflow(self) -> jax.Array:
        """True when the list cannot be trusted (see ``error`` for why)."""
        return self.error != 0

    @property
    def self_images(self) -> bool:
        """Whether an atom's own images can be in the list: only when the cell is replicated for
        the search (a cell at least 2 (cutoff + skin) thick in every direction holds none)."""
        return any(r > 1 for r in self.replicate)

    def update(self, system) -> "NeighborList":
        return update_neighbors(self, system)


jax.tree_util.register_dataclass(
    NeighborList,
    data_fields=[
        "partner", "shifts", "reference_positions", "cells", "search", "to_fractional", "origin",
        "replicas", "reference_cell", "error", "slab_limit",
    ],
    meta_fields=["cutoff", "skin", "replicate", "n_atoms", "grid"],
)  # fmt: skip


def _check_cutoff(cutoff):
    if cutoff is None or not (math.isfinite(cutoff) and cutoff > 0):
        raise QEqInputError(f"a neighbour search needs a positive cutoff in Å, got {cutoff}")
    return float(cutoff)


def _search_frame(system, reach):
    """Replication counts, replica offsets, the supercell search frame and its origin (host)."""
    pbc = system.pbc
    pos = np.asarray(system.positions, dtype=np.float64)[np.asarray(system.mask)]
    if system.periodic:
        cell = np.asarray(system.cell, dtype=np.float64)
        base = np.asarray(frame(cell, pbc, xp=np), dtype=np.float64)
    else:
        cell = np.eye(3)
        base = np.eye(3)
    replicate = checks.replication(cell, pbc, reach)
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in replicate], indexing="ij"), -1).reshape(-1, 3)
    rows, origin = [], np.zeros(3)
    for k in range(3):
        if pbc[k]:
            rows.append(replicate[k] * base[k])
        else:
            # vacuum: atoms occupy fractional [reach/L, (reach+extent)/L] with L = 2 extent + 4 reach + 1
            u = base[k] / np.linalg.norm(base[k])
            proj = pos @ u if len(pos) else np.zeros(1)
            extent = float(proj.max() - proj.min())
            length = 2.0 * extent + 4.0 * reach + 1.0
            rows.append(length * u)
            origin += (float(proj.min()) - reach) * u
    search = np.stack(rows)
    lengths = np.linalg.norm(search, axis=1)
    slab_limit = np.asarray([1.0 if pbc[k] else 0.5 - reach / lengths[k] for k in range(3)])
    return replicate, grid, search, origin, slab_limit


def _fractional(positions, cell, replicas, to_fractional, origin):
    """Fractional coordinates (N R, 3) of the replicated system in the search frame, in [0, 1)."""
    offsets = replicas.astype(positions.dtype) @ cell if cell is not None else jnp.zeros_like(replicas)
    x = (positions[None, :, :] + offsets[:, None, :]).reshape(-1, 3) - origin
    return jnp.mod(x @ to_fractional, 1.0)


def _candidates(cells, grid, count):
    """i → the (K,) atoms of the replicated system that may lie within reach of atom i: those of
    the 27 cells around its cell, or all ``count`` of them without a cell list. Empty cell slots
    hold ``count``."""
    if cells is None:
        everyone = jnp.arange(count, dtype=jnp.int32)
        return lambda i: everyone
    table = cells.id_buffer.reshape(-1, cells.cell_capacity)  # row = cell hash Σ_d c_d grid^d
    weights = jnp.asarray([1, grid, grid * grid], jnp.int32)
    around = jnp.asarray(np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3), jnp.int32)

    def candidates(i):
        cell = jnp.mod(cells.particle_cell_id[i] + around, grid)
        return table[jnp.sum(cell * weights, axis=1)].reshape(-1)

    return candidates


def _search(nbrs, frac, cells, capacity=None):
    """Each real-cell atom's partners within reach (cutoff + skin) among the replicated atoms
    (fractional coordinates ``frac`` (N R, 3)), in batches of :data:`SEARCH_BATCH` atoms: ``(idx,
    count)`` with idx (N, capacity) replicated-atom indices in order of distance (N R where empty)
    and count (N,) the partners found; only ``count`` when ``capacity`` is None (jittable)."""
    total = frac.shape[0]
    reach = nbrs.cutoff + nbrs.skin
    candidates = _candidates(cells, nbrs.grid, total)

    def row(i):
        j = candidates(i)
        ds = frac[jnp.minimum(j, total - 1)] - frac[i]
        d = (ds - jnp.round(ds)) @ nbrs.search  # minimum image of the search cell, Å
        r2 = jnp.sum(d * d, axis=-1)
        found = (j < total) & (j != i) & (r2 < reach * reach)
        count = jnp.sum(found, dtype=jnp.int32)
        if capacity is None:
            return count
        # float32 keys: XLA's CPU top-k is a partial sort for them (several times faster than for
        # float64); the order only decides which slots lead the list, never which pairs are in it
        nearest, slot = jax.lax.top_k(jnp.where(found, -r2, -jnp.inf).astype(jnp.float32), capacity)
        return jnp.where(nearest > -jnp.inf, j[slot], total).astype(jnp.int32), count

    return jax.lax.map(row, jnp.arange(nbrs.n_atoms), batch_size=min(SEARCH_BATCH, nbrs.n_atoms))


def neighbor_list(system, cutoff, skin=DEFAULT_SKIN, capacity_multiplier=1.25) -> NeighborList:
    """Allocate a neighbour list of ``system`` for pairs within ``cutoff`` Å (host, not jittable).

    The capacity is the largest neighbour count found within cutoff + skin times
    ``capacity_multiplier`` (also the spare room of the cell list). Free-space systems are
    searched in a box of vacuum."""
    from jax_md import partition  # noqa: PLC0415 - heavy import, only for lists

    cutoff = _check_cutoff(cutoff)
    if not (math.isfinite(skin) and skin >= 0):
        raise QEqInputError(f"skin must be a non-negative number of Å, got {skin}")
    if not (math.isfinite(capacity_multiplier) and capacity_multiplier > 0):
        raise QEqInputError(f"capacity_multiplier must be a positive number, got {capacity_multiplier}")
    reach = cutoff + skin
    replicate, grid, search, origin, slab_limit = _search_frame(system, reach)
    dtype = system.positions.dtype
    n = system.positions.shape[0]
    side = int(math.floor(float(np.min(heights(search, (True, True, True)))) / reach))
    nbrs = NeighborList(
        partner=None,
        shifts=None,
        reference_positions=system.positions,
        cells=None,
        search=jnp.asarray(search, dtype=dtype),
        to_fractional=jnp.asarray(np.linalg.inv(search), dtype=dtype),
        origin=jnp.asarray(origin, dtype=dtype),
        replicas=jnp.asarray(grid, dtype=dtype),
        reference_cell=system.cell if system.periodic else jnp.eye(3, dtype=dtype),
        error=jnp.asarray(0, jnp.int32),
        slab_limit=jnp.asarray(slab_limit, dtype=dtype),
        cutoff=cutoff,
        skin=float(skin),
        replicate=replicate,
        n_atoms=n,
        grid=side if side >= 3 else 0,
    )
    cell = system.cell if system.periodic else None
    frac = _fractional(system.positions, cell, nbrs.replicas, nbrs.to_fractional, nbrs.origin)
    if nbrs.grid:  # cells at least ``reach`` thick: the 27 around an atom hold all its partners
        cells = partition.cell_list(1.0, (1.0 - 1e-9) / nbrs.grid, capacity_multiplier).allocate(frac)
        nbrs = dataclasses.replace(nbrs, cells=cells)
    count = jax.jit(_search)(nbrs, frac, nbrs.cells)
    width = frac.shape[0] if nbrs.cells is None else 27 * nbrs.cells.cell_capacity
    capacity = max(1, min(width, int(int(jnp.max(count)) * capacity_multiplier)))
    idx, count = jax.jit(_search, static_argnums=3)(nbrs, frac, nbrs.cells, capacity)
    nbrs = jax.jit(_derive)(nbrs, system, idx)
    return dataclasses.replace(nbrs, error=_lost(count, capacity, nbrs.cells) | _flags(nbrs, system))


def _lost(count, capacity, cells):
    """The error bits of a search: more partners than slots, a cell list that overflowed."""
    error = jnp.where(jnp.any(count > capacity), CAPACITY, 0)
    if cells is not None:
        error = error | jnp.where(cells.did_buffer_overflow, CELL_LIST, 0)
    return error.astype(jnp.int32)


def _derive(nbrs, system, idx):
    """Partner atoms and lattice shifts from the search result ``idx`` (N, M) (jittable)."""
    n = nbrs.n_atoms
    sentinel = n * nbrs.replicas.shape[0]
    valid = idx < sentinel
    partner = jnp.where(valid, idx % n, n).astype(jnp.int32)
    safe = jnp.where(valid, partner, 0)
    rho = jnp.where(valid, idx // n, 0)
    x = system.positions
    cell = system.cell if system.periodic else jnp.eye(3, dtype=x.dtype)
    reps = jnp.asarray(nbrs.replicate, x.dtype)
    pbc = jnp.asarray(system.pbc, x.dtype)
    inv = jnp.linalg.inv(frame(reps[:, None] * cell, system.pbc))
    m = [nbrs.replicas[:, a][rho] for a in range(3)]  # replica offsets in cell vectors
    d0 = [x[:, k][safe] - x[:, k][:, None] + sum(m[a] * cell[a, k] for a in range(3)) for k in range(3)]
    image = [jnp.round(sum(d0[a] * inv[a, k] for a in range(3))) * pbc[k] for k in range(3)]
    shifts = jnp.stack([jnp.where(valid, m[a] - reps[a] * image[a], 0.0).T for a in range(3)], axis=1)
    shifts = shifts.astype(jnp.int8)
    return dataclasses.replace(nbrs, partner=partner.T, shifts=shifts, reference_positions=x)


def _flags(nbrs, system):
    """The error bits for ``system``: a changed cell, an atom outside the vacuum slab of a
    non-periodic direction."""
    error = jnp.asarray(0, jnp.int32)
    if system.periodic:
        error = error | jnp.where(jnp.any(jnp.abs(system.cell - nbrs.reference_cell) > 1e-9), CELL_CHANGED, 0)
    if not all(system.pbc):
        s = (system.positions - nbrs.origin) @ nbrs.to_fractional
        free = ~jnp.asarray(system.pbc)
        outside = (s < 0.0) | (s > nbrs.slab_limit)
        error = error | jnp.where(jnp.any(outside & free[None, :] & system.mask[:, None]), LEFT_SLAB, 0)
    return error.astype(jnp.int32)


def update_neighbors(nbrs: NeighborList, system) -> NeighborList:
    """The list for the current positions (jittable, fixed capacity): rebuilt when a real atom
    moved more than skin/2 (Cartesian, so a wrapped atom counts as moved) since the last build,
    else unchanged. ``.overflow`` is set (and stays set) when an atom found more partners than the
    capacity, a cell of the cell list overflowed, the cell changed or an atom left the vacuum
    slab: check it before trusting the list."""
    x = system.positions
    moved = jnp.sum((x - nbrs.reference_positions) ** 2, axis=1)
    need = jnp.any(system.mask & (moved > (0.5 * nbrs.skin) ** 2))

    def rebuild(nbrs):
        cell = system.cell if system.periodic else None
        frac = _fractional(x, cell, nbrs.replicas, nbrs.to_fractional, nbrs.origin)
        cells = None if nbrs.cells is None else nbrs.cells.update(frac)
        idx, count = _search(nbrs, frac, cells, nbrs.capacity)
        return dataclasses.replace(_derive(nbrs, system, idx), cells=cells, error=nbrs.error | _lost(count, nbrs.capacity, cells))

    new = jax.lax.cond(need, rebuild, lambda nbrs: nbrs, nbrs)
    return dataclasses.replace(new, error=new.error | _flags(new, system))


@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Everything about which interactions exist that must be decided on the host, for one kernel
    and one system: ``pairs`` (an :class:`ImageList`, a :class:`NeighborList`, or None for the
    free-space all-pairs sum) and ``reciprocal`` (an ``ewald.Reciprocal`` or a ``pme.Mesh`` for Ewald
    kernels)."""

    pairs: object = None
    reciprocal: object = None

    @property
    def error(self):
        """Why the pairs cannot be trusted (bits of :data:`REASONS`; 0: they can)."""
        return jnp.asarray(0, jnp.int32) if self.pairs is None else self.pairs.error

    @property
    def overflow(self):
        return self.error != 0

    @property
    def did_buffer_overflow(self):
        """``overflow`` under jax-md's name."""
        return self.overflow

    def update(self, system) -> "Neighbors":
        if isinstance(self.pairs, NeighborList):
            return dataclasses.replace(self, pairs=update_neighbors(self.pairs, system))
        return self


jax.tree_util.register_dataclass(Neighbors, data_fields=["pairs", "reciprocal"], meta_fields=[])

#: Growth of a neighbour list's capacity factor after an overflow, and the default ceiling.
GROWTH, MAX_CAPACITY_MULTIPLIER = 1.5, 4.0


def until_it_fits(attempt, multiplier: float = 1.25, max_multiplier: float = MAX_CAPACITY_MULTIPLIER):
    """Call ``attempt(multiplier) -> (result, error)`` (error: bits of :data:`REASONS`, 0 when the
    list can be trusted) with the capacity factor growing by :data:`GROWTH` until it returns no
    error; ``(result, multiplier)``. The one retry loop of the calculator and of MD: it raises
    ``QEqNeighborError``, naming the reasons, once the factor would pass ``max_multiplier``."""
    error = 0
    while multiplier <= max_multiplier * (1 + 1e-12):
        result, error = attempt(multiplier)
        if not int(error):
            return result, multiplier
        multiplier *= GROWTH
    raise QEqNeighborError(
        f"{'; '.join(reasons(error))}. Its capacity factor would exceed {max_multiplier} (atoms crowd far beyond the "
        "density they had when the list was allocated)",
        int(error),
    )


#: Lattice translation (in cells) of the padding entries of :func:`stackable` image lists.
FAR_SHIFT = 1.0e6


def _padded(needed: int, before: int, headroom: float) -> int:
    """The padded size of ``needed`` rows: ``before`` while they fit, else the size bucket of
    ``headroom`` times ``needed``."""
    return before if needed <= before else size_bucket(math.ceil(headroom * needed))


def stackable(nbrs: Neighbors, like: Neighbors | None = None, headroom: float = 1.0) -> Neighbors:
    """``nbrs`` with its lattice translations and Ewald reciprocal vectors padded to size buckets
    (``system.size_bucket`` of their number; of ``headroom`` times it for the reciprocal vectors,
    whose number follows the cell volume, while translations change in whole shells), or to the
    sizes of ``like`` (earlier neighbours of the same structure) where they fit, so that the
    neighbours of similar cells have one shape: they stack into a batch (fitting), and a cell that
    changes (relaxation) keeps the compiled functions. The interactions are unchanged: the extra
    translations lie ``FAR_SHIFT`` cells away, beyond every cutoff, and the extra Miller indices
    are (0, 0, 0), which the reciprocal sum skips. Neighbour lists and PME meshes are left as they
    are."""
    pairs, reciprocal = nbrs.pairs, nbrs.reciprocal
    if isinstance(pairs, ImageList):
        shifts = np.asarray(pairs.shifts)
        before = like.pairs.shifts.shape[0] if like is not None and isinstance(like.pairs, ImageList) else 0
        extra = _padded(len(shifts), before, 1.0) - len(shifts)
        far = np.tile([[FAR_SHIFT, 0.0, 0.0]], (extra, 1))
        pairs = dataclasses.replace(pairs, shifts=jnp.asarray(np.concatenate([shifts, far]), dtype=pairs.shifts.dtype))
    if isinstance(reciprocal, ewald.Reciprocal):
        miller = np.asarray(reciprocal.miller)
        before = like.reciprocal.miller.shape[0] if like is not None and isinstance(like.reciprocal, ewald.Reciprocal) else 0
        extra = _padded(len(miller), before, headroom) - len(miller)
        padded = np.concatenate([miller, np.zeros((extra, 3))])
        reciprocal = dataclasses.replace(reciprocal, miller=jnp.asarray(padded, dtype=reciprocal.miller.dtype))
    return Neighbors(pairs=pairs, reciprocal=reciprocal)


def serves(nbrs: Neighbors, built_for, strain: float, cell) -> bool:
    """Whether ``nbrs``, built for the cell ``built_for`` (3, 3) Å with ``strain`` (:func:`build`),
    hold every pair and k-vector of ``cell`` = ``built_for`` (1 + ε) (host): image lists and
    Ewald plans for ‖ε‖₂ ≤ ``strain``, neighbour lists and PME meshes for their own cell only."""
    if np.array_equal(cell, built_for):
        return True
    strainable = isinstance(nbrs.pairs, ImageList) and (nbrs.reciprocal is None or isinstance(nbrs.reciprocal, ewald.Reciprocal))
    if strain <= 0.0 or not strainable:
        return False
    eps = np.linalg.solve(np.asarray(built_for, np.float64), np.asarray(cell, np.float64)) - np.eye(3)
    return float(np.linalg.norm(eps, 2)) <= strain


#: Largest S N² for which ``layout="auto"`` picks the dense all-images layout.
DENSE_IMAGES_BUDGET = 2_000_000


def build(kernel, system, params=None, layout="auto", skin=DEFAULT_SKIN, capacity_multiplier=1.25, max_kvectors=None,
          limits=None, strain=0.0):  # fmt: skip
    """The :class:`Neighbors` of ``system`` for ``kernel`` (host).

    layout: "auto" (free space: all pairs; periodic: dense all-images for small S N², else a
    neighbour list), "images", "list" (also for free space with a cutoff kernel), or "dense"
    (free space only). ``params`` (optional) lets Ewald kernels pick and check their real-space
    cutoff from the Gaussian widths of the elements present. ``limits`` (``checks.Limits``, None:
    the defaults): before anything is built, a cell that puts atoms closer than
    ``limits.min_distance`` or would take more than ``limits.max_memory`` is refused
    (``checks``). Errors name the problem: a periodic cell with a kernel that has no cutoff and
    no Ewald sum, a charged periodic cell with a kernel that has no background term, an
    unreachable Ewald accuracy. ``strain``: image lists and Ewald plans that also serve the cells
    ``cell (1 + ε)`` with ‖ε‖₂ ≤ ``strain`` (see :func:`serves`): translations for pairs within
    cutoff / (1 − strain) and k-vectors within k_cut (1 + strain); neighbour lists and PME meshes
    belong to their cell whatever ``strain`` is."""
    limits = checks.Limits() if limits is None else limits
    if not (math.isfinite(strain) and 0.0 <= strain < 0.5):
        raise QEqInputError(f"strain must be in [0, 0.5), got {strain}")
    if layout not in ("auto", "images", "list", "dense"):
        raise QEqInputError(f"unknown neighbour layout '{layout}' (valid: auto, images, list, dense)")
    n = int(np.sum(np.asarray(system.mask)))
    if not system.periodic:
        return _build_free(kernel, system, layout, skin, capacity_multiplier, limits, n)
    if layout == "dense":
        raise QEqInputError("layout 'dense' is for free space; periodic cells use 'images' or 'list'")
    cell = np.asarray(system.cell, dtype=np.float64)
    checks.check_cell(cell, system.pbc, n, limits)
    reciprocal = None
    if kernel.ewald:
        sigma_max = None
        if params is not None:
            species = np.unique(np.asarray(system.species)[np.asarray(system.mask)])
            sigma_max = float(np.max(np.asarray(params.sigma)[species]))
        reciprocal = pme.plan_for(kernel, cell, system.pbc, sigma_max, n, max_kvectors, strain)
        reach = reciprocal.real_cutoff
    else:
        _check_periodic_cutoff_kernel(kernel, system)
        reach = kernel.cutoff
    if layout == "auto":
        s = math.prod(2 * m + 1 for m in image_range(cell, system.pbc, reach))
        layout = "images" if s * n * n <= DENSE_IMAGES_BUDGET else "list"
    parts = checks.estimate_memory(n, cell, system.pbc, reach + (skin if layout == "list" else 0.0), layout, reciprocal)
    checks.check_memory(parts, limits, cell, system.pbc, reach, n)
    if layout == "images":
        pairs = image_list(system, reach / (1.0 - strain))
    else:
        pairs = neighbor_list(system, reach, skin, capacity_multiplier)
    return Neighbors(pairs=pairs, reciprocal=reciprocal)


def _build_free(kernel, system, layout, skin, capacity_multiplier, limits, n):
    """``build`` for free space: all pairs (checked against the memory limit) or, for a cutoff
    kernel asked for ``layout="list"``, a neighbour list."""
    if layout in ("auto", "dense") or kernel.cutoff is None:
        if layout == "list":
            raise QEqInputError(f"kernel '{kernel.name}' has no cutoff: free space takes all pairs")
        if layout == "images":
            raise QEqInputError("image lists are for periodic systems; free space uses all pairs")
        checks.check_memory(checks.estimate_memory(system.positions.shape[0], None, system.pbc, 0.0, "dense"), limits, n_atoms=n)
        return Neighbors()
    return Neighbors(pairs=neighbor_list(system, kernel.cutoff, skin, capacity_multiplier))


def _check_periodic_cutoff_kernel(kernel, system):
    if kernel.cutoff is None:
        raise QEqInputError(
            f"kernel '{kernel.name}' in a periodic cell needs a cutoff (Å): its lattice sum does not "
            "converge otherwise; give one, or use the gaussian kernel (Ewald summation)"
        )
    total = float(np.sum(np.asarray(system.fragment_charges)))
    if abs(total) > 1e-10:
        raise QEqInputError(
            f"charged periodic cell (total charge {total:g} e) with kernel '{kernel.name}', which has no "
            "neutralising background term: its energy would depend on the cutoff. Use a neutral cell "
            "or the gaussian kernel (Ewald summation with a uniform background)"
        )
