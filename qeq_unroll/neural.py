"""Neural charge equilibration: χ_i and J_i from each atom's environment, and a short-range
network, in the family of the fourth-generation HDNNP (Ko et al., Nat. Commun. 12, 398 (2021)).

For atom i of element e with standardised symmetry functions g_i (``descriptors``)::

    χ_i = χ_e + o¹_e(g_i)           (eV/e)
    J_i = J_e · exp(o²_e(g_i))      (eV/e², positive by construction; with ``hardness_correction``)
    E_short = Σ_i s_e(g_i [, q_i]) + the element-pair terms of ``params.pairs``   (eV)

with o_e and s_e per-element multilayer perceptrons (tanh hidden layers). The last layer of every
network starts at zero, so an untrained model is exactly the element table it was built on. With
``charge_in_short`` the short-range energy takes the atom's charge as an input: the energy is then
not stationary in q, and only ``unrolled`` and ``implicit`` gradients give exact forces.

The networks are plain pytrees of arrays in ``Params.networks`` (``{"chi": layers, "short":
layers, "feature_mean": (E, F), "feature_std": (E, F)}``, layers a list of ``{"w": (E, in, out),
"b": (E, out)}``): they ride along wherever parameters go already (jit, optax, checkpoints, the
fitter's raw coordinates) with no framework in between. The widths σ and γ stay per element.

A model file (:func:`save_model`, :func:`load_model`) holds everything needed to evaluate the
model: kernel, Coulomb constant, descriptor settings, network shapes and weights, the element
table, versioned and written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .descriptors import SymmetryFunctions, default_symmetry_functions
from .energy import layout_pairs
from .errors import QEqInputError
from .learned import TrainedSolver
from .pairs import pair_energy
from .params import Params, check_format, write_atomic
from .terms import AtomTerms

#: The model file's format name and version (``load_model`` reads this one and the earlier ones
#: in ``MODEL_VERSIONS``; version 2 added the solver trained with the model).
MODEL_FORMAT = "qeq-unroll model"
MODEL_VERSION = 2
MODEL_VERSIONS = (1, 2)


def mlp(layers, x, species):
    """Per-element perceptron: (N, out) from inputs x (N, in) for atoms of ``species`` (N,);
    tanh between layers, linear output."""
    for k, layer in enumerate(layers):
        x = jnp.einsum("ni,nio->no", x, layer["w"][species]) + layer["b"][species]
        if k < len(layers) - 1:
            x = jnp.tanh(x)
    return x


def init_layers(key, n_elements: int, sizes, dtype) -> list:
    """Layers for ``sizes`` = (in, hidden..., out): hidden weights drawn with variance 1/in (LeCun),
    biases zero, and the last layer zero (the network starts as the zero function)."""
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        last = k == len(sizes) - 2
        w = jnp.zeros((n_elements, n_in, n_out), dtype) if last else jax.random.normal(sub, (n_elements, n_in, n_out), dtype) / np.sqrt(n_in)
        layers.append({"w": w, "b": jnp.zeros((n_elements, n_out), dtype)})
    return layers


@dataclasses.dataclass(frozen=True)
class NeuralTerms:
    """The per-atom terms of a neural charge model (``terms.Terms``; see the module docstring).

    descriptors: ``descriptors.SymmetryFunctions``; hidden: hidden layer widths of every network;
    hardness_correction: J_i = J_e exp(o²); charge_in_short: q_i is an input of the short-range network."""

    descriptors: SymmetryFunctions
    hidden: tuple = (16, 16)
    hardness_correction: bool = True
    charge_in_short: bool = False

    @property
    def charge_dependent(self) -> bool:
        return self.charge_in_short

    def features(self, params, system, pairs):
        """(N, F) standardised symmetry functions of every atom, and (N,) its neighbour count."""
        g, count = self.descriptors(pairs, system.species)
        net, s = params.networks, system.species
        return (g - net["feature_mean"][s]) / net["feature_std"][s], count

    def atom_terms(self, params, system, pairs) -> AtomTerms:
        g, _ = self.features(params, system, pairs)
        s = system.species
        out = mlp(params.networks["chi"], g, s)
        chi = params.chi[s] + out[:, 0]
        hardness = params.hardness[s] * jnp.exp(out[:, 1]) if self.hardness_correction else params.hardness[s]
        return AtomTerms(chi, hardness)

    def short_range(self, params, system, pairs, charges):
        g, _ = self.features(params, system, pairs)
        if self.charge_in_short:
            g = jnp.concatenate([g, charges[:, None]], axis=1)
        e = mlp(params.networks["short"], g, system.species)[:, 0]
        atoms = jnp.sum(jnp.where(system.mask, e, 0.0))
        return atoms + pair_energy(params, system.species, pairs.r, pairs.mask, pairs.neighbors)

    def diagnostics(self, params, system, pairs) -> dict:
        """``most_neighbors``: the largest neighbour count of a real atom within the descriptor
        cutoff; above ``descriptors.max_neighbors`` the environment was cut (results invalid)."""
        _, count = self.descriptors(pairs, system.species)
        return {"most_neighbors": jnp.max(jnp.where(system.mask, count, 0))}

    def check(self, diagnostics) -> None:
        """Host: raise when an evaluation's environment was cut (``diagnostics`` from :meth:`diagnostics`)."""
        most = int(diagnostics["most_neighbors"])
        if most > self.descriptors.max_neighbors:
            raise QEqInputError(
                f"an atom has {most} neighbours within {self.descriptors.cutoff} Å; the model's descriptors were "
                f"built for at most {self.descriptors.max_neighbors}: the structure is denser than the training data"
            )

    def init_networks(self, key, n_elements: int, dtype=jnp.float64) -> dict:
        """Fresh networks (standardisation: mean 0, std 1; last layers zero)."""
        f = self.descriptors.size
        k1, k2 = jax.random.split(key)
        n_out = 2 if self.hardness_correction else 1
        return {
            "chi": init_layers(k1, n_elements, (f, *self.hidden, n_out), dtype),
            "short": init_layers(k2, n_elements, (f + int(self.charge_in_short), *self.hidden, 1), dtype),
            "feature_mean": jnp.zeros((n_elements, f), dtype),
            "feature_std": jnp.ones((n_elements, f), dtype),
        }

    def to_dict(self) -> dict:
        d = self.descriptors
        return dict(cutoff=d.cutoff, radial=[list(r) for r in d.radial], angular=[list(a) for a in d.angular],
                    max_neighbors=d.max_neighbors, hidden=list(self.hidden),
                    hardness_correction=self.hardness_correction, charge_in_short=self.charge_in_short)  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping, n_elements: int) -> "NeuralTerms":
        sf = SymmetryFunctions(n_elements, float(data["cutoff"]), tuple(tuple(map(float, r)) for r in data["radial"]),
                               tuple(tuple(map(float, a)) for a in data["angular"]), int(data["max_neighbors"]))  # fmt: skip
        return cls(sf, tuple(int(h) for h in data["hidden"]), bool(data["hardness_correction"]), bool(data["charge_in_short"]))


