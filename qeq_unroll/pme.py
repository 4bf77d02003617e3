"""Particle-mesh Ewald (PME): the reciprocal-space part of the Ewald sum (``ewald``) on a mesh.

``ewald`` splits the periodic Gaussian-charge coupling so that the Gaussian widths sit entirely in
the real-space term; the reciprocal part is that of point charges,

    H^rec_ij = k_e (4π/V) Σ_{k≠0} cos(k·r_ij) exp(−k²/4α²) / k²       (eV/e²),

which ``ewald.reciprocal_factor`` sums exactly over a sphere of k-vectors (cost O(N K), K ∝ V).
PME (Essmann et al., J. Chem. Phys. 103, 8577 (1995)) applies it matrix-free as

    H^rec q ≈ Wᵀ C W q,

W the smooth charge assignment with cardinal B-splines of order p onto a K_a × K_b × K_c mesh in
fractional coordinates, C the convolution with the influence function

    θ(m) = k_e (4π/V) exp(−k²/4α²)/k² |b_a(m_a) b_b(m_b) b_c(m_c)|²,   k = 2π m A⁻ᵀ,

done by FFT (b the Euler exponential-spline factors). Cost O(N p³ + M log M) per product for M
mesh points, memory O(N p + M). Wᵀ C W is symmetric (the Nyquist modes of even meshes are
dropped so θ is Hermitian) and smooth in positions and cell, so forces and stress come from
``jax.grad``. The diagonal reported for preconditioning is the exact Ewald one, Σ_{k≠0} on the
mesh of k_e (4π/V) exp(−k²/4α²)/k² (the same for every atom).

Accuracy ε (the Ewald one): B-spline interpolation of the mode k on a mesh of spacing h (plane
heights over K) is off by about 2 (k h / 2π)^p; weighted by exp(−k²/4α²) this peaks at
2 (αh/π)^p (p/2)^(p/2) e^(−p/2). The plan takes the largest h for which that is ≤ ε and the mesh
still resolves the Ewald sphere, π/h ≥ 2α√(−ln ε), and rounds each K up to a 2^a 3^b 5^c size.

``plan_for`` picks the exact k-sum or PME for a kernel's ``reciprocal`` option ("ewald", "pme",
"auto": the one with the smaller estimated cost per product).

``MeshPreconditioner`` (the iterative solvers' default) removes the long-wavelength stiffness of
Wᵀ C W, whose eigenvalues grow like the cell's L² and make Jacobi-preconditioned CG need ∝ L
iterations. It works on a coarser mesh (B-splines of order ``COARSE_ORDER``), which only has to
carry the long waves: it resolves the modes whose Ewald factor exp(−k²/4α²) is at least
``COARSE_DECAY``, a spacing π/(2α√ln(1/δ)) against the PME mesh's π/(2α√ln(1/ε)) or finer. Its
model takes the weight density the atoms see (a slab's, not the cell's mean), and on bulk cells
one step of iterative refinement makes the iteration count independent of N.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import ewald
from .constraints import project
from .errors import QEqInputError
from .hardness import add_operator
from .periodic import heights, volume

#: Default B-spline order of the charge assignment.
DEFAULT_ORDER = 6
#: Orders allowed (below 3 the forces are not continuous; above 12 nothing is gained in float64).
ORDERS = range(3, 13)
#: Most mesh points allowed by default.
MAX_MESH_POINTS = 2**27
#: B-spline order of the preconditioner's coarse mesh.
COARSE_ORDER = 4
#: The preconditioner's coarse mesh resolves the modes whose Ewald factor exp(−k²/4α²) is at least
#: this; on shorter waves the PME term is too weak for the preconditioner to correct anything.
COARSE_DECAY = 1e-2

#: Spreading and interpolation pass the atoms in chunks of ``CHUNK`` once their blocks of p³ mesh
#: values would take more than ``CHUNK_BYTES``: a chunk's blocks stay in cache instead of streaming
#: through memory (NaCl, order 6: a PME call at 110592 atoms 6 to 8 % faster; at 4096 atoms chunks
#: would cost 4 %).
CHUNK = 2048
CHUNK_BYTES = 2**25

#: ``MeshPreconditioner`` refines only where the Ewald-smoothed weight density an atom sees, Σρ²/Σρ,
#: is within this fraction of the cell's mean (rattled NaCl: 3e-4 to 2e-3; a random ion packing:
#: 4e-2; a slab with as much vacuum as matter: 0.9).
HOMOGENEITY = 0.01


@dataclasses.dataclass(frozen=True)
class Mesh:
    """PME plan (all static): mesh ``shape`` (K_a, K_b, K_c) along the cell vectors, B-spline
    ``order`` p, and the Ewald ``alpha`` (1/Å), ``real_cutoff`` (Å), ``accuracy``;
    ``coarse_shape`` the preconditioner's mesh (order ``COARSE_ORDER``; None: ``shape``)."""

    shape: tuple = (1, 1, 1)
    order: int = DEFAULT_ORDER
    alpha: float = 0.0
    real_cutoff: float = 0.0
    accuracy: float = ewald.DEFAULT_ACCURACY
    coarse_shape: tuple | None = None

    def add_to(self, hardness, positions, cell, mask, coulomb_constant):
        """``hardness`` plus the reciprocal part of H as a matrix-free operator (:func:`operator`)."""
        return add_operator(hardness, operator(positions, cell, self, mask, coulomb_constant))

    def energy(self, charges, positions, cell, coulomb_constant):
        """Reciprocal-space energy (eV) of fixed charges (e) on the mesh."""
        mask = jnp.ones(positions.shape[0], bool)
        return 0.5 * charges @ operator(positions, cell, self, mask, coulomb_constant).matvec(charges)


