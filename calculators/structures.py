"""Built-in test structures as ASE ``Atoms`` (free space, no cell, ``pbc=False``).

Units: lengths in Å, angles in degrees. The structures are starting points for relaxations and
MD with the built-in ``demo-nacl-water`` parameter set, not relaxed minima.

    from calculators.structures import nacl_cluster, water_cluster
    atoms = nacl_cluster(32)       # 4 x 4 x 2 rock-salt block, 16 Na + 16 Cl
    water = water_cluster()        # cyclic water hexamer, 18 atoms
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms

#: Default nearest-neighbour Na–Cl distance of the rock-salt block (Å): half the NaCl lattice constant.
NACL_SPACING = 2.82
#: Water geometry of ``water_cluster`` (Å, degrees).
WATER_OH = 0.96
WATER_HOH = 104.5
WATER_OO = 2.80

#: Block shapes (nx, ny, nz) used for the supported atom counts of ``nacl_cluster``.
_NACL_SHAPES = {8: (2, 2, 2), 16: (4, 2, 2), 32: (4, 4, 2), 64: (4, 4, 4), 128: (8, 4, 4), 216: (6, 6, 6)}


def rocksalt_block(shape, spacing: float = NACL_SPACING) -> Atoms:
    """An (nx, ny, nz) block of the simple-cubic rock-salt grid, Na and Cl alternating.

    shape: number of sites along x, y, z. spacing: nearest-neighbour distance in Å. Neutral when
    the number of sites is even. Centred at the origin, ``pbc=False``.
    """
    nx, ny, nz = (int(s) for s in shape)
    idx = np.indices((nx, ny, nz)).reshape(3, -1).T
    symbols = ["Na" if (i + j + k) % 2 == 0 else "Cl" for i, j, k in idx]
    positions = idx * float(spacing)
    positions = positions - positions.mean(axis=0)
    return Atoms(symbols=symbols, positions=positions, pbc=False)


def nacl_cluster(n: int = 32, spacing: float = NACL_SPACING) -> Atoms:
    """A neutral rock-salt NaCl cluster of ``n`` atoms (n/2 Na, n/2 Cl), unrelaxed.

    n: one of 8, 16, 32 (4x4x2 block, the default), 64, 128, 216. spacing: Na–Cl distance in Å
    (2.82 Å, the bulk value). For other sizes see :func:`nacl_cut`.
    """
    if n not in _NACL_SHAPES:
        raise ValueError(f"nacl_cluster: n must be one of {sorted(_NACL_SHAPES)}, got {n} (see nacl_cut)")
    return rocksalt_block(_NACL_SHAPES[n], spacing)


def nacl_cut(n: int, spacing: float = NACL_SPACING, rattle: float = 0.0, seed: int = 0) -> Atoms:
    """A compact, neutral NaCl cluster of ``n`` atoms (n even) cut from a rock-salt cube.

    The ``n`` sites nearest the centre of a large enough cube are kept, alternately Na and Cl so
    the cluster is neutral. rattle: standard deviation (Å) of Gaussian noise added to the
    positions (seeded by ``seed``). spacing in Å.
    """
    if n < 2 or n % 2:
        raise ValueError(f"nacl_cut: n must be an even number >= 2, got {n}")
    side = int(math.ceil((2.0 * n) ** (1.0 / 3.0))) + 2
    block = rocksalt_block((side, side, side), spacing)
    pos = block.positions
    symbols = np.asarray(block.get_chemical_symbols())
    # Centre on a site so the shells are symmetric, then take sites shell by shell, per element.
    centre = pos[np.argmin(np.linalg.norm(pos, axis=1))]
    dist = np.linalg.norm(pos - centre, axis=1) + 1e-9 * np.arange(len(pos))
    keep = []
    for element in ("Na", "Cl"):
        sites = np.flatnonzero(symbols == element)
        keep.extend(sites[np.argsort(dist[sites])[: n // 2]].tolist())
    keep = np.sort(np.asarray(keep))
    positions = pos[keep] - pos[keep].mean(axis=0)
    if rattle:
        positions = positions + np.random.default_rng(seed).normal(0.0, rattle, positions.shape)
    return Atoms(symbols=symbols[keep].tolist(), positions=positions, pbc=False)


def water_cluster(n_molecules: int = 6, oh: float = WATER_OH, hoh: float = WATER_HOH, oo: float = WATER_OO,
                  pucker: float = 0.25) -> Atoms:
    """A cyclic water cluster (ring of ``n_molecules`` hydrogen-bonded waters; default the hexamer).

    The oxygens sit on a ring with neighbouring O···O = ``oo`` Å (2.80 Å), puckered (even rings
    only) by ``pucker`` Å: oxygens alternately that far above and below the ring plane. Every
    molecule donates one hydrogen bond to the next oxygen along the ring; its other ("free")
    hydrogen points out of the ring plane, alternately up and down. Each molecule has O–H = ``oh``
    Å (0.96 Å) and H–O–H = ``hoh`` degrees (104.5°). Atom order O, H, H per molecule.
    n_molecules: 1 gives a single water molecule, 2 a dimer-like pair, 3 or more a ring.
    """
    if n_molecules < 1:
        raise ValueError(f"water_cluster: n_molecules must be >= 1, got {n_molecules}")
    if n_molecules == 1:
        return _water(np.zeros(3), np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0]), oh, hoh)
    m = n_molecules
    if m == 2:
        oxygens = np.array([[0.0, 0.0, 0.0], [oo, 0.0, 0.0]])
    else:
        pucker = pucker if m % 2 == 0 else 0.0  # Å, alternating height of the ring oxygens
        # In-plane radius so that the 3D O···O distance is exactly ``oo``.
        chord = math.sqrt(max(oo**2 - (2 * pucker) ** 2, 1e-6))
        radius = chord / (2.0 * math.sin(math.pi / m))
        angles = 2.0 * math.pi * np.arange(m) / m
        heights = pucker * np.where(np.arange(m) % 2 == 0, 1.0, -1.0)
        oxygens = np.stack([radius * np.cos(angles), radius * np.sin(angles), heights], axis=1)
    molecules = []
    for k in range(m):
        o = oxygens[k]
        if m == 2 and k == 1:
            # The acceptor of the dimer: H's point away from the donor, out of its axis.
            donor_dir = np.array([math.cos(math.radians(60)), 0.0, math.sin(math.radians(60))])
            molecules.append(_water(o, donor_dir, np.array([0.0, 1.0, 0.0]), oh, hoh))
            continue
        target = oxygens[(k + 1) % m]
        u = target - o
        u /= np.linalg.norm(u)
        up = np.array([0.0, 0.0, 1.0 if k % 2 == 0 else -1.0])
        molecules.append(_water(o, u, up, oh, hoh))
    out = molecules[0]
    for mol in molecules[1:]:
        out += mol
    out.pbc = False
    return out


def _water(o, u, side, oh, hoh):
    """One water at ``o``: the first H along unit vector ``u``, the second in the plane of ``u``
    and ``side``, at angle ``hoh`` (degrees) from the first."""
    u = np.asarray(u, dtype=float)
    u = u / np.linalg.norm(u)
    v = np.asarray(side, dtype=float) - np.dot(side, u) * u
    v /= np.linalg.norm(v)
    theta = math.radians(hoh)
    h1 = o + oh * u
    h2 = o + oh * (math.cos(theta) * u + math.sin(theta) * v)
    return Atoms("OH2", positions=[o, h1, h2], pbc=False)


def water_geometry(atoms: Atoms):
    """Per-molecule O–H distances (Å) and H–O–H angles (degrees) of a cluster in O, H, H order.

    Returns ``(oh, hoh)``: arrays of shape (n_molecules, 2) and (n_molecules,).
    """
    pos = atoms.positions
    symbols = atoms.get_chemical_symbols()
    oh, hoh = [], []
    for i in range(0, len(atoms), 3):
        if symbols[i : i + 3] != ["O", "H", "H"]:
            raise ValueError("water_geometry expects atoms ordered O, H, H per molecule")
        a, b = pos[i + 1] - pos[i], pos[i + 2] - pos[i]
        la, lb = np.linalg.norm(a), np.linalg.norm(b)
        oh.append((la, lb))
        hoh.append(math.degrees(math.acos(np.clip(np.dot(a, b) / (la * lb), -1.0, 1.0))))
    return np.asarray(oh), np.asarray(hoh)


def water_molecules(n_molecules: int, spacing: float = 3.0, rattle: float = 0.25, seed: int = 0,
                    oh: float = WATER_OH, hoh: float = WATER_HOH) -> Atoms:
    """A compact, disordered cluster of ``n_molecules`` rigid waters (O, H, H order).

    Oxygens occupy the ``n_molecules`` sites of a simple-cubic grid of pitch ``spacing`` Å nearest
    its centre, displaced by Gaussian noise of ``rattle`` Å; each molecule has a random
    orientation. Seeded by ``seed``. A distribution of structures, e.g. for training solvers.
    """
    rng = np.random.default_rng(seed)
    side = int(math.ceil(n_molecules ** (1.0 / 3.0))) + 1
    sites = np.indices((side,) * 3).reshape(3, -1).T.astype(float)
    order = np.argsort(np.linalg.norm(sites - (side - 1) / 2.0, axis=1) + 1e-3 * rng.random(len(sites)))
    out = Atoms(pbc=False)
    for site in sites[order[:n_molecules]]:
        u, side_dir = rng.normal(size=(2, 3))
        out += _water(site * spacing + rng.normal(0.0, rattle, 3), u, side_dir, oh, hoh)
    out.positions -= out.positions.mean(axis=0)
    return out


def rock_salt(reps: int = 2, a: float = 2 * NACL_SPACING, rattle: float = 0.0, seed: int = 0) -> Atoms:
    """Periodic rock-salt NaCl: ``reps``³ conventional cells (8 atoms each) of lattice constant
    ``a`` Å, positions displaced by Gaussian noise of ``rattle`` Å (seeded). ``pbc=True``."""
    site = rocksalt_block((2 * reps,) * 3, spacing=a / 2.0)
    site.positions -= site.positions.min(axis=0)
    rng = np.random.default_rng(seed)
    site.positions += rng.normal(0.0, rattle, site.positions.shape)
    site.cell = np.eye(3) * a * reps
    site.pbc = True
    return site


def water_box(n_side: int = 3, spacing: float = 3.1, seed: int = 0, oh: float = WATER_OH, hoh: float = WATER_HOH) -> Atoms:
    """Periodic liquid-density water: ``n_side``³ waters (O, H, H order), oxygens on a cubic grid of
    pitch ``spacing`` Å (3.1 Å: about 1 g/cm³) with random orientations (seeded). ``pbc=True``."""
    rng = np.random.default_rng(seed)
    out = Atoms(pbc=False)
    for site in np.indices((n_side,) * 3).reshape(3, -1).T:
        u, side_dir = rng.normal(size=(2, 3))
        out += _water((site + 0.5) * spacing, u, side_dir, oh, hoh)
    out.cell = np.eye(3) * n_side * spacing
    out.pbc = True
    return out
