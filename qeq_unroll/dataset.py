"""Reference data as arrays, and batches of structures of different sizes for fitting.

Units: positions Å, energies eV, forces eV/Å, charges e, dipoles e·Å.

A :class:`Dataset` is a host-side (NumPy) list of :class:`Configuration` s, each with whatever
reference properties it has (``None`` = not given). Fitting works on :class:`Batch` es: every
structure is padded to its size bucket (``system.size_bucket``), structures of one bucket are
stacked ``batch_size`` at a time, and a batch that is not full is topped up with copies of one of
its structures at weight zero. So every batch of a bucket has one shape, and a fit compiles its
step once per bucket, never once per structure.

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
from .system import System, make_system, size_bucket

PROPERTIES = ("energy", "forces", "charges", "dipole")


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

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[0])


def _check_configuration(c: Configuration) -> None:
    n = c.n_atoms
    where = f" ({c.source})" if c.source else ""
    shapes = {"forces": (n, 3), "charges": (n,), "dipole": (3,)}
    for key, shape in shapes.items():
        value = getattr(c, key)
        if value is not None and np.shape(value) != shape:
            raise QEqInputError(f"reference {key}{where} has shape {np.shape(value)}, expected {shape}")
    if np.shape(c.species) != (n,):
        raise QEqInputError(f"species{where} has shape {np.shape(c.species)}, expected ({n},)")


def is_finite(c: Configuration) -> bool:
    """True when the positions and every given reference value are finite."""
    values = [c.positions, c.total_charge] + [getattr(c, k) for k in PROPERTIES if getattr(c, k) is not None]
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
            for v in (c.positions, c.species, c.total_charge) + tuple(getattr(c, k) for k in PROPERTIES):
                h.update(b"-" if v is None else np.ascontiguousarray(np.asarray(v, dtype=float)).tobytes())
        return h.hexdigest()[:16]


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
    """B structures padded to one size N. ``system`` is a ``System`` with a leading batch axis;
    the references are zero where absent and their ``has_*`` flags (B,) are 0; ``weight`` (B,) is
    0 for filler structures; ``counts`` (B, n_elements) atoms per element (energy offsets);
    ``n_atoms`` (B,) real atoms."""

    system: System
    energy: jax.Array
    forces: jax.Array
    charges: jax.Array
    dipole: jax.Array
    has_energy: jax.Array
    has_forces: jax.Array
    has_charges: jax.Array
    has_dipole: jax.Array
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
    dataset: Dataset, batch_size: int, order: Sequence[int] | None = None, min_size: int = 0
) -> list[BatchPlan]:
    """Group the configurations (in ``order``, default dataset order) by size bucket and cut each
    group into chunks of at most ``batch_size``. Buckets come in increasing size."""
    if batch_size < 1:
        raise QEqInputError(f"batch size must be a positive integer, got {batch_size}")
    order = range(len(dataset)) if order is None else order
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_of(dataset[int(i)].n_atoms, min_size), []).append(int(i))
    plans = []
    for bucket in sorted(groups):
        idx = groups[bucket]
        plans += [BatchPlan(bucket, tuple(idx[k : k + batch_size])) for k in range(0, len(idx), batch_size)]
    return plans


def epoch_plan(
    dataset: Dataset, batch_size: int, seed: int, epoch: int, shuffle: bool = True, min_size: int = 0
) -> list[BatchPlan]:
    """The batches of one epoch: configurations shuffled by ``(seed, epoch)``, grouped by bucket,
    and the batches themselves shuffled. Deterministic, so a resumed fit sees the same order."""
    if not shuffle:
        return plan_batches(dataset, batch_size, min_size=min_size)
    rng = np.random.default_rng([int(seed), int(epoch)])
    plans = plan_batches(dataset, batch_size, rng.permutation(len(dataset)), min_size)
    return [plans[k] for k in rng.permutation(len(plans))]


class Batcher:
    """Builds :class:`Batch` es of ``dataset`` with a fixed ``batch_size`` (rounded up to a
    multiple of ``multiple_of``, e.g. the number of devices), caching each padded structure.
    ``min_size``: pad every structure to at least this many atoms (see :func:`bucket_of`)."""

    def __init__(self, dataset: Dataset, batch_size: int, multiple_of: int = 1, dtype=None, min_size: int = 0):
        self.dataset = dataset
        self.min_size = int(min_size)
        self.batch_size = int(-(-int(batch_size) // multiple_of) * multiple_of)
        self.dtype = dtype or jnp.asarray(0.0).dtype
        self._cache: dict[int, dict] = {}
        self._n_el = len(dataset.elements)

    def _padded(self, i: int) -> dict:
        if i not in self._cache:
            c = self.dataset[i]
            n, bucket = c.n_atoms, bucket_of(c.n_atoms, self.min_size)
            s = make_system(c.positions, c.species, total_charge=c.total_charge, pad_to=bucket, dtype=self.dtype)
            f = np.zeros((bucket, 3))
            q = np.zeros(bucket)
            if c.forces is not None:
                f[:n] = c.forces
            if c.charges is not None:
                q[:n] = c.charges
            counts = np.zeros(self._n_el)
            np.add.at(counts, c.species, 1.0)
            self._cache[i] = dict(
                positions=np.asarray(s.positions),
                species=np.asarray(s.species),
                fragments=np.asarray(s.fragments),
                fragment_charges=np.asarray(s.fragment_charges),
                energy=0.0 if c.energy is None else float(c.energy),
                forces=f,
                charges=q,
                dipole=np.zeros(3) if c.dipole is None else np.asarray(c.dipole, float),
                has_energy=float(c.energy is not None),
                has_forces=float(c.forces is not None),
                has_charges=float(c.charges is not None),
                has_dipole=float(c.dipole is not None),
                counts=counts,
                n_atoms=float(n),
            )
        return self._cache[i]

    def batch(self, plan: BatchPlan) -> Batch:
        """Stack the plan's structures, topped up to ``batch_size`` with weight-zero fillers."""
        if len(plan.indices) > self.batch_size:
            raise QEqInputError(f"a plan of {len(plan.indices)} structures exceeds the batch size {self.batch_size}")
        items = [self._padded(i) for i in plan.indices]
        weight = [1.0] * len(items) + [0.0] * (self.batch_size - len(items))
        items += [items[0]] * (self.batch_size - len(items))

        def stack(key, dtype=None):
            return jnp.asarray(np.stack([np.asarray(it[key]) for it in items]), dtype=dtype or self.dtype)

        system = System(
            positions=stack("positions"),
            species=stack("species", jnp.int32),
            fragments=stack("fragments", jnp.int32),
            fragment_charges=stack("fragment_charges"),
        )
        return Batch(
            system=system,
            energy=stack("energy"),
            forces=stack("forces"),
            charges=stack("charges"),
            dipole=stack("dipole"),
            has_energy=stack("has_energy"),
            has_forces=stack("has_forces"),
            has_charges=stack("has_charges"),
            has_dipole=stack("has_dipole"),
            weight=jnp.asarray(weight, dtype=self.dtype),
            counts=stack("counts"),
            n_atoms=stack("n_atoms"),
        )

    def all_batches(self) -> list[Batch]:
        """Every configuration once, in bucket order (for evaluation and full-batch optimisers)."""
        return [self.batch(p) for p in plan_batches(self.dataset, self.batch_size, min_size=self.min_size)]


def persisted_split(path, dataset: Dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """The train/validation split of ``dataset`` stored at ``path`` (JSON), made by
    :func:`split_indices` and written atomically the first time. A stored split of other data or
    another fraction/seed is an error (remove the file to draw a new one)."""
    from pathlib import Path

    from .params import write_atomic

    path = Path(path)
    key = dict(fingerprint=dataset.fingerprint(), n=len(dataset), fraction=float(fraction), seed=int(seed))
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise QEqInputError(f"split file {path} is not valid JSON: {exc}") from exc
        if {k: stored.get(k) for k in key} != key:
            raise QEqInputError(
                f"split file {path} belongs to other data or another fraction/seed "
                f"(stored n={stored.get('n')}, fraction={stored.get('fraction')}, seed={stored.get('seed')}); "
                "remove it to draw a new split"
            )
        return list(stored["train"]), list(stored["validation"])
    train, val = split_indices(len(dataset), fraction, seed)
    write_atomic(path, json.dumps(dict(key, train=train, validation=val)) + "\n")
    return train, val
