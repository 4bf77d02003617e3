"""Molecular dynamics on the device: QEq energy functions in jax-md form, a charge-history
integrator (warm start, extended Lagrangian) and an MD loop that runs in jitted blocks.

Units: energies eV, lengths Å, masses amu, temperatures as k_B T in eV. Time inside the loop is in
the natural unit of these, Å·√(amu/eV) ≈ 10.18 fs (``FS`` is one femtosecond in it), as in ASE,
so ASE momenta can be passed in unchanged.

jax-md form (``energy_fn``, ``neighbor_fn``)::

    energy_fn = md.energy_fn(energy, params, system)          # E(R, neighbor=None, guess=None) in eV
    neighbor_fn = md.neighbor_fn(energy, params, system)      # .allocate(R) on the host, .update(R, nbrs) in jit
    init, apply = jax_md.simulate.nve(energy_fn, jax_md.space.free()[1], dt=1.0 * md.FS)
    nbrs = neighbor_fn.allocate(R)
    state = init(key, R, kT, mass=masses, neighbor=nbrs)
    nbrs = neighbor_fn.update(state.position, nbrs); state = apply(state, neighbor=nbrs)

Positions are never wrapped into the cell (the free shift): the energy and the neighbour lists
handle any image of an atom, and unwrapped positions keep lists from rebuilding every time an
atom crosses a cell face.

Charge history (:func:`history_nve`): for the settings MD codes use, the inner solver is started
from charges that carry information from earlier steps:

- ``"warm"``: the previous step's charges (what LAMMPS ``fix qeq`` does). The energy then depends
  on the trajectory's past, so no force can be its exact derivative and NVE drifts.
- ``"xl"``: extended-Lagrangian charges (Niklasson et al., J. Chem. Phys. 130, 214109 (2009)):
  auxiliary charges p follow the time-reversible Verlet dynamics p_{n+1} = 2 p_n − p_{n−1} +
  κ (q_n − p_n) + α Σ_k c_k p_{n−k}, with weak dissipation (α, c_k) that removes the noise it
  would otherwise accumulate. The solver runs K iterations from p_{n+1}; the forces are the exact
  derivative of the reported energy at fixed p (``gradient="unrolled"``).

:func:`run` drives either kind of integrator block by block (:class:`Settings`), updates the
neighbour list every step, reallocates it on the host when it overflows (the block is then run
again from its start) and stops with :class:`MDError` when the run blows up.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .checks import Limits
from .errors import QEqError, QEqInputError, QEqNeighborError, require_positive_integers
from .neighbors import GROWTH, MAX_CAPACITY_MULTIPLIER, until_it_fits

#: One femtosecond in the unit of time Å·√(amu/eV).
FS = 1e-5 * math.sqrt(1.602176634e-19 / 1.66053906660e-27)
#: Boltzmann's constant, eV/K.
KB = 8.617333262e-5

#: (κ, α, c_0..c_K) of the dissipative extended-Lagrangian update for K = 3..7 history terms
#: (Niklasson et al. 2009, Table I).
XL_COEFFICIENTS = {
    3: (1.69, 0.150, (-2, 3, 0, -1)),
    4: (1.75, 0.057, (-3, 6, -2, -2, 1)),
    5: (1.82, 0.018, (-6, 14, -8, -3, 4, -1)),
    6: (1.84, 0.0055, (-14, 36, -27, -2, 12, -6, 1)),
    7: (1.86, 0.0016, (-36, 99, -88, 11, 32, -25, 8, -1)),
}


class MDError(QEqError, RuntimeError):
    """The MD run cannot go on (it blew up, or its neighbour list cannot be made to fit)."""


def energy_fn(energy, params, system):
    """``fn(R, neighbor=None, guess=None, **ignored) -> E`` (eV): the energy of ``system`` with
    positions R (N, 3) Å, in the form jax-md's integrators take (extra keywords such as ``kT`` are
    ignored). ``fn.with_aux`` returns ``(E, aux)`` (charges and diagnostics, see
    ``energy.qeq_energy``)."""

    def with_aux(positions, neighbor=None, guess=None, **ignored):
        return energy(params, dataclasses.replace(system, positions=positions), neighbor, guess)

    def fn(positions, **kwargs):
        return with_aux(positions, **kwargs)[0]

    fn.with_aux = with_aux
    return fn


@dataclasses.dataclass(frozen=True)
class NeighborFn:
    """jax-md style neighbour function of one kernel and system: ``allocate(R)`` on the host,
    ``update(R, nbrs)`` inside jit (fixed capacity; ``nbrs.did_buffer_overflow`` says when it
    must be allocated again). Free space with all pairs gives an empty ``Neighbors``."""

    energy: object
    params: object
    system: object
    skin: float
    layout: str = "auto"

    def allocate(self, positions, capacity_multiplier=1.25):
        system = dataclasses.replace(self.system, positions=jnp.asarray(positions, self.system.positions.dtype))
        return self.energy.neighbors(
            system, self.params, skin=self.skin, layout=self.layout, capacity_multiplier=capacity_multiplier
        )

    def update(self, positions, neighbors):
        return self.energy.update_neighbors(neighbors, dataclasses.replace(self.system, positions=positions))


def neighbor_fn(energy, params, system, skin=1.0, layout="auto") -> NeighborFn:
    """The :class:`NeighborFn` of ``energy``'s kernel for ``system`` (skin in Å)."""
    return NeighborFn(energy, params, system, float(skin), layout)


