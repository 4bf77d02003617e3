"""Import and export of LAMMPS QEq parameter files.

LAMMPS numbers atom types 1..ntypes; here a *type map* ``type_elements`` is a sequence of chemical
symbols with ``type_elements[0]`` the element of LAMMPS type 1, ``type_elements[1]`` of type 2, ...
Several types may share one element.

File formats (one line per type; ``#`` starts a comment; blank lines are ignored):

- ``fix qeq/reaxff`` (style ``"reaxff"``), 4 columns::

      itype  chi  eta  gamma

- ``fix qeq/point``, ``fix qeq/shielded``, ``fix qeq/slater`` (styles ``"point"``, ``"shielded"``,
  ``"slater"``), 6 columns::

      itype  chi  eta  gamma  zeta  qcore

Columns and units (LAMMPS ``units metal`` / ``real`` both use Å; the QEq fixes take χ and η in eV;
qeq/reaxff and qeq/shielded couple with k_e = 14.4 eV·Å, ``constants.LAMMPS_COULOMB_CONSTANT``,
while qeq/point adds a bare 1/r with no Coulomb constant):

- ``chi``   electronegativity χ in eV            <-> ``Params.chi``
- ``eta``   self-Coulomb hardness J in eV (the diagonal of H)  <-> ``Params.hardness``
- ``gamma`` shielding γ in 1/Å (reaxff and shielded kernels)   <-> ``Params.gamma``
- ``zeta``  Slater exponent ζ in 1/Å (qeq/slater)   <-> ``Params.radius`` through the
  Rappé–Goddard relation ζ = λ (2n + 1) / (2 R) with λ = 0.4913 (``ZETA_LAMBDA``) and n the
  principal quantum number ``Params.n``; so R = λ (2n + 1) / (2 ζ).
- ``qcore`` core charge in e. This library has no core charges: it is written as 0 and any other
  value is an error on import.

The ``fix qeq/reaxff`` reader of LAMMPS rejects comment lines, so the 4-column file is written
without any; the 6-column files start with a commented header. This module's reader accepts
comments in both.

On export a column a style does not use is still written when known; an unknown ``gamma`` or ``zeta``
(radius or n absent) is written as 0.0. On import a 0.0 ``gamma``/``zeta`` means "not given"; a
``zeta`` becomes a radius only when n is known from the ``base`` parameters, else the radius is left
absent (NaN).

Pure Python/NumPy: no ASE, no LAMMPS needed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import QEqInputError
from .params import Params, write_atomic

#: λ of the Rappé–Goddard relation ζ = λ (2n + 1) / (2 R) between Slater exponent and radius.
ZETA_LAMBDA = 0.4913

#: Number of columns per style.
STYLE_COLUMNS = {"reaxff": 4, "point": 6, "shielded": 6, "slater": 6}
#: The ``Params`` keys each style's fix needs.
STYLE_KEYS = {
    "reaxff": ("chi", "hardness", "gamma"),
    "point": ("chi", "hardness"),
    "shielded": ("chi", "hardness", "gamma"),
    "slater": ("chi", "hardness", "radius", "n"),
}
_HEADERS = {4: "itype chi eta gamma", 6: "itype chi eta gamma zeta qcore"}


def zeta_from_radius(radius: float, n: int) -> float:
    """Slater exponent ζ (1/Å) from radius R (Å) and principal quantum number n."""
    return ZETA_LAMBDA * (2 * n + 1) / (2.0 * radius)


def radius_from_zeta(zeta: float, n: int) -> float:
    """Radius R (Å) from Slater exponent ζ (1/Å) and principal quantum number n."""
    return ZETA_LAMBDA * (2 * n + 1) / (2.0 * zeta)


def _check_style(style: str) -> str:
    if style not in STYLE_COLUMNS:
        raise QEqInputError(
            f"unknown LAMMPS QEq style '{style}' (valid: {', '.join(STYLE_COLUMNS)})"
        )
    return style


def _check_type_map(type_elements: Sequence[str]) -> list[str]:
    if isinstance(type_elements, str):
        raise QEqInputError(
            f"type_elements must be a list of symbols (index 0 = LAMMPS type 1), got the string "
            f"'{type_elements}'"
        )
    symbols = list(type_elements)
    if not symbols:
        raise QEqInputError("type_elements is empty: give one chemical symbol per LAMMPS type")
    for t, s in enumerate(symbols, start=1):
        if not isinstance(s, str) or not s:
            raise QEqInputError(f"type_elements entry for LAMMPS type {t} is not a symbol: {s!r}")
    return symbols


def _fmt(x: float) -> str:
    return repr(float(x))


def write_lammps_qeq(
    params: Params,
    path: "str | os.PathLike",
    type_elements: Sequence[str],
    style: str = "reaxff",
) -> None:
    """Write the parameter file of LAMMPS ``fix qeq/<style>`` for the type map ``type_elements``.

    style: ``"reaxff"`` (4 columns ``itype chi eta gamma``) or ``"point"``/``"shielded"``/``"slater"``
    (6 columns ``itype chi eta gamma zeta qcore``). Raises :class:`QEqInputError` when an element of
    the map is missing from ``params`` or lacks a parameter the style needs. Written atomically.
    """
    style = _check_style(style)
    symbols = _check_type_map(type_elements)
    index = {e: i for i, e in enumerate(params.elements)}
    for t, s in enumerate(symbols, start=1):
        if s not in index:
            raise params.missing_error([s], what=f"element {s} (LAMMPS type {t})")
    params.require(STYLE_KEYS[style], [index[s] for s in symbols])

    cols = {k: np.asarray(getattr(params, k), dtype=float) for k in ("chi", "hardness", "gamma", "radius")}
    ncol = STYLE_COLUMNS[style]
    lines = []
    if ncol == 6:  # fix qeq/reaxff rejects comment lines; the QEQ-package fixes skip them
        lines = [
            f"# LAMMPS fix qeq/{style} parameters written by qeq-unroll from set '{params.name}'",
            f"# units: chi, eta in eV; gamma, zeta in 1/Angstrom; zeta = {ZETA_LAMBDA}*(2n+1)/(2R)",
            "# " + _HEADERS[ncol],
        ]
    for t, s in enumerate(symbols, start=1):
        i = index[s]
        gamma = cols["gamma"][i]
        row = [str(t), _fmt(cols["chi"][i]), _fmt(cols["hardness"][i]), _fmt(gamma if math.isfinite(gamma) else 0.0)]
        if ncol == 6:
            radius = cols["radius"][i]
            n = params.n[i] if params.n else 0
            zeta = zeta_from_radius(radius, n) if (math.isfinite(radius) and 1 <= n <= 7) else 0.0
            row += [_fmt(zeta), _fmt(0.0)]
        lines.append(" ".join(row))
    write_atomic(path, "\n".join(lines) + "\n")


def read_lammps_qeq(
    path: "str | os.PathLike",
    type_elements: Sequence[str],
    style: str = "reaxff",
    base: Params | None = None,
    name: str | None = None,
) -> Params:
    """Read the parameter file of LAMMPS ``fix qeq/<style>`` into a :class:`Params`.

    type_elements: symbols, index 0 = LAMMPS type 1. base: optional parameters to start from: its
    elements, pair terms and the keys the file lacks (sigma, n, radius, ...) are kept and the file's
    values replace chi, hardness and (when non-zero) gamma and the radius from zeta (which needs
    n from ``base``). name: the new set's name (default: ``base``'s name, else the file's stem).

    Every type of the map must have exactly one line (types sharing an element must agree), the
    file must name no type outside the map, and qcore must be 0. Errors are :class:`QEqInputError`
    naming the file, line and problem.
    """
    style = _check_style(style)
    symbols = _check_type_map(type_elements)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise QEqInputError(f"cannot read LAMMPS qeq/{style} parameter file {path}: {exc}") from exc
    rows = _read_rows(path, text, style, symbols)
    per_element = _per_element(path, rows, symbols)
    data = base.to_dict() if base is not None else {"elements": {}}
    data["name"] = name if name is not None else (base.name if base is not None else path.stem)
    for s, (_, values) in per_element.items():
        data["elements"][s] = _element_entry(data["elements"].get(s, {}), values, STYLE_COLUMNS[style])
    try:
        params = Params.from_dict(data)
    except QEqInputError as exc:
        raise QEqInputError(f"{path}: {exc}") from exc
    try:
        params.require(STYLE_KEYS[style], params.species_indices(list(per_element)))
    except QEqInputError as exc:
        hint = " (fix qeq/slater needs a non-zero zeta and n from the base parameters)" if style == "slater" else ""
        raise QEqInputError(f"{path}: {exc}{hint}") from exc
    return params


def _read_row(path, lineno, line, style, symbols):
    """``(type, values)`` of one non-empty line of a ``fix qeq/<style>`` file, checked."""
    ncol = STYLE_COLUMNS[style]
    words = line.split()
    if len(words) != ncol:
        raise QEqInputError(
            f"{path}, line {lineno}: expected {ncol} columns '{_HEADERS[ncol]}' for fix qeq/{style}, got {len(words)}: '{line}'"
        )
    try:
        itype = int(words[0])
    except ValueError:
        raise QEqInputError(f"{path}, line {lineno}: the first column must be an integer LAMMPS type, got '{words[0]}'") from None
    try:
        values = [float(w) for w in words[1:]]
    except ValueError:
        raise QEqInputError(f"{path}, line {lineno}: non-numeric value in '{line}'") from None
    if not all(math.isfinite(v) for v in values):
        raise QEqInputError(f"{path}, line {lineno}: non-finite value in '{line}'")
    if not 1 <= itype <= len(symbols):
        raise QEqInputError(
            f"{path}, line {lineno}: LAMMPS type {itype} is not in the type map (types 1..{len(symbols)}: {', '.join(symbols)})"
        )
    if ncol == 6 and values[4] != 0.0:
        raise QEqInputError(
            f"{path}, line {lineno}: type {itype} ({symbols[itype - 1]}) has qcore = {values[4]}; "
            f"qeq-unroll has no core charges, only qcore = 0 is supported"
        )
    return itype, values


def _read_rows(path, text, style, symbols) -> dict:
    """``{type: (line number, values)}``: one line for every type of the map, no type twice."""
    rows: dict[int, tuple[int, list[float]]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        itype, values = _read_row(path, lineno, line, style, symbols)
        if itype in rows:
            raise QEqInputError(f"{path}, line {lineno}: LAMMPS type {itype} appears twice (first on line {rows[itype][0]})")
        rows[itype] = (lineno, values)
    missing = [t for t in range(1, len(symbols) + 1) if t not in rows]
    if missing:
        raise QEqInputError(f"{path}: no line for LAMMPS type(s) " + ", ".join(f"{t} ({symbols[t - 1]})" for t in missing))
    return rows


def _per_element(path, rows, symbols) -> dict:
    """``{element: (line number, values)}``; types sharing an element must agree."""
    per_element: dict[str, tuple[int, list[float]]] = {}
    for t in range(1, len(symbols) + 1):
        s = symbols[t - 1]
        lineno, values = rows[t]
        if s in per_element and per_element[s][1] != values:
            raise QEqInputError(
                f"{path}, line {lineno}: type {t} and line {per_element[s][0]} both map to element {s} but give different parameters"
            )
        per_element.setdefault(s, (lineno, values))
    return per_element


def _element_entry(entry, values, ncol) -> dict:
    """An element's JSON entry with the file's chi, hardness and (when non-zero) gamma and the
    radius from zeta (which needs the element's n)."""
    entry = dict(entry)
    entry["chi"], entry["hardness"] = values[0], values[1]
    if values[2] != 0.0:
        entry["gamma"] = values[2]
    if ncol == 6 and values[3] != 0.0:
        n = int(entry.get("n", 0))
        if 1 <= n <= 7:
            entry["radius"] = radius_from_zeta(values[3], n)
        else:
            entry.pop("radius", None)  # a zeta without n: the radius is unknown
    return entry
