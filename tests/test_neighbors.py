"""Neighbour lists across MD steps: reused with a skin, rebuilt inside jit without recompiling,
overflow detected and reallocated (never silently wrong), stale cells refused."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import qeq_unroll as qu

try:
    from test_periodic import PARAMS, TYPE_ELEMENTS, rock_salt, system_of
except ImportError:  # tests/ imported as a package
    from tests.test_periodic import PARAMS, TYPE_ELEMENTS, rock_salt, system_of

jax.config.update("jax_enable_x64", True)

KERNEL = qu.ReaxFF(cutoff=6.0)


_REFERENCE = qu.qeq_energy(KERNEL, qu.CG(iterations=4), "unrolled")
_REFERENCE_EFS = jax.jit(qu.energy_forces_stress(_REFERENCE))


def fresh(system):
    """Energy, forces, stress from the dense image list of these positions (no neighbour list)."""
    return _REFERENCE_EFS(PARAMS, system, _REFERENCE.neighbors(system, layout="images"))


def assert_equals_images(energy, system, nbrs):
    """Energy, forces and stress over the list ``nbrs`` equal those of the dense image layout."""
    efs = jax.jit(qu.energy_forces_stress(energy))
    e, f, s, _ = efs(PARAMS, system, nbrs)
    e0, f0, s0, _ = efs(PARAMS, system, energy.neighbors(system, layout="images"))
    assert abs(float(e - e0)) < 1e-10
    np.testing.assert_allclose(f, f0, atol=1e-10)
    np.testing.assert_allclose(s, s0, atol=1e-12)


def test_update_rebuilds_inside_jit_and_stays_exact():
    """Move atoms step by step beyond skin/2: the jitted update rebuilds the list at fixed
    capacity (same compiled function), and every step equals a from-scratch list."""
    pos, kinds, cell = rock_salt(2, rattle=0.05, seed=1)
    system = system_of(pos, kinds, cell)
    energy = qu.qeq_energy(KERNEL, qu.CG(iterations=4), "unrolled")
    nbrs = energy.neighbors(system, skin=0.5, layout="list")
    efs = qu.energy_forces_stress(energy)

    @jax.jit
    def step(nbrs, system):
        nbrs = energy.update_neighbors(nbrs, system)
        return efs(PARAMS, system, nbrs), nbrs

    rng = np.random.default_rng(0)
    velocity = rng.normal(0.0, 0.08, pos.shape)  # Å per step: > skin/2 after a few steps
    rebuilt = 0
    for k in range(8):
        system = dataclasses.replace(system, positions=system.positions + velocity)
        (e, f, s, aux), new = step(nbrs, system)
        assert not bool(new.overflow)
        rebuilt += int(not np.array_equal(np.asarray(new.pairs.reference_positions), np.asarray(nbrs.pairs.reference_positions)))
        nbrs = new
        e0, f0, s0, _ = fresh(system)
        assert abs(float(e - e0)) < 1e-10
        np.testing.assert_allclose(f, f0, atol=1e-10)
        np.testing.assert_allclose(s, s0, atol=1e-12)
    assert rebuilt >= 2  # the list was rebuilt inside jit...
    assert step._cache_size() == 1  # ...without recompiling


def test_overflow_is_detected_and_energy_flags_it():
    """A list allocated for a dilute structure overflows when atoms crowd together; the update
    says so and so does the energy's aux."""
    pos, kinds, cell = rock_salt(2, a=6.5, rattle=0.0, seed=2)
    system = system_of(pos, kinds, cell)
    energy = qu.qeq_energy(KERNEL, qu.CG(iterations=2), "unrolled")
    nbrs = energy.neighbors(system, skin=0.5, capacity_multiplier=1.0, layout="list")
    crowded = pos.copy()
    crowded[:8] = crowded[0] + 0.9 * (crowded[:8] - crowded[0]) * 0.3 + 1.0  # eight atoms squeezed into a corner
    squeezed = dataclasses.replace(system, positions=jax.numpy.asarray(crowded))
    updated = jax.jit(energy.update_neighbors)(nbrs, squeezed)
    assert bool(updated.overflow) and int(updated.error) & qu.neighbors.CAPACITY
    assert "more neighbours within cutoff + skin than the list has slots" in qu.neighbors.reasons(updated.error)[0]
    _, aux = jax.jit(energy)(PARAMS, squeezed, updated)
    assert bool(aux["neighbors_overflow"])
    # a changed cell is flagged too (lists belong to one cell), and named as such
    stretched = jax.jit(energy.update_neighbors)(nbrs, dataclasses.replace(system, cell=system.cell * 1.01))
    assert int(stretched.error) == qu.neighbors.CELL_CHANGED
    assert qu.neighbors.reasons(stretched.error) == [qu.neighbors.REASONS[qu.neighbors.CELL_CHANGED]]