@dataclasses.dataclass(frozen=True)
class HistoryState:
    """Velocity-Verlet state with charge history. position, momentum, force (N, 3) in Å,
    amu·Å/time, eV/Å; mass (N, 1) amu; energy eV and charges (N,) e at ``position``; history
    (H, N) e: the guesses of the current and earlier steps, newest first."""

    position: jax.Array
    momentum: jax.Array
    force: jax.Array
    mass: jax.Array
    energy: jax.Array
    charges: jax.Array
    history: jax.Array
    aux: dict


jax.tree_util.register_dataclass(
    HistoryState,
    data_fields=["position", "momentum", "force", "mass", "energy", "charges", "history", "aux"],
    meta_fields=[],
)


def _propagate(mode, history, charges, xl_order):
    """The next guess and the shifted history (see the module docstring)."""
    if mode == "warm":
        return charges, charges[None]
    kappa, alpha, c = XL_COEFFICIENTS[xl_order]
    c = jnp.asarray(c, history.dtype)
    new = 2.0 * history[0] - history[1] + kappa * (charges - history[0]) + alpha * jnp.tensordot(c, history, 1)
    return new, jnp.concatenate([new[None], history[:-1]])


def history_nve(energy_fn, dt, mode="xl", xl_order=5):
    """jax-md style ``(init_fn, apply_fn)`` of velocity-Verlet NVE whose charge solver is started
    from the charge history. dt in units of Å·√(amu/eV) (multiply fs by ``FS``). mode: "warm" |
    "xl"; xl_order: history length K of the dissipation (3..7).

    ``init_fn(positions, momenta, mass, charges, neighbor=None)``: charges (N,) e, ideally the
    converged ones, fill the history. ``apply_fn(state, neighbor=None)``: one step."""
    if mode not in ("warm", "xl"):
        raise QEqInputError(f"unknown charge history mode '{mode}' (valid: warm, xl)")
    if mode == "xl" and xl_order not in XL_COEFFICIENTS:
        raise QEqInputError(f"xl_order must be one of {sorted(XL_COEFFICIENTS)}, got {xl_order}")
    depth = 1 if mode == "warm" else xl_order + 1
    grad = jax.value_and_grad(energy_fn.with_aux, has_aux=True)

    def evaluate(positions, neighbor, guess):
        (e, aux), g = grad(positions, neighbor=neighbor, guess=guess)
        return e, -g, aux

    def init_fn(positions, momenta, mass, charges, neighbor=None):
        mass = jnp.reshape(jnp.asarray(mass, positions.dtype), (-1, 1)) * jnp.ones((positions.shape[0], 1), positions.dtype)
        e, f, aux = evaluate(positions, neighbor, charges)
        history = jnp.tile(charges[None], (depth, 1))
        return HistoryState(positions, jnp.asarray(momenta, positions.dtype), f, mass, e, aux["charges"], history, aux)

    def apply_fn(state, neighbor=None, **ignored):
        momentum = state.momentum + 0.5 * dt * state.force
        position = state.position + dt * momentum / state.mass
        guess, history = _propagate(mode, state.history, state.charges, xl_order)
        e, f, aux = evaluate(position, neighbor, guess)
        momentum = momentum + 0.5 * dt * f
        return HistoryState(position, momentum, f, state.mass, e, aux["charges"], history, aux)

    return init_fn, apply_fn


