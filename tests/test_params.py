"""Parameter sets: JSON contract, the built-in Rappé–Goddard set, pytree behaviour."""

import json

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

import qeq_unroll as qu
from calculators import QEqCalculator
from qeq_unroll.errors import QEqInputError

# Rappé & Goddard 1991, Table I: chi (eV), J (eV, full IP - EA), R (Å), n
PUBLISHED = {
    "H": (4.528, 13.8904, 0.371, 1), "Li": (3.006, 4.772, 1.557, 2), "C": (5.343, 10.126, 0.759, 2),
    "N": (6.899, 11.760, 0.715, 2), "O": (8.741, 13.364, 0.669, 2), "F": (10.874, 14.948, 0.706, 2),
    "Na": (2.843, 4.592, 2.085, 3), "Si": (4.168, 6.974, 1.176, 3), "P": (5.463, 8.000, 1.102, 3),
    "S": (6.928, 8.972, 1.047, 3), "Cl": (8.564, 9.892, 0.994, 3), "K": (2.421, 3.840, 2.586, 4),
    "Br": (7.790, 8.850, 1.141, 4), "Rb": (2.331, 3.692, 2.770, 5), "I": (6.822, 7.524, 1.333, 5),
    "Cs": (2.183, 3.422, 2.984, 6),
}


def test_builtin_rappe_goddard_values():
    p = qu.load_params("rappe-goddard-1991")
    for el, (chi, J, R, n) in PUBLISHED.items():
        i = p.elements.index(el)
        assert float(p.chi[i]) == chi and float(p.hardness[i]) == J and float(p.radius[i]) == R
        assert p.n[i] == n
        assert float(p.sigma[i]) > 0 and float(p.gamma[i]) > 0
    assert "1991" in p.reference


# UFF (Rappé et al., JACS 114, 10024 (1992)) as tabulated by RDKit: Xi (eV), Hard = J/2 (eV), Radius (Å),
# and the period. RDKit spells lawrencium "Lw".
UFF_PUBLISHED = {
    "H": (4.528, 6.9452, 0.371, 1), "C": (5.343, 5.063, 0.759, 2), "O": (8.741, 6.682, 0.669, 2),
    "Na": (2.843, 2.296, 2.085, 3), "Cl": (8.564, 4.946, 0.994, 3), "Mg": (3.951, 3.693, 1.5, 3),
    "Ti": (3.47, 3.38, 1.607, 4), "Fe": (3.76, 4.14, 1.393, 4), "Zn": (5.106, 4.285, 1.4, 4),
    "U": (3.341, 2.853, 1.713, 7), "Lr": (3.5, 3.2, 1.9, 7),
}


def _period(symbol):
    """The period of an element: one more than the number of noble gases before it."""
    z = atomic_numbers[symbol]
    return 1 + sum(z > atomic_numbers[g] for g in ("He", "Ne", "Ar", "Kr", "Xe", "Rn"))


def test_builtin_uff_values():
    p = qu.load_params("uff-qeq")
    for el, (chi, hard, R, n) in UFF_PUBLISHED.items():
        i = p.elements.index(el)
        assert float(p.chi[i]) == chi and float(p.hardness[i]) == 2 * hard and float(p.radius[i]) == R
        assert p.n[i] == n
    assert "10024" in p.reference


def test_uff_agrees_with_rappe_goddard():
    """UFF took its QEq terms for these elements from Rappé & Goddard 1991: χ, J = 2 Hard and R agree."""
    uff, rg = qu.load_params("uff-qeq"), qu.load_params("rappe-goddard-1991")
    assert {"H", "C"} <= set(rg.elements)
    for j, el in enumerate(rg.elements):
        i = uff.elements.index(el)
        assert float(uff.chi[i]) == float(rg.chi[j]) and float(uff.hardness[i]) == float(rg.hardness[j])
        assert float(uff.radius[i]) == float(rg.radius[j]) and uff.n[i] == rg.n[j]


def test_uff_table_is_the_periodic_table_h_to_lr():
    p = qu.load_params("uff-qeq")
    assert set(p.elements) == set(chemical_symbols[1:104])
    J, R = np.asarray(p.hardness), np.asarray(p.radius)
    assert (J > 0).all() and (R > 0).all()
    assert [p.n[i] for i in range(len(p.elements))] == [_period(el) for el in p.elements]
    # the project's documented defaults: sigma = R, gamma = J / k_e (rounded to 1e-6)
    np.testing.assert_array_equal(np.asarray(p.sigma), R)
    np.testing.assert_allclose(np.asarray(p.gamma), J / 14.399645, atol=5e-7, rtol=0)


def _mgo_cube():
    """Mg4O4: a rock-salt cube, Mg-O 2.105 Å (bulk MgO)."""
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    symbols = ["Mg" if (i + j + k) % 2 == 0 else "O" for i, j, k in corners.astype(int)]
    return Atoms(symbols, positions=2.105 * corners)


