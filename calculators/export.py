"""``qeq-unroll export-lammps``: a parameter set as a LAMMPS deck (``qeq_unroll.lammps_export``)."""

from __future__ import annotations

from .options import add_model_options


def add_export_lammps(subparsers) -> None:
    p = subparsers.add_parser(
        "export-lammps",
        help="write a LAMMPS deck (in.qeq and its files) that computes this model's energy, forces and charges",
        description="Write DIR/in.qeq, to include right after read_data (units metal, atom_style charge; LAMMPS type i "
        "= the i-th element of --elements), and the fix qeq/reaxff parameter file it reads. Kernels LAMMPS cannot "
        "reproduce (gaussian, slater) and neural models are refused with the reason.",
    )
    p.add_argument("params", help="parameter set: built-in name, JSON file or ReaxFF ffield")
    add_model_options(p, params=None, only=("kernel", "cutoff"))
    p.add_argument("--elements", required=True, help="element of each LAMMPS type, in type order, e.g. Na,Cl")
    p.add_argument("--coulomb-constant", type=float, default=None, help="k_e in eV*A (default 14.399645)")
    p.add_argument("--tol", type=float, default=1e-10, help="the fix's relative CG tolerance (default 1e-10)")
    p.add_argument("--out", required=True, help="output folder DIR")
    p.set_defaults(func=run_export_lammps)


def elements_list(text: str) -> list[str]:
    return [e.strip() for e in text.split(",") if e.strip()]


def run_export_lammps(args, echo=print) -> int:
    import qeq_unroll as qu
    from qeq_unroll.lammps_export import export_lammps

    k_e = qu.COULOMB_CONSTANT if args.coulomb_constant is None else args.coulomb_constant
    written = export_lammps(qu.load_params(args.params), qu.get_kernel(args.kernel, args.cutoff),
                            elements_list(args.elements), args.out, k_e, args.tol)  # fmt: skip
    echo(f"wrote {', '.join(map(str, written))}: 'include {written[0]}' after read_data")
    return 0
