"""Which pairs (and which lattice images) a cutoff kernel couples: image lists and neighbour lists.

Two layouts, both pytrees that an energy function takes as its ``neighbors`` argument:

- :class:`ImageList` (small periodic cells, the clear and exact reference): every pair (i, j) for
  every lattice translation that can bring them within the cutoff. Memory O(S N²).
- :class:`NeighborList` (any size, memory O(N)): a jax-md neighbour list
  (``jax_md.partition.neighbor_list`` over ``jax_md.space.periodic_general`` in fractional
  coordinates) built with a cutoff plus a ``skin`` and reused until an atom has moved more than
  skin/2. Cells thinner than 2 (cutoff + skin) are replicated R_a × R_b × R_c times before the
  search, so every image within the cutoff, an atom's own images included, is a distinct entry
  of the list; the image of each entry is recovered by the minimum-image rule of that supercell.
  Non-periodic directions are embedded in a vacuum slab twice as thick as needed.

A list is *allocated* on the host (:func:`neighbor_list`) and *updated* inside ``jax.jit``
(:func:`update_neighbors`): the update rebuilds it at its fixed capacity when needed and raises
``overflow`` when that capacity was too small, the cell changed, or an atom left the vacuum slab of
a non-periodic direction. An overflowed list is never used silently: the energy reports it
(``aux["neighbors_overflow"]``) and the caller reallocates (see ``calculators.qeq``).

Distances are in Å; ``cutoff`` is the largest pair distance that must be found, ``skin`` the margin.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError
from .periodic import frame, heights, image_shifts

#: Default skin (Å) of neighbour lists.
DEFAULT_SKIN = 1.0


@dataclasses.dataclass(frozen=True)
class ImageList:
    """Dense all-images pairs: every (i, j) for every lattice translation in ``shifts`` (S, 3)
    (integer-valued, (0, 0, 0) first); ``cutoff`` Å (static)."""

    shifts: jax.Array
    cutoff: float = 0.0


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
    after it (``geometry.Pairs.occupied``). The list is *symmetric*: every pair within the cutoff is stored from
    both of its atoms (with opposite shifts), which the derivatives in ``geometry`` and
    ``hardness`` use to gather instead of scatter. ``reference_positions`` (N, 3) Å: positions at
    the last build. ``inner``: the
    jax-md list of the replicated system (atom j of replica ρ is ρ N + j). ``to_fractional``
    (3, 3), ``origin`` (3,) Å: the search frame; ``replicas`` (R, 3) integer replica offsets;
    ``reference_cell``: the cell at allocation; ``slab_limit`` (3,): largest fractional coordinate
    allowed along non-periodic directions; ``overflow``: True when the list cannot be trusted.
    Static: ``cutoff``, ``skin`` (Å), ``replicate`` (R_a, R_b, R_c), ``n_atoms``."""

    partner: jax.Array
    shifts: jax.Array
    reference_positions: jax.Array
    inner: object
    to_fractional: jax.Array
    origin: jax.Array
    replicas: jax.Array
    reference_cell: jax.Array
    overflow: jax.Array
    slab_limit: jax.Array
    cutoff: float = 0.0
    skin: float = DEFAULT_SKIN
    replicate: tuple = (1, 1, 1)
    n_atoms: int = 0

    @property
    def capacity(self) -> int:
        """Neighbour slots per atom (M)."""
        return self.partner.shape[0]

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
        "partner", "shifts", "reference_positions", "inner", "to_fractional", "origin",
        "replicas", "reference_cell", "overflow", "slab_limit",
    ],
    meta_fields=["cutoff", "skin", "replicate", "n_atoms"],
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
        h = heights(cell, pbc)
    else:
        cell = np.eye(3)
        base = np.eye(3)
        h = np.ones(3)
    replicate = tuple(max(1, int(math.ceil(2.0 * reach / h[k]))) if pbc[k] else 1 for k in range(3))
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


