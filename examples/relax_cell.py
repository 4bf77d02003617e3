"""Relax the atoms *and* the cell of rock-salt NaCl with the QEq calculator (ASE FrechetCellFilter).

    python examples/relax_cell.py [--kernel reaxff|gaussian] [relax_cell.traj]

Built-in ``demo-nacl-water`` parameters (QEq terms of Rappé–Goddard plus the project's Born–Mayer
pair terms), a rattled and stretched 2×2×2 conventional cell (64 atoms) and a sheared cell, CG to
tolerance with implicit forces and stress. The stress is the strain derivative of the reported
energy (ASE sign convention), so BFGS on the cell filter converges like on positions. Prints the
lattice constant, the remaining force and stress and the charges.
"""

import argparse
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.filters import FrechetCellFilter  # noqa: E402
from ase.io import Trajectory  # noqa: E402
from ase.optimize import BFGS  # noqa: E402

from calculators import QEqCalculator  # noqa: E402


def rock_salt(a=6.0, reps=2, rattle=0.05, seed=0):
    """reps³ conventional rock-salt cells of lattice constant ``a`` (Å), slightly sheared and rattled."""
    basis = np.array([[0, 0, 0], [0, .5, .5], [.5, 0, .5], [.5, .5, 0], [.5, 0, 0], [0, .5, 0], [0, 0, .5], [.5, .5, .5]])
    symbols = ["Na"] * 4 + ["Cl"] * 4
    grid = np.stack(np.meshgrid(*[np.arange(reps)] * 3, indexing="ij"), -1).reshape(-1, 3)
    frac = (grid[:, None, :] + basis[None]).reshape(-1, 3) / reps
    cell = a * reps * np.array([[1.0, 0.0, 0.0], [0.03, 1.0, 0.0], [0.0, -0.02, 1.0]])
    rng = np.random.default_rng(seed)
    return Atoms(symbols * len(grid), scaled_positions=frac + rng.normal(0, rattle / (a * reps), frac.shape),
                 cell=cell, pbc=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trajectory", nargs="?", default="relax_cell.traj")
    parser.add_argument("--kernel", default="gaussian", choices=["gaussian", "reaxff"])
    parser.add_argument("--fmax", type=float, default=0.01, help="force/stress tolerance (eV/Å)")
    parser.add_argument("--reps", type=int, default=2, help="conventional cells per direction")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="logm result may be inaccurate")  # FrechetCellFilter's matrix log
    atoms = rock_salt(reps=args.reps)
    cutoff = 10.0 if args.kernel == "reaxff" else None
    atoms.calc = QEqCalculator(params="demo-nacl-water", kernel=args.kernel, cutoff=cutoff, solver="cg",
                               tol=1e-10, gradient="implicit")
    a0 = np.cbrt(atoms.get_volume() / args.reps**3)
    with Trajectory(args.trajectory, "w", atoms) as traj:
        opt = BFGS(FrechetCellFilter(atoms), trajectory=traj)
        converged = opt.run(fmax=args.fmax, steps=300)
    stress = atoms.get_stress()
    q = atoms.get_charges()
    lengths, angles = atoms.cell.cellpar()[:3], atoms.cell.cellpar()[3:]
    print(f"\n{'converged' if converged else 'NOT converged'} after {opt.nsteps} BFGS steps ({args.kernel} kernel); "
          f"trajectory: {args.trajectory}")
    print(f"lattice constant {a0:.4f} -> {np.cbrt(atoms.get_volume() / args.reps**3):.4f} A; cell lengths {np.round(lengths, 4)} A, "
          f"angles {np.round(angles, 3)} deg")
    print(f"energy           {atoms.get_potential_energy() / len(atoms):.6f} eV/atom")
    print(f"max force        {np.max(np.linalg.norm(atoms.get_forces(), axis=1)):.2e} eV/A; "
          f"max |stress| {np.abs(stress).max():.2e} eV/A^3")
    print(f"charges          Na {q[atoms.numbers == 11].mean():+.4f} e, Cl {q[atoms.numbers == 17].mean():+.4f} e")
    return converged


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
