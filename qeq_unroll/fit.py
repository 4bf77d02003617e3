"""Fitting the parameters to reference energies, forces, charges and dipoles, through the solver.

Units: energies eV, forces eV/Å, charges e, dipoles e·Å, stress eV/Å³ (Voigt; metrics in GPa);
metrics report the energy per atom in meV/atom.

The data may mix free-space clusters and periodic cells (``dataset``): periodic structures carry
their neighbours (built once, ``batcher_for``) and their stress. The model is the one energy
function (``energy.qeq_energy``): predictions come from ``loss.predict`` mapped over a batch, so
the forces and stress in the loss are derivatives of the energy the model reports, and parameter
gradients of a force loss are second derivatives through the charge solver (``unrolled`` or
``implicit`` gradient mode; ``envelope`` gives wrong parameter gradients, see the tests).

Loss of a batch (means over the structures/atoms/components that have the reference)::

    w_E <((E + Σ_e n_e b_e − E_ref) / N)²> + w_F <(F − F_ref)²> + w_q <(q − q_ref)²>
    + w_μ <(μ − μ_ref)²> + w_σ <(σ − σ_ref)²> + w_pull Σ ((θ − θ₀)/s)²

with per-element energy offsets b_e (fitted; reference energies with any zero work), and the pull
toward the start θ₀ measured in the raw coordinates below (s = 1 for logarithms, max(|x₀|, 1)
otherwise).

Raw coordinates (``parametrisation``; losses and metrics: ``loss``) keep the physics by construction: hardness J, widths
σ and γ and the positive pair coefficients (A, ρ, a, r0, D) are trained as logarithms, so they stay
positive at every step (the prefactor A of an exponential repulsion as the logarithm of the
repulsion at the pair's typical contact distance, which decouples it from ρ); χ and the Buckingham
C are trained as they are. Only the elements present
in the training data are trained. χ is only defined up to a common shift per charge constraint
(a uniform shift of every χ leaves neutral systems' charges and energies unchanged), so when all
training structures are neutral the mean χ of the trained elements is held at its start value
(``chi_gauge``); compare χ *differences* between sets.

The loop (:func:`fit`): Levenberg–Marquardt (default, ``lm``: full batch, one iteration per epoch,
stops at a minimum), optax Adam (with global-norm clipping and a cosine learning-rate schedule) on
mini-batches grouped by size and neighbour shape, or full-batch L-BFGS (one iteration per epoch);
metrics on train and validation after every epoch; early stopping on the validation loss (the
best parameters are returned); a checkpoint every N steps written atomically; ``resume``
continues exactly (parameters, optimiser state, the epoch's batch order and position); a JSON-lines
log. ``devices > 1`` splits every batch across devices with ``jax.sharding`` (data parallel).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import ewald, lm
from .dataset import Batch, Batcher, BatchPlan, Dataset
from .errors import QEqConvergenceError, QEqInputError, require_positive_integers
from .loss import (  # noqa: F401  (re-exported: the fitting API in one place)
    TERMS,
    add_sums,
    batch_sums,
    least_squares_offsets,
    loss_from_sums,
    metrics_from_sums,
    predict,
    sums_of_errors,
    term_counts,
    weighted_residuals,
)
from .parametrisation import (  # noqa: F401  (re-exported)
    GROUPS,
    LOG_ELEMENT_KEYS,
    LOG_PAIR_KEYS,
    Parametrisation,
    make_parametrisation,
    pair_reference_distances,
)
from .neighbors import stackable
from .params import Params, check_format, write_atomic

CHECKPOINT_FORMAT = "qeq-unroll-fit-checkpoint"
CHECKPOINT_VERSION = 2
#: Optimisers: mini-batch Adam, full-batch L-BFGS, full-batch Levenberg–Marquardt (``lm``).
OPTIMIZERS = ("adam", "lbfgs", "lm")
#: The most raw coordinates ``lm`` takes (one forward-mode pass each per batch and iteration).
LM_MAX_COORDINATES = 400


# --- configuration and result ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitConfig:
    """What is trained and how.

    train: groups of ``GROUPS``. weights: loss weights of ``TERMS`` (energy per atom in
    (eV/atom)⁻², forces (eV/Å)⁻², charges e⁻², dipole (e·Å)⁻², stress (eV/Å³)⁻²). pull: weight
    of the pull toward the start. optimizer: "adam" | "lbfgs" (full batch, one iteration per epoch) | "lm"
    (Levenberg–Marquardt, full batch, one iteration per epoch, stops at a minimum; ``lm``: for
    models with tens of parameters, where it converges quadratically). learning_rate: Adam's
    peak rate in raw coordinates (ignored by L-BFGS, which line-searches). schedule: "cosine"
    (decay to ``final_lr_fraction`` over the fit) | "constant". clip_norm: global gradient-norm
    clip for Adam (None: off). epochs; batch_size (structures per batch; rounded up to a
    multiple of ``devices``). patience: epochs without a validation improvement of more than
    ``min_delta`` (relative) before stopping (None: never). seed: shuffling. checkpoint_every:
    optimiser steps between checkpoints. chi_gauge: "auto" (when all training data are neutral),
    True or False. devices: number of devices to split each batch across. min_bucket: pad every
    structure to at least this many atoms (fewer size buckets, so fewer compilations).
    """

    train: tuple[str, ...] = ("chi", "hardness", "sigma", "pairs")
    weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"energy": 1.0, "forces": 1.0, "charges": 0.0, "dipole": 0.0, "stress": 0.0}
    )
    pull: float = 0.0
    optimizer: str = "lm"
    learning_rate: float = 0.02
    schedule: str = "cosine"
    final_lr_fraction: float = 0.05
    clip_norm: float | None = 1.0
    epochs: int = 50
    batch_size: int = 16
    patience: int | None = 20
    min_delta: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    lbfgs_memory: int = 10
    chi_gauge: Any = "auto"
    devices: int = 1
    min_bucket: int = 0

    def __post_init__(self):
        unknown = set(self.weights) - set(TERMS)
        if unknown:
            raise QEqInputError(f"unknown loss weight(s) {sorted(unknown)} (valid: {', '.join(TERMS)})")
        if any((not math.isfinite(float(w))) or float(w) < 0 for w in self.weights.values()):
            raise QEqInputError(f"loss weights must be finite and non-negative, got {dict(self.weights)}")
        if self.optimizer not in OPTIMIZERS:
            raise QEqInputError(f"unknown optimizer '{self.optimizer}' (valid: {', '.join(OPTIMIZERS)})")
        if self.schedule not in ("cosine", "constant"):
            raise QEqInputError(f"unknown schedule '{self.schedule}' (valid: cosine, constant)")
        require_positive_integers(self, ("epochs", "batch_size", "checkpoint_every", "devices", "lbfgs_memory"))
        if not self.learning_rate > 0:
            raise QEqInputError(f"learning rate must be positive, got {self.learning_rate}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = list(self.train)
        d["weights"] = {k: float(self.weights.get(k, 0.0)) for k in TERMS}
        return d


@dataclasses.dataclass
class FitResult:
    """params: the fitted set (the best on validation when there is one). offsets: per-element
    energy offsets in eV. history: one record per epoch (the log's lines). best_epoch: epoch of
    the returned parameters. steps: optimiser steps taken. stopped_early: early stopping fired.
    initial: metrics of the start (with least-squares energy offsets) on ``train``/``validation``.
    warnings: fitted values outside a plausible range or far from the start
    (:func:`implausible`), in words."""

    params: Params
    offsets: dict
    history: list
    best_epoch: int
    steps: int
    stopped_early: bool
    initial: dict = dataclasses.field(default_factory=dict)
    warnings: list = dataclasses.field(default_factory=list)


class FitInterrupted(Exception):
    """Raised by a ``callback`` to stop a fit (its last checkpoint stays as written)."""


# --- the fitter ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a fit's compiled functions, hashable, so that fits with the same
    model and settings share one compiled step (jit caches on it). ``energy`` is hashed by
    identity: build it once with ``qeq_energy`` and reuse it."""

    energy: Callable
    par: Parametrisation
    weights: tuple[tuple[str, float], ...]
    pull: float = 0.0
    optimizer: tuple = ("adam", None)  # ("adam", clip_norm), ("lbfgs", memory) or ("lm", None)

    def build_optimizer(self) -> optax.GradientTransformation:
        """L-BFGS, or Adam's scaling (after an optional global-norm clip) without the learning
        rate: the rate is data, passed to each step, so the schedule never recompiles."""
        if self.optimizer[0] == "lm":
            return None  # not an optax transformation: see ``Fitter.lm_step``
        if self.optimizer[0] == "lbfgs":
            return optax.lbfgs(memory_size=self.optimizer[1])
        clip = self.optimizer[1]
        adam = optax.scale_by_adam()
        return optax.chain(optax.clip_by_global_norm(clip), adam) if clip else adam

    def loss(self, raw, anchor, raw0, batch):
        """(loss, sums) of one batch at raw coordinates ``raw``."""
        params = self.par.params(raw, anchor)
        sums = batch_sums(self.energy, params, raw["offsets"], batch)
        return self._total(sums, raw, raw0), sums

    def full_loss(self, raw, anchor, raw0, stacks):
        """(loss, sums) over a whole data set: ``stacks`` holds the batches of each size bucket
        stacked along a leading axis and scanned, so the program holds one copy per bucket."""
        params = self.par.params(raw, anchor)
        sums = None
        for stack in stacks:
            first = jax.tree_util.tree_map(lambda x: x[0], stack)
            acc = batch_sums(self.energy, params, raw["offsets"], first)
            if stack.weight.shape[0] > 1:

                def body(acc, b):
                    return add_sums(acc, batch_sums(self.energy, params, raw["offsets"], b)), None

                acc, _ = jax.lax.scan(body, acc, jax.tree_util.tree_map(lambda x: x[1:], stack))
            sums = acc if sums is None else add_sums(sums, acc)
        return self._total(sums, raw, raw0), sums

    def _total(self, sums, raw, raw0):
        loss = loss_from_sums(sums, dict(self.weights))
        if self.pull:
            loss = loss + self.pull * self.par.pull(raw, raw0)
        return loss


@functools.partial(jax.jit, static_argnums=0)
def _adam_step(spec: StepSpec, raw, opt_state, anchor, raw0, batch, learning_rate):
    (loss, sums), grad = jax.value_and_grad(spec.loss, has_aux=True)(raw, anchor, raw0, batch)
    updates, opt_state = spec.build_optimizer().update(grad, opt_state, raw)
    updates = jax.tree_util.tree_map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(raw, updates), opt_state, loss


@functools.partial(jax.jit, static_argnums=0)
def _lbfgs_step(spec: StepSpec, raw, opt_state, anchor, raw0, stacks):
    def value_fn(r):
        return spec.full_loss(r, anchor, raw0, stacks)[0]

    value, grad = optax.value_and_grad_from_state(value_fn)(raw, state=opt_state)
    updates, opt_state = spec.build_optimizer().update(
        grad, opt_state, raw, value=value, grad=grad, value_fn=value_fn
    )
    return optax.apply_updates(raw, updates), opt_state, value


def _residuals(spec: StepSpec, raw, anchor, raw0, batch, scales):
    """The weighted residuals of one batch (``loss.weighted_residuals``), or of the pull toward
    the start when ``batch`` is None."""
    if batch is None:
        return math.sqrt(spec.pull) * spec.par.pull_residuals(raw, raw0)
    p = predict(spec.energy, spec.par.params(raw, anchor), raw["offsets"], batch)
    return weighted_residuals(p, batch, scales)


@functools.partial(jax.jit, static_argnums=0)
def _lm_normal(spec: StepSpec, raw, anchor, raw0, batch, scales):
    """(JᵀJ, Jᵀr, r·r) of one batch's residuals r (or the pull's, ``batch`` None) over the
    flattened raw coordinates; J by forward mode, one tangent per coordinate."""
    flat, unravel = ravel_pytree(raw)
    r, tangent = jax.linearize(lambda v: _residuals(spec, unravel(v), anchor, raw0, batch, scales), flat)
    jac = jax.vmap(tangent, out_axes=1)(jnp.eye(flat.size, dtype=flat.dtype))
    return jac.T @ jac, jac.T @ r, r @ r


@functools.partial(jax.jit, static_argnums=0)
def _lm_value(spec: StepSpec, raw, anchor, raw0, batches, scales):
    """The loss as Σ r·r over ``batches`` and the pull."""
    total = sum(jnp.sum(_residuals(spec, raw, anchor, raw0, b, scales) ** 2) for b in batches)
    return total + (spec.pull * spec.par.pull(raw, raw0) if spec.pull else 0.0)


def lm_scales(batches, weights) -> dict:
    """Per weighted term, its weight over how many values it has in ``batches``: the factors that
    make Σ r·r of the residuals the loss (``loss.loss_from_sums``)."""
    counts = functools.reduce(add_sums, [term_counts(b) for b in batches])
    return {t: float(w) / max(float(counts[t]), 1.0) for t, w in weights.items() if w}


@functools.partial(jax.jit, static_argnums=0)
def _param_sums(energy, params, offsets, batch):
    """(sums of errors, predicted energies) of a batch for plain ``Params``."""
    p = predict(energy, params, offsets, batch)
    return sums_of_errors(p, batch), p["energy"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _raw_sums(energy, par, raw, anchor, batch):
    """(sums of errors, predicted energies) of a batch: one compiled evaluation serves the
    metrics and the least-squares start of the energy offsets."""
    p = predict(energy, par.params(raw, anchor), raw["offsets"], batch)
    return sums_of_errors(p, batch), p["energy"]


class Fitter:
    """The compiled functions of one fit and the placement of its arrays on the devices.

    energy: ``qeq_energy(...)``; par: a :class:`Parametrisation`; anchor: its
    :meth:`Parametrisation.anchor` (the start parameters, placed on the devices here);
    steps_total: optimiser steps of the whole fit (for the learning-rate schedule).
    """

    def __init__(self, energy: Callable, par: Parametrisation, anchor: Mapping, config: FitConfig, steps_total: int):
        self.par = par
        self.config = config
        self.weights = {k: float(config.weights.get(k, 0.0)) for k in TERMS}
        self.steps_total = int(steps_total)
        if config.optimizer == "lbfgs":
            opt = ("lbfgs", int(config.lbfgs_memory))
        elif config.optimizer == "lm":
            opt = ("lm", None)
        else:
            opt = ("adam", None if config.clip_norm is None else float(config.clip_norm))
        self.spec = StepSpec(energy, par, tuple(self.weights.items()), float(config.pull), opt)
        self.optimizer = self.spec.build_optimizer()
        if config.schedule == "cosine":
            self.schedule = optax.cosine_decay_schedule(config.learning_rate, max(self.steps_total, 1), alpha=config.final_lr_fraction)
        else:
            self.schedule = optax.constant_schedule(config.learning_rate)
        self.mesh = None
        if config.devices > 1:
            devices = jax.devices()
            if len(devices) < config.devices:
                raise QEqInputError(f"devices={config.devices} requested but JAX sees {len(devices)}: {devices}")
            self.mesh = jax.sharding.Mesh(np.asarray(devices[: config.devices]), ("batch",))
        self.anchor = self.replicate(_strong(anchor))

    # placement
    def replicate(self, tree):
        """Place ``tree`` on every device (parameters, optimiser state)."""
        if self.mesh is None:
            return tree
        return jax.device_put(tree, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def shard(self, batch: Batch, stacked: bool = False) -> Batch:
        """Place a batch with its structures split across the devices (axis 1 when ``stacked``)."""
        if self.mesh is None:
            return batch
        spec = jax.sharding.PartitionSpec(None, "batch") if stacked else jax.sharding.PartitionSpec("batch")
        return jax.device_put(batch, jax.sharding.NamedSharding(self.mesh, spec))

    def stacks(self, batches: Sequence[Batch]) -> list[Batch]:
        """The batches grouped by shape (size, periodicity, neighbours) and stacked along a new
        leading axis (placed)."""
        groups: dict[tuple, list[Batch]] = {}
        for b in batches:
            key = (jax.tree_util.tree_structure(b), tuple(np.shape(x) for x in jax.tree_util.tree_leaves(b)))
            groups.setdefault(key, []).append(b)
        return [self.shard(jax.tree_util.tree_map(lambda *x: jnp.stack(x), *group), stacked=True) for group in groups.values()]

    def learning_rate(self, step: int) -> float | None:
        """Adam's learning rate at optimiser step ``step`` (None for L-BFGS)."""
        return None if self.config.optimizer != "adam" else float(self.schedule(step))

    # compiled functions
    def init(self, raw):
        if self.config.optimizer == "lm":
            return {"damping": jnp.asarray(lm.START_DAMPING, jnp.asarray(raw["offsets"]).dtype)}
        return _strong(self.optimizer.init(raw))

    def adam_step(self, raw, opt_state, raw0, batch, step: int):
        lr = jnp.asarray(self.learning_rate(step), dtype=jnp.asarray(raw["offsets"]).dtype)
        return _adam_step(self.spec, raw, opt_state, self.anchor, raw0, batch, lr)

    def lbfgs_step(self, raw, opt_state, raw0, stacks):
        return _lbfgs_step(self.spec, raw, opt_state, self.anchor, raw0, stacks)

    def lm_step(self, raw, opt_state, raw0, batches):
        """One Levenberg–Marquardt iteration over ``batches`` (the whole training set, ``lm``):
        ``(raw, opt_state, loss, moved)``."""
        flat, unravel = ravel_pytree(raw)
        scales = lm_scales(batches, self.weights)

        def normal(x):
            r = unravel(jnp.asarray(x, flat.dtype))
            parts = [_lm_normal(self.spec, r, self.anchor, raw0, b, scales) for b in batches]
            if self.spec.pull:
                parts.append(_lm_normal(self.spec, r, self.anchor, raw0, None, scales))
            return lm.accumulate(jax.device_get(parts))

        def value(x):
            r = unravel(jnp.asarray(x, flat.dtype))
            return float(_lm_value(self.spec, r, self.anchor, raw0, batches, scales))

        x, damping, loss, moved = lm.iterate(normal, value, np.asarray(flat, np.float64), float(opt_state["damping"]))
        new = self.replicate(_strong(unravel(jnp.asarray(x, flat.dtype))))
        return new, {"damping": jnp.asarray(damping, flat.dtype)}, loss, moved

    def loss_and_grad(self, raw, raw0, batch):
        """(loss, gradient with respect to the raw coordinates) of one batch."""
        (loss, _), grad = jax.value_and_grad(self.spec.loss, has_aux=True)(raw, self.anchor, raw0, batch)
        return loss, grad

    def sums(self, raw, batch):
        return _raw_sums(self.spec.energy, self.par, raw, self.anchor, batch)

    def params(self, raw) -> Params:
        """The ``Params`` of raw coordinates (on the host)."""
        host = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), jax.device_get((raw, self.anchor)))
        return self.par.params(*host)

    def dataset_sums(self, raw, batches):
        sums = None
        for b in batches:
            s = self.sums(raw, b)[0]
            sums = s if sums is None else add_sums(sums, s)
        return jax.device_get(sums)

    def metrics(self, raw, batches):
        return metrics_from_sums(self.dataset_sums(raw, batches), self.weights)


def _strong(tree):
    """The same arrays without weak types (a weak-typed leaf that becomes strong after one
    update would make jit compile the step a second time)."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), tree)


def _offsets(batches, model_energies) -> np.ndarray:
    """Per-element energy offsets (eV) that best align ``model_energies(batch)`` (B,) eV with the
    reference energies of ``batches`` (least squares per atom, ``loss.least_squares_offsets``)."""
    columns = ([], [], [], [])
    for batch in batches:
        keep = np.asarray(batch.weight > 0) & np.asarray(batch.has_energy > 0)
        for column, x in zip(columns, (model_energies(batch), batch.energy, batch.counts, batch.n_atoms)):
            column.append(np.asarray(x)[keep])
    return least_squares_offsets(*(np.concatenate(c) for c in columns))


def _initial_offsets(fitter: Fitter, raw, batcher: Batcher) -> np.ndarray:
    return _offsets(batcher.all_batches(), lambda b: jax.device_get(fitter.sums(raw, fitter.shard(b))[1]))


#: Gaussian widths may grow by this factor in a fit before its Ewald sums lose their accuracy.
WIDTH_MARGIN = 1.2


def batcher_for(dataset: Dataset, model, params: Params, batch_size: int, devices: int = 1, min_bucket: int = 0) -> Batcher:
    """The :class:`Batcher` of a fit: periodic structures get the dense all-images layout (exact
    for their cell, nothing to outgrow) made ``neighbors.stackable``, built once per structure;
    Ewald sums are planned for the start widths ``params.sigma`` times :data:`WIDTH_MARGIN`, room
    for the widths to grow during the fit."""
    planning = params.replace(sigma=params.sigma * WIDTH_MARGIN)

    def neighbors(system):
        return stackable(model.neighbors(system, planning, layout="images"))

    return Batcher(dataset, batch_size, multiple_of=devices, min_size=min_bucket, neighbors=neighbors)


# --- checkpoints -----------------------------------------------------------------------------
def _encode_tree(tree) -> list:
    out = []
    for leaf in jax.tree_util.tree_leaves(jax.device_get(tree)):
        a = np.asarray(leaf)
        out.append({"dtype": str(a.dtype), "shape": list(a.shape), "data": a.ravel().tolist()})
    return out


def _decode_tree(like, encoded, what: str):
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if len(leaves) != len(encoded):
        raise QEqInputError(f"checkpoint {what} has {len(encoded)} arrays, this fit expects {len(leaves)}")
    new = []
    for leaf, enc in zip(leaves, encoded):
        a = np.asarray(enc["data"], dtype=enc["dtype"]).reshape(enc["shape"])
        if a.shape != np.shape(leaf):
            raise QEqInputError(f"checkpoint {what}: an array of shape {a.shape} where {np.shape(leaf)} is expected")
        new.append(jnp.asarray(a, dtype=jnp.asarray(leaf).dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def save_checkpoint(path, state: dict) -> None:
    """Write a checkpoint atomically (a temporary file and ``os.replace``): an interruption while
    writing leaves the previous checkpoint as it was."""
    write_atomic(path, json.dumps(state) + "\n")


def load_checkpoint(path) -> dict:
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise QEqInputError(f"cannot resume: checkpoint {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise QEqInputError(f"checkpoint {path} is not valid JSON: {exc}") from exc
    check_format(state, path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "fit checkpoint",
                 ": start the fit again without resuming")  # fmt: skip
    return state


def _fingerprint(params, train, validation, config, model_name) -> dict:
    return dict(
        start=params.to_dict(),
        train=train.fingerprint(),
        validation=None if validation is None else validation.fingerprint(),
        config=config.to_dict(),
        model=model_name,
        **({"networks": _digest(params.networks)} if params.networks else {}),
    )


def _digest(tree) -> str | None:
    """A hash of the arrays of ``tree`` (None when it has none)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return None
    return hashlib.sha256(b"".join(np.asarray(a, dtype=np.float64).tobytes() for a in leaves)).hexdigest()


def _model_name(model) -> str:
    return " ".join(repr(part) for part in (model.kernel, model.solver, model.gradient, model.terms))


def model_label(model) -> str:
    """A short description of the model, e.g. "gaussian kernel, cg K=20, unrolled gradients"."""
    k = getattr(model.solver, "iterations", None)
    iters = f"K={k}" if k else ("to tol" if hasattr(model.solver, "iterations") else "")
    return f"{model.kernel.name} kernel, {model.solver.name} {iters}".rstrip() + f", {model.gradient.name} gradients"


def offsets_dict(params: Params, offsets) -> dict:
    return {el: float(b) for el, b in zip(params.elements, np.asarray(offsets))}


def fitted_params(params: Params, offsets, name: str | None = None, note: str = "") -> Params:
    """``params`` renamed, with the energy offsets (eV) recorded in its notes."""
    off = ", ".join(f"{el} {b:.6f}" for el, b in offsets_dict(params, offsets).items() if b != 0.0)
    notes = (note + " " if note else "") + (f"Per-element energy offsets (eV): {off}." if off else "")
    return params.replace(name=name or f"{params.name}-fit", notes=notes.strip() or params.notes)


# --- the state of a fit ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Run:
    """What a fit holds fixed from start to end: its inputs, the parametrisation, the batches and
    the compiled functions (``fitter``)."""

    params: Params
    train: Dataset
    validation: Dataset | None
    energy: Callable
    config: FitConfig
    par: Parametrisation
    anchor: Mapping
    batcher: Batcher
    fitter: "Fitter"
    train_eval: list
    val_eval: list
    train_stacks: list | None
    fingerprint: dict
    steps_total: int

    @property
    def full_batch(self) -> bool:
        """One optimiser iteration per epoch over the whole training set (L-BFGS, LM)."""
        return self.config.optimizer in ("lbfgs", "lm")


def _indefinite_start(run: _Run, count: int, named: int = 3) -> QEqConvergenceError:
    """The error for start parameters whose hardness matrix is not positive definite on ``count``
    training structures, naming the first ``named`` of them (found one by one)."""
    params, found = run.params, []
    for i, c in enumerate(run.train.configurations):
        if len(found) == named:
            break
        if evaluate(params, run.train.subset([i]), run.energy, offsets=np.zeros(len(params.elements)))["indefinite"]:
            found.append(c.source or f"configuration {i}")
    return QEqConvergenceError(
        f"the start parameters '{params.name}' give a hardness matrix that is not positive definite on {count} "
        f"training structure(s) ({', '.join(found)}{', ...' if count > len(found) else ''}) with kernel "
        f"'{run.energy.kernel.name}': the charges run away and the fit would learn from garbage. Start from "
        "larger hardness J or, for reaxff, smaller gamma (more shielding), or use the gaussian kernel"
    )


@dataclasses.dataclass
class FitState:
    """Where a fit stands, all a checkpoint holds: the start ``raw0`` (raw coordinates with the
    least-squares energy offsets), the current ``raw`` and optimiser state, the best parameters so
    far, optimiser ``step``, ``epoch``, ``position`` in the epoch's batch ``order``, early-stopping
    counters, ``converged`` (LM found no lower loss), the epoch ``history``, and the ``initial`` metrics."""

    raw0: Any
    raw: Any
    opt_state: Any
    best_raw: Any
    step: int = 0
    epoch: int = 0
    position: int = 0
    order: list | None = None
    best_loss: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list = dataclasses.field(default_factory=list)
    done: bool = False
    stopped_early: bool = False
    converged: bool = False
    initial: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def fresh(cls, run: _Run) -> "FitState":
        """The start of a fit: energy offsets by least squares, metrics of the start."""
        fitter, params = run.fitter, run.params
        zeros = jnp.zeros(len(params.elements), dtype=params.chi.dtype)
        raw0 = fitter.replicate(_strong(run.par.raw(run.anchor, zeros)))
        if run.train.has("energy"):
            offsets0 = jnp.asarray(_initial_offsets(fitter, raw0, run.batcher), dtype=params.chi.dtype)
            raw0 = fitter.replicate(_strong(run.par.raw(run.anchor, offsets0)))
        initial = {"train": fitter.metrics(raw0, run.train_eval)}
        if initial["train"]["indefinite"]:
            raise _indefinite_start(run, initial["train"]["indefinite"])
        if run.val_eval:
            initial["validation"] = fitter.metrics(raw0, run.val_eval)
        return cls(raw0, raw0, fitter.replicate(fitter.init(raw0)), raw0, initial=initial)

    @classmethod
    def from_checkpoint(cls, run: _Run, path) -> "FitState":
        """The state written to ``path``; the fit it belongs to must be ``run``'s."""
        state = load_checkpoint(path)
        expected = json.loads(json.dumps(run.fingerprint))
        if state["fingerprint"] != expected:
            diff = [k for k in expected if expected[k] != state["fingerprint"].get(k)]
            raise QEqInputError(f"cannot resume from {path}: it belongs to a different fit (differs in: {', '.join(diff)})")
        fitter = run.fitter
        like = _strong(run.par.raw(run.anchor, jnp.zeros(len(run.params.elements), dtype=run.params.chi.dtype)))
        raw = fitter.replicate(_decode_tree(like, state["raw"], "parameters"))
        return cls(
            raw0=fitter.replicate(_decode_tree(like, state["raw0"], "start")),
            raw=raw,
            opt_state=fitter.replicate(_decode_tree(fitter.init(raw), state["opt_state"], "optimiser state")),
            best_raw=fitter.replicate(_decode_tree(like, state["best_raw"], "best parameters")),
            order=None if state["order"] is None else [tuple(p) for p in state["order"]],
            **{k: state[k] for k in ("step", "epoch", "position", "best_loss", "best_epoch", "bad_epochs",
                                     "history", "done", "stopped_early", "converged", "initial")},
        )  # fmt: skip

    def to_checkpoint(self, run: _Run) -> dict:
        """The checkpoint's JSON content (format ``CHECKPOINT_FORMAT``, ``CHECKPOINT_VERSION``)."""
        best = run.fitter.params(self.best_raw)
        offsets = jax.device_get(self.best_raw["offsets"])
        return dict(
            format=CHECKPOINT_FORMAT,
            version=CHECKPOINT_VERSION,
            fingerprint=run.fingerprint,
            order=None if self.order is None else [[int(p[0]), [int(i) for i in p[1]]] for p in self.order],
            raw0=_encode_tree(self.raw0),
            raw=_encode_tree(self.raw),
            opt_state=_encode_tree(self.opt_state),
            best_raw=_encode_tree(self.best_raw),
            final=dict(params=fitted_params(best, offsets).to_dict(), offsets=offsets_dict(run.params, offsets)),
            **{k: getattr(self, k) for k in ("step", "epoch", "position", "best_loss", "best_epoch", "bad_epochs",
                                             "history", "done", "stopped_early", "converged", "initial")},
        )  # fmt: skip


# --- the loop --------------------------------------------------------------------------------
def _check_inputs(params, train, energy, config, validation):
    """Refuse a fit that cannot work, naming why."""
    if len(train) == 0:
        raise QEqInputError("no training configurations")
    if tuple(train.elements) != tuple(params.elements):
        raise QEqInputError(f"the training data are indexed by elements {train.elements}, the parameters by {params.elements}")
    params.require(energy.kernel.required, train.species_present())
    if energy.gradient.name == "envelope":
        raise QEqInputError(
            "gradient='envelope' gives wrong parameter gradients of a force loss (the charges' response "
            "is left out); fit with 'unrolled' or 'implicit'"
        )
    for term in TERMS:
        if config.weights.get(term, 0.0) and not train.has(term):
            raise QEqInputError(f"the loss weights {term} but no training configuration has a reference {term}")


def _setup(params, train, energy, config, validation) -> _Run:
    """Parametrisation, batches, compiled functions and the fingerprint of a fit."""
    gauge = train.neutral() if config.chi_gauge == "auto" else bool(config.chi_gauge)
    distances = pair_reference_distances(train)
    par = make_parametrisation(params, config.train, train.species_present(), gauge, distances)
    anchor = par.anchor(params, distances)
    size = ravel_pytree(par.raw(anchor, jnp.zeros(len(params.elements))))[0].size
    if config.optimizer == "lm" and size > LM_MAX_COORDINATES:
        raise QEqInputError(
            f"optimizer 'lm' builds JᵀJ with one forward pass per raw coordinate; this model has {size} "
            f"(at most {LM_MAX_COORDINATES}): use optimizer 'adam'"
        )
    batcher = batcher_for(train, energy, params, config.batch_size, config.devices, config.min_bucket)
    lbfgs = config.optimizer == "lbfgs"
    steps_per_epoch = 1 if config.optimizer in ("lbfgs", "lm") else len(batcher.plans())
    steps_total = config.epochs * steps_per_epoch
    fitter = Fitter(energy, par, anchor, config, steps_total)
    val_eval = []
    if validation is not None:
        val_batcher = batcher_for(validation, energy, params, config.batch_size, config.devices, config.min_bucket)
        val_eval = [fitter.shard(b) for b in val_batcher.all_batches()]
    return _Run(
        params, train, validation, energy, config, par, anchor, batcher, fitter,
        train_eval=[fitter.shard(b) for b in batcher.all_batches()],
        val_eval=val_eval,
        train_stacks=fitter.stacks(batcher.all_batches()) if lbfgs else None,
        fingerprint=_fingerprint(params, train, validation, config, _model_name(energy)),
        steps_total=steps_total,
    )  # fmt: skip


def _epoch_steps(run: _Run, state: FitState, after_step: Callable[[float], None]) -> None:
    """The optimiser steps left in the current epoch: the rest of its shuffled batches (Adam) or
    one full-batch iteration (L-BFGS); ``after_step(loss)`` after each."""
    fitter = run.fitter
    if state.order is None:
        plans = run.batcher.epoch_plan(run.config.seed, state.epoch)
        state.order = [(p.bucket, p.indices) for p in plans]
    length = 1 if run.full_batch else len(state.order)
    while state.position < length:
        if run.config.optimizer == "lm":
            state.raw, state.opt_state, loss, moved = fitter.lm_step(state.raw, state.opt_state, state.raw0, run.train_eval)
            state.converged = not moved
        elif run.config.optimizer == "lbfgs":
            state.raw, state.opt_state, loss = fitter.lbfgs_step(state.raw, state.opt_state, state.raw0, run.train_stacks)
        else:
            batch = fitter.shard(run.batcher.batch(BatchPlan(*state.order[state.position])))
            state.raw, state.opt_state, loss = fitter.adam_step(state.raw, state.opt_state, state.raw0, batch, state.step)
        state.step += 1
        state.position += 1
        after_step(float(loss))


def _end_epoch(run: _Run, state: FitState, started: float) -> dict:
    """Metrics, early stopping and the history record at the end of an epoch; the state moves to
    the next epoch. A non-finite loss is an error that says what to change."""
    config, fitter = run.config, run.fitter
    record = dict(event="epoch", epoch=state.epoch, step=state.step, lr=fitter.learning_rate(state.step))
    record["train"] = fitter.metrics(state.raw, run.train_eval)
    if run.val_eval:
        record["validation"] = fitter.metrics(state.raw, run.val_eval)
    current = record["validation" if run.val_eval else "train"]["loss"]
    if not math.isfinite(current):
        raise QEqInputError(
            f"the loss became {current} in epoch {state.epoch}: lower the learning rate, or check the data "
            "(metrics: " + json.dumps(record["train"]) + ")"
        )
    if state.best_loss is None or current < state.best_loss * (1.0 - config.min_delta):
        state.best_loss, state.best_epoch, state.best_raw, state.bad_epochs = current, state.epoch, state.raw, 0
    else:
        state.bad_epochs += 1
    record["seconds"] = round(time.perf_counter() - started, 3)
    state.history.append(record)
    state.epoch += 1
    state.position = 0
    state.order = None
    state.stopped_early = bool(run.val_eval) and config.patience is not None and state.bad_epochs >= config.patience
    state.done = state.stopped_early or state.converged or state.epoch >= config.epochs
    return record


def _write_log(run: _Run, state: FitState, log) -> None:
    """The JSON-lines log from scratch: a start line, then one line per epoch so far."""
    start = dict(event="start", config=run.config.to_dict(), model=model_label(run.energy), n_train=len(run.train),
                 n_validation=0 if run.validation is None else len(run.validation), **state.initial)  # fmt: skip
    write_atomic(log, "\n".join(json.dumps(line) for line in [start, *state.history]) + "\n")


def _progress_bar(run: _Run, state: FitState):
    from tqdm.auto import tqdm  # noqa: PLC0415 - only with progress=True

    return tqdm(total=run.steps_total, initial=state.step, unit="step", desc="fit", dynamic_ncols=True)


#: Plausible ranges of the element parameters (χ eV, J eV, σ Å, γ 1/Å, R Å) and of the pair
#: coefficients (A eV, ρ Å, C eV·Å⁶, D eV, a 1/Å, r0 Å): wide bounds around the values of
#: published QEq and ReaxFF sets and of Born–Mayer/Buckingham fits of ionic solids; a fitted
#: value outside them is reported, not changed.
PLAUSIBLE = {
    "chi": (-10.0, 30.0), "hardness": (0.5, 50.0), "sigma": (0.1, 5.0), "gamma": (0.05, 5.0), "radius": (0.1, 5.0),
    "A": (0.0, 1.0e5), "rho": (0.05, 1.5), "C": (0.0, 1.0e4), "D": (0.0, 50.0), "a": (0.1, 10.0), "r0": (0.3, 6.0),
}  # fmt: skip
#: A positive fitted value more than this factor from its start (χ, C: this many eV / eV·Å⁶ away) has
#: run away during the fit.
RUNAWAY = 10.0


def implausible(start: Params, fitted: Params, elements: Sequence[int]) -> list[str]:
    """Messages naming each fitted value (of ``elements``, indices) outside :data:`PLAUSIBLE` or
    more than :data:`RUNAWAY` from its start (a factor for positive quantities)."""
    values = []
    for key in ("chi", "hardness", "sigma", "gamma", "radius"):
        for i in elements:
            values.append((f"{key} of {fitted.elements[i]}", key, float(getattr(start, key)[i]), float(getattr(fitted, key)[i])))
    for pair, forms in fitted.pairs.items():
        for form, coeffs in forms.items():
            for c, v in coeffs.items():
                values.append((f"{form} {c} of {pair}", c, float(start.pairs.get(pair, {}).get(form, {}).get(c, v)), float(v)))
    out = []
    for name, key, v0, v in values:
        if v == v0 or not math.isfinite(v):
            continue
        lo, hi = PLAUSIBLE[key]
        if not lo <= v <= hi:
            out.append(f"fitted {name} = {v:.6g} is outside the plausible range [{lo:g}, {hi:g}] (start {v0:.6g})")
        elif key in ("chi", "C") and abs(v - v0) > RUNAWAY or v0 > 0 and v > 0 and max(v / v0, v0 / v) > RUNAWAY:
            out.append(f"fitted {name} = {v:.6g} ran far from its start {v0:.6g}")
    return out


def _ewald_warnings(run: _Run, fitted: Params) -> list[str]:
    """A message when the fitted Gaussian widths need a longer Ewald real-space cutoff than the
    one the periodic structures were planned with (:func:`batcher_for`)."""
    kernel = run.energy.kernel
    if not (kernel.ewald and any(c.periodic for c in run.train.configurations)):
        return []
    present = run.train.species_present()
    start, end = (float(np.max(np.asarray(p.sigma)[present])) for p in (run.params, fitted))
    used = kernel.cutoff or ewald.default_real_cutoff(WIDTH_MARGIN * start, kernel.accuracy)
    needed = ewald.required_real_cutoff(end, kernel.accuracy)
    if needed <= used:
        return []
    return [f"the fitted Gaussian widths (largest σ {end:.4g} Å) need an Ewald real-space cutoff of {needed:.4g} Å "
            f"for accuracy {kernel.accuracy:g}; the cells were summed with {used:.4g} Å: fit again with that cutoff"]


def _result(run: _Run, state: FitState) -> FitResult:
    final_raw = state.best_raw if run.val_eval else state.raw
    offsets = np.asarray(jax.device_get(final_raw["offsets"]))
    fitted = run.fitter.params(final_raw)
    return FitResult(
        params=fitted_params(fitted, offsets),
        offsets=offsets_dict(run.params, offsets),
        history=state.history,
        best_epoch=state.best_epoch if run.val_eval else state.epoch - 1,
        steps=state.step,
        stopped_early=state.stopped_early,
        initial=state.initial,
        warnings=implausible(run.params, fitted, run.train.species_present()) + _ewald_warnings(run, fitted),
    )


def fit(
    params: Params,
    train: Dataset,
    energy: Callable,
    config: FitConfig = FitConfig(),
    validation: Dataset | None = None,
    checkpoint: "str | Path | None" = None,
    log: "str | Path | None" = None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
) -> FitResult:
    """Fit ``params`` to ``train`` with the model ``energy`` (``qeq_energy(kernel, solver,
    gradient)``); see the module docstring and :class:`FitConfig`.

    checkpoint: path of the checkpoint file (written every ``config.checkpoint_every`` steps, at
    the end of each epoch and at the end). resume: continue from ``checkpoint`` exactly where it
    stopped (the start parameters, data and configuration must be the same). log: JSON-lines file,
    one record per epoch (rewritten from the checkpoint's history on resume). callback: called with
    a dict after every step; raising in it (e.g. :class:`FitInterrupted`) stops the fit.
    """
    validation = validation if validation is not None and len(validation) else None
    if resume and checkpoint is None:
        raise QEqInputError("resume needs the checkpoint path")
    _check_inputs(params, train, energy, config, validation)
    run = _setup(params, train, energy, config, validation)
    state = FitState.from_checkpoint(run, checkpoint) if resume else FitState.fresh(run)
    if log is not None:
        _write_log(run, state, log)
    bar = _progress_bar(run, state) if progress and not state.done else None

    def after_step(loss):
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=state.epoch, loss=f"{loss:.4g}")
        if callback is not None:
            callback(dict(step=state.step, epoch=state.epoch, loss=loss))
        unfinished = run.full_batch or state.position < len(state.order)
        if checkpoint is not None and state.step % config.checkpoint_every == 0 and unfinished:
            save_checkpoint(checkpoint, state.to_checkpoint(run))

    t_epoch = time.perf_counter()
    try:
        while not state.done and state.epoch < config.epochs:
            _epoch_steps(run, state, after_step)
            record = _end_epoch(run, state, t_epoch)
            t_epoch = time.perf_counter()
            if bar is not None:
                v = record.get("validation", {})
                bar.set_postfix(epoch=record["epoch"], F_rmse=f"{record['train']['force_rmse'] or 0:.3g}",
                                val=f"{v.get('force_rmse') or 0:.3g}" if v else "-")
            if log is not None:
                with open(log, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if checkpoint is not None:
                save_checkpoint(checkpoint, state.to_checkpoint(run))
    finally:
        if bar is not None:
            bar.close()
    return _result(run, state)


def fit_offsets(params: Params, dataset: Dataset, energy: Callable, batch_size: int = 16) -> dict:
    """Per-element energy offsets (eV, ``{element: b}``) that best align the model energies of
    ``params`` with the reference energies of ``dataset`` (least squares per atom)."""
    zero = jnp.zeros(len(params.elements), params.chi.dtype)
    batches = batcher_for(dataset, energy, params, batch_size).all_batches()
    return offsets_dict(params, _offsets(batches, lambda b: _param_sums(energy, params, zero, b)[1]))


def evaluate(params: Params, dataset: Dataset, energy: Callable, offsets=None, batch_size: int = 16) -> dict:
    """Metrics of ``params`` on ``dataset`` (see :func:`metrics_from_sums`). offsets: per-element
    energy offsets (eV, array or ``{element: eV}``); ``None`` fits them to ``dataset`` by least
    squares (the energy metrics are then those after the best per-element shift)."""
    if tuple(dataset.elements) != tuple(params.elements):
        raise QEqInputError(f"the data are indexed by elements {dataset.elements}, the parameters by {params.elements}")
    params.require(energy.kernel.required, dataset.species_present())
    batches = batcher_for(dataset, energy, params, batch_size).all_batches()
    if offsets is None:
        offsets = fit_offsets(params, dataset, energy, batch_size)
    if isinstance(offsets, Mapping):
        offsets = np.asarray([float(offsets.get(el, 0.0)) for el in params.elements])
    offsets = jnp.asarray(offsets, dtype=params.chi.dtype)
    sums = None
    for b in batches:
        s = _param_sums(energy, params, offsets, b)[0]
        sums = s if sums is None else add_sums(sums, s)
    return metrics_from_sums(jax.device_get(sums), {k: 1.0 for k in TERMS})