def md_atoms():
    from ase import Atoms

    pos, kinds, cell = rock_salt(2, rattle=0.05, seed=3)
    return Atoms([TYPE_ELEMENTS[k] for k in kinds], positions=pos, cell=cell, pbc=True)


def test_calculator_md_reuses_list_without_recompiling():
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from calculators import QEqCalculator

    atoms = md_atoms()
    # 3000 K with this set drives an Na past +4 e: the list, not the charge model, is under test here
    calc = QEqCalculator(params=PARAMS, kernel="reaxff", cutoff=6.0, solver="cg", iterations=4, neighbor_layout="list",
                         skin=0.3, charge_margin=10.0)
    atoms.calc = calc
    kt = 3000 * units.kB  # hot, so atoms travel beyond skin/2 within a few steps
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(np.random.default_rng(4).normal(0.0, 1.0, (len(atoms), 3)) * np.sqrt(masses * kt))
    dyn = VelocityVerlet(atoms, timestep=2.0 * units.fs)
    dyn.run(1)
    reference = calc._neighbors.pairs.reference_positions
    dyn.run(5)  # the step that searches the list again compiles once, when an atom first moves skin/2
    cache = calc._evaluate_periodic._cache_size()
    assert cache <= 2
    dyn.run(10)
    assert calc._evaluate_periodic._cache_size() == cache  # no recompilation per step
    assert not np.array_equal(np.asarray(reference), np.asarray(calc._neighbors.pairs.reference_positions))
    species = PARAMS.species_indices(atoms.get_chemical_symbols())
    e0, f0, _, _ = fresh(system_of(atoms.positions, species, np.asarray(atoms.cell[:])))
    np.testing.assert_allclose(atoms.get_forces(), f0, atol=1e-10)


def test_calculator_reallocates_on_overflow():
    """Atoms crowding beyond the list's capacity: the calculator sees the overflow, reallocates
    and returns what a fresh list gives (never the overflowed result)."""
    from calculators import QEqCalculator

    atoms = md_atoms()
    atoms.positions = atoms.positions * 1.0
    calc = QEqCalculator(params=PARAMS, kernel="reaxff", cutoff=6.0, solver="cg", iterations=4, neighbor_layout="list", skin=0.3)
    atoms.calc = calc
    atoms.get_forces()
    first = calc._neighbors
    crowded = atoms.positions.copy()
    far = np.argsort(np.linalg.norm(crowded - crowded[0], axis=1))[-20:]
    rng = np.random.default_rng(5)
    placed = [crowded[0]]
    for i in far:  # twenty distant atoms moved next to atom 0, at least 1.4 Å from each other and 1 Å from the rest
        while True:
            trial = crowded[0] + rng.uniform(-3.2, 3.2, 3)
            rest = np.delete(crowded, i, axis=0)
            if min(np.linalg.norm(np.asarray(placed) - trial, axis=1)) > 1.4 and min(np.linalg.norm(rest - trial, axis=1)) > 1.0:
                break
        crowded[i] = trial
        placed.append(trial)
    atoms.positions = crowded
    forces = atoms.get_forces()
    assert calc._neighbors is not first and calc._neighbors.pairs.capacity > first.pairs.capacity
    species = PARAMS.species_indices(atoms.get_chemical_symbols())
    _, f0, _, _ = fresh(system_of(atoms.positions, species, np.asarray(atoms.cell[:])))
    np.testing.assert_allclose(forces, f0, atol=1e-10)