jax.tree_util.register_dataclass(
    Mesh, data_fields=[], meta_fields=["shape", "order", "alpha", "real_cutoff", "accuracy", "coarse_shape"]
)


def bspline(w, order):
    """Cardinal B-spline values M_p(w + j), j = 0..p−1, for w in [0, 1) (stacked last; works on
    NumPy and JAX arrays). M_1 = 1 on [0, 1); M_n(x) = [x M_{n−1}(x) + (n − x) M_{n−1}(x − 1)]/(n − 1)."""
    values = [w * 0 + 1.0]
    for n in range(2, order + 1):
        values = [
            ((w + j) * (values[j] if j < n - 1 else 0.0) + (n - w - j) * (values[j - 1] if j else 0.0)) / (n - 1)
            for j in range(n)
        ]
    return values


def spline_moduli(size, order):
    """|b(m)|² of the Euler exponential spline for m = 0..K−1 (NumPy), 0 at the Nyquist mode."""
    knots = np.asarray(bspline(0.0, order))  # M_p(j), j = 0..p−1
    m = np.arange(size)
    den = np.abs(np.exp(2j * np.pi * np.outer(m, np.arange(order)) / size) @ knots) ** 2
    out = np.where(den > 1e-30, 1.0 / np.maximum(den, 1e-30), 0.0)
    if size % 2 == 0:
        out[size // 2] = 0.0
    return out


def max_spacing(alpha, accuracy, order) -> float:
    """Largest mesh spacing (Å) for relative accuracy ε with B-splines of order p (see module)."""
    p = order
    peak = 2.0 * (p / 2.0) ** (p / 2.0) * math.exp(-p / 2.0)
    aliasing = (accuracy / peak) ** (1.0 / p)
    resolve = 1.0 / (2.0 * ewald.log_accuracy(accuracy))
    return math.pi / alpha * min(aliasing, resolve)


def fft_size(n) -> int:
    """Smallest 2^a 3^b 5^c ≥ n."""
    best = None
    a = 1
    while a < 2 * n:
        b = a
        while b < 2 * n:
            c = b
            while c < n:
                c *= 5
            best = c if best is None else min(best, c)
            b *= 3
        a *= 2
    return best


def plan(cell, pbc, accuracy=ewald.DEFAULT_ACCURACY, real_cutoff=None, sigma_max=None, order=DEFAULT_ORDER,
         spacing=None, max_points=MAX_MESH_POINTS) -> Mesh:  # fmt: skip
    """The :class:`Mesh` of ``cell`` (host). ``spacing`` (Å): None picks the largest that reaches
    ``accuracy``; a given one must be fine enough. Raises ``QEqInputError`` when the accuracy is out
    of reach (bad order, too coarse a spacing, more than ``max_points`` mesh points)."""
    alpha, real_cutoff = ewald.splitting(pbc, accuracy, real_cutoff, sigma_max)
    if order not in ORDERS:
        raise QEqInputError(f"PME B-spline order must be an integer in [3, 12], got {order}")
    limit = max_spacing(alpha, accuracy, order)
    if spacing is None:
        spacing = limit
    elif not (math.isfinite(spacing) and 0 < spacing <= limit):
        raise QEqInputError(
            f"PME accuracy {accuracy:g} cannot be reached with a mesh spacing of {spacing} Å at order {order}: it "
            f"needs a spacing of at most {limit:.4g} Å (or a higher order, a looser accuracy, a longer real-space cutoff)"
        )
    h = heights(np.asarray(cell, np.float64), pbc)
    shape = tuple(fft_size(max(order, math.ceil(x / spacing))) for x in h)
    coarse = math.pi / (2.0 * alpha * math.sqrt(math.log(1.0 / COARSE_DECAY)))
    coarse_shape = tuple(min(k, fft_size(max(COARSE_ORDER, math.ceil(x / coarse)))) for k, x in zip(shape, h))
    points = shape[0] * shape[1] * shape[2]
    if points > max_points:
        raise QEqInputError(
            f"PME accuracy {accuracy:g} cannot be reached: this cell needs a {shape[0]}×{shape[1]}×{shape[2]} mesh "
            f"({points} points, limit {max_points}); use a looser accuracy, a higher order or a longer real-space cutoff"
        )
    return Mesh(shape, int(order), float(alpha), float(real_cutoff), float(accuracy), coarse_shape)


def plan_for(kernel, cell, pbc, sigma_max=None, n_atoms=1, max_kvectors=None, strain=0.0):
    """The reciprocal-space plan of an Ewald ``kernel`` (host): an ``ewald.Reciprocal`` or a
    :class:`Mesh`, after the kernel's ``reciprocal`` option ("ewald" | "pme" | "auto").
    ``strain``: an Ewald plan also serves cells strained by up to this much (``ewald.plan``); a
    mesh belongs to its cell."""
    method = getattr(kernel, "reciprocal", "ewald")
    kw = {"strain": strain} | ({} if max_kvectors is None else {"max_kvectors": max_kvectors})
    mesh_kw = dict(order=kernel.mesh_order, spacing=kernel.mesh_spacing)
    if method == "ewald":
        return ewald.plan(cell, pbc, kernel.accuracy, kernel.cutoff, sigma_max, **kw)
    mesh = plan(cell, pbc, kernel.accuracy, kernel.cutoff, sigma_max, **mesh_kw)
    if method == "pme":
        return mesh
    # auto: an evaluation costs ~ 10 N K for the exact k-sum (K half-space vectors in the Ewald
    # sphere; N K cosines and sines, their derivatives, the products) against ~ 2 N p³ + 5 M log2 M
    # for PME (spread, gather, two FFTs per product); the factor 10 is measured (benchmarks/bench_pme.py:
    # PME is already faster at 512 atoms at accuracy 1e-6)
    kcut = 2.0 * mesh.alpha * ewald.log_accuracy(kernel.accuracy)
    n_kvectors = abs(np.linalg.det(np.asarray(cell, np.float64))) * kcut**3 / (12.0 * math.pi**2)
    points = math.prod(mesh.shape)
    if 10.0 * n_atoms * n_kvectors <= 2.0 * n_atoms * mesh.order**3 + 5.0 * points * math.log2(points):
        return ewald.plan(cell, pbc, kernel.accuracy, kernel.cutoff, sigma_max, **kw)
    return mesh


#: Scatter/gather of one atom's p × p × p block of mesh points (a window at a start index).
_SCATTER = jax.lax.ScatterDimensionNumbers(update_window_dims=(1, 2, 3), inserted_window_dims=(), scatter_dims_to_operand_dims=(0, 1, 2))
_GATHER = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(), start_index_map=(0, 1, 2))
_IN_BOUNDS = jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS


@dataclasses.dataclass(frozen=True)
class MeshOperator:
    """The PME reciprocal term as a matrix-free operator (eV/e²): ``start`` (N, 3) the first mesh
    point of each atom's p × p × p block, ``weight`` (N, 3, p) the B-spline weights of the block's
    points along each cell vector (zero on padding), ``influence`` (K_a, K_b, K_c//2 + 1) the
    influence function times M on the rfft half mesh, ``smoothing`` (same shape) the Ewald
    split's factor exp(−k²/4α²) per mode, ``self_value`` (scalar) the diagonal, ``coarse`` the
    same term on the preconditioner's coarser mesh (a MeshOperator, or None). Blocks
    live on the mesh padded by p − 1 points per direction, folded back periodically. Static
    ``shape``."""

    start: jax.Array
    weight: jax.Array
    influence: jax.Array
    smoothing: jax.Array
    self_value: jax.Array
    coarse: object = None
    shape: tuple = (1, 1, 1)

    @property
    def preconditioner(self):
        """The preconditioner of a hardness with this term (the iterative solvers' default)."""
        return MeshPreconditioner()

    def spread(self, q):
        """W q: the charges (e) on the mesh (K_a, K_b, K_c)."""
        return _spread(self.start, self.weight, q, self.shape)

    def interpolate(self, grid):
        """Wᵀ g: mesh values (K_a, K_b, K_c) interpolated at the atoms (N,)."""
        return _interpolate(self.start, self.weight, grid)

    def matvec(self, q):
        """Wᵀ C W q (eV/e for q in e)."""
        return _product(self.shape, self.start, self.weight, self.influence, q)

    def quadratic(self, q):
        """½ qᵀ Wᵀ C W q (eV for q in e), with a derivative that reuses the forward pass: in q
        the product itself, in the weights the potential's gradient at the atoms, in the influence
        function the power |W q|² per mode. Autodiff would instead take a second product with the
        cotangent ½q (one spreading, two FFTs and one interpolation more per gradient)."""
        return _quadratic(self.shape, self.start, self.weight, self.influence, q)

    def diagonal(self):
        return jnp.full(self.start.shape[0], self.self_value)

    def dense(self):
        n = self.start.shape[0]
        return jax.vmap(self.matvec)(jnp.eye(n, dtype=self.weight.dtype))