# ----------------------------------------------------------------------------- the MD loop


@dataclasses.dataclass(frozen=True)
class Settings:
    """One MD run. dt_fs: time step (fs); steps; ensemble: "nve" | "langevin" | "nose-hoover";
    temperature_K: initial velocities (when no momenta are given) and thermostat target (K);
    friction: Langevin γ (1/fs); tau_fs: Nose–Hoover time constant (fs); charges: "geometry"
    (the solver's own start, a function of positions only: jax-md's integrators) | "warm" | "xl"
    (:func:`history_nve`, NVE only); xl_order; report_every: steps between records; block:
    records per jitted block; seed; max_energy_change: |E_tot − E_tot(0)| per atom (eV) that
    counts as a blow-up in NVE; min_distance: Å below which atoms count as collided;
    charge_margin: e, a charge beyond the largest |fragment charge| plus this is a blow-up (the
    charge model broke down, ``checks.Limits``);
    capacity_multiplier: neighbour-list capacity over the largest count at allocation, grown by
    1.5× at each overflow up to max_capacity_multiplier."""

    steps: int
    dt_fs: float = 1.0
    ensemble: str = "nve"
    temperature_K: float = 300.0
    friction: float = 0.01
    tau_fs: float = 100.0
    charges: str = "geometry"
    xl_order: int = 5
    report_every: int = 10
    block: int = 10
    seed: int = 0
    max_energy_change: float = 0.1
    min_distance: float = 0.4
    charge_margin: float = 4.0
    capacity_multiplier: float = 1.25
    max_capacity_multiplier: float = MAX_CAPACITY_MULTIPLIER

    def __post_init__(self):
        if self.ensemble not in ("nve", "langevin", "nose-hoover"):
            raise QEqInputError(f"unknown ensemble '{self.ensemble}' (valid: nve, langevin, nose-hoover)")
        if self.charges not in ("geometry", "warm", "xl"):
            raise QEqInputError(f"unknown charge mode '{self.charges}' (valid: geometry, warm, xl)")
        if self.charges != "geometry" and self.ensemble != "nve":
            raise QEqInputError(f"charge mode '{self.charges}' runs NVE only, not '{self.ensemble}'")
        if not (math.isfinite(self.dt_fs) and self.dt_fs > 0):
            raise QEqInputError(f"the time step must be a positive number of fs, got {self.dt_fs}")
        require_positive_integers(self, ("steps", "report_every", "block"))
        if not 0 < self.capacity_multiplier <= self.max_capacity_multiplier:
            raise QEqInputError(
                f"need 0 < capacity_multiplier ({self.capacity_multiplier}) <= max_capacity_multiplier "
                f"({self.max_capacity_multiplier})"
            )
        if self.temperature_K < 0:
            raise QEqInputError(f"temperature must be >= 0 K, got {self.temperature_K}")


class Record(NamedTuple):
    """What a block returns per report (leading axis: reports). Positions Å, momenta amu·Å/time,
    energies eV, charges e, temperature K."""

    step: np.ndarray
    positions: np.ndarray
    momenta: np.ndarray
    charges: np.ndarray
    e_pot: np.ndarray
    e_kin: np.ndarray
    temperature: np.ndarray
    residual: np.ndarray
    iterations: np.ndarray
    min_distance: np.ndarray
    overflow: np.ndarray
    terms: dict


def maxwell_boltzmann(key, masses, temperature_K, dtype=jnp.float64):
    """Momenta (N, 3) amu·Å/time drawn at ``temperature_K`` with the centre-of-mass motion
    removed (the same draw for every solver setting, so runs can be compared step by step)."""
    m = jnp.asarray(masses, dtype)[:, None]
    p = jax.random.normal(key, (m.shape[0], 3), dtype) * jnp.sqrt(m * KB * temperature_K)
    return p - m * jnp.sum(p, 0) / jnp.sum(m)


def kinetic_energy(momentum, mass):
    """Σ |p|²/2m in eV."""
    return 0.5 * jnp.sum(momentum**2 / mass)


def _integrator(settings, fn):
    dt = settings.dt_fs * FS
    if settings.charges != "geometry":
        return history_nve(fn, dt, settings.charges, settings.xl_order)
    from jax_md import simulate, space  # noqa: PLC0415 - heavy import

    shift = space.free()[1]
    kT = KB * settings.temperature_K
    if settings.ensemble == "nve":
        return simulate.nve(fn, shift, dt)
    if settings.ensemble == "langevin":
        return simulate.nvt_langevin(fn, shift, dt, kT, gamma=settings.friction / FS)
    return simulate.nvt_nose_hoover(fn, shift, dt, kT, tau=settings.tau_fs * FS)


