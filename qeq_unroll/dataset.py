"""Reference data as arrays, and batches of structures of different sizes for fitting.

Units: positions and cells Å, energies eV, forces eV/Å, charges e, dipoles e·Å, stress eV/Å³
(ASE's Voigt order xx, yy, zz, yz, xz, xy and sign: positive when the cell wants to shrink).

A :class:`Dataset` is a host-side (NumPy) list of :class:`Configuration` s, free-space or
periodic, each with whatever reference properties it has (``None`` = not given). Fitting works on
:class:`Batch` es: every structure is padded to its size bucket (``system.size_bucket``);
structures of one *group* (one bucket, one set of periodic directions and, for periodic cells,
one shape of their neighbours: ``neighbors.stackable``) are stacked ``batch_size`` at a time, and
a batch that is not full is topped up with copies of one of its structures at weight zero. So
every batch of a group has one shape, and a fit compiles its step once per group, never once per
structure. The neighbours of a periodic structure are built once, when it is first batched, and
reused for the whole fit.

The order of the batches of an epoch is a pure function of ``(seed, epoch)``
(:func:`epoch_plan`), which is what lets a fit stop and resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError
from .periodic import check_cell
from .system import System, make_system, size_bucket

PROPERTIES = ("energy", "forces", "charges", "dipole", "stress")


class Configuration(NamedTuple):
    """One structure and its reference properties. ``species`` index ``Dataset.elements``;
    ``source`` names it in messages (e.g. ``"train.xyz:12"``)."""

    positions: np.ndarray  # (n, 3) Å
    species: np.ndarray  # (n,) int
    total_charge: float = 0.0  # e
    energy: float | None = None  # eV
    forces: np.ndarray | None = None  # (n, 3) eV/Å
    charges: np.ndarray | None = None  # (n,) e
    dipole: np.ndarray | None = None  # (3,) e·Å
    source: str = ""
    cell: np.ndarray | None = None  # (3, 3) Å, rows a, b, c
    pbc: tuple = (False, False, False)
    stress: np.ndarray | None = None  # (6,) eV/Å³, Voigt

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])

    @property
    def periodic(self) -> bool:
        return any(self.pbc)


def _check_configuration(c: Configuration) -> None:
    n = c.n_atoms
    where = f" ({c.source})" if c.source else ""
    try:
        check_cell(c.cell, c.pbc)
    except QEqInputError as error:
        raise QEqInputError(f"{c.source or 'a configuration'}: {error}") from None
    if c.stress is not None and not all(c.pbc):
        raise QEqInputError(
            f"{c.source or 'a configuration'} has a reference stress but is not periodic in all three directions "
            f"(pbc = {list(c.pbc)}): stress is defined for bulk cells only"
        )
    shapes = {"forces": (n, 3), "charges": (n,), "dipole": (3,), "stress": (6,)}
    for key, shape in shapes.items():
        value = getattr(c, key)
        if value is not None and np.shape(value) != shape:
            raise QEqInputError(f"reference {key}{where} has shape {np.shape(value)}, expected {shape}")
    if np.shape(c.species) != (n,):
        raise QEqInputError(f"species{where} has shape {np.shape(c.species)}, expected ({n},)")


def is_finite(c: Configuration) -> bool:
    """True when the positions and every given reference value are finite."""
    given = [getattr(c, k) for k in PROPERTIES if getattr(c, k) is not None]
    values = [c.positions, c.total_charge] + given + ([] if c.cell is None else [c.cell])
    return all(np.all(np.isfinite(np.asarray(v, dtype=float))) for v in values)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Configurations over the element list ``elements`` (the order of ``Params.elements``)."""

    elements: tuple[str, ...]
    configurations: tuple[Configuration, ...]

    def __post_init__(self):
        for c in self.configurations:
            _check_configuration(c)
            bad = [int(s) for s in np.unique(c.species) if not 0 <= s < len(self.elements)]
            if bad:
                raise QEqInputError(f"species index {bad} out of range in {c.source or 'a configuration'}")
            if not is_finite(c):
                raise QEqInputError(
                    f"non-finite position or reference value in {c.source or 'a configuration'}"
                )

    def __len__(self) -> int:
        return len(self.configurations)

    def __getitem__(self, i) -> Configuration:
        return self.configurations[i]

    def subset(self, indices: Sequence[int]) -> "Dataset":
        return Dataset(self.elements, tuple(self.configurations[int(i)] for i in indices))

    def has(self, key: str) -> bool:
        """Whether any configuration has reference ``key``."""
        return any(getattr(c, key) is not None for c in self.configurations)

    def species_present(self) -> list[int]:
        """Indices of the elements that occur in the data, sorted."""
        if not self.configurations:
            return []
        return sorted({int(s) for c in self.configurations for s in np.unique(c.species)})

    def neutral(self) -> bool:
        """True when every configuration has total charge zero."""
        return all(c.total_charge == 0.0 for c in self.configurations)

    def counts(self) -> np.ndarray:
        """(n_configurations, n_elements) number of atoms of each element."""
        out = np.zeros((len(self), len(self.elements)))
        for i, c in enumerate(self.configurations):
            np.add.at(out[i], c.species, 1.0)
        return out

    def fingerprint(self) -> str:
        """A hash of the data (geometry, species and references), to check a resume uses the same."""
        h = hashlib.sha256(json.dumps(self.elements).encode())
        for c in self.configurations:
            for v in (c.positions, c.species, c.total_charge, c.cell, c.pbc) + tuple(getattr(c, k) for k in PROPERTIES):
                _update(h, v)
        return h.hexdigest()[:16]

    def structures_fingerprint(self) -> str:
        """A hash of the structures alone: element symbols, positions, cells and periodic
        directions, in order. It does not depend on the element list's order or the references,
        so any parameter set reads the same data to the same fingerprint."""
        h = hashlib.sha256()
        for c in self.configurations:
            h.update(" ".join(self.elements[int(s)] for s in c.species).encode())
            for v in (c.positions, c.cell, c.pbc):
                _update(h, v)
        return h.hexdigest()[:16]