def test_slot_sum_loop_equals_one_reduction():
    """The per-slot loop (CPU) and the single reduction over all slots (accelerators) agree, for a
    gathered product, a pytree of terms and the minimum; a loop stopped at any slot sums exactly
    the slots before it."""
    from qeq_unroll.geometry import slot_sum

    rng = np.random.default_rng(3)
    values = jax.numpy.asarray(rng.normal(size=(7, 20)))
    partner = jax.numpy.asarray(rng.integers(0, 20, size=(7, 20)))
    q = jax.numpy.asarray(rng.normal(size=20))
    product = lambda m: (values[m] * q[partner[m]], jax.numpy.abs(values[m]))  # noqa: E731
    for combine in (jax.numpy.add, jax.numpy.minimum):
        looped, reduced = (slot_sum(product, 7, combine, loop=flag) for flag in (True, False))
        for a, b in zip(looped, reduced):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-13)
    np.testing.assert_allclose(slot_sum(product, 7)[0], np.sum(np.asarray(values) * np.asarray(q)[np.asarray(partner)], axis=0), atol=1e-13)
    # a loop that stops early (several slots a step, then the remainder) sums the leading rows only
    for stop in range(1, 8):
        head = np.sum((np.asarray(values) * np.asarray(q)[np.asarray(partner)])[:stop], axis=0)
        np.testing.assert_allclose(slot_sum(product, 7, stop=jax.numpy.int32(stop))[0], head, atol=1e-13)


def test_list_matvec_and_diagonal_equal_dense():
    """The slot-major list operator (a loop of fused passes over the slots) equals the dense H
    assembled from the same couplings by scatter: products with a random vector and the diagonal,
    for a cell thick enough to hold no own images (the diagonal's image term is skipped there) and
    for a replicated cell whose atoms see their own images."""
    from qeq_unroll.energy import qeq_problem

    rng = np.random.default_rng(7)
    for reps, cutoff, own in ((3, 5.0, False), (1, 6.0, True)):
        pos, kinds, cell = rock_salt(reps, rattle=0.05, seed=6)
        system = system_of(pos, kinds, cell)
        nbrs = qu.neighbor_list(system, cutoff)
        partner = np.asarray(nbrs.partner)
        assert nbrs.self_images == own == bool(np.any(partner == np.arange(len(pos))[None, :]))
        h = jax.jit(lambda s, n: qeq_problem(qu.ReaxFF(cutoff=cutoff), PARAMS, s, 1.0, n).hardness)(system, nbrs)
        dense = np.asarray(h.dense())
        q = jax.numpy.asarray(rng.normal(size=len(pos)))
        np.testing.assert_allclose(h.matvec(q), dense @ q, rtol=0, atol=1e-12)
        np.testing.assert_allclose(h.diagonal, np.diagonal(dense), rtol=0, atol=1e-12)



def test_list_slots_by_distance_and_passes_stop_after_the_occupied_block():
    """Each atom's slots are in order of distance at the build, empty slots last, so the pairs
    within the cutoff fill a leading block: the list passes (H q and the force pass) stop after it
    and still equal the dense operator and a fresh list once atoms have moved (no rebuild)."""
    from qeq_unroll.energy import qeq_problem
    from qeq_unroll.geometry import list_pairs

    pos, kinds, cell = rock_salt(3, rattle=0.05, seed=6)
    system = system_of(pos, kinds, cell)
    nbrs = qu.neighbor_list(system, 5.5, skin=1.0)
    partner, shifts = np.asarray(nbrs.partner), np.asarray(nbrs.shifts).astype(float)
    n = len(pos)
    empty = partner == n
    d = pos[np.where(empty, 0, partner)] - pos[None] + np.einsum("man,ak->mnk", shifts, cell)
    r = np.where(empty, 1e9, np.linalg.norm(d, axis=-1))
    assert np.all(np.diff(r, axis=0) >= -1e-5)  # sorted per atom (float32 keys), empty slots last
    pairs = list_pairs(system, nbrs)
    occupied = int(pairs.occupied)
    assert occupied < nbrs.capacity - 10  # the skin shell and the spare capacity are skipped
    assert np.any(np.asarray(pairs.mask)[occupied - 1]) and not np.any(np.asarray(pairs.mask)[occupied:])

    rng = np.random.default_rng(8)
    moved = dataclasses.replace(system, positions=system.positions + rng.uniform(-0.28, 0.28, pos.shape))
    h = jax.jit(lambda s, nb: qeq_problem(qu.ReaxFF(cutoff=5.5), PARAMS, s, 1.0, nb).hardness)(moved, nbrs)
    assert int(h.occupied) > occupied  # pairs from further down the build order moved within the cutoff
    q = jax.numpy.asarray(rng.normal(size=n))
    np.testing.assert_allclose(h.matvec(q), np.asarray(h.dense()) @ q, rtol=0, atol=1e-12)
    assert_equals_images(qu.qeq_energy(qu.ReaxFF(cutoff=5.5), qu.CG(iterations=4), "unrolled"), moved, nbrs)


