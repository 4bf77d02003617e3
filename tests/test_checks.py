"""Bad geometries, cells and results: a named error before anything is built or returned.

The cases are the mistakes people make (a cell typed in the wrong unit, atoms pasted twice, a
fitted set that breaks down); each must give a ``QEqError`` that names the problem, and every piece
of advice in a message is applied here to see the problem go away. The property tests draw random
geometries, cells, elements, total charges and kernels: every call returns finite charges with
Σq = Q inside the charge bound, or raises a ``QEqError``. ``QEQ_FUZZ_EXAMPLES=N`` sets the number
of examples per property (the suite runs a few; ``benchmarks/RESULTS.md`` records a long run).
"""

import itertools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import qeq_unroll as qu
from calculators import QEqCalculator
from qeq_unroll import checks
from qeq_unroll.errors import QEqConvergenceError, QEqError, QEqInputError, QEqRangeError, QEqResourceError

EXAMPLES = int(os.environ.get("QEQ_FUZZ_EXAMPLES", "0"))


def test_bad_cells_are_refused_before_anything_is_built():
    """A 0.005 Å³ triclinic cell (it took 19 GB before) and a near-singular one (83.7 PiB), with the
    gaussian and reaxff kernels, and a sound cell over a small memory limit: each a named error in
    a fresh process that stays well under 1 GB."""
    script = textwrap.dedent(
        """
        import json, time, jax
        jax.config.update("jax_enable_x64", True)
        from ase import Atoms
        from calculators import QEqCalculator
        from qeq_unroll.errors import QEqError
        tiny = Atoms("NaCl", [[0, 0, 0], [0.1, 0.05, 0.03]], cell=[[0.2, 0, 0], [0.05, 0.2, 0], [0.03, 0.04, 0.125]], pbc=True)
        flat = Atoms("NaCl", [[0, 0, 0], [1, 1, 1]], cell=[[3, 0, 0], [0, 3, 0], [3, 3, 9e-6]], pbc=True)
        sound = Atoms("NaCl", [[0, 0, 0], [2.8, 0, 0]], cell=[5.6, 5.6, 5.6], pbc=True)
        out = []
        for atoms, kw in [(tiny, {}), (tiny, {"kernel": "reaxff"}), (flat, {}), (flat, {"kernel": "reaxff"}),
                          (sound, {"kernel": "reaxff", "cutoff": 40.0, "max_memory": 1e6})]:
            t = time.perf_counter()
            atoms.calc = QEqCalculator(**kw)
            try:
                atoms.get_potential_energy()
                out.append(["returned", "", 0.0])
            except QEqError as e:
                out.append([type(e).__name__, str(e), time.perf_counter() - t])
        # VmHWM: this process's peak resident memory (ru_maxrss would count the forking parent's too)
        peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1]
        print(json.dumps({"cases": out, "peak_kb": int(peak)}))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (tiny_g, tiny_r, flat_g, flat_r, memory) = result["cases"]
    for kind, message, seconds in (tiny_g, tiny_r):
        assert kind == "QEqInputError" and seconds < 5
        assert "0.135 Å from its own periodic image" in message and "volume 0.005 Å³" in message
    for kind, message, seconds in (flat_g, flat_r):
        assert kind == "QEqInputError" and seconds < 5
        assert "9e-06 Å from its own periodic image (lattice translation a + b − c)" in message
    kind, message, _ = memory
    assert kind == "QEqResourceError"
    for part in ("volume 175.6 Å³", "cutoff 40 Å", "GiB", "max_memory"):
        assert part in message
    assert result["peak_kb"] < 1024**2


def test_dense_cells_and_unit_slips_are_refused():
    """More atoms than close packing allows at min_distance; a cell of the right shape in bohr-sized
    numbers is fine, since nothing is closer than 0.5 Å."""
    limits = checks.Limits()
    cell = np.eye(3) * 2.0
    with pytest.raises(QEqInputError, match=r"200 atoms in cell .* fill at most 90.5"):
        checks.check_cell(cell, (True,) * 3, 200, limits)
    checks.check_cell(cell, (True,) * 3, 90, limits)
    checks.check_cell(5.64 / 0.529177 * np.eye(3), (True,) * 3, 8, limits)
    length, n = checks.shortest_translation([[1, 0, 0], [7.05, 0.3, 0], [0, 0, 5]], (True,) * 3)
    assert length == pytest.approx(np.hypot(0.05, 0.3)) and (n * np.sign(n[1])).tolist() == [-7, 1, 0]
    # along a non-periodic direction the cell vector is no translation
    assert checks.shortest_translation([[4, 0, 0], [0, 5, 0], [0, 0, 0.1]], (True, True, False))[0] == 4


def test_memory_estimate_follows_the_layout():
    """The estimate grows as N² for all pairs, with the image count for image lists and with the
    slots within reach for neighbour lists, and names each part."""
    dense = checks.estimate_memory(1000, None, (False,) * 3, 0.0, "dense")
    assert sum(dense.values()) == 1000**2 * checks.PAIR_BYTES
    cell = np.eye(3) * 20.0
    parts = checks.estimate_memory(800, cell, (True,) * 3, 11.0, "list")
    slots = 1.25 * 800 / 8000 * 4 / 3 * np.pi * 11.0**3 + 1
    assert parts[f"{slots:.3g} neighbour slots per atom"] == pytest.approx(800 * slots * checks.SLOT_BYTES)
    images = checks.estimate_memory(8, np.eye(3) * 5.6, (True,) * 3, 10.0, "images")
    assert list(images) == ["125 lattice images × 8² pairs"]


@pytest.fixture(scope="module")
def free_calcs():
    return {
        kernel: QEqCalculator(kernel=kernel, solver="cg", tol=1e-8, max_iterations=200)
        for kernel in ("gaussian", "reaxff", "point", "slater")
    }


@pytest.fixture(scope="module")
def reaxff_calc(free_calcs):
    return free_calcs["reaxff"]


def test_close_and_coincident_atoms_are_named(reaxff_calc):
    pair = Atoms("NaCl", [[0, 0, 0], [0.05, 0, 0]])
    four = Atoms("NaClNaCl", [[0, 0, 0], [0.05, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]])
    same = Atoms("NaClNaCl", [[0, 0, 0], [0, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]])
    for atoms in (pair, four):
        atoms.calc = reaxff_calc
        with pytest.raises(QEqInputError, match=r"closer than min_distance 0.5 Å: atoms 0 \(Na\) and 1 \(Cl\) at 0.05 Å\. "):
            atoms.get_potential_energy()
    same.calc = reaxff_calc
    with pytest.raises(QEqInputError, match=r"on top of each other: atoms 0 \(Na\) and 1 \(Cl\) at 0 Å\. "):
        same.get_potential_energy()


def test_close_pairs_across_the_cell_boundary_are_named():
    """Atom 0 and atom 2's image across the boundary are 0.3 Å apart: found through an image list
    (by the calculator) and through a neighbour list, and the same pairs either way."""
    atoms = Atoms("NaClCl", [[0.1, 1.0, 1.0], [2.9, 1.0, 1.0], [5.4, 1.0, 1.0]], cell=[5.6, 4.0, 4.0], pbc=True)
    atoms.set_initial_charges([1.0, -1.0, 0.0])
    atoms.calc = QEqCalculator(kernel="reaxff", cutoff=4.0)
    with pytest.raises(QEqInputError, match=r"closer than min_distance 0.5 Å: atoms 0 \(Na\) and 2 \(Cl\) at 0.3 Å\. "):
        atoms.get_potential_energy()
    system = atoms.calc.system(atoms)
    images = qu.image_list(system, 4.0)
    listed = qu.neighbor_list(system, 4.0)
    x = np.asarray(system.positions)
    wrapped = x - np.floor(x / 5.6 * [1, 0, 0]) * [5.6, 0, 0]
    by_images = checks.closest_pairs(wrapped, system.cell, system.pbc, images.shifts)
    by_list = checks.closest_pairs(x, system.cell, system.pbc, listed.shifts, listed.partner)
    assert [(min(i, j), max(i, j)) for i, j, _ in by_list] == [(min(i, j), max(i, j)) for i, j, _ in by_images]
    np.testing.assert_allclose([r for *_, r in by_list], [0.3, 2.5, 2.8], atol=1e-12)
    np.testing.assert_allclose([r for *_, r in by_images], [0.3, 2.5, 2.8], atol=1e-12)


def test_charges_beyond_the_bound_are_refused_with_the_atoms(reaxff_calc):
    """With the distance check off (``calc.set``), the reaxff cluster that gave +9443 e is stopped
    by the charge bound (|Q| + 4 e by default), naming the atoms; the bound follows the fragment
    charges and the margin."""
    four = Atoms("NaClNaCl", [[0, 0, 0], [0.05, 0, 0], [2.8, 0, 0], [2.8, 2.8, 0]])
    four.calc = reaxff_calc
    reaxff_calc.set(min_distance=0.0)
    try:
        with pytest.raises(QEqRangeError, match=r"beyond ±4 e .*: atom 0 \(Na\) \+\d+.* e, atom 1 \(Cl\) -\d+"):
            four.get_potential_energy()
    finally:
        reaxff_calc.set(min_distance=checks.Limits.min_distance)
    limits = checks.Limits(charge_margin=0.5)
    assert limits.charge_bound([1.0, -3.0]) == 3.5
    checks.check_charges([3.5, -3.5], [1.0, -3.0], ["O", "O"], limits)
    with pytest.raises(QEqRangeError, match=r"1 charge\(s\) beyond ±3.5 e .*: atom 1 \(H\) \+3.6 e"):
        checks.check_charges([0.0, 3.6], [1.0, -3.0], ["O", "H"], limits)
    with pytest.raises(QEqRangeError, match=r"atom 0 \(O\) \+nan e"):
        checks.check_charges([np.nan, 0.0], [0.0], ["O", "H"], limits)


def _with(params, **elements):
    data = params.to_dict()
    for element, values in elements.items():
        data["elements"][element].update(values)
    return qu.load_params(data)


def _solved(atoms):
    """Finite charges inside the bound, summing to zero, from ``atoms.calc``."""
    atoms.calc.reset()
    q = atoms.get_charges()
    return np.all(np.isfinite(q)) and np.all(np.abs(q) < 4.0) and abs(q.sum()) < 1e-9


ADVICE = {
    "reaxff": (
        r"smaller reaxff gamma \(now Na 2, Cl 2 /Å.*larger hardness J \(now Na 4.592, Cl 9.892 eV\), or the gaussian kernel",
        [dict(Na={"gamma": 0.35}, Cl={"gamma": 0.35}), dict(Na={"hardness": 13.8}, Cl={"hardness": 29.7})],
    ),
    "point": (r"use a shielded kernel \(gaussian, reaxff, slater\) or larger hardness J", [dict(Na={"hardness": 13.8}, Cl={"hardness": 29.7})]),
    "slater": (r"larger Slater radius \(now Na 0.5, Cl 0.5 Å.* or larger hardness J", [dict(Na={"radius": 2.085}, Cl={"radius": 0.994}), dict(Na={"hardness": 13.8}, Cl={"hardness": 29.7})]),
}


def _rock_salt_cube():
    """Eight atoms of rock salt (2.82 Å) in free space."""
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return Atoms(["Na" if g.sum() % 2 == 0 else "Cl" for g in grid], positions=2.82 * grid)


@pytest.mark.parametrize("kernel", list(ADVICE))
def test_breakdown_advice_is_right(kernel):
    """A set each kernel refuses, on bulk NaCl for reaxff (where LAMMPS silently gives −75..+95 e
    for such a set) and on a rock-salt cube for the others: the message says why and what to
    change; each change it suggests, made to the same calculator's parameters, gives charges
    inside the bound, and so does the gaussian kernel."""
    base = qu.load_params("rappe-goddard-1991")
    broken = _with(base, Na={"gamma": 2.0}, Cl={"gamma": 2.0}) if kernel != "slater" else _with(base, Na={"radius": 0.5}, Cl={"radius": 0.5})
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True) if kernel == "reaxff" else _rock_salt_cube()
    atoms.calc = QEqCalculator(params=broken, kernel=kernel)
    message, fixes = ADVICE[kernel]
    with pytest.raises(QEqConvergenceError, match=r"not positive definite .*the Coulomb coupling of close atoms outweighs their hardness .*" + message):
        atoms.get_potential_energy()
    for fix in fixes:
        atoms.calc.qeq_params = _with(broken, **fix)
        assert _solved(atoms)
    if kernel == "reaxff":
        atoms.calc = QEqCalculator(params=broken, kernel="gaussian")
        assert _solved(atoms)


# --- properties ----------------------------------------------------------------------------------

ELEMENTS = ["H", "O", "Na", "Cl"]


def _verdict(atoms, calc, total):
    """Either finite charges summing to ``total`` inside the bound, or a QEqError (returned)."""
    atoms.calc = calc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", qu.QEqConvergenceWarning)
            atoms.get_potential_energy()
            q = atoms.get_charges()
            forces = atoms.get_forces()
    except QEqError as error:
        assert str(error)
        event(f"refused: {type(error).__name__}")
        return error
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(forces))
    assert abs(q.sum() - total) < 1e-7
    assert np.all(np.abs(q) <= calc.limits.charge_bound([total]))
    event("returned charges")
    return None


@st.composite
def clusters(draw):
    n = draw(st.integers(2, 8))
    box = draw(st.sampled_from([6.0, 3.0, 10.0, 0.3]))
    spacing = draw(st.sampled_from([2.0, 0.0, 0.5]))  # atoms also spread along x: i × spacing
    positions = np.asarray(draw(st.lists(st.tuples(*[st.floats(0, box)] * 3), min_size=n, max_size=n)))
    positions[:, 0] += spacing * np.arange(n)
    symbols = draw(st.lists(st.sampled_from(ELEMENTS), min_size=n, max_size=n))
    total = float(draw(st.integers(-2, 2)))
    return symbols, positions, total


@settings(max_examples=EXAMPLES or 20, deadline=None, derandomize=not EXAMPLES, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kernel=st.sampled_from(["gaussian", "reaxff", "point", "slater"]), cluster=clusters())
def test_property_free_space_clusters(free_calcs, kernel, cluster):
    symbols, positions, total = cluster
    charges = np.zeros(len(symbols))
    charges[0] = total
    _verdict(Atoms(symbols, positions, charges=charges), free_calcs[kernel], total)


@st.composite
def cells(draw):
    """Cells from sound to absurd: a scale (Å), a random skew, sometimes a vector squeezed toward
    the span of the others (nearly singular), any pbc with at least one periodic direction."""
    scale = draw(st.sampled_from([6.0, 9.0, 3.0, 0.05]))
    skew = np.asarray(draw(st.lists(st.floats(-1.5, 1.5), min_size=9, max_size=9))).reshape(3, 3)
    cell = scale * (np.eye(3) + skew * draw(st.sampled_from([0.0, 0.3, 1.0])))
    squeeze = draw(st.sampled_from([None, None, 1e-2, 1e-6]))
    if squeeze:
        cell[2] = cell[0] + cell[1] + squeeze * cell[2]
    pbc = draw(st.sampled_from([p for p in itertools.product([False, True], repeat=3) if any(p)]))
    n = draw(st.integers(1, 4))
    fractions = np.asarray(draw(st.lists(st.tuples(*[st.floats(0, 1)] * 3), min_size=n, max_size=n)))
    symbols = draw(st.lists(st.sampled_from(["Na", "Cl", "O", "H"]), min_size=n, max_size=n))
    return symbols, fractions @ cell, cell, pbc


@settings(max_examples=EXAMPLES or 6, deadline=None, derandomize=not EXAMPLES)
@given(kernel=st.sampled_from(["gaussian", "reaxff"]), structure=cells())
def test_property_periodic_cells(kernel, structure):
    symbols, positions, cell, pbc = structure
    if kernel == "gaussian":
        pbc = (True, True, True)
    atoms = Atoms(symbols, positions, cell=cell, pbc=pbc)
    calc = QEqCalculator(kernel=kernel, cutoff=6.0 if kernel == "reaxff" else None, tol=1e-8, max_memory=2**30)
    _verdict(atoms, calc, 0.0)
