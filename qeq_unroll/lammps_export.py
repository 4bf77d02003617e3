"""A fitted parameter set as a LAMMPS input deck that computes the same energy, forces and charges.

``export_lammps(params, kernel, elements, folder)`` writes ``folder/in.qeq``, to be ``include``d
right after ``read_data`` (``units metal``, ``atom_style charge``, LAMMPS type i = ``elements[i-1]``),
and the ``fix qeq/*`` parameter file it reads. What the deck holds:

- **Charges**: ``fix qeq/reaxff`` for the ``reaxff`` kernel (the same shielded, tapered coupling:
  ``lammps_io``), ``fix qeq/point`` for ``point`` cut hard at its cutoff (``Point(taper=False)``).
  The fixes hard-code their Coulomb constant (14.4 eV·Å in qeq/reaxff, 1 in qeq/point). Scaling χ and
  J by 14.4/k_e (1/k_e) scales H q = −χ + μ1 as a whole, so the charges are this library's for any
  k_e; the file holds the scaled values.
- **Coulomb energy and forces**: ``pair_style lepton/coul`` (LAMMPS's LEPTON package) with one
  expression per type pair: k_e q_i q_j K_ij(r), written out (taper and shielding for reaxff). The
  pair style multiplies by LAMMPS's q²/r constant (14.399645 eV·Å in ``units metal``), so the
  expression carries the factor k_e/14.399645. LAMMPS computes the forces at the converged charges:
  the Hellmann–Feynman forces, which are the exact forces at convergence.
- **Short-range pair terms** as LAMMPS pair styles with the same formulas, truncated at the
  kernel's cutoff like the periodic energy here: ``born_mayer`` → ``born A ρ 0 0 0``,
  ``buckingham`` → ``buck A ρ C``, ``morse`` → ``morse D a r0`` (all of them map exactly, so no
  ``table`` is needed), overlaid with ``hybrid/overlay``.
- **The self energy** Σ χ_i q_i + ½ J_i q_i², which no LAMMPS pair style tallies: an atom-style
  variable, summed by ``compute qeq_self``; ``v_qeq_energy`` = ``pe`` + that sum is this library's
  energy, printed by the deck's ``thermo_style``.

LAMMPS's QEq fixes make the charges sum to zero whatever the initial charges: the deck reproduces
neutral systems only (``calculators.lammps.run_deck`` refuses a charged one).

Refused with the reason: the ``gaussian`` and ``slater`` kernels (no LAMMPS fix solves QEq with
Gaussian charges; ``fix qeq/slater`` is the Streitz–Mintmire 1s form with Wolf summation, not these
ns integrals), ``point`` without a hard cutoff, neural models, elements missing from the set.
Pure Python: no JAX arrays are traced, no LAMMPS is needed to write the deck.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from .constants import LAMMPS_COULOMB_CONSTANT
from .errors import QEqInputError
from .kernels import Point, ReaxFF
from .lammps_io import write_lammps_qeq
from .params import Params, pair_key, write_atomic

#: LAMMPS's q²/r constant in ``units metal`` (eV·Å), by which pair styles multiply q_i q_j.
LAMMPS_QQR2E_METAL = 14.399645
#: The deck's file names inside the export folder.
DECK, PARAM_FILE = "in.qeq", "param.qeq"
#: Our pair forms as LAMMPS pair styles: (style, coefficients in LAMMPS's order).
PAIR_STYLES = {
    "born_mayer": ("born", lambda c: (c["A"], c["rho"], 0.0, 0.0, 0.0)),
    "buckingham": ("buck", lambda c: (c["A"], c["rho"], c["C"])),
    "morse": ("morse", lambda c: (c["D"], c["a"], c["r0"])),
}


def _num(x) -> str:
    return repr(float(x))


def check_exportable(params: Params, kernel, elements: Sequence[str]) -> None:
    """Raise :class:`QEqInputError` with the reason when LAMMPS cannot reproduce this model."""
    if params.networks:
        raise QEqInputError("a neural model cannot be exported to LAMMPS: LAMMPS has no style for its networks")
    hard_point = isinstance(kernel, Point) and kernel.cutoff is not None and not kernel.taper
    if isinstance(kernel, ReaxFF) or hard_point:
        pass  # exportable
    elif isinstance(kernel, Point):
        raise QEqInputError(
            "kernel 'point' exports only with a hard cutoff (LAMMPS fix qeq/point cuts 1/r at its cutoff, no taper): "
            "use Point(cutoff=..., taper=False), or the reaxff kernel"
        )
    else:
        raise QEqInputError(
            f"kernel '{kernel.name}' cannot be exported to LAMMPS: no LAMMPS fix solves QEq with it "
            "(fix qeq/slater is the Streitz-Mintmire 1s form with Wolf summation); fit with --kernel reaxff "
            "(fix qeq/reaxff) to run the model in LAMMPS"
        )
    if not elements:
        raise QEqInputError("--elements is empty: name the element of each LAMMPS type, e.g. Na,Cl")
    if len(set(elements)) != len(elements):
        raise QEqInputError(f"--elements names an element twice ({','.join(elements)}): one LAMMPS type per element")
    params.require(kernel.required, params.species_indices(list(elements)))  # missing elements: named


def _coupling_expression(params: Params, kernel, a: str, b: str, scale: float) -> str:
    """Lepton expression of k_e q_i q_j K_ab(r) / 14.399645 for elements ``a``, ``b``."""
    if isinstance(kernel, Point):
        return f"{_num(scale)}*qi*qj/r"
    i, j = params.species_indices([a, b])
    shielding = (float(params.gamma[i]) * float(params.gamma[j])) ** -1.5
    taper = "(x^4*(((20*x-70)*x+84)*x-35)+1)"
    return f"{_num(scale)}*qi*qj*{taper}/(r^3+{_num(shielding)})^(1/3); x=r/{_num(kernel.cutoff)}"


def _pair_lines(params: Params, kernel, elements, scale) -> tuple[list[str], list[str]]:
    """``(styles, pair_coeff lines)`` of the Coulomb and short-range terms, types 1..n."""
    used: dict[str, None] = {}
    coeffs = []
    for ti, a in enumerate(elements, start=1):
        for tj, b in enumerate(elements, start=1):
            if tj < ti:
                continue
            coeffs.append(f'pair_coeff {ti} {tj} lepton/coul "{_coupling_expression(params, kernel, a, b, scale)}"')
            for form, c in params.pairs.get(pair_key(a, b), {}).items():
                style, order = PAIR_STYLES[form]
                used[style] = None
                coeffs.append(f"pair_coeff {ti} {tj} {style} " + " ".join(_num(v) for v in order(c)))
    return ["lepton/coul", *used], coeffs


def _self_energy(params: Params, elements) -> str:
    """Atom-style expression of χ_i q_i + ½ J_i q_i² (eV) by LAMMPS type."""
    parts = []
    for t, e in enumerate(elements, start=1):
        i = params.species_indices([e])[0]
        parts.append(f"(type=={t})*({_num(params.chi[i])}*q+{_num(0.5 * float(params.hardness[i]))}*q^2)")
    return "+".join(parts)


def deck_text(params: Params, kernel, elements: Sequence[str], coulomb_constant: float, folder: str,
              tolerance: float = 1e-10, maxiter: int = 1000) -> str:  # fmt: skip
    """The text of ``in.qeq`` (see the module docstring); ``folder`` is where the parameter file lies."""
    rc = _num(kernel.cutoff)
    styles, coeffs = _pair_lines(params, kernel, elements, coulomb_constant / LAMMPS_QQR2E_METAL)
    pair_style = ("pair_style hybrid/overlay " + " ".join(f"{s} {rc}" for s in styles) if len(styles) > 1
                  else f"pair_style lepton/coul {rc}")  # fmt: skip
    if len(styles) == 1:
        coeffs = [c.replace(" lepton/coul ", " ", 1) for c in coeffs]
    param_file = "${qeq_dir}/" + PARAM_FILE
    if isinstance(kernel, ReaxFF):
        fix = f"fix qeq_unroll all qeq/reaxff 1 0.0 {rc} {_num(tolerance)} {param_file} maxiter {maxiter}"
    else:
        fix = f"fix qeq_unroll all qeq/point 1 {rc} {_num(tolerance)} {maxiter} {param_file}"
    short = [k for k in params.pairs if set(k.split("-")) <= set(elements)]
    lines = [
        f"# qeq-unroll parameter set '{params.name}' as LAMMPS input: kernel {kernel.name}, cutoff {rc} A,",
        f"# Coulomb constant {_num(coulomb_constant)} eV*A. Include right after read_data; units metal, atom_style charge.",
        "# LAMMPS types: " + ", ".join(f"{t}={e}" for t, e in enumerate(elements, start=1)),
        "# v_qeq_energy = pe + the QEq self energy sum(chi q + J q^2 / 2): qeq-unroll's energy (eV).",
        "# fix qeq/* makes the charges sum to zero: this deck reproduces neutral systems only.",
    ]
    if not short:
        lines.append("# WARNING: no short-range pair terms among these elements: the energy is the electrostatics alone.")
    lines += [
        f"variable qeq_dir index {folder}",
        pair_style,
        *coeffs,
        "neighbor 2.0 bin",
        fix,
        f'variable qeq_self atom "{_self_energy(params, elements)}"',
        "compute qeq_self all reduce sum v_qeq_self",
        "variable qeq_energy equal pe+c_qeq_self",
        "thermo_style custom step temp pe v_qeq_energy press",
        "thermo_modify format float %.10g",
    ]
    return "\n".join(lines) + "\n"


def scaled_for_fix(params: Params, kernel, coulomb_constant: float) -> Params:
    """``params`` with χ and J scaled so that the fix's built-in Coulomb constant gives our charges."""
    fix_constant = LAMMPS_COULOMB_CONSTANT if isinstance(kernel, ReaxFF) else 1.0
    s = fix_constant / coulomb_constant
    return params.replace(chi=params.chi * s, hardness=params.hardness * s)


