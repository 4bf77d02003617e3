"""Parameter sets: JSON contract, the built-in Rappé–Goddard set, pytree behaviour."""

import json

import jax
import numpy as np
import pytest

import qeq_unroll as qu
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