def _block_fn(settings, fn, nfn, apply_fn, dof):
    """The jitted block: ``block`` reports of ``report_every`` steps each, with the neighbour list
    updated before every step."""
    history = settings.charges != "geometry"

    def observe(state, nbrs):
        if history:
            e, aux = state.energy, state.aux
        else:
            e, aux = fn.with_aux(state.position, neighbor=nbrs)
        ke = kinetic_energy(state.momentum, state.mass)
        return Record(
            step=jnp.zeros((), jnp.int32),
            positions=state.position,
            momenta=state.momentum,
            charges=aux["charges"],
            e_pot=e,
            e_kin=ke,
            temperature=2.0 * ke / (dof * KB),
            residual=aux["residual"],
            iterations=aux["iterations"],
            min_distance=aux["min_distance"],
            overflow=jnp.asarray(nbrs.did_buffer_overflow),
            terms=aux["terms"],
        )

    def report(carry, _):
        def step(_, c):
            state, nbrs = c
            nbrs = nfn.update(state.position, nbrs)
            return apply_fn(state, neighbor=nbrs), nbrs

        carry = lax.fori_loop(0, settings.report_every, step, carry)
        return carry, observe(*carry)

    @jax.jit
    def block(state, nbrs):
        return lax.scan(report, (state, nbrs), None, length=settings.block)

    return block, jax.jit(observe)


def _masses(masses, n, dtype):
    m = np.asarray(masses, dtype=float).reshape(-1)
    if m.shape != (n,) or not np.all(np.isfinite(m)) or np.any(m <= 0):
        raise QEqInputError(f"masses must be {n} positive numbers in amu")
    return jnp.asarray(m, dtype)


def _blow_up(settings, rec, e0, n, bound, terms):
    """Index of the first bad report and why (or None); ``bound``: the largest |q| (e) accepted;
    ``terms``: the model's terms, whose ``check`` judges their own diagnostics."""
    e_tot = rec.e_pot + rec.e_kin
    for i in range(len(rec.step)):
        try:
            terms.check(jax.tree_util.tree_map(lambda x: x[i], rec.terms))
        except QEqInputError as error:
            return i, str(error)
        if not (np.all(np.isfinite(rec.positions[i])) and np.isfinite(e_tot[i]) and np.all(np.isfinite(rec.charges[i]))):
            return i, "positions, energy or charges became non-finite"
        if rec.min_distance[i] < settings.min_distance:
            return i, f"two atoms came {rec.min_distance[i]:.3g} Å apart (limit {settings.min_distance} Å)"
        k = int(np.argmax(np.abs(rec.charges[i])))
        if abs(rec.charges[i][k]) > bound:
            return i, f"the charge of atom {k} reached {rec.charges[i][k]:+.3g} e (bound ±{bound:.3g} e): the charge model broke down"
        if settings.ensemble == "nve" and abs(e_tot[i] - e0) / n > settings.max_energy_change:
            return i, (
                f"the total energy changed by {(e_tot[i] - e0) / n:+.3g} eV/atom "
                f"(limit {settings.max_energy_change} eV/atom)"
            )
    return None


def _allocate(nfn, positions, multiplier, settings, step):
    """A neighbour list that fits ``positions`` (``neighbors.until_it_fits``); ``(neighbors,
    multiplier)``. MDError past ``max_capacity_multiplier``."""

    def attempt(m):
        nbrs = nfn.allocate(positions, m)
        return nbrs, nbrs.error

    try:
        return until_it_fits(attempt, multiplier, settings.max_capacity_multiplier)
    except QEqNeighborError as exc:
        raise MDError(
            f"the neighbour list overflowed at step {step} and cannot be made to fit: {exc}; raise "
            "max_capacity_multiplier or check the structure"
        ) from None


