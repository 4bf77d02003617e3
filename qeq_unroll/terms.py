"""Where the per-atom terms of the model come from: χ_i, J_i and the short-range energy.

A *terms* value answers two questions for a system and its pairs (``geometry.Pairs``, any layout):

- ``atom_terms(params, system, pairs) -> AtomTerms``: each atom's electronegativity χ_i (eV/e)
  and hardness J_i (eV/e²), which may depend on the atom's environment (the pairs around it);
- ``short_range(params, system, pairs, charges) -> E`` (eV): the energy beyond QEq, which may
  depend on the charges (then the total energy is not stationary in q, and only ``unrolled`` and
  ``implicit`` gradients are exact: ``charge_dependent`` says so);
- ``diagnostics(params, system, pairs) -> dict``: values the host checks after an evaluation
  (the model's ``aux["terms"]``; e.g. a neural model's neighbour count), and
  ``check(diagnostics)``, which raises on the host when they show the evaluation invalid.

Solvers, gradient modes and kernels never see where χ and J come from: the model
(``energy.QEqModel``) asks its terms value and builds the charge problem from the answer. Widths
(σ, γ, Slater radii) stay per element: the kernels read them from ``params``.

:class:`ElementTable` is the per-element model: χ and J by element, pair terms by element pair
(``pairs``). A model whose χ_i depends on the environment (a network on atom-centred descriptors)
is a second implementation of the same methods (``neural.NeuralTerms``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp

from .hardness import symmetric_list_matvec
from .pairs import pair_energy


class AtomTerms(NamedTuple):
    """chi (N,) eV/e and hardness (N,) eV/e² of every atom (padding entries are ignored)."""

    chi: jax.Array
    hardness: jax.Array


class Terms(Protocol):
    """The per-atom terms of a model (see the module docstring)."""

    charge_dependent: bool

    def atom_terms(self, params, system, pairs) -> AtomTerms: ...

    def short_range(self, params, system, pairs, charges) -> jax.Array: ...

    def diagnostics(self, params, system, pairs) -> dict: ...

    def check(self, diagnostics) -> None: ...


@dataclasses.dataclass(frozen=True)
class ElementTable:
    """χ and J per element (``params.chi``, ``params.hardness``) and the element-pair terms of
    ``params.pairs`` (Born–Mayer, Buckingham, Morse) as the short-range energy."""

    charge_dependent = False

    def atom_terms(self, params, system, pairs) -> AtomTerms:
        s = system.species
        return AtomTerms(params.chi[s], params.hardness[s])

    def short_range(self, params, system, pairs, charges):
        return pair_energy(params, system.species, pairs.r, pairs.mask, pairs.neighbors)

    def diagnostics(self, params, system, pairs) -> dict:
        return {}

    def check(self, diagnostics) -> None:
        """Host: nothing to check for an element table."""


def atom_sum(pairs, values):
    """Σ_j v_ij over each atom's partners: (N,) from ``values`` laid out like ``pairs.r`` ((N, N),
    (S, N, N) over lattice images, or (M, N) slots of a neighbour list; zero where there is no
    pair). On a neighbour list the values must be symmetric, v_ij = v_ji (a function of the pair
    distance, say): the list's distance derivative takes the two slots of a pair to have equal
    cotangents, which the sum's derivative, ½(ȳ_i + ȳ_j) per slot, keeps."""
    if pairs.neighbors is not None:
        ones = jnp.ones(values.shape[1], values.dtype)
        return symmetric_list_matvec(values, pairs.neighbors, ones, pairs.occupied)
    total = jnp.sum(values, axis=-1)
    return jnp.sum(total, axis=0) if total.ndim == 2 else total
