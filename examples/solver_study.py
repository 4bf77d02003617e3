"""Solver study: GD, NAG, CG and their learned variants on held-out water clusters.

Trains the learned solvers, compares charge and force errors against the exact solve for
K = 1..16, the cost per iteration, the sensitivity to the learned parameters and NVE energy
conservation, writes the table to ``benchmarks/RESULTS.md`` and the error-vs-K plot to a PNG.
The work is done by ``benchmarks/bench_learned.py``; this script runs it with a plot.

    python examples/solver_study.py [solver_study.png]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_learned  # noqa: E402

if __name__ == "__main__":
    bench_learned.main(["--plot", sys.argv[1] if len(sys.argv) > 1 else "solver_study.png"])