def neural_terms(n_elements: int, cutoff=6.0, hidden=(16, 16), hardness_correction=True, charge_in_short=False, max_neighbors=48):
    """:class:`NeuralTerms` with the default symmetry functions (``descriptors.default_symmetry_functions``)."""
    sf = default_symmetry_functions(n_elements, cutoff, max_neighbors=max_neighbors)
    return NeuralTerms(sf, tuple(hidden), hardness_correction, charge_in_short)


def standardise(networks: dict, features: np.ndarray, species: np.ndarray, n_elements: int) -> dict:
    """``networks`` with ``feature_mean``/``feature_std`` of the features (A, F) of atoms of
    ``species`` (A,): per element; a feature that does not vary (or an element with no atoms)
    keeps a scale of 1."""
    features = np.asarray(features, dtype=float)
    mean = np.zeros((n_elements, features.shape[1]))
    std = np.ones((n_elements, features.shape[1]))
    for e in range(n_elements):
        rows = features[np.asarray(species) == e]
        if len(rows):
            mean[e] = rows.mean(axis=0)
            spread = rows.std(axis=0)
            std[e] = np.where(spread > 1e-6, spread, 1.0)
    dtype = networks["feature_mean"].dtype
    return dict(networks, feature_mean=jnp.asarray(mean, dtype), feature_std=jnp.asarray(std, dtype))


def fitted_to_data(model, params: Params, batcher, margin: float = 1.5):
    """``(terms, params)`` for the data of ``batcher`` (a ``dataset.Batcher`` built for
    ``model``): the descriptors' ``max_neighbors`` set to ``margin`` × the most neighbours an
    atom of the data has within the cutoff (rounded up to a multiple of 4; the triplet sums cost
    its square), and the networks' feature standardisation taken from the data. ``model.terms``
    must hold at least the data's neighbours: a structure with more is an error naming it."""
    sf = model.terms.descriptors

    @jax.jit
    def features(params, system, neighbors):
        return sf(layout_pairs(model.kernel, system, neighbors), system.species)

    rows, species, most = [], [], 0
    for plan in batcher.plans():
        batch = batcher.batch(plan)
        g, count = jax.vmap(features, in_axes=(None, 0, 0))(params, batch.system, batch.neighbors)
        for b, i in enumerate(plan.indices):
            c = batcher.dataset[i]
            n = c.n_atoms
            if int(np.max(count[b, :n])) > sf.max_neighbors:
                raise QEqInputError(
                    f"{c.source or f'configuration {i}'}: an atom has {int(np.max(count[b, :n]))} neighbours within "
                    f"{sf.cutoff} Å, more than the {sf.max_neighbors} the descriptors hold: raise max_neighbors"
                )
            most = max(most, int(np.max(count[b, :n])))
            rows.append(np.asarray(g[b, :n]))
            species.append(np.asarray(c.species))
    networks = standardise(params.networks, np.concatenate(rows), np.concatenate(species), len(params.elements))
    slots = min(sf.max_neighbors, 4 * int(np.ceil(margin * max(most, 1) / 4)))
    terms = dataclasses.replace(model.terms, descriptors=dataclasses.replace(sf, max_neighbors=slots))
    return terms, params.replace(networks=networks)