def neighbor_list(system, cutoff, skin=DEFAULT_SKIN, capacity_multiplier=1.25) -> NeighborList:
    """Allocate a neighbour list of ``system`` for pairs within ``cutoff`` Å (host, not jittable).

    The capacity is the largest neighbour count found within cutoff + skin times
    ``capacity_multiplier``. Free-space systems are searched in a box of vacuum."""
    from jax_md import partition, space  # noqa: PLC0415 - heavy import, only for lists

    cutoff = _check_cutoff(cutoff)
    if not (math.isfinite(skin) and skin >= 0):
        raise QEqInputError(f"skin must be a non-negative number of Å, got {skin}")
    reach = cutoff + skin
    replicate, grid, search, origin, slab_limit = _search_frame(system, reach)
    # jax-md takes an upper-triangular box (columns are cell vectors) with the same metric
    gram = search @ search.T
    box = np.linalg.cholesky(gram).T
    displacement, _ = space.periodic_general(jnp.asarray(box), fractional_coordinates=True)
    fn = partition.neighbor_list(
        displacement,
        jnp.asarray(box),
        cutoff,
        dr_threshold=skin,
        capacity_multiplier=capacity_multiplier,
        fractional_coordinates=True,
        format=partition.NeighborListFormat.Dense,
    )
    dtype = system.positions.dtype
    to_fractional = jnp.asarray(np.linalg.inv(search), dtype=dtype)
    replicas = jnp.asarray(grid, dtype=dtype)
    origin = jnp.asarray(origin, dtype=dtype)
    cell = system.cell if system.periodic else None
    frac = _fractional(system.positions, cell, replicas, to_fractional, origin)
    with warnings.catch_warnings():  # jax-md mixes int32/int64 index dtypes under x64
        warnings.simplefilter("ignore", FutureWarning)
        inner = fn.allocate(frac)
    if inner.cell_size is not None:  # jax-md keeps an array as static metadata; JAX compares those
        inner = dataclasses.replace(inner, cell_size=tuple(np.atleast_1d(np.asarray(inner.cell_size)).tolist()))
    n = system.positions.shape[0]
    m = inner.idx.shape[1]
    reference_cell = system.cell if system.periodic else jnp.eye(3, dtype=dtype)
    nbrs = NeighborList(
        partner=jnp.full((m, n), n, jnp.int32),
        shifts=jnp.zeros((m, 3, n), jnp.int8),
        reference_positions=system.positions,
        inner=inner,
        to_fractional=to_fractional,
        origin=origin,
        replicas=replicas,
        reference_cell=reference_cell,
        overflow=jnp.asarray(False),
        slab_limit=jnp.asarray(slab_limit, dtype=dtype),
        cutoff=cutoff,
        skin=float(skin),
        replicate=replicate,
        n_atoms=n,
    )
    nbrs = jax.jit(_derive)(nbrs, system, inner)
    return dataclasses.replace(nbrs, overflow=_flags(nbrs, system, inner))


def _derive(nbrs, system, inner):
    """Partner atoms and lattice shifts from the jax-md list ``inner`` (jittable)."""
    n = nbrs.n_atoms
    sentinel = n * nbrs.replicas.shape[0]
    idx = inner.idx[:n]
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
    shifts = [jnp.where(valid, m[a] - reps[a] * image[a], 0.0) for a in range(3)]
    # each atom's slots by distance, empty ones last: pairs within a shorter cutoff lead the list
    d = [x[:, k][safe] - x[:, k][:, None] + sum(shifts[a] * cell[a, k] for a in range(3)) for k in range(3)]
    key = jnp.where(valid, d[0] * d[0] + d[1] * d[1] + d[2] * d[2], jnp.inf)
    _, partner, *shifts = jax.lax.sort((key, partner, *[s.astype(jnp.int8) for s in shifts]), dimension=1, num_keys=1)
    shifts = jnp.stack([s.T for s in shifts], axis=1)
    return dataclasses.replace(nbrs, partner=partner.T, shifts=shifts, reference_positions=x, inner=inner)


def _flags(nbrs, system, inner):
    """True when the list cannot be trusted for ``system``: capacity overflow, changed cell, or an
    atom outside the vacuum slab of a non-periodic direction."""
    bad = jnp.asarray(inner.did_buffer_overflow)
    if system.periodic:
        bad = bad | jnp.any(jnp.abs(system.cell - nbrs.reference_cell) > 1e-9)
    if not all(system.pbc):
        s = (system.positions - nbrs.origin) @ nbrs.to_fractional
        free = ~jnp.asarray(system.pbc)
        outside = (s < 0.0) | (s > nbrs.slab_limit)
        bad = bad | jnp.any(outside & free[None, :] & system.mask[:, None])
    return bad