def test_uff_charges_of_mgo_cluster():
    atoms = _mgo_cube()
    atoms.calc = QEqCalculator(params="uff-qeq", kernel="gaussian")
    q = atoms.get_charges()
    mg = np.array(atoms.get_chemical_symbols()) == "Mg"
    assert abs(q.sum()) < 1e-10
    assert (q[mg] > 0.1).all() and (q[~mg] < -0.1).all() and (np.abs(q) < 2).all()
    np.testing.assert_allclose(q[mg], q[mg][0], atol=1e-8)  # the four Mg are equivalent


def test_missing_element_error_names_builtin_sets_that_have_it():
    atoms = _mgo_cube()
    atoms.calc = QEqCalculator(params="rappe-goddard-1991", kernel="gaussian")
    with pytest.raises(QEqInputError, match=r"element Mg missing from parameter set 'rappe-goddard-1991' "
                       r"\(it has H, .*\); built-in sets with Mg: (.*, )?uff-qeq\b"):
        atoms.get_charges()
    p = qu.load_params("rappe-goddard-1991")
    message = r"elements Mg, Og missing .*; built-in sets with Mg: (.*, )?uff-qeq\b.*; no built-in set has Og$"
    with pytest.raises(QEqInputError, match=message):
        p.species_indices(["O", "Mg", "Og"])
    demo = qu.load_params("demo-nacl-water")
    with pytest.raises(QEqInputError, match=r"built-in sets with C: (.*, )?rappe-goddard-1991, (.*, )?uff-qeq\b"):
        demo.species_indices(["C"])


@pytest.mark.parametrize("name", qu.builtin_sets())
def test_json_round_trip_is_lossless(tmp_path, name):
    p = qu.load_params(name)
    path = tmp_path / "p.json"
    qu.save_params(p, path)
    again = qu.load_params(str(path))
    assert again.to_dict() == p.to_dict()
    assert json.loads(path.read_text()) == p.to_dict()


def test_design_example_loads():
    data = {
        "name": "my-set",
        "elements": {
            "Na": {"chi": 2.843, "hardness": 4.592, "sigma": 1.0, "gamma": 0.7, "radius": 2.085, "n": 3},
            "Cl": {"chi": 8.564, "hardness": 9.892, "sigma": 1.0, "gamma": 0.7, "radius": 0.994, "n": 3},
        },
        "pairs": {"Cl-Na": {"born_mayer": {"A": 1000.0, "rho": 0.3}}, "Na-Na": {"born_mayer": {"A": 500.0, "rho": 0.3}}},
    }
    p = qu.load_params(data)
    assert p.to_dict() == data


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: d["elements"]["Na"].update(colour=1.0), "unknown key.*'colour'.*Na"),
        (lambda d: d["elements"]["Na"].pop("chi"), "'chi' of element Na is missing"),
        (lambda d: d.update(extra=1), "unknown top-level key"),
        (lambda d: d["pairs"].update({"Na-Cl": {"born_mayer": {"A": 1.0, "rho": 0.3}}}), "alphabetical.*Cl-Na"),
        (lambda d: d["pairs"]["Cl-Na"].update(lennard_jones={"eps": 1.0}), "unknown pair form 'lennard_jones'"),
        (lambda d: d["pairs"]["Cl-Na"]["born_mayer"].pop("rho"), "needs exactly"),
        (lambda d: d["pairs"]["Cl-Na"]["born_mayer"].update(rho=-0.3), "'rho'.*must be positive"),
        (lambda d: d["elements"]["Cl"].update(sigma=-1.0), "'sigma' of element Cl.*must be positive"),
    ],
)
def test_bad_parameter_files(mutate, message):
    data = qu.load_params("demo-nacl-water").to_dict()
    mutate(data)
    with pytest.raises(QEqInputError, match=message):
        qu.Params.from_dict(data)


def test_unknown_source_lists_builtin_sets():
    with pytest.raises(QEqInputError, match="rappe-goddard-1991"):
        qu.load_params("no-such-set")


def test_params_are_a_differentiable_pytree():
    p = qu.load_params("demo-nacl-water")
    leaves = jax.tree_util.tree_leaves(p)
    n_pair_coefficients = sum(len(c) for forms in p.pairs.values() for c in forms.values())
    assert len(leaves) == 5 + n_pair_coefficients  # chi, hardness, sigma, gamma, radius + pair terms
    system = qu.make_system([[0, 0, 0], [0, 0, 2.4]], p.species_indices(["Na", "Cl"]))
    energy = qu.qeq_energy("gaussian", qu.Exact(), "implicit")
    grads = jax.grad(lambda p: energy(p, system)[0])(p)
    i_na = p.elements.index("Na")
    # dE/dchi_i = q_i at the minimum (the constraint term cancels in the difference)
    q = np.asarray(energy(p, system)[1]["charges"])
    assert abs(float(grads.chi[i_na]) - q[0]) < 1e-10
    assert float(grads.pairs["Cl-Na"]["born_mayer"]["A"]) > 0


def test_missing_element_in_the_wrong_case_suggests_the_symbol():
    with pytest.raises(QEqInputError, match=r"symbols are case-sensitive: Cl, Na\?"):
        qu.load_params("rappe-goddard-1991").species_indices(["na", "CL"])
