"""Parameters of the charge model: per-element QEq terms and short-range pair terms.

Units: energies in eV, lengths in Å, the reaxff shielding ``gamma`` in 1/Å.

``Params`` is a JAX pytree: its float arrays are leaves (differentiable, fittable); the element
symbols, the Slater principal quantum numbers, the pair forms and the set's name are static.
An element may lack a key that no kernel in use needs: such entries are NaN and are dropped again
on save, so a JSON file round-trips losslessly.

JSON layout (docs/reference.md)::

    {"name": "my-set",
     "elements": {"Na": {"chi": 2.843, "hardness": 4.592, "sigma": 1.0, "gamma": 0.7,
                         "radius": 2.085, "n": 3}, ...},
     "pairs": {"Cl-Na": {"born_mayer": {"A": 1000.0, "rho": 0.3}}, ...}}
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .errors import QEqInputError
from .reaxff_ffield import is_ffield, read_ffield

#: Per-element float keys, in the order of the ``Params`` fields.
ELEMENT_FLOAT_KEYS = ("chi", "hardness", "sigma", "gamma", "radius")
#: Keys that must be strictly positive where present.
POSITIVE_KEYS = ("hardness", "sigma", "gamma", "radius")
#: Pair forms and their coefficients: E(r) in eV, r in Å.
PAIR_FORMS = {
    "born_mayer": ("A", "rho"),  # A exp(-r/rho)
    "buckingham": ("A", "rho", "C"),  # A exp(-r/rho) - C / r^6
    "morse": ("D", "a", "r0"),  # D [(1 - exp(-a (r - r0)))^2 - 1]
}
#: Pair coefficients that must be strictly positive.
POSITIVE_PAIR_KEYS = ("rho", "a", "r0", "D")
_TOP_KEYS = ("name", "reference", "notes", "elements", "pairs")


def pair_key(a: str, b: str) -> str:
    """The canonical key of an element pair: the two symbols in alphabetical order, '-'-joined."""
    return "-".join(sorted((a, b)))


@dataclasses.dataclass(frozen=True)
class Params:
    """Per-element arrays of shape ``(n_elements,)`` indexed like ``elements``; NaN = not given.

    chi: electronegativity χ (eV/e). hardness: J, the diagonal of H before kernel self terms (eV/e²).
    sigma: gaussian charge width (Å). gamma: reaxff shielding (1/Å). radius: Slater radius R (Å).
    n: Slater principal quantum number (static; 0 = not given).
    pairs: ``{"Cl-Na": {"born_mayer": {"A": array, "rho": array}}}``, arrays are scalars.
    networks: the weights of an environment-dependent model (``neural``), a pytree of arrays;
    empty for an element table. They travel in a model file (``neural.save_model``), not in the
    JSON layout of a parameter set.
    """

    elements: tuple[str, ...]
    chi: jax.Array
    hardness: jax.Array
    sigma: jax.Array
    gamma: jax.Array
    radius: jax.Array
    n: tuple[int, ...] = ()
    pairs: Mapping[str, Mapping[str, Mapping[str, jax.Array]]] = dataclasses.field(default_factory=dict)
    networks: Mapping = dataclasses.field(default_factory=dict)
    name: str = "unnamed"
    reference: str = ""
    notes: str = ""

    # --- lookups -------------------------------------------------------------------------------
    def species_indices(self, symbols: Sequence[str]) -> np.ndarray:
        """Map chemical symbols to indices into ``elements``; unknown symbols are an error."""
        index = {e: i for i, e in enumerate(self.elements)}
        missing = sorted({s for s in symbols if s not in index})
        if missing:
            raise self.missing_error(missing)
        return np.asarray([index[s] for s in symbols], dtype=np.int32)

    def missing_error(self, missing: Sequence[str], what: str | None = None) -> QEqInputError:
        """The error for elements ``missing`` from this set: it names them, the set, the elements
        the set has and the built-in sets that have them. ``what`` replaces the leading
        "element X" (e.g. "element K (LAMMPS type 2)")."""
        what = what or f"element{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        cased = [s.strip().capitalize() for s in missing if s.strip().capitalize() in self.elements and s.strip().capitalize() != s]
        hint = f" (symbols are case-sensitive: {', '.join(cased)}?)" if cased else ""
        return QEqInputError(
            f"{what} missing from parameter set '{self.name}'{hint} (it has {', '.join(self.elements)}); "
            f"{_builtin_sets_having(missing)}"
        )

    def require(self, keys: Sequence[str], species: Sequence[int] | None = None) -> None:
        """Check that every element in use has finite values for ``keys`` and positive ones where
        physics demands it. Raises :class:`QEqInputError` naming the element, key and set."""
        used = range(len(self.elements)) if species is None else sorted(set(int(s) for s in species))
        for key in keys:
            if key == "n":
                for i in used:
                    if not 1 <= self.n[i] <= 7:
                        raise QEqInputError(
                            f"parameter 'n' of element {self.elements[i]} in set '{self.name}' "
                            f"is missing or not a principal quantum number 1..7"
                        )
                continue
            values = np.asarray(getattr(self, key), dtype=float)
            for i in used:
                v = values[i]
                if not math.isfinite(v):
                    raise QEqInputError(
                        f"parameter '{key}' of element {self.elements[i]} is missing from set '{self.name}'"
                    )
                if key in POSITIVE_KEYS and v <= 0:
                    raise QEqInputError(
                        f"parameter '{key}' of element {self.elements[i]} in set '{self.name}' "
                        f"must be positive, got {v}"
                    )

    def restricted(self, elements: Sequence[str]) -> "Params":
        """The set with only ``elements`` (in that order) and the pair terms among them."""
        self.species_indices(elements)  # unknown elements are an error naming them
        data = self.to_dict()
        data["elements"] = {e: data["elements"][e] for e in elements}
        pairs = {k: v for k, v in data.get("pairs", {}).items() if set(k.split("-")) <= set(elements)}
        data.pop("pairs", None)
        if pairs:
            data["pairs"] = pairs
        return Params.from_dict(data)

    def replace(self, **changes) -> "Params":
        return dataclasses.replace(self, **changes)

    # --- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping) -> "Params":
        """Build from the JSON layout; unknown or missing keys are errors naming them."""
        name = str(data.get("name", "unnamed"))
        unknown = set(data) - set(_TOP_KEYS)
        if unknown:
            raise QEqInputError(f"unknown top-level key(s) {sorted(unknown)} in parameter set '{name}'")
        if not data.get("elements"):
            raise QEqInputError(f"parameter set '{name}' has no 'elements'")
        elements = tuple(data["elements"])
        columns = {k: [] for k in ELEMENT_FLOAT_KEYS}
        ns = []
        for el in elements:
            entry = data["elements"][el]
            bad = set(entry) - set(ELEMENT_FLOAT_KEYS) - {"n"}
            if bad:
                raise QEqInputError(
                    f"unknown key(s) {sorted(bad)} for element {el} in parameter set '{name}' "
                    f"(valid: {', '.join(ELEMENT_FLOAT_KEYS + ('n',))})"
                )
            for k in ("chi", "hardness"):
                if k not in entry:
                    raise QEqInputError(f"parameter '{k}' of element {el} is missing from set '{name}'")
            for k in ELEMENT_FLOAT_KEYS:
                columns[k].append(float(entry.get(k, math.nan)))
            ns.append(int(entry.get("n", 0)))
        pairs = {}
        for key, forms in (data.get("pairs") or {}).items():
            parts = key.split("-")
            if len(parts) != 2 or pair_key(*parts) != key:
                raise QEqInputError(
                    f"pair key '{key}' in set '{name}' must be two symbols in alphabetical order, "
                    f"e.g. '{pair_key(*parts) if len(parts) == 2 else 'Cl-Na'}'"
                )
            for el in parts:
                if el not in elements:
                    raise QEqInputError(f"pair '{key}' in set '{name}' names element {el} with no entry")
            pairs[key] = {}
            for form, coeffs in forms.items():
                if form not in PAIR_FORMS:
                    raise QEqInputError(
                        f"unknown pair form '{form}' for '{key}' in set '{name}' "
                        f"(valid: {', '.join(PAIR_FORMS)})"
                    )
                need = PAIR_FORMS[form]
                if set(coeffs) != set(need):
                    raise QEqInputError(
                        f"pair '{key}' form '{form}' in set '{name}' needs exactly {list(need)}, "
                        f"got {sorted(coeffs)}"
                    )
                for c in need:
                    v = float(coeffs[c])
                    if not math.isfinite(v) or (c in POSITIVE_PAIR_KEYS and v <= 0):
                        raise QEqInputError(
                            f"pair '{key}' form '{form}' coefficient '{c}' in set '{name}' "
                            f"must be {'positive' if c in POSITIVE_PAIR_KEYS else 'finite'}, got {v}"
                        )
                pairs[key][form] = {c: jnp.asarray(float(coeffs[c])) for c in need}
        params = cls(
            elements=elements,
            n=tuple(ns),
            pairs=pairs,
            name=name,
            reference=str(data.get("reference", "")),
            notes=str(data.get("notes", "")),
            **{k: jnp.asarray(np.asarray(v, dtype=np.float64)) for k, v in columns.items()},
        )
        params.require(("chi", "hardness"))
        _check_optional_positive(params)
        return params

    def to_dict(self) -> dict:
        """The JSON layout; NaN (absent) entries are left out."""
        elements = {}
        cols = {k: np.asarray(getattr(self, k), dtype=float) for k in ELEMENT_FLOAT_KEYS}
        for i, el in enumerate(self.elements):
            entry = {k: float(cols[k][i]) for k in ELEMENT_FLOAT_KEYS if math.isfinite(cols[k][i])}
            if self.n and self.n[i]:
                entry["n"] = int(self.n[i])
            elements[el] = entry
        pairs = {
            key: {form: {c: float(v) for c, v in coeffs.items()} for form, coeffs in forms.items()}
            for key, forms in self.pairs.items()
        }
        out = {"name": self.name}
        out.update({k: getattr(self, k) for k in ("reference", "notes") if getattr(self, k)})
        out["elements"] = elements
        if pairs:
            out["pairs"] = pairs
        return out


def _check_optional_positive(params: Params) -> None:
    for key in POSITIVE_KEYS:
        values = np.asarray(getattr(params, key), dtype=float)
        for i, v in enumerate(values):
            if math.isfinite(v) and v <= 0:
                raise QEqInputError(
                    f"parameter '{key}' of element {params.elements[i]} in set '{params.name}' "
                    f"must be positive, got {v}"
                )


jax.tree_util.register_dataclass(
    Params,
    data_fields=["chi", "hardness", "sigma", "gamma", "radius", "pairs", "networks"],
    meta_fields=["elements", "n", "name", "reference", "notes"],
)


def builtin_sets() -> list[str]:
    """Names of the parameter sets shipped with the package."""
    return sorted(p.name[:-5] for p in resources.files("qeq_unroll.data").iterdir() if p.name.endswith(".json"))


def _read_builtin(name: str) -> dict:
    return json.loads(resources.files("qeq_unroll.data").joinpath(name + ".json").read_text())


def _builtin_sets_having(symbols: Sequence[str]) -> str:
    """Which built-in sets have each of ``symbols``, grouped, e.g. "built-in sets with Mg, Ti:
    uff-qeq; no built-in set has Xx"."""
    have = {name: set(_read_builtin(name)["elements"]) for name in builtin_sets()}
    groups: dict[tuple[str, ...], list[str]] = {}
    for symbol in symbols:
        groups.setdefault(tuple(n for n, els in have.items() if symbol in els), []).append(symbol)
    return "; ".join(
        f"built-in sets with {', '.join(group)}: {', '.join(sets)}"
        if sets
        else f"no built-in set has {', '.join(group)}"
        for sets, group in groups.items()
    )


