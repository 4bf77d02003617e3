"""Small ASE molecular-dynamics helpers: relax a structure, run NVE, measure energy drift.

Units as in ASE: energies eV, lengths Å, time fs (ps for drift rates), temperatures K.
Shared by ``examples/nve_energy_conservation.py`` and ``tests/test_nve.py``, so the example and
its test measure energy conservation the same way.

    atoms = relax(nacl_cluster(32), QEqCalculator(...))
    etot = run_nve(atoms, QEqCalculator(solver="cg", iterations=3), steps=2000, dt_fs=1.0,
                   temperature_K=600.0, seed=7)
    stats = drift_stats(etot, len(atoms), dt_fs=1.0)   # meV/atom and meV/atom/ps

    # the same start, several solver / gradient-mode settings:
    runs = compare_nve(atoms, solver_setups((2, 3, 4)), steps=2000, temperature_K=600.0, seed=7,
                       calc_kwargs=dict(params="demo-nacl-water", kernel="gaussian"))
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import numpy as np
from ase import units
from ase.md import velocitydistribution as _vd
from ase.md.velocitydistribution import Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from qeq_unroll import md


def relax(atoms, calc, fmax: float = 0.01, steps: int = 1000, trajectory=None, logfile=None):
    """A relaxed copy of ``atoms`` (BFGS until the largest force is below ``fmax`` eV/Å, at most
    ``steps`` steps). ``trajectory``: optional path or ``ase.io.Trajectory`` to write each step to.
    The copy keeps ``calc`` attached; ``copy.info["relax_steps"]`` and ``["relax_converged"]``
    record the run."""
    atoms = atoms.copy()
    atoms.calc = calc
    opt = BFGS(atoms, logfile=logfile, trajectory=trajectory)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    atoms.info["relax_steps"] = int(opt.nsteps)
    atoms.info["relax_converged"] = converged
    return atoms


def initial_velocities(atoms, temperature_K: float, seed: int) -> np.ndarray:
    """Maxwell–Boltzmann momenta at ``temperature_K`` from a fixed ``seed``, with the centre-of-mass
    motion and the overall rotation removed; set on ``atoms`` and returned (ASE momentum units)."""
    rng = np.random.default_rng(seed)
    if hasattr(_vd, "thermalize_momenta"):  # ASE >= 3.27; MaxwellBoltzmannDistribution is deprecated there
        _vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        _vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms.get_momenta()


def run_nve(atoms, calc, steps: int, dt_fs: float = 1.0, temperature_K: float = 600.0, seed: int = 0,
            trajectory=None, inplace: bool = False) -> np.ndarray:
    """Velocity-Verlet NVE from ``atoms`` with velocities from :func:`initial_velocities`; returns
    the total energy E_pot + E_kin (eV) at steps 0..``steps``.

    The same ``atoms``, ``temperature_K`` and ``seed`` give the same start for every ``calc``, so
    runs with different solvers are comparable step by step. ``trajectory``: optional
    ``ase.io.Trajectory`` path to write every step to. ``inplace``: advance ``atoms`` itself (to
    inspect the final state) instead of a copy.
    """
    if not inplace:
        atoms = atoms.copy()
    atoms.calc = calc
    initial_velocities(atoms, temperature_K, seed)
    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs, trajectory=trajectory, logfile=None)
    etot = np.empty(steps + 1)
    count = [0]

    def record():
        i = count[0]
        if i <= steps:
            etot[i] = atoms.get_potential_energy() + atoms.get_kinetic_energy()
        count[0] += 1

    dyn.attach(record, interval=1)
    dyn.run(steps)
    if count[0] != steps + 1:
        raise RuntimeError(f"run_nve recorded {count[0]} energies for {steps} steps")
    return etot


class Drift(NamedTuple):
    """max_dev: max |E_tot(t) − E_tot(0)| in meV/atom; slope: least-squares drift in meV/atom/ps;
    std: standard deviation of E_tot in meV/atom."""

    max_dev: float
    slope: float
    std: float


def drift_stats(etot, n_atoms: int, dt_fs: float = 1.0) -> Drift:
    """Energy-conservation measures of a total-energy series (eV, one value per step of ``dt_fs``)."""
    etot = np.asarray(etot, dtype=float)
    slope, worst = md.drift(np.arange(len(etot)) * dt_fs / 1000.0, etot, n_atoms)
    return Drift(worst, slope, float(np.std(etot * 1000.0 / n_atoms)))


def max_extent(atoms) -> float:
    """Largest distance (Å) of an atom from the centre of mass: a check for evaporation."""
    return float(np.max(np.linalg.norm(atoms.positions - atoms.get_center_of_mass(), axis=1)))


#: The reference of energy-conservation comparisons: exact charges, implicit-function gradients.
REFERENCE_LABEL = "exact + implicit"


def setup_label(iterations: int, gradient: str) -> str:
    """Label of a fixed-K CG setting, e.g. ``"cg K=3 unrolled"``."""
    return f"cg K={iterations} {gradient}"


def solver_setups(iterations: Sequence[int] = (2, 3, 4), gradients: Sequence[str] = ("unrolled", "envelope")):
    """``[(label, calculator keywords)]``: the exact + implicit reference first, then CG with a fixed
    number of iterations K for each K and gradient mode."""
    setups = [(REFERENCE_LABEL, dict(solver="exact", gradient="implicit"))]
    for k in iterations:
        for mode in gradients:
            setups.append((setup_label(k, mode), dict(solver="cg", iterations=int(k), gradient=mode)))
    return setups


class NVERun(NamedTuple):
    """etot: total energy per step (eV); drift: :class:`Drift`; seconds: wall time of the run
    (JIT compilation included); extent: final :func:`max_extent` (Å); temperature: final K."""

    etot: np.ndarray
    drift: Drift
    seconds: float
    extent: float
    temperature: float


def compare_nve(atoms, setups, steps: int, dt_fs: float = 1.0, temperature_K: float = 600.0, seed: int = 0,
                calc_kwargs: dict | None = None, progress: Callable[[str, NVERun], None] | None = None):
    """Run :func:`run_nve` from the same start once per setting in ``setups`` (``[(label, kwargs)]``,
    e.g. from :func:`solver_setups`), each with ``QEqCalculator(**calc_kwargs, **kwargs)``.
    Returns ``{label: NVERun}`` in the order given; ``progress(label, run)`` is called after each."""
    from .qeq import QEqCalculator

    runs = {}
    for label, kwargs in setups:
        calc = QEqCalculator(**{**(calc_kwargs or {}), **kwargs})
        work = atoms.copy()
        start = time.perf_counter()
        etot = run_nve(work, calc, steps, dt_fs, temperature_K, seed, inplace=True)
        seconds = time.perf_counter() - start
        runs[label] = NVERun(etot, drift_stats(etot, len(work), dt_fs), seconds, max_extent(work),
                             float(work.get_temperature()))
        if progress is not None:
            progress(label, runs[label])
    return runs
