"""ReaxFF force-field files (``ffield``) as a source of QEq parameters.

A ReaxFF ``ffield`` (van Duin et al., J. Phys. Chem. A 105, 9396 (2001); the format LAMMPS
``pair_style reaxff`` reads) holds, per element, the EEM (electronegativity equalisation) terms
that ``fix qeq/reaxff ... reaxff`` takes from the pair style:

- line 1 of the element's block: ``symbol r_s valency mass r_vdw epsilon gammaEEM r_pi valency_e``;
  ``gammaEEM`` is the shielding γ (1/Å) of H_ij = Tap(r) / (r³ + (γ_i γ_j)^(-3/2))^(1/3);
- line 2: ``alpha gamma_w valency_boc p_ovun5 n.u. chiEEM etaEEM p_hbond``; ``chiEEM`` is χ (eV)
  and ``etaEEM`` is η (eV), half the idempotential: the EEM self energy is χq + η q², so the
  hardness of this library (the diagonal of H, self energy ½ J q²) is J = 2η. LAMMPS doubles η when
  it reads the file for the same reason; the parity test against ``pair_style reaxff`` checks it.

The file is: a comment line; ``N ! general parameters`` and N lines; ``M ! Nr of atoms ...`` and
three more header lines; then M blocks of four lines (five in the ``lgvdw`` variant), each starting
with the element symbol. The upper taper radius, general parameter 13, is the cutoff LAMMPS uses
for the shielded Coulomb: pass it as ``kernel="reaxff", cutoff=...`` (``ffield_taper_radius``).
Bond, angle and torsion sections are not read. Pure Python: no JAX, no ASE.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import QEqInputError

#: 0-based positions of the EEM terms: (line of the element's block, number on that line).
GAMMA_AT, CHI_AT, ETA_AT = (0, 5), (1, 5), (1, 6)
#: 1-based index of the upper taper radius among the general parameters.
TAPER_RADIUS_INDEX = 13


def _numbers(path, lineno, words):
    try:
        return [float(w) for w in words]
    except ValueError:
        raise QEqInputError(f"{path}, line {lineno}: expected numbers, got '{' '.join(words)}'") from None


def _count(path, lines, at, what):
    """The integer that starts line ``at`` (0-based), the size of the section ``what``."""
    if at >= len(lines):
        raise QEqInputError(f"{path}: the file ends before the {what} section (line {at + 1}); is it a ReaxFF ffield?")
    words = lines[at].split()
    try:
        return int(words[0])
    except (ValueError, IndexError):
        raise QEqInputError(
            f"{path}, line {at + 1}: expected the number of {what} at the start of the line, got '{lines[at].strip()}'"
        ) from None


def _general(path, lines) -> list[float]:
    n = _count(path, lines, 1, "general parameters")
    if len(lines) < 2 + n:
        raise QEqInputError(f"{path}: {n} general parameters announced on line 2, the file ends first")
    return [_numbers(path, 3 + i, lines[2 + i].split("!")[0].split()[:1] or ["(nothing)"])[0] for i in range(n)]


def _is_symbol_line(line: str) -> bool:
    words = line.split()
    return bool(words) and words[0][0].isalpha()


def _blocks(path, lines, start, count) -> list[tuple[int, str, list[list[float]]]]:
    """``(line number, symbol, rows)`` of each element block; a block runs to the next symbol line."""
    blocks, i = [], start
    while len(blocks) < count:
        if i >= len(lines) or not _is_symbol_line(lines[i]):
            got = lines[i].strip() if i < len(lines) else "the end of the file"
            raise QEqInputError(
                f"{path}, line {i + 1}: expected element {len(blocks) + 1} of {count} of the atom section "
                f"(a line starting with its symbol), got '{got}'"
            )
        words = lines[i].split()
        rows, first = [_numbers(path, i + 1, words[1:])], i + 1
        i += 1
        # continuation lines: numbers only; the block ends at the next symbol or after the section
        while i < len(lines) and not _is_symbol_line(lines[i]) and len(rows) < 5 and "!" not in lines[i]:
            rows.append(_numbers(path, i + 1, lines[i].split()))
            i += 1
        blocks.append((first, words[0], rows))
    return blocks


def _entry(path, lineno, symbol, rows) -> dict:
    def value(at, name):
        line, k = at
        if line >= len(rows) or k >= len(rows[line]):
            raise QEqInputError(
                f"{path}, line {lineno}: element {symbol} has no {name} (line {line + 1} of its block, number {k + 1})"
            )
        return rows[line][k]

    gamma, chi, eta = value(GAMMA_AT, "gammaEEM"), value(CHI_AT, "chiEEM"), value(ETA_AT, "etaEEM")
    if not (eta > 0 and gamma > 0):
        raise QEqInputError(
            f"{path}, line {lineno}: element {symbol} has etaEEM = {eta}, gammaEEM = {gamma}; both must be positive for QEq"
        )
    return {"chi": chi, "hardness": 2.0 * eta, "gamma": gamma}


def read_ffield(path: "str | os.PathLike") -> dict:
    """The QEq terms of every element of a ReaxFF ``ffield`` as a parameter-set dict (the JSON
    layout of :func:`qeq_unroll.params.Params.from_dict`): χ (eV), J = 2η (eV), γ (1/Å); no pair
    terms (ReaxFF's bonded and van der Waals terms are not QEq's). Errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QEqInputError(f"cannot read ReaxFF ffield {path}: {exc}") from exc
    general = _general(path, lines)
    at = 2 + len(general)
    count = _count(path, lines, at, "atoms")
    entries = {}
    for lineno, symbol, rows in _blocks(path, lines, at + 4, count):
        if symbol in entries:
            raise QEqInputError(f"{path}, line {lineno}: element {symbol} appears twice in the atom section")
        entries[symbol] = _entry(path, lineno, symbol, rows)
    taper = general[TAPER_RADIUS_INDEX - 1] if len(general) >= TAPER_RADIUS_INDEX else None
    note = f"upper taper radius {taper} Å: use kernel 'reaxff' with cutoff {taper}" if taper else "no taper radius"
    return {
        "name": path.name,
        "reference": f"ReaxFF ffield {path} (first line: {lines[0].strip()[:200]})",
        "notes": f"chi = chiEEM, hardness = 2 etaEEM, gamma = gammaEEM (the conventions of LAMMPS fix qeq/reaxff ... reaxff); {note}",
        "elements": entries,
    }


def ffield_taper_radius(path: "str | os.PathLike") -> float:
    """The upper taper radius (Å) of a ReaxFF ``ffield``: the cutoff of its shielded Coulomb."""
    path = Path(path)
    general = _general(path, path.read_text().splitlines())
    if len(general) < TAPER_RADIUS_INDEX:
        raise QEqInputError(f"{path}: {len(general)} general parameters, the taper radius is number {TAPER_RADIUS_INDEX}")
    return general[TAPER_RADIUS_INDEX - 1]


def is_ffield(path: "str | os.PathLike") -> bool:
    """Whether ``path`` is a file whose second line announces ReaxFF general parameters."""
    try:
        with open(path) as fh:
            fh.readline()
            second = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    words = second.split("!")
    return len(words) > 1 and words[0].strip().isdigit() and "general" in words[1].lower()