def test_cell_list_search_in_batches_finds_every_pair_and_flags_a_full_cell(monkeypatch):
    """A cell four search cells a side is searched through the jax-md cell list, in batches
    smaller than N (with a remainder): every atom gets exactly the partners within cutoff + skin
    that a brute-force image search finds, and energy, forces and stress equal the dense image
    layout's. A rigid translation keeps every neighbour count but moves atoms onto cell faces:
    cells then hold more atoms than at allocation, and the update flags the list."""
    monkeypatch.setattr(qu.neighbors, "SEARCH_BATCH", 100)  # 512 atoms: five batches and 12 more
    pos, kinds, cell = rock_salt(4, rattle=0.05, seed=4)
    inside = system_of(pos + 1.41, kinds, cell)  # every atom well inside its search cell (5.64 Å)
    energy = qu.qeq_energy(qu.ReaxFF(cutoff=4.0), qu.CG(iterations=4), "unrolled")
    nbrs = energy.neighbors(inside, skin=1.0, capacity_multiplier=1.0, layout="list").pairs
    assert nbrs.grid == 4 and nbrs.cells is not None and not bool(nbrs.overflow)
    shifts = qu.periodic.image_shifts(cell, (True, True, True), 5.0)
    d = pos[None, None, :] - pos[None, :, None] + (shifts @ cell)[:, None, None]
    r = np.linalg.norm(d, axis=-1)
    brute = np.sum((r < 5.0) & (r > 0), axis=(0, 2))
    np.testing.assert_array_equal(np.sum(np.asarray(nbrs.partner) < len(pos), axis=0), brute)
    assert_equals_images(energy, inside, nbrs)

    on_faces = dataclasses.replace(inside, positions=jax.numpy.asarray(pos))
    updated = jax.jit(qu.update_neighbors)(nbrs, on_faces)
    assert bool(updated.cells.did_buffer_overflow) and bool(updated.overflow)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cutoff=0.0), r"a neighbour search needs a positive cutoff in Å, got 0.0"),
        (dict(skin=-0.5), r"skin must be a non-negative number of Å, got -0.5"),
        (dict(capacity_multiplier=0.0), r"capacity_multiplier must be a positive number, got 0.0"),
    ],
)
def test_bad_list_settings_are_named(kwargs, message):
    pos, kinds, cell = rock_salt(2, rattle=0.05, seed=1)
    settings = {"cutoff": 5.0, **kwargs}
    with pytest.raises(qu.QEqInputError, match=message):
        qu.neighbor_list(system_of(pos, kinds, cell), settings.pop("cutoff"), **settings)


def test_until_it_fits_grows_the_capacity_and_names_why_it_gave_up():
    """The one retry of the calculator and MD: the capacity factor grows by GROWTH until a list
    fits; past the ceiling a QEqNeighborError names the reasons."""
    from qeq_unroll.errors import QEqNeighborError
    from qeq_unroll.neighbors import CAPACITY, GROWTH, until_it_fits

    tried = []

    def attempt(m):
        tried.append(m)
        return f"list at {m:g}", 0 if m >= 2.0 else CAPACITY

    assert until_it_fits(attempt, 1.0) == ("list at 2.25", 2.25)
    assert tried == [1.0, GROWTH, GROWTH**2]
    with pytest.raises(QEqNeighborError, match="more neighbours within cutoff") as info:
        until_it_fits(lambda m: (None, CAPACITY), 1.25, max_multiplier=3.0)
    assert info.value.error == CAPACITY