def update_neighbors(nbrs: NeighborList, system) -> NeighborList:
    """The list for the current positions (jittable, fixed capacity): rebuilt when a real atom
    moved more than skin/2 (Cartesian, so a wrapped atom counts as moved) since the last build,
    else unchanged. Check ``.overflow`` before trusting it."""
    x = system.positions
    moved = jnp.sum((x - nbrs.reference_positions) ** 2, axis=1)
    need = jnp.any(system.mask & (moved > (0.5 * nbrs.skin) ** 2))

    def rebuild(nbrs):
        cell = system.cell if system.periodic else None
        frac = _fractional(x, cell, nbrs.replicas, nbrs.to_fractional, nbrs.origin)
        # jax-md rebuilds when its reference is far away: move it by half a cell
        inner = dataclasses.replace(nbrs.inner, reference_position=jnp.mod(frac + 0.5, 1.0))
        with warnings.catch_warnings():  # jax-md mixes int32/int64 index dtypes under x64
            warnings.simplefilter("ignore", FutureWarning)
            inner = inner.update(frac)
        return _derive(nbrs, system, inner)

    new = jax.lax.cond(need, rebuild, lambda nbrs: nbrs, nbrs)
    return dataclasses.replace(new, overflow=nbrs.overflow | _flags(new, system, new.inner))



@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Everything about which interactions exist that must be decided on the host, for one kernel
    and one system: ``pairs`` (an :class:`ImageList`, a :class:`NeighborList`, or None for the
    free-space all-pairs sum) and ``reciprocal`` (an ``ewald.Reciprocal`` or a ``pme.Mesh`` for Ewald
    kernels)."""

    pairs: object = None
    reciprocal: object = None

    @property
    def overflow(self):
        return getattr(self.pairs, "overflow", jnp.asarray(False))

    @property
    def did_buffer_overflow(self):
        """``overflow`` under jax-md's name."""
        return self.overflow

    def update(self, system) -> "Neighbors":
        if isinstance(self.pairs, NeighborList):
            return dataclasses.replace(self, pairs=update_neighbors(self.pairs, system))
        return self


jax.tree_util.register_dataclass(Neighbors, data_fields=["pairs", "reciprocal"], meta_fields=[])

#: Largest S N² for which ``layout="auto"`` picks the dense all-images layout.
DENSE_IMAGES_BUDGET = 2_000_000


def build(kernel, system, params=None, layout="auto", skin=DEFAULT_SKIN, capacity_multiplier=1.25, max_kvectors=None):
    """The :class:`Neighbors` of ``system`` for ``kernel`` (host).

    layout: "auto" (free space: all pairs; periodic: dense all-images for small S N², else a
    neighbour list), "images", "list" (also for free space with a cutoff kernel), or "dense"
    (free space only). ``params`` (optional) lets Ewald kernels pick and check their real-space
    cutoff from the Gaussian widths of the elements present. Errors name the problem: a periodic
    cell with a kernel that has no cutoff and no Ewald sum, a charged periodic cell with a kernel
    that has no background term, an unreachable Ewald accuracy."""
    from . import pme  # noqa: PLC0415

    if layout not in ("auto", "images", "list", "dense"):
        raise QEqInputError(f"unknown neighbour layout '{layout}' (valid: auto, images, list, dense)")
    if not system.periodic:
        if layout in ("auto", "dense") or kernel.cutoff is None:
            if layout == "list":
                raise QEqInputError(f"kernel '{kernel.name}' has no cutoff: free space takes all pairs")
            if layout == "images":
                raise QEqInputError("image lists are for periodic systems; free space uses all pairs")
            return Neighbors()
        return Neighbors(pairs=neighbor_list(system, kernel.cutoff, skin, capacity_multiplier))
    if layout == "dense":
        raise QEqInputError("layout 'dense' is for free space; periodic cells use 'images' or 'list'")
    reciprocal = None
    if getattr(kernel, "ewald", False):
        sigma_max = None
        if params is not None:
            species = np.unique(np.asarray(system.species)[np.asarray(system.mask)])
            sigma_max = float(np.max(np.asarray(params.sigma)[species]))
        n = int(np.sum(np.asarray(system.mask)))
        reciprocal = pme.plan_for(kernel, np.asarray(system.cell), system.pbc, sigma_max, n, max_kvectors)
        reach = reciprocal.real_cutoff
    else:
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
        reach = kernel.cutoff
    if layout == "auto":
        n = int(np.sum(np.asarray(system.mask)))
        s = len(image_shifts(np.asarray(system.cell), system.pbc, reach))
        layout = "images" if s * n * n <= DENSE_IMAGES_BUDGET else "list"
    if layout == "images":
        pairs = image_list(system, reach)
    else:
        pairs = neighbor_list(system, reach, skin, capacity_multiplier)
    return Neighbors(pairs=pairs, reciprocal=reciprocal)