def export_lammps(params: Params, kernel, elements: Sequence[str], folder: "str | os.PathLike",
                  coulomb_constant: float, tolerance: float = 1e-10) -> list[Path]:  # fmt: skip
    """Write ``folder/in.qeq`` and ``folder/param.qeq`` (atomically) and return their paths.

    params: a per-element set; kernel: a ``ReaxFF`` or hard-cut ``Point`` kernel value; elements:
    the element of each LAMMPS type (index 0 = type 1); coulomb_constant: k_e (eV·Å) of the model;
    tolerance: the fix's relative CG tolerance. Raises :class:`QEqInputError` naming what LAMMPS
    cannot reproduce (``check_exportable``)."""
    elements = list(elements)
    check_exportable(params, kernel, elements)
    if not (math.isfinite(coulomb_constant) and coulomb_constant > 0):
        raise QEqInputError(f"coulomb_constant must be a positive number of eV*A, got {coulomb_constant}")
    folder = Path(folder)
    deck, param_file = folder / DECK, folder / PARAM_FILE
    style = "reaxff" if isinstance(kernel, ReaxFF) else "point"
    write_lammps_qeq(scaled_for_fix(params, kernel, coulomb_constant), param_file, elements, style=style)
    write_atomic(deck, deck_text(params, kernel, elements, coulomb_constant, str(folder), tolerance))
    return [deck, param_file]