def _lists(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, dtype=float).tolist(), tree)


def save_model(path: "str | os.PathLike", terms: NeuralTerms, params: Params, kernel, coulomb_constant: float,
               charges: bool = True, offsets: Mapping[str, float] | None = None, solver=None) -> None:  # fmt: skip
    """Write a model file (JSON, atomically): format and version, kernel, Coulomb constant,
    whether the model has charges (False: a purely local model, solver ``none``), the energy
    offset of each element (eV; added to the model's energy, so the reported energy is on the
    reference's scale), descriptor settings and network shapes (``terms``), the element table,
    the weights, and the solver the model was trained with: its name and K, and for a
    ``learned.TrainedSolver`` its settings (its arrays are ``networks["solver"]``)."""
    data = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "kernel": {"name": kernel.name, "cutoff": kernel.cutoff},
        "coulomb_constant": float(coulomb_constant),
        "charges": bool(charges),
        "energy_offsets": {el: float((offsets or {}).get(el, 0.0)) for el in params.elements},
        "terms": terms.to_dict(),
        "params": params.to_dict(),
        "networks": _lists(dict(params.networks)),
        "solver": _solver_record(solver),
    }
    write_atomic(path, json.dumps(data) + "\n")


def is_model_file(source) -> bool:
    """True when ``source`` is a path to a JSON file that declares itself a model file."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return False
    try:
        return json.loads(Path(source).read_text()).get("format") == MODEL_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _solver_record(solver) -> dict | None:
    """What a model file says of the solver it was trained with (None: not recorded)."""
    if solver is None:
        return None
    if isinstance(solver, TrainedSolver):
        return {"name": solver.name, "iterations": solver.iterations, "trained": solver.to_dict()}
    return {"name": solver.name, "iterations": getattr(solver, "iterations", None)}


def _networks(data, terms: NeuralTerms, n_elements: int, path, trained=None) -> dict:
    like = terms.init_networks(jax.random.PRNGKey(0), n_elements)
    if trained is not None:
        like["solver"] = trained.init_arrays()
    treedef = jax.tree_util.tree_structure(like)
    try:
        leaves = [np.asarray(a, dtype=float) for a in treedef.flatten_up_to(data)]
    except (ValueError, TypeError):
        leaves = None
    if leaves is None or any(a.shape != b.shape for a, b in zip(leaves, jax.tree_util.tree_leaves(like))):
        raise QEqInputError(f"model file {path}: the network weights do not match the shapes its settings declare")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in leaves])


def load_model(path: "str | os.PathLike"):
    """``(terms, params, settings)`` from a model file; settings: ``{"kernel": {"name", "cutoff"},
    "coulomb_constant", "charges", "energy_offsets": {element: eV}, "solver"}``, the solver the
    model was trained with (None when the file does not say; else ``{"name", "iterations"}`` and,
    for a solver trained with the model, ``"trained"``: a ``learned.TrainedSolver``). Another
    format version is an error naming the versions read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QEqInputError(f"cannot read model file {path}: {exc}") from exc
    check_format(data, path, MODEL_FORMAT, MODEL_VERSIONS, "model file")
    params = Params.from_dict(data["params"])
    n = len(params.elements)
    terms = NeuralTerms.from_dict(data["terms"], n)
    solver = data.get("solver")
    if solver is not None and "trained" in solver:
        solver = dict(solver, trained=TrainedSolver.from_dict(solver["trained"]))
    trained = None if solver is None else solver.get("trained")
    params = params.replace(networks=_networks(data["networks"], terms, n, path, trained))
    settings = {"kernel": dict(data["kernel"]), "coulomb_constant": float(data["coulomb_constant"]),
                "charges": bool(data["charges"]), "energy_offsets": dict(data["energy_offsets"]), "solver": solver}  # fmt: skip
    return terms, params, settings