def run(settings, energy, params, system, masses, momenta=None, charges=None, skin=1.0, layout="auto") -> Iterator[Record]:
    """Run MD of ``system`` (positions Å; the cell is fixed) with ``energy`` and ``params``,
    yielding one :class:`Record` (numpy) per block, step 0 first (a one-report record).

    masses (N,) amu; momenta (N, 3) amu·Å/time (None: Maxwell–Boltzmann at ``temperature_K``
    from ``seed``, centre-of-mass motion removed); charges: starting charges (e) of the charge
    history (None: a tightly converged CG solve). The neighbour list is updated every step and
    reallocated when it overflows (the block is redone from its start); a run that blows up
    raises :class:`MDError` after yielding every good record before it."""
    from .solvers import CG  # noqa: PLC0415
    from .energy import qeq_energy  # noqa: PLC0415

    dtype = system.positions.dtype
    n = int(np.sum(np.asarray(system.mask)))
    if n != system.positions.shape[0]:
        raise QEqInputError("MD needs an unpadded system (every atom real)")
    fn = energy_fn(energy, params, system)
    nfn = neighbor_fn(energy, params, system, skin, layout)
    mass = _masses(masses, n, dtype)
    init_fn, apply_fn = _integrator(settings, fn)
    nbrs, multiplier = _allocate(nfn, system.positions, settings.capacity_multiplier, settings, 0)
    if momenta is None:
        momenta = maxwell_boltzmann(jax.random.PRNGKey(settings.seed), mass, settings.temperature_K, dtype)
    momenta = jnp.asarray(momenta, dtype)
    if settings.charges == "geometry":
        kT = KB * settings.temperature_K
        state = init_fn(jax.random.PRNGKey(settings.seed + 1), system.positions, mass=mass, momenta=momenta, neighbor=nbrs, kT=kT)
    else:
        if charges is None:
            tight = qeq_energy(energy.kernel, CG(tol=1e-12, max_iterations=5000), "implicit", energy.coulomb_constant,
                               terms=energy.terms)  # fmt: skip
            charges = jax.jit(energy_fn(tight, params, system).with_aux)(system.positions, neighbor=nbrs)[1]["charges"]
        state = jax.jit(init_fn)(system.positions, momenta, mass, jnp.asarray(charges, dtype), neighbor=nbrs)
    dof = max(3 * n - 3, 1)
    block, observe = _block_fn(settings, fn, nfn, apply_fn, dof)
    first = jax.tree_util.tree_map(lambda x: np.asarray(x)[None], observe(state, nbrs))
    e0 = float(first.e_pot[0] + first.e_kin[0])
    bound = Limits(charge_margin=settings.charge_margin).charge_bound(system.fragment_charges)
    bad = _blow_up(settings, first, e0, n, bound, energy.terms)
    if bad is not None:
        raise MDError(f"the starting structure is not fit for MD: {bad[1]}")
    yield first
    steps_per_block = settings.report_every * settings.block
    done = 0
    while done < settings.steps:
        (new_state, new_nbrs), rec = block(state, nbrs)
        rec = jax.tree_util.tree_map(np.asarray, rec)
        rec = rec._replace(step=done + settings.report_every * np.arange(1, settings.block + 1))
        valid = int(np.argmax(rec.overflow)) if rec.overflow.any() else settings.block
        bad = _blow_up(settings, jax.tree_util.tree_map(lambda x: x[:valid], rec), e0, n, bound, energy.terms)
        if bad is not None:
            i, why = bad
            yield jax.tree_util.tree_map(lambda x: x[:i], rec)
            raise MDError(
                f"the run blew up at step {rec.step[i]} ({rec.step[i] * settings.dt_fs:g} fs): {why}; the time "
                f"step {settings.dt_fs} fs may be too large for this structure. Records up to step "
                f"{rec.step[i] - settings.report_every} were kept"
            )
        if valid < settings.block:  # the list overflowed: allocate a larger one, redo the block
            nbrs, multiplier = _allocate(nfn, state.position, multiplier * GROWTH, settings, rec.step[valid])
            continue
        state, nbrs = new_state, new_nbrs
        done += steps_per_block
        yield jax.tree_util.tree_map(lambda x: x[rec.step <= settings.steps], rec)


def drift(times_ps, e_total, n_atoms):
    """(slope, max_change): least-squares slope of E_tot(t) in meV/atom/ps and the largest
    |E_tot − E_tot(0)| in meV/atom."""
    t = np.asarray(times_ps, dtype=float)
    e = 1e3 * (np.asarray(e_total, dtype=float) - e_total[0]) / n_atoms
    slope = float(np.polyfit(t, e, 1)[0]) if len(t) > 1 else 0.0
    return slope, float(np.max(np.abs(e)))
