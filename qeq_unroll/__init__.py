"""qeq-unroll: differentiable charge equilibration (QEq) in JAX.

Pure JAX, functional core (never imports ASE). Units: eV, Å, e.

    params = qeq_unroll.load_params("rappe-goddard-1991")
    system = qeq_unroll.make_system(positions, params.species_indices(symbols), total_charge=0.0)
    energy = qeq_unroll.qeq_energy(kernel="gaussian", solver=qeq_unroll.CG(iterations=3), gradient="unrolled")
    E, F, aux = jax.jit(qeq_unroll.energy_and_forces(energy))(params, system)

float64 needs ``jax.config.update("jax_enable_x64", True)`` (or JAX_ENABLE_X64=1) in your program;
the library never changes JAX's global configuration.
"""

from .constants import COULOMB_CONSTANT, LAMMPS_COULOMB_CONSTANT
from .energy import QEqModel, dipole_moment, energy_and_forces, energy_forces_stress, qeq_energy
from .checks import Limits
from .compilation_cache import enable_compilation_cache
from .errors import (
    QEqConvergenceError,
    QEqConvergenceWarning,
    QEqError,
    QEqInputError,
    QEqNeighborError,
    QEqRangeError,
    QEqResourceError,
    QEqShortRangeWarning,
)
from .gradients import GRADIENTS, Envelope, Implicit, Unrolled, get_gradient
from .kernels import KERNELS, Gaussian, Point, ReaxFF, Slater, get_kernel
from .lammps_io import read_lammps_qeq, write_lammps_qeq
from .neighbors import ImageList, NeighborList, Neighbors, image_list, neighbor_list, update_neighbors
from .params import Params, builtin_sets, load_params, save_params
from .solvers import CG, GD, NAG, SOLVERS, Diagnostics, Exact, Problem, get_solver
from .system import System, make_system, size_bucket
from .terms import AtomTerms, ElementTable
from . import dataset, fit  # noqa: E402  (modules: qeq_unroll.fit.fit, qeq_unroll.fit.evaluate)
from .dataset import Configuration, Dataset
from .fit import FitConfig, FitResult

__version__ = "0.1.0"