def load_params(source: "str | os.PathLike | Params | Mapping") -> Params:
    """A ``Params`` from a built-in set name, a JSON file path, a ReaxFF ``ffield`` path (its EEM
    terms, :mod:`qeq_unroll.reaxff_ffield`), a dict, or a ``Params`` (returned as is)."""
    if isinstance(source, Params):
        return source
    if isinstance(source, Mapping):
        return Params.from_dict(source)
    text = str(source)
    if text in builtin_sets():
        return Params.from_dict(_read_builtin(text))
    path = Path(text)
    if not path.is_file():
        raise QEqInputError(
            f"parameters '{text}': neither a built-in set ({', '.join(builtin_sets())}) nor a file"
        )
    if is_ffield(path):
        return Params.from_dict(read_ffield(path))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QEqInputError(f"parameter file {path} is not valid JSON: {exc}") from exc
    return Params.from_dict(data)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: "str | os.PathLike", text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename, so a
    crash never leaves a half-written file. The file gets the permissions of any file the user
    creates (0666 less the umask; the temporary file starts at 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_format(data: Mapping, path, fmt: str, version, what: str, advice: str = "") -> None:
    """Refuse a JSON file ``path`` whose ``format`` is not ``fmt`` or whose ``version`` is not
    ``version`` (an int, or a tuple of the versions read); ``what`` names the kind of file,
    ``advice`` ends the version message."""
    if data.get("format") != fmt:
        raise QEqInputError(f"{path} is not a qeq-unroll {what} (no \"format\": \"{fmt}\")")
    versions = version if isinstance(version, tuple) else (version,)
    if data.get("version") not in versions:
        raise QEqInputError(
            f"{what} {path} has format version {data.get('version')}, this qeq-unroll reads version "
            f"{' or '.join(map(str, versions))}{advice}"
        )


def save_params(params: Params, path: "str | os.PathLike") -> None:
    """Write ``params`` as JSON (atomically)."""
    write_atomic(path, json.dumps(params.to_dict(), indent=2) + "\n")
