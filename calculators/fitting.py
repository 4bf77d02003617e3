"""``qeq-unroll fit`` and ``qeq-unroll plot-fit``: fit parameters to extended XYZ reference data.

    qeq-unroll fit train.xyz --out fitted.json [--validation 0.1 | --validation val.xyz]
    qeq-unroll plot-fit fitted.log.jsonl --out curves.png

The logic lives in ``qeq_unroll.fit`` (the loop) and ``calculators.data`` (reading); this module
turns options into those calls and prints a summary. Units: energies eV (metrics meV/atom),
forces eV/Å, charges e, dipoles e·Å, stress eV/Å³ (metrics GPa).

Starting pair terms: when ``pairs`` is trained and the start set has no pair term between the
elements of the data, :func:`add_start_pairs` adds one of the form ``--pairs`` for every pair of
elements present, placed at the sum of the two covalent radii r_c (Cordero et al., Dalton Trans.
2008, 2832, as tabulated by ``ase.data.covalent_radii``): Born–Mayer A e^(−r/ρ) with ρ = 0.3 Å and
A e^(−r_c/ρ) = 0.1 eV (a soft repulsion at contact); Buckingham the same with C = 0; Morse with
D = 0.1 eV, a = 1.5 Å⁻¹, r0 = r_c.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qeq_unroll import SOLVERS
from qeq_unroll.errors import QEqInputError

from .options import add_model_options

#: Defaults of ``qeq-unroll fit``.
DEFAULTS = dict(
    params="demo-nacl-water",
    iterations=20,
    gradient="auto",
    validation="0.1",
    epochs=100,
    train="chi,hardness,sigma,pairs",
    lr=0.02,
    optimizer="lm",
    batch_size=16,
    weights="energy=1,forces=1,charges=0,dipole=0",
    pairs="born_mayer",
)
#: What ``--model neural`` changes: the start table gives only the baseline χ, J and widths of the
#: data's elements; the networks and widths are trained, with Adam (thousands of weights).
NEURAL_DEFAULTS = dict(params="rappe-goddard-1991", train="sigma,networks", optimizer="adam", lr=0.005, epochs=200)
#: The most neighbours within the descriptor cutoff that the search for the data's largest count takes.
MAX_NEIGHBORS_SEARCHED = 256
#: ``--model local``: the networks of ``neural`` without charges (solver ``none``).
LOCAL_DEFAULTS = dict(NEURAL_DEFAULTS, train="networks")
#: The fitted width of each kernel, in place of the defaults' ``sigma``.
WIDTH_KEYS = {"gaussian": "sigma", "reaxff": "gamma"}
#: Stress weight, (eV/Å³)⁻², when the data hold stress and ``--weights`` does not name it: a
#: 0.01 eV/Å³ (1.6 GPa) error then weighs like a 32 meV/atom energy error.
DEFAULT_STRESS_WEIGHT = 10.0
#: Starting pair terms (see the module docstring): softness ρ (Å), energy at contact (eV), Morse a (1/Å).
START_RHO, START_CONTACT_ENERGY, START_MORSE_A = 0.3, 0.1, 1.5


def _parse_pairs(text: str, what: str, cast=str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise QEqInputError(f"{what}: expected name=value items separated by commas, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = cast(v.strip())
        except ValueError:
            raise QEqInputError(f"{what}: '{v}' is not a number (in '{item}')") from None
    return out


def add_fit(subparsers) -> None:
    p = subparsers.add_parser(
        "fit",
        help="fit QEq and pair parameters to reference energies/forces/charges (extended XYZ)",
        description="Fit the parameters of the charge model to reference data through the charge "
        "solver (unrolled or implicit gradients). Reference properties are read from extended XYZ "
        "under the keys REF_energy, REF_forces, REF_charges, REF_dipole (see --keys). Per-element "
        "energy offsets are fitted too, so energies with any zero work. Metrics after every epoch "
        "on training and validation data: energy MAE (meV/atom), force RMSE and MAE (eV/A), "
        "charge RMSE (e). Writes the fitted set (JSON), a checkpoint, a JSON-lines log and, on "
        "request, LAMMPS parameter files.",
    )
    p.add_argument("train_files", nargs="+", metavar="TRAIN.xyz", help="training data (extended XYZ)")
    p.add_argument("--out", required=True, help="fitted parameter set, or model file with --model neural|local, to write (JSON)")
    # a fit differentiates through the solver: no envelope gradients, no learned solver
    p.add_argument("--model", choices=("table", "neural", "local"), default="table",
                   help="table: chi, J and pair terms per element; neural: chi and J from each atom's environment "
                   "(symmetry functions, per-element networks) and a short-range network; local: the short-range "
                   "network alone, no charges (the baseline a charge model must beat); default table")
    p.add_argument("--hidden", default="16,16", help="neural: hidden layer widths (default 16,16)")
    p.add_argument("--descriptor-cutoff", type=float, default=6.0, help="neural: symmetry-function cutoff in A (default 6)")
    p.add_argument("--max-neighbors", type=int, default=None,
                   help="neural: neighbours within the descriptor cutoff an atom may have (default 1.5 x the most in the data)")
    p.add_argument("--charge-in-short", action="store_true", help="neural: the short-range network also takes the atom's charge")
    p.add_argument("--learned-family", choices=("cg", "gd", "nag"), default="cg",
                   help="neural with --solver learned: the iteration whose start, preconditioner and steps are trained with "
                        "the model (default cg)")
    add_model_options(p, params=None, params_help=f"{DEFAULTS['params']}; neural: the baseline chi, J and widths, "
                      f"{NEURAL_DEFAULTS['params']}", iterations_default=DEFAULTS["iterations"], solvers=(*SOLVERS, "learned"),
                      gradients=("auto", "unrolled", "implicit"), gradient=DEFAULTS["gradient"], tol=1e-10, tol_help="default 1e-10")
    p.add_argument("--coulomb-constant", type=float, default=None, help="k_e in eV*A (default 14.399645)")
    p.add_argument("--validation", default=DEFAULTS["validation"],
                   help="validation data: an extended XYZ file, or a fraction of the training data held "
                   "out (default 0.1; 0 for none). The split is stored in --split and reused")
    p.add_argument("--split", default=None, help="file of the persisted train/validation split (default OUT.split.json)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 100, neural 200; lm stops earlier at a minimum)")
    p.add_argument("--train", default=None,
                   help="parameter groups to fit, from chi, hardness, sigma, gamma, pairs, networks (default "
                   "chi,hardness,sigma,pairs with sigma the kernel's width: gamma for reaxff, none for point and "
                   "slater; neural sigma,networks; local networks)")
    p.add_argument("--lr", type=float, default=None, help="Adam peak learning rate (default 0.02, neural 0.005)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine", help="learning-rate schedule (default cosine)")
    p.add_argument("--optimizer", choices=("lm", "adam", "lbfgs"), default=None,
                   help="lm (Levenberg-Marquardt, full batch, one iteration per epoch, stops at a minimum: for tens of "
                   "parameters), adam (mini-batches) or lbfgs (full batch); default lm, neural adam")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="structures per batch (default 16)")
    p.add_argument("--weights", default=DEFAULTS["weights"],
                   help="loss weights, e.g. energy=1,forces=1,charges=0.5,dipole=0,stress=10 (energy per atom; stress in "
                   f"eV/A^3, default {DEFAULT_STRESS_WEIGHT:g} where the data have stress; default %(default)s)")
    p.add_argument("--pairs", choices=("born_mayer", "buckingham", "morse"), default=DEFAULTS["pairs"],
                   help="form of the starting pair terms added when the start set has none between the data's elements "
                   "(default born_mayer)")
    p.add_argument("--pull", type=float, default=0.0, help="weight of a pull toward the start parameters (default 0)")
    p.add_argument("--patience", type=int, default=20, help="early stopping: epochs without validation improvement (default 20; 0 off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffling (default 0)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default OUT.ckpt.json)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="optimiser steps between checkpoints (default 50)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint exactly where it stopped")
    p.add_argument("--log", default=None, help="JSON-lines log, one line per epoch (default OUT.log.jsonl)")
    p.add_argument("--keys", default="", help="reference keys, e.g. energy=DFT_E,forces=DFT_F (defaults REF_*)")
    p.add_argument("--on-nonfinite", choices=("skip", "error"), default="skip",
                   help="configurations with non-finite values: skip and report (default) or stop")
    p.add_argument("--lammps-out", default=None, metavar="DIR",
                   help="also write the fitted set as a LAMMPS deck in DIR (as qeq-unroll export-lammps; needs --kernel reaxff)")
    p.add_argument("--min-bucket", type=int, default=0,
                   help="pad every structure to at least this many atoms: fewer size buckets, fewer compilations")
    p.add_argument("--devices", type=int, default=1, help="split each batch across this many devices (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_fit)


def add_plot_fit(subparsers) -> None:
    p = subparsers.add_parser(
        "plot-fit",
        help="draw the learning curves of a fit log to PNG",
        description="Plot loss, force RMSE, energy MAE and charge RMSE per epoch (training and "
        "validation) from the JSON-lines log of 'qeq-unroll fit'.",
    )
    p.add_argument("log", help="JSON-lines log written by qeq-unroll fit")
    p.add_argument("--out", default=None, help="PNG to write (default LOG with .png)")
    p.set_defaults(func=run_plot_fit)


def _stem(out: str) -> str:
    path = Path(out)
    return str(path.with_suffix("")) if path.suffix == ".json" else str(path)


def _load_data(files, params, keys, required, on_nonfinite, echo):
    from .data import read_reference

    data, report = read_reference(files, params, keys=keys, required=required, on_nonfinite=on_nonfinite)
    skipped = report["skipped_nonfinite"]
    if skipped:
        echo(f"skipped {len(skipped)} configuration(s) with non-finite values: {', '.join(skipped[:5])}"
             + (" ..." if len(skipped) > 5 else ""))
    return data, report


def add_start_pairs(params, dataset, form: str = "born_mayer"):
    """``(params, added)``: ``params`` with a starting pair term of ``form`` for every pair of
    elements present in ``dataset`` when it has none between them (see the module docstring);
    ``added`` names the pairs added (empty: ``params`` unchanged)."""
    from ase.data import atomic_numbers, covalent_radii

    from qeq_unroll.params import Params, pair_key

    present = [params.elements[i] for i in dataset.species_present()]
    keys = sorted({pair_key(a, b) for a in present for b in present})
    if any(k in params.pairs for k in keys):
        return params, []
    data = params.to_dict()
    pairs = data.setdefault("pairs", {})
    for key in keys:
        a, b = key.split("-")
        contact = float(covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])
        prefactor = START_CONTACT_ENERGY * math.exp(contact / START_RHO)
        pairs[key] = {
            "born_mayer": {"born_mayer": {"A": prefactor, "rho": START_RHO}},
            "buckingham": {"buckingham": {"A": prefactor, "rho": START_RHO, "C": 0.0}},
            "morse": {"morse": {"D": START_CONTACT_ENERGY, "a": START_MORSE_A, "r0": contact}},
        }[form]
    return Params.from_dict(data), keys


def _weights(args, train, echo) -> dict:
    """Loss weights from ``--weights``; stress gets ``DEFAULT_STRESS_WEIGHT`` where the data have
    stress and the option does not name it."""
    given = _parse_pairs(args.weights, "--weights", float)
    weights = {**{"energy": 0.0, "forces": 0.0, "charges": 0.0, "dipole": 0.0, "stress": 0.0}, **given}
    if "stress" not in given and train.has("stress"):
        weights["stress"] = DEFAULT_STRESS_WEIGHT
        n = sum(c.stress is not None for c in train.configurations)
        echo(f"{n} training structures have a reference stress: stress weight {DEFAULT_STRESS_WEIGHT:g} (eV/A^3)^-2 "
             "(set it with --weights ...,stress=W)")
    return weights


def _split(args, train, stem, params, keys, required, echo):
    """``(train, validation, note)`` after ``--validation`` (a file or a held-out fraction)."""
    from qeq_unroll.dataset import persisted_split

    try:
        fraction = float(args.validation)
    except ValueError:
        validation, _ = _load_data([args.validation], params, keys, required, args.on_nonfinite, echo)
        return train, validation, f"validation file {args.validation}"
    if fraction > 0:
        split_path = args.split or f"{stem}.split.json"
        tr, va = persisted_split(split_path, train, fraction, args.seed)
        return train.subset(tr), train.subset(va), f"{fraction:g} of the training data held out (split in {split_path})"
    return train, None, "no validation data"


def _config(args, weights):
    from qeq_unroll import fit as F

    return F.FitConfig(
        train=tuple(g.strip() for g in args.train.split(",") if g.strip()),
        weights=weights,
        pull=args.pull,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        schedule=args.schedule,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience or None,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        devices=args.devices,
        min_bucket=args.min_bucket,
    )


def _resolve_defaults(args) -> None:
    """Fill the options left unset with the defaults of the chosen ``--model``."""
    defaults = {**DEFAULTS, **{"neural": NEURAL_DEFAULTS, "local": LOCAL_DEFAULTS}.get(args.model, {})}
    if args.train is None:  # the kernel's own width: sigma (gaussian), gamma (reaxff), none (point, slater)
        groups = [WIDTH_KEYS.get(args.kernel) if g == "sigma" else g for g in defaults["train"].split(",")]
        defaults["train"] = ",".join(g for g in groups if g)
    for name in ("params", "train", "optimizer", "lr", "epochs"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])


def _read(args, params, keys, required, echo):
    """The training data; with ``--model neural``, ``params`` cut down to the data's elements
    (the networks take one input block per element) and the data read again against it."""
    train, report = _load_data(args.train_files, params, keys, required, args.on_nonfinite, echo)
    if args.model != "table":
        params = params.restricted([params.elements[i] for i in train.species_present()])
        train, report = _load_data(args.train_files, params, keys, required, args.on_nonfinite, lambda *_: None)
    return params, train


def _neural(args, params, kernel, solver, kwargs, train, echo):
    """``(energy, params)`` of a fresh neural (or local) model on ``params``' elements, its
    neighbour slots and feature standardisation fitted to the training data."""
    import jax

    import qeq_unroll as qu
    from qeq_unroll import fit as F
    from qeq_unroll.learned import TrainedSolver
    from qeq_unroll.neural import fitted_to_data, neural_terms

    hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    n = len(params.elements)
    terms = neural_terms(n, args.descriptor_cutoff, hidden, charge_in_short=args.charge_in_short,
                         max_neighbors=args.max_neighbors or MAX_NEIGHBORS_SEARCHED)  # fmt: skip
    networks = terms.init_networks(jax.random.PRNGKey(args.seed), n, params.chi.dtype)
    if isinstance(solver, TrainedSolver):
        networks["solver"] = solver.init_arrays(params.chi.dtype)
    params = params.replace(networks=networks)
    probe = qu.qeq_energy(kernel, solver, args.gradient, terms=terms, **kwargs)
    terms, params = fitted_to_data(probe, params, F.batcher_for(train, probe, params, args.batch_size),
                                   margin=1.0 if args.max_neighbors else 1.5)  # fmt: skip
    echo(f"{args.model} model: {terms.descriptors.size} symmetry functions per atom (cutoff {args.descriptor_cutoff:g} A, "
         f"{terms.descriptors.max_neighbors} neighbour slots), networks {terms.descriptors.size}-{'-'.join(map(str, hidden))} "
         f"per element; baseline chi, J and widths from '{params.name}'")
    return qu.qeq_energy(kernel, solver, args.gradient, terms=terms, **kwargs), params


def run_fit(args, echo=print) -> int:
    import qeq_unroll as qu
    from qeq_unroll import fit as F

    _resolve_defaults(args)
    params = qu.load_params(args.params)
    keys = _parse_pairs(args.keys, "--keys")
    given = _parse_pairs(args.weights, "--weights", float)
    required = [k for k, w in given.items() if w > 0 and k != "stress"]  # stress: bulk cells only
    params, train = _read(args, params, keys, required, echo)
    weights = _weights(args, train, echo)
    kernel = qu.get_kernel(args.kernel, args.cutoff)
    solver = _solver(args, kernel, params)  # bad solver options are refused before a split is drawn
    stem = _stem(args.out)
    train, validation, split_note = _split(args, train, stem, params, keys, required, echo)
    config = _config(args, weights)
    if "pairs" in config.train:
        params, added = add_start_pairs(params, train, args.pairs)
        if added:
            echo(f"'{params.name}' has no pair terms between the elements of the data: starting {args.pairs} terms "
                 f"added for {', '.join(added)} (see 'qeq-unroll fit --help', --pairs)")
    elements = [params.elements[i] for i in train.species_present()]
    if args.lammps_out:  # refused before the fit, not after it
        _check_exportable(args, params, kernel, elements)
    kwargs = {} if args.coulomb_constant is None else {"coulomb_constant": args.coulomb_constant}
    if args.model == "local":
        solver = qu.get_solver("none")
    if args.model != "table":
        energy, params = _neural(args, params, kernel, solver, kwargs, train, echo)
    else:
        energy = qu.qeq_energy(kernel, solver, args.gradient, **kwargs)
    checkpoint = args.checkpoint or f"{stem}.ckpt.json"
    log = args.log or f"{stem}.log.jsonl"
    k_text = "to tol" if args.iterations is None else f"K={args.iterations}"
    solver_text = "none (no charges)" if energy.solver.name == "none" else f"{args.solver} {k_text}"
    if hasattr(energy.solver, "parts"):
        solver_text += (f" ({args.learned_family}: start, preconditioner and steps" if energy.solver.parts == "all"
                        else " (step sizes") + " trained with the model)"  # fmt: skip
    n_periodic = sum(c.periodic for c in train.configurations)
    echo(f"qeq-unroll fit: {len(train)} training ({n_periodic} periodic) and {0 if validation is None else len(validation)} "
         f"validation configurations ({split_note}); start '{params.name}', kernel {kernel.name}, solver {solver_text}, "
         f"{energy.gradient.name} gradients; training {', '.join(config.train)}; {args.optimizer}, {args.epochs} epochs")
    try:
        result = F.fit(params, train, energy, config, validation=validation, checkpoint=checkpoint, log=log,
                       resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        echo(f"\ninterrupted: the last checkpoint {checkpoint} is intact; continue with the same command and --resume")
        return 130
    _save(args, result, energy)
    _report(args, result, energy, echo)
    written = [args.out, checkpoint, log]
    if args.lammps_out:
        written.append(_write_lammps(args, result, energy, elements, echo))
    echo(f"wrote {', '.join(written)}")
    present = {params.elements[i] for i in train.species_present()}
    if result.offsets:
        echo("energy offsets (eV/atom of each element): " + ", ".join(
            f"{el} {b:.4f}" for el, b in result.offsets.items() if el in present))
    return 0


def _solver(args, kernel, params):
    """The fit's solver. A neural model trains the parts of its solver with its networks: the step
    sizes (and momenta) of ``gd`` and ``nag`` at a fixed K, and with ``--solver learned`` the start,
    preconditioner and steps of ``--learned-family`` (``learned.TrainedSolver``)."""
    import qeq_unroll as qu
    from qeq_unroll.learned import TrainedSolver

    trained = args.solver == "learned" or (args.model == "neural" and args.solver in ("gd", "nag") and args.iterations)
    if args.solver == "learned" and args.model != "neural":
        raise QEqInputError("fit --solver learned trains the solver together with a neural model (--model neural); for a "
                            "parameter table train a solver file with 'qeq-unroll train-solver'")  # fmt: skip
    if not trained:
        return qu.get_solver(args.solver, args.iterations, args.tol, args.max_iterations)
    if args.iterations is None:
        raise QEqInputError(f"a solver trained with the model runs a fixed K: give --iterations with --solver {args.solver}")
    family, parts = (args.learned_family, "all") if args.solver == "learned" else (args.solver, "steps")
    return TrainedSolver(family, args.iterations, parts, kernel.name, tuple(params.elements))


def _save(args, result, energy) -> None:
    """The fitted parameter set, or with ``--model neural`` or ``local`` the model file."""
    import qeq_unroll as qu
    from qeq_unroll.neural import save_model

    if args.model != "table":
        save_model(args.out, energy.terms, result.params, energy.kernel, energy.coulomb_constant, args.model == "neural",
                   result.offsets, energy.solver)
    else:
        qu.save_params(result.params, args.out)


def _report(args, result, energy, echo) -> None:
    """Warnings (unconverged solves, implausible parameters) and the closing table."""
    if result.history:
        unconverged = sum(h["train"]["unconverged"] for h in result.history)
        if unconverged and energy.gradient.name == "implicit":
            echo(f"warning: {unconverged} unconverged charge solves during the fit: implicit gradients assume "
                 "converged solves; raise --iterations or use --gradient unrolled")
    for warning in result.warnings:
        echo(f"warning: {warning}")
    echo("")
    echo(format_summary(result))


def _check_exportable(args, params, kernel, elements) -> None:
    from qeq_unroll.lammps_export import check_exportable

    if args.model != "table":
        raise QEqInputError(f"--lammps-out: a {args.model} model cannot be exported to LAMMPS (no LAMMPS style for its networks)")
    check_exportable(params, kernel, elements)


def _write_lammps(args, result, energy, elements, echo) -> str:
    from qeq_unroll.lammps_export import export_lammps

    written = export_lammps(result.params, energy.kernel, elements, args.lammps_out, energy.coulomb_constant)
    echo(f"LAMMPS deck {written[0]} (types {' '.join(f'{t + 1}={e}' for t, e in enumerate(elements))}): "
         f"'include {written[0]}' after read_data")
    return str(args.lammps_out)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


#: Columns of the closing table: (metric, heading, format); stress only when the data have it.
COLUMNS = (("energy_mae", "E MAE meV/atom", "14.2f"), ("force_rmse", "F RMSE eV/A", "12.4f"),
           ("force_mae", "F MAE eV/A", "11.4f"), ("charge_rmse", "q RMSE e", "9.4f"),
           ("stress_rmse_gpa", "S RMSE GPa", "11.4f"))  # fmt: skip


def format_summary(result) -> str:
    """Start vs fitted metrics on training and validation data (a text table). A fitted metric
    worse than at the start is marked ``!`` and named below the table."""
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), None)
    best = best or (result.history[-1] if result.history else {})
    parts = [p for p in ("train", "validation") if result.initial.get(p)]
    columns = [c for c in COLUMNS if any(m and m.get(c[0]) is not None for p in parts for m in (result.initial[p], best.get(p)))]
    head = f"{'':<30s} " + " ".join(f"{title:>{int(fmt.split('.')[0]) + 1}s}" for _, title, fmt in columns)
    lines, worse = [head, "-" * len(head)], []
    for part in parts:
        start, fitted = result.initial[part], best.get(part)
        for label, metrics in (("start", start), (f"fitted (epoch {result.best_epoch})", fitted)):
            if not metrics:
                continue
            cells = []
            for key, title, fmt in columns:
                flag = metrics is fitted and _worse(start.get(key), metrics.get(key))
                cells.append(_fmt(metrics.get(key), fmt) + ("!" if flag else " "))
                if flag:
                    worse.append(f"! {part} {title} got worse than at the start ({_fmt(start[key], '.4g')} -> {_fmt(metrics[key], '.4g')})")
            lines.append(f"{part + ' ' + label:<30s} " + " ".join(cells))
    note = "stopped early" if result.stopped_early else "all epochs"
    lines += worse
    lines.append(f"{result.steps} optimiser steps ({note}); start energies use least-squares per-element offsets")
    return "\n".join(lines)


def _worse(start, fitted) -> bool:
    return start is not None and fitted is not None and fitted > start * (1.0 + 1e-9)


def read_log(path) -> tuple[dict, list]:
    """``(start record, epoch records)`` of a fit log."""
    path = Path(path)
    if not path.is_file():
        raise QEqInputError(f"fit log {path} does not exist")
    start, epochs = {}, []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QEqInputError(f"{path}, line {n}: not JSON ({exc})") from exc
        if rec.get("event") == "start":
            start = rec
        elif rec.get("event") == "epoch":
            epochs.append(rec)
    if not epochs:
        raise QEqInputError(f"fit log {path} has no epoch records")
    return start, epochs


def run_plot_fit(args, echo=print) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start, epochs = read_log(args.log)
    out = args.out or str(Path(args.log).with_suffix(".png"))
    panels = [("loss", "loss", True), ("force_rmse", "force RMSE (eV/Å)", True),
              ("energy_mae", "energy MAE (meV/atom)", True), ("charge_rmse", "charge RMSE (e)", True)]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), constrained_layout=True)
    for ax, (key, label, log_y) in zip(axes.ravel(), panels):
        for part, style in (("train", "-"), ("validation", "--")):
            xs = [-1] if start.get(part) else []
            ys = [start[part][key]] if start.get(part) else []
            for h in epochs:
                if part in h and h[part].get(key) is not None:
                    xs.append(h["epoch"])
                    ys.append(h[part][key])
            ys_ok = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
            if ys_ok:
                ax.plot(*zip(*ys_ok), style, marker="o", markersize=2.5, label=part)
        ax.set_xlabel("epoch (-1: start)")
        ax.set_ylabel(label)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    model = start.get("model", "")
    fig.suptitle(f"qeq-unroll fit: {Path(args.log).name}" + (f"\n{model}" if model else ""), fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    echo(f"wrote {out} ({len(epochs)} epochs)")
    return 0


def _rmsd(a, b) -> float:
    """RMSD (Å) of two conformations of the same atoms after removing translation and rotation."""
    import numpy as np

    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return float(np.sqrt(np.mean(np.sum((a @ rot - b) ** 2, axis=1))))


def demo_fit(echo=print, epochs: int = 15, fmax: float = 0.02, steps: int = 500) -> dict:
    """The fitting part of ``qeq-unroll demo``: a short fit of ``demo-nacl-water`` to the shipped
    GFN2-xTB NaCl clusters of 8 and 16 atoms (validation: the held-out 12-atom clusters), then a
    BFGS relaxation of the held-out 20-atom cluster (a size never fitted) with the start and the
    fitted parameters (BFGS to ``fmax`` eV/Å, at most ``steps``), compared with the GFN2-xTB
    minimum. The model is its own (gaussian kernel, CG K = 16, unrolled): a fit needs a fixed K or
    implicit gradients whatever the demo's relaxation used. Returns the numbers as a dict."""
    import time

    import numpy as np
    from ase import Atoms
    from ase.io import read

    import qeq_unroll as qu
    from qeq_unroll import fit as F

    from .data import read_reference, shipped_reference
    from .md import relax
    from .qeq import QEqCalculator

    t0 = time.perf_counter()
    start = qu.load_params("demo-nacl-water")
    train, _ = read_reference(shipped_reference("train"), start)
    held, _ = read_reference(shipped_reference("heldout"), start)
    nacl = lambda d, sizes: d.subset([i for i, c in enumerate(d.configurations)  # noqa: E731
                                      if c.n_atoms in sizes and set(int(s) for s in c.species) <= {2, 3}])
    train, val = nacl(train, (8, 16)), nacl(held, (12,))
    iterations = 16
    energy = qu.qeq_energy("gaussian", qu.CG(iterations=iterations), "unrolled")
    config = F.FitConfig(optimizer="adam", epochs=epochs, batch_size=14, learning_rate=0.05, patience=None, min_bucket=16)
    echo(f"Fit: {len(train)} GFN2-xTB NaCl clusters of 8 and 16 atoms (shipped set), validation {len(val)} "
         f"held-out clusters of 12 atoms; chi, J, sigma and pair terms from '{start.name}'; CG K = {iterations}, "
         f"unrolled gradients through the solver; Adam, {epochs} epochs")
    result = F.fit(start, train, energy, config, validation=val)
    fitted = result.params
    v0, v1 = result.initial["validation"], result.history[result.best_epoch]["validation"]
    echo(f"  validation force RMSE {v0['force_rmse']:.3f} -> {v1['force_rmse']:.3f} eV/A, charge RMSE "
         f"{v0['charge_rmse']:.3f} -> {v1['charge_rmse']:.3f} e ({time.perf_counter() - t0:.1f} s with compilation)")
    ref = [a for a in read(shipped_reference("heldout"), ":") if a.info["config_type"] == "relaxed" and len(a) == 20][0]
    rattled = Atoms(ref.get_chemical_symbols(), positions=ref.positions
                    + np.random.default_rng(0).normal(0.0, 0.1, ref.positions.shape))
    out = dict(validation_start=v0, validation_fitted=v1)
    head = f"  {'Na10Cl10 (held-out size)':<26s} {'BFGS':>5s} {'max|F| eV/A':>11s} {'RMSD to xTB min (A)':>20s} {'Na-Cl min (A)':>13s} {'q(Na) e':>8s}"
    echo("Relax the held-out 20-atom cluster (xTB minimum rattled by 0.1 A):")
    echo(head)
    echo("  " + "-" * (len(head) - 2))
    for label, params in (("start", start), ("fitted", fitted)):
        calc = QEqCalculator(params=params, kernel="gaussian", solver="cg", iterations=iterations)
        atoms = relax(rattled.copy(), calc, fmax=fmax, steps=steps)
        symbols = np.asarray(atoms.get_chemical_symbols())
        d = atoms.get_all_distances()[np.ix_(symbols == "Na", symbols == "Cl")]
        rmsd = _rmsd(atoms.positions, ref.positions)
        f = float(np.max(np.linalg.norm(calc.results["forces"], axis=1)))
        qna = float(np.mean(calc.results["charges"][symbols == "Na"]))
        echo(f"  {label:<26s} {atoms.info['relax_steps']:>5d} {f:11.2e} {rmsd:20.3f} {d.min():13.3f} {qna:8.3f}")
        out[label] = dict(rmsd=rmsd, fmax=f, steps=atoms.info["relax_steps"], q_na=qna)
    symbols = np.asarray(ref.get_chemical_symbols())
    d = ref.get_all_distances()[np.ix_(symbols == "Na", symbols == "Cl")]
    echo(f"  {'GFN2-xTB':<26s} {'':>5s} {'':>11s} {0.0:20.3f} {d.min():13.3f} {np.mean(ref.arrays['REF_charges'][symbols == 'Na']):8.3f}")
    echo(f"Fit and relaxations: {time.perf_counter() - t0:.1f} s")
    return out