def _update(h, value) -> None:
    h.update(b"-" if value is None else np.ascontiguousarray(np.asarray(value, dtype=float)).tobytes())


def concatenate(datasets: Sequence[Dataset]) -> Dataset:
    elements = datasets[0].elements
    if any(d.elements != elements for d in datasets):
        raise QEqInputError("datasets to concatenate must share one element list")
    return Dataset(elements, tuple(c for d in datasets for c in d.configurations))


# --- persisted train/validation split ---------------------------------------------------------
def split_indices(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """A random split of ``range(n)``: ``(train, validation)`` with ``round(fraction * n)``
    validation indices (at least one when ``fraction > 0`` and ``n > 1``), both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise QEqInputError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * n))
    if fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# --- batches ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Batch:
    """B structures padded to one size N. ``system`` is a ``System`` with a leading batch axis
    (with cells (B, 3, 3) for periodic structures); ``neighbors`` the stacked
    ``neighbors.Neighbors`` of periodic structures (None in free space); the references are zero
    where absent and their ``has_*`` flags (B,) are 0; ``stress`` (B, 6) eV/Å³ Voigt; ``weight``
    (B,) is 0 for filler structures; ``counts`` (B, n_elements) atoms per element (energy offsets);
    ``n_atoms`` (B,) real atoms."""

    system: System
    neighbors: object
    energy: jax.Array
    forces: jax.Array
    charges: jax.Array
    dipole: jax.Array
    stress: jax.Array
    has_energy: jax.Array
    has_forces: jax.Array
    has_charges: jax.Array
    has_dipole: jax.Array
    has_stress: jax.Array
    weight: jax.Array
    counts: jax.Array
    n_atoms: jax.Array

    @property
    def size(self) -> int:
        return int(self.weight.shape[0])


jax.tree_util.register_dataclass(
    Batch,
    data_fields=[f.name for f in dataclasses.fields(Batch)],
    meta_fields=[],
)


class BatchPlan(NamedTuple):
    """Which configurations form a batch: ``indices`` into the dataset (``-1``-free), padded to
    the batch size by ``filler`` copies of ``indices[0]``; ``bucket`` the padded atom count."""

    bucket: int
    indices: tuple[int, ...]


def bucket_of(n_atoms: int, min_size: int = 0) -> int:
    """The padded size of a structure of ``n_atoms``: ``size_bucket(max(n_atoms, min_size))``.
    A ``min_size`` merges the small buckets (fewer compilations, more padding)."""
    return size_bucket(max(int(n_atoms), int(min_size)))


def plan_batches(
    dataset: Dataset, batch_size: int, order: Sequence[int] | None = None, min_size: int = 0, group=None
) -> list[BatchPlan]:
    """Group the configurations (in ``order``, default dataset order) by ``group(i)`` (default:
    the size bucket) and cut each group into chunks of at most ``batch_size``. Groups come in
    increasing size bucket."""
    if batch_size < 1:
        raise QEqInputError(f"batch size must be a positive integer, got {batch_size}")
    order = range(len(dataset)) if order is None else order
    group = group or (lambda i: (bucket_of(dataset[i].n_atoms, min_size),))
    groups: dict[tuple, list[int]] = {}
    for i in order:
        groups.setdefault(group(int(i)), []).append(int(i))
    plans = []
    for key in sorted(groups, key=lambda k: (k[0], repr(k))):
        idx = groups[key]
        plans += [BatchPlan(key[0], tuple(idx[k : k + batch_size])) for k in range(0, len(idx), batch_size)]
    return plans


def epoch_plan(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, shuffle: bool = True, min_size: int = 0, group=None
) -> list[BatchPlan]:
    """The batches of one epoch: configurations shuffled by ``(seed, epoch)``, grouped, and the
    batches themselves shuffled. Deterministic, so a resumed fit sees the same order."""
    if not shuffle:
        return plan_batches(dataset, batch_size, min_size=min_size, group=group)
    rng = np.random.default_rng([int(seed), int(epoch)])
    plans = plan_batches(dataset, batch_size, rng.permutation(len(dataset)), min_size, group)
    return [plans[k] for k in rng.permutation(len(plans))]


def _references(c: Configuration, bucket: int, n_elements: int) -> dict:
    """The reference arrays of a configuration padded to ``bucket`` atoms, and their flags."""
    n = c.n_atoms
    f, q = np.zeros((bucket, 3)), np.zeros(bucket)
    if c.forces is not None:
        f[:n] = c.forces
    if c.charges is not None:
        q[:n] = c.charges
    counts = np.zeros(n_elements)
    np.add.at(counts, c.species, 1.0)
    out = dict(forces=f, charges=q, counts=counts, n_atoms=float(n),
               energy=0.0 if c.energy is None else float(c.energy),
               dipole=np.zeros(3) if c.dipole is None else np.asarray(c.dipole, float),
               stress=np.zeros(6) if c.stress is None else np.asarray(c.stress, float))  # fmt: skip
    out.update({f"has_{k}": float(getattr(c, k) is not None) for k in PROPERTIES})
    return out


class Batcher:
    """Builds :class:`Batch` es of ``dataset`` with a fixed ``batch_size`` (rounded up to a
    multiple of ``multiple_of``, e.g. the number of devices), caching each padded structure and
    its neighbours. ``min_size``: pad every structure to at least this many atoms (see
    :func:`bucket_of`). ``neighbors``: ``system -> neighbors.Neighbors`` for the periodic
    structures (host; e.g. ``model.neighbors`` made ``neighbors.stackable``); needed when the data
    hold any."""

    def __init__(self, dataset: Dataset, batch_size: int, multiple_of: int = 1, dtype=None, min_size: int = 0,
                 neighbors=None):  # fmt: skip
        self.dataset = dataset
        self.min_size = int(min_size)
        self.batch_size = int(-(-int(batch_size) // multiple_of) * multiple_of)
        self.dtype = dtype or jnp.asarray(0.0).dtype
        self.neighbors = neighbors
        self._cache: dict[int, dict] = {}
        self._n_el = len(dataset.elements)

    def _padded(self, i: int) -> dict:
        if i not in self._cache:
            c = self.dataset[i]
            bucket = bucket_of(c.n_atoms, self.min_size)
            s = make_system(c.positions, c.species, total_charge=c.total_charge, pad_to=bucket, dtype=self.dtype,
                            cell=c.cell, pbc=c.pbc)  # fmt: skip
            nbrs = self._neighbors(s, c) if c.periodic else None
            leaves = jax.tree_util.tree_leaves(nbrs)
            group = (bucket, c.pbc, jax.tree_util.tree_structure(nbrs), tuple(np.shape(x) for x in leaves))
            self._cache[i] = dict(system=jax.tree_util.tree_map(np.asarray, s), neighbors=nbrs, group=group,
                                  **_references(c, bucket, self._n_el))  # fmt: skip
        return self._cache[i]

    def _neighbors(self, system, c: Configuration):
        if self.neighbors is None:
            raise QEqInputError(f"{c.source or 'a periodic configuration'}: periodic structures need a Batcher with neighbors")
        try:
            return self.neighbors(system)
        except QEqInputError as error:
            raise QEqInputError(f"{c.source or 'a periodic configuration'}: {error}") from None

    def group(self, i: int) -> tuple:
        """The batching group of configuration ``i``: its size bucket, periodic directions and the
        shape of its neighbours (structures of one group stack into one batch)."""
        return self._padded(int(i))["group"]

    def plans(self, order: Sequence[int] | None = None) -> list[BatchPlan]:
        """:func:`plan_batches` of the data set with this batcher's groups."""
        return plan_batches(self.dataset, self.batch_size, order, self.min_size, self.group)

    def epoch_plan(self, seed: int, epoch: int, shuffle: bool = True) -> list[BatchPlan]:
        """:func:`epoch_plan` of the data set with this batcher's groups."""
        return epoch_plan(self.dataset, self.batch_size, seed, epoch, shuffle, self.min_size, self.group)

    def batch(self, plan: BatchPlan) -> Batch:
        """Stack the plan's structures, topped up to ``batch_size`` with weight-zero fillers."""
        if len(plan.indices) > self.batch_size:
            raise QEqInputError(f"a plan of {len(plan.indices)} structures exceeds the batch size {self.batch_size}")
        items = [self._padded(i) for i in plan.indices]
        if len({it["group"] for it in items}) > 1:
            raise QEqInputError("a batch mixes structures of different groups (size, periodicity or neighbour shape)")
        weight = [1.0] * len(items) + [0.0] * (self.batch_size - len(items))
        items += [items[0]] * (self.batch_size - len(items))

        def stack(key, dtype=None):
            return jnp.asarray(np.stack([np.asarray(it[key]) for it in items]), dtype=dtype or self.dtype)

        def stack_tree(key):
            return jax.tree_util.tree_map(lambda *x: jnp.asarray(np.stack([np.asarray(v) for v in x])),
                                          *[it[key] for it in items])  # fmt: skip

        keys = [f.name for f in dataclasses.fields(Batch) if f.name not in ("system", "neighbors", "weight")]
        return Batch(system=stack_tree("system"), neighbors=stack_tree("neighbors"),
                     weight=jnp.asarray(weight, dtype=self.dtype), **{k: stack(k) for k in keys})  # fmt: skip

    def all_batches(self) -> list[Batch]:
        """Every configuration once, in group order (for evaluation and full-batch optimisers)."""
        return [self.batch(p) for p in self.plans()]


def persisted_split(path, dataset: Dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """The train/validation split of ``dataset`` stored at ``path`` (JSON), made by
    :func:`split_indices` and written atomically the first time. The split belongs to the
    structures (``Dataset.structures_fingerprint``), so fits of the same data from any start set
    or with other reference keys reuse it. A stored split of other structures or another
    fraction/seed is an error (remove the file to draw a new one)."""
    from pathlib import Path

    from .params import write_atomic

    path = Path(path)
    key = dict(structures=dataset.structures_fingerprint(), n=len(dataset), fraction=float(fraction), seed=int(seed))
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise QEqInputError(f"split file {path} is not valid JSON: {exc}") from exc
        if {k: stored.get(k) for k in key} != key:
            raise QEqInputError(
                f"split file {path} belongs to other structures or another fraction/seed "
                f"(stored n={stored.get('n')}, fraction={stored.get('fraction')}, seed={stored.get('seed')}); "
                "remove it to draw a new split"
            )
        return list(stored["train"]), list(stored["validation"])
    train, val = split_indices(len(dataset), fraction, seed)
    write_atomic(path, json.dumps(dict(key, train=train, validation=val)) + "\n")
    return train, val
