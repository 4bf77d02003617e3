"""Relax a 32-atom NaCl cluster with the QEq calculator (BFGS) and write the trajectory.

    python examples/relax_cluster.py [relax_cluster.traj] [--params model.json] [--structure start.xyz]

Built-in ``demo-nacl-water`` parameters, gaussian kernel, CG to tolerance with unrolled forces;
``--params`` also takes a model file of ``qeq-unroll fit --model neural`` (its kernel comes with
it) and ``--structure`` an extended XYZ file (its first configuration) in place of the cluster.
Prints the final energy (eV), the largest remaining force (eV/Å) and the charges (e); every BFGS
step goes to the ASE trajectory (view it with ``ase gui relax_cluster.traj``).
"""

import argparse
import sys

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase.io import Trajectory  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

from ase.io import read  # noqa: E402

from calculators import QEqCalculator  # noqa: E402
from calculators.structures import nacl_cluster  # noqa: E402
from qeq_unroll.neural import is_model_file  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trajectory", nargs="?", default="relax_cluster.traj", help="ASE trajectory to write")
    ap.add_argument("--params", default="demo-nacl-water", help="parameter set or model file (default demo-nacl-water)")
    ap.add_argument("--structure", default=None, help="extended XYZ file to relax (default: a 32-atom NaCl cluster)")
    args = ap.parse_args(argv)
    path = args.trajectory
    atoms = nacl_cluster(32) if args.structure is None else read(args.structure, 0)
    kernel = {} if is_model_file(args.params) else {"kernel": "gaussian"}
    atoms.calc = QEqCalculator(params=args.params, solver="cg", iterations=None, gradient="unrolled", **kernel)
    with Trajectory(path, "w", atoms) as traj:
        opt = BFGS(atoms, trajectory=traj)
        converged = opt.run(fmax=0.01, steps=500)
    forces = atoms.get_forces()
    charges = atoms.get_charges()
    print(f"\n{'converged' if converged else 'NOT converged'} after {opt.nsteps} BFGS steps; trajectory: {path}")
    print(f"final energy     {atoms.get_potential_energy():.6f} eV ({atoms.get_potential_energy() / len(atoms):.6f} eV/atom)")
    print(f"max force        {np.max(np.linalg.norm(forces, axis=1)):.2e} eV/A")
    print(f"solver           residual {atoms.calc.results['qeq_residual']:.1e}, "
          f"{atoms.calc.results['qeq_iterations']} CG iterations")
    print(f"sum of charges   {charges.sum():.2e} e")
    print(" i  el      q (e)")
    for i, (el, q) in enumerate(zip(atoms.get_chemical_symbols(), charges)):
        print(f"{i:2d}  {el:<2s} {q:+10.5f}")
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