jax.tree_util.register_dataclass(
    MeshOperator, data_fields=["start", "weight", "influence", "smoothing", "self_value", "coarse"], meta_fields=["shape"]
)


def _in_chunks(blocks):
    """(atoms per chunk, chunks) for ``blocks`` (N, p, p, p) (shape and dtype only)."""
    n = blocks.shape[0]
    count = 1 if math.prod(blocks.shape) * blocks.dtype.itemsize <= CHUNK_BYTES else -(-n // CHUNK)
    return -(-n // count), count


def _chunked(arrays, chunk, count):
    """Each (N, ...) array zero-padded to count · chunk rows, as (count, chunk, ...)."""
    return tuple(
        jnp.pad(a, [(0, chunk * count - a.shape[0])] + [(0, 0)] * (a.ndim - 1)).reshape((count, chunk) + a.shape[1:])
        for a in arrays
    )


def _spread(start, weight, q, shape):
    p = weight.shape[2]

    def add(padded, piece):
        s, w, qc = piece
        blocks = qc[:, None, None, None] * w[:, 0, :, None, None] * w[:, 1, None, :, None] * w[:, 2, None, None, :]
        return jax.lax.scatter_add(padded, s, blocks, _SCATTER, mode=_IN_BOUNDS), None

    padded = jnp.zeros(tuple(k + p - 1 for k in shape), q.dtype)
    blocks = jax.ShapeDtypeStruct((q.shape[0], p, p, p), q.dtype)
    padded, _ = jax.lax.scan(add, padded, _chunked((start, weight, q), *_in_chunks(blocks)))
    # fold the padding back onto the periodic mesh: the 8 corners of head and tail planes, one pass
    out = 0
    for tail in itertools.product((False, True), repeat=3):
        piece = padded[tuple(slice(k, k + p - 1) if t else slice(0, k) for k, t in zip(shape, tail))]
        out = out + jnp.pad(piece, [(0, k - p + 1) if t else (0, 0) for k, t in zip(shape, tail)])
    return out


def _over_atoms(fn, start, weight, grid):
    """``fn(blocks, weight)`` per atom, blocks (n, p, p, p) the atoms' blocks of the periodic
    ``grid``, applied chunk by chunk."""
    n, p = weight.shape[0], weight.shape[2]
    padded = jnp.pad(grid, [(0, p - 1)] * 3, mode="wrap")
    chunk, count = _in_chunks(jax.ShapeDtypeStruct((n, p, p, p), grid.dtype))

    def one(piece):
        s, w = piece
        return fn(jax.lax.gather(padded, s, _GATHER, (p, p, p), mode=_IN_BOUNDS), w)

    out = jax.lax.map(one, _chunked((start, weight), chunk, count))
    return jax.tree_util.tree_map(lambda a: a.reshape((count * chunk,) + a.shape[2:])[:n], out)


def _values(blocks, weight):
    """Σ_abc w_a w_b w_c block_abc per atom, contracted one axis at a time (a third of the work
    of forming the weight blocks)."""
    across = jnp.einsum("nabc,nc->nab", blocks, weight[:, 2])
    return jnp.einsum("na,na->n", jnp.einsum("nab,nb->na", across, weight[:, 1]), weight[:, 0])


def _values_and_partials(blocks, weight):
    """The values and their derivatives in each weight (n, 3, p): the block contracted with the
    other two weights."""
    w0, w1, w2 = weight[:, 0], weight[:, 1], weight[:, 2]
    across = jnp.einsum("nabc,nc->nab", blocks, w2)
    partial = jnp.stack(
        [jnp.einsum("nab,nb->na", across, w1), jnp.einsum("nab,na->nb", across, w0), jnp.einsum("nabc,na,nb->nc", blocks, w0, w1)],
        axis=1,
    )
    return jnp.einsum("na,na->n", partial[:, 0], w0), partial


def _interpolate(start, weight, grid):
    return _over_atoms(_values, start, weight, grid)


def _potential(spectrum, influence, shape):
    """C applied to a mesh charge given as its rfft ``spectrum``: the potential on the mesh."""
    return jnp.fft.irfftn(spectrum * influence, s=shape)


def _half_multiplicity(size):
    """How many modes of the full spectrum each rfft half-mesh plane along the last axis stands
    for (NumPy): 1 at m = 0 and at the Nyquist plane of an even size, 2 elsewhere."""
    m = np.arange(size // 2 + 1)
    return np.where((m == 0) | (2 * m == size), 1.0, 2.0)


def _product(shape, start, weight, influence, q):
    return _interpolate(start, weight, _potential(jnp.fft.rfftn(_spread(start, weight, q, shape)), influence, shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quadratic(shape, start, weight, influence, q):
    return 0.5 * jnp.vdot(q, _product(shape, start, weight, influence, q))


def _quadratic_fwd(shape, start, weight, influence, q):
    spectrum = jnp.fft.rfftn(_spread(start, weight, q, shape))
    potential, partial = _over_atoms(_values_and_partials, start, weight, _potential(spectrum, influence, shape))
    return 0.5 * jnp.vdot(q, potential), (q, potential, partial, spectrum)


def _quadratic_bwd(shape, residuals, cotangent):
    q, potential, partial, spectrum = residuals
    # e = ½ Σ_i q_i (W φ)_i with φ = C W q symmetric in the two factors W: each weight enters twice
    weight = cotangent * q[:, None, None] * partial
    power = jnp.real(spectrum * jnp.conj(spectrum)) * jnp.asarray(_half_multiplicity(shape[2]), potential.dtype)
    influence = (0.5 * cotangent / math.prod(shape)) * power
    return None, weight, influence, cotangent * potential


_quadratic.defvjp(_quadratic_fwd, _quadratic_bwd)


def operator(positions, cell, mesh: Mesh, mask, coulomb_constant) -> MeshOperator:
    """The PME reciprocal term of H for atoms at ``positions`` (N, 3) Å in ``cell`` (3, 3) Å (rows
    are cell vectors), padding rows (``mask`` False) decoupled; with its ``coarse`` copy on
    ``mesh.coarse_shape`` (order ``COARSE_ORDER``) for the preconditioner."""
    args = (positions, cell, mesh.alpha, mask, coulomb_constant)
    coarse = _operator(*args, mesh.coarse_shape or mesh.shape, min(COARSE_ORDER, mesh.order))
    return dataclasses.replace(_operator(*args, mesh.shape, mesh.order), coarse=coarse)


def _operator(positions, cell, alpha, mask, coulomb_constant, shape, p) -> MeshOperator:
    sizes = jnp.asarray(shape, positions.dtype)
    u = (positions @ jnp.linalg.inv(cell)) * sizes  # mesh coordinates (N, 3)
    base = jnp.floor(u)
    # mesh point floor(u) − j carries M_p(u − floor(u) + j), j = 0..p−1: blocks start at j = p − 1
    weight = jnp.stack(bspline(u - base, p)[::-1], axis=-1) * mask[:, None, None].astype(positions.dtype)
    start = jnp.mod(base.astype(jnp.int32) - (p - 1), jnp.asarray(shape, jnp.int32))
    # influence function on the rfft half mesh
    m = [np.fft.fftfreq(k, 1.0 / k) for k in shape[:2]] + [np.arange(shape[2] // 2 + 1)]
    nyquist = np.zeros([len(x) for x in m], bool)
    for d, k in enumerate(shape):
        if k % 2 == 0:
            nyquist |= (np.abs(m[d]) == k // 2).reshape([-1 if e == d else 1 for e in range(3)])
    grid = np.stack(np.meshgrid(*m, indexing="ij"), -1)
    kvec = 2.0 * math.pi * jnp.asarray(grid, positions.dtype) @ jnp.linalg.inv(cell).T
    k2 = jnp.sum(kvec * kvec, axis=-1)
    keep = jnp.asarray(~nyquist & (np.sum(grid != 0, axis=-1) > 0))
    safe = jnp.where(keep, k2, 1.0)
    smoothing = jnp.exp(-k2 / (4 * alpha**2))
    green = jnp.where(keep, coulomb_constant * 4.0 * math.pi / volume(cell) * smoothing / safe, 0.0)
    moduli = [spline_moduli(k, p) for k in shape]
    bb = np.einsum("a,b,c->abc", moduli[0], moduli[1], moduli[2][: shape[2] // 2 + 1])
    influence = green * jnp.asarray(bb * math.prod(shape), positions.dtype)
    self_value = jnp.sum(green * jnp.asarray(_half_multiplicity(shape[2]), positions.dtype))
    return MeshOperator(start, weight, influence, smoothing, self_value, None, tuple(shape))


def spline_autocorrelation(size, order):
    """a(m) = Σ_j M_2p(p + j) exp(2πi j m/K), m = 0..K−1 (NumPy): the mean over the atom's place
    in a mesh cell of |Σ_j M_p(u + j) exp(2πi j m/K)|², the power one atom's B-spline block puts
    into mode m along one axis (1 at m = 0, falling towards the Nyquist mode)."""
    knots = np.asarray(bspline(0.0, 2 * order))  # M_2p(p + j) for j = −p..p−1
    lags = np.arange(2 * order) - order
    return np.real(np.exp(2j * np.pi * np.outer(np.arange(size), lags) / size) @ knots)


@dataclasses.dataclass(frozen=True)
class MeshPreconditioner:
    """Preconditioner for a hardness with a PME term, H = A + Wᵀ C W (eV/e²): A the rest (J,
    self terms, real-space couplings; its diagonal D = diag(H) − diag(Wᵀ C W)), W the B-spline
    spreading, C the convolution by ``influence``, c(m) (eV/e²) per mode m of the rfft half mesh.

    On the constraint plane the Jacobi preconditioner is P = D⁻¹ − D⁻¹ 1_f (1_fᵀ D⁻¹ 1_f)⁻¹ 1_fᵀ D⁻¹
    (``constraints.project``), and the inverse of D + Wᵀ C W there is, by Woodbury,
    P − P Wᵀ (C⁻¹ + W P Wᵀ)⁻¹ W P. The mesh operator W P Wᵀ is replaced by the translation-invariant
    one with symbol

        s(m) = ρ̄ · a(m_a) a(m_b) a(m_c)        (e²/eV per mode),

    its average over atom positions (a: ``spline_autocorrelation``; ρ̄ the weight density below,
    (Σ_i 1/D_i) / M on bulk cells, M mesh points); on a mode where it is exact,
    x = c s (dimensionless) and the Woodbury factor is 1 − x/(1 + x) = 1/(1 + x). That factor is
    applied as a square, so that M is positive semi-definite whatever W P Wᵀ is (the subtractive
    Woodbury form turns indefinite on large disordered cells, where W P Wᵀ departs from its
    average by more than 1/x on the long waves):

        M = (1 − P Wᵀ G W) P (1 − Wᵀ G W P),   G = F⁻¹ diag(g) F,   g = c / (1 + x + √(1 + x)),

    so that (1 − s g)² = 1/(1 + x): equal to the Woodbury inverse where the model is exact, and
    (1 − δ √x)² instead of 1 − δ x on the preconditioned operator where W P Wᵀ is off by a factor
    1 + δ. Symmetric, zero on padding and on Σ_f, z = M r sums to zero over each fragment.
    Where C dominates (long waves, x ∝ L² ≫ 1) the preconditioned operator is ≈ 1 instead of
    ≈ 1 + x, so CG needs about as many iterations at any N. W, C and M here are those of the
    operator's ``coarse`` mesh: x falls with exp(−k²/4α²), so the short waves that only the PME
    mesh resolves need no correction. Cost per application two spreadings, four FFTs and two
    interpolations on that mesh (NaCl at accuracy 1e-6, order 6: 1/14 to 1/20 of the PME mesh points;
    0.2 to 0.3 of one PME product in all).

    The density ρ̄ is the one an atom sees, Σρ²/Σρ of ρ = W w smoothed by exp(−k²/4α²) (w = 1/D):
    the cell's mean Σ_i w_i / M for bulk matter, twice that for a slab with as much vacuum as
    matter, whose charge waves all live in the slab. Condition number of M H on such a slab:
    216 atoms (``tests/test_pme.py``) 1.9 against Jacobi's 13; 4096 atoms (Lanczos) 5, against
    489 with the cell's mean and 86 with Jacobi.

    The translation-invariant s still misses how W P Wᵀ couples a long wave to the short ones (the
    crystal's Bragg vectors, the two species' different D); the error is weighted by √x, which grows
    with the cell, so M alone needs more CG iterations on larger cells (condition number 1.19 at
    4096 atoms of rattled NaCl, 1.32 at 32768). ``refinements`` steps of iterative refinement on
    the model B = D + Wᵀ C W (the coarse mesh's term) remove that: z ← z + M (r − B z), from
    z = M r. With one step the preconditioned model is λ (2 − λ) for each eigenvalue λ of M B,
    1 − (λ − 1)² near 1, so M H has the condition number of B⁻¹ H (1.09 on rattled NaCl at any N).
    It needs λ < 2 to stay positive definite: that holds on bulk cells, whose smoothed density is
    uniform (Σρ²/Σρ within ``HOMOGENEITY`` of the mean), and the step is skipped elsewhere (slabs,
    random packings, where λ reaches 3 to 5.3 at 4096 to 32768 atoms). Each step costs one
    product with B and one application of M on the coarse mesh.

    Without a PME term (``hardness.operator`` None) it is the Jacobi preconditioner. A_ii is raised
    to diag(H)/10 where it is smaller (very wide Gaussians): any positive D keeps M positive
    semi-definite."""

    refinements: int = 1
    needs_distances = False

    def __post_init__(self):
        if int(self.refinements) != self.refinements or self.refinements < 0:
            raise QEqInputError(f"refinements must be a non-negative integer, got {self.refinements}")

    def setup(self, problem):
        h, real = problem.hardness, problem.fragments >= 0
        op = h.operator
        if not isinstance(op, MeshOperator):
            return jnp.where(real, 1.0 / h.diagonal, 0.0), None, None
        w = jnp.where(real, 1.0 / jnp.maximum(h.diagonal - op.diagonal(), 0.1 * h.diagonal), 0.0)
        coarse = op.coarse
        k_a, k_b, k_c = coarse.shape
        a = [spline_autocorrelation(k, coarse.weight.shape[2]) for k in coarse.shape]
        power = jnp.asarray(np.einsum("a,b,c->abc", a[0], a[1], a[2][: k_c // 2 + 1]), w.dtype)
        density = jnp.fft.irfftn(jnp.fft.rfftn(coarse.spread(w)) * coarse.smoothing, s=coarse.shape)
        seen = jnp.sum(density * density) / jnp.maximum(jnp.sum(w), jnp.finfo(w.dtype).tiny)  # Σρ² / Σρ
        x = coarse.influence * seen * power
        homogeneous = seen <= (1.0 + HOMOGENEITY) * jnp.sum(w) / (k_a * k_b * k_c)
        return w, coarse.influence / (1.0 + x + jnp.sqrt(1.0 + x)), homogeneous

    def apply(self, pre, residual, problem):
        w, g, homogeneous = pre
        jacobi = functools.partial(project, w=w, fragments=problem.fragments, n_fragments=problem.n_fragments)
        if g is None:
            return jacobi(residual)
        coarse = problem.hardness.operator.coarse

        def smooth(v):  # Wᵀ G W v
            return coarse.interpolate(jnp.fft.irfftn(jnp.fft.rfftn(coarse.spread(v)) * g, s=coarse.shape))

        def woodbury(r):  # M r
            u = jacobi(r - smooth(jacobi(r)))
            return u - jacobi(smooth(u))

        def refine(z):  # z + M (r − B z), B = D + Wᵀ C W on the coarse mesh
            model = jnp.where(w > 0, z / jnp.where(w > 0, w, 1.0), 0.0) + coarse.matvec(z)
            return z + woodbury(residual - model)

        z = woodbury(residual)
        for _ in range(int(self.refinements)):
            z = jax.lax.cond(homogeneous, refine, lambda z: z, z)
        return z
