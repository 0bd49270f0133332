"""Matrix-free estimators built on a product ``v -> M v``: diagonals, traces, eigenpairs, spectra.

Every estimator takes the product as ``matvec`` (for example
:func:`jaxopt2.curvature.hessian_operator`), a pytree ``like`` with the shapes and dtypes of
the vectors (usually the parameters; arrays or ``jax.ShapeDtypeStruct`` leaves), and, when it
is stochastic, an explicit PRNG ``key``. ``M`` must be symmetric (a Hessian, Gauss-Newton or
Fisher matrix) and ``matvec`` a traceable JAX function (it is called under ``jax.vmap`` and
inside loops) that returns a pytree shaped like ``like``. The computation runs in the dtype
of ``like``, is pure, and works under ``jax.jit`` and ``jax.vmap``: probes are batched with
``vmap`` and iterations are ``lax.fori_loop`` / ``lax.while_loop``, never Python loops.

Conventions: eigenvalues are sorted descending and "largest" means algebraically largest;
eigenvectors come as a pytree shaped like ``like`` with a leading ``k`` axis. Krylov methods
flatten ``like`` with :func:`jax.flatten_util.ravel_pytree` internally and unflatten results.

Probe sharing: :func:`hutchinson_trace`, :func:`hutchinson_diagonal` (with
``dist="rademacher"``) and :func:`spectral_density` draw their probes with
``jaxopt2._tree.random_probes(key, like, num_probes, "rademacher")``, so with the same
``key`` and ``num_probes`` they use the same probes: the quadrature moments
``dim * Σ weights * nodes**p`` of :func:`spectral_density` then reproduce the Hutchinson
estimates of ``tr(M**p)`` (exactly for ``p <= 2 * num_iters - 1``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jaxopt2._tree import (
    PROBE_DISTRIBUTIONS,
    check_choice,
    check_hyperparameter,
    check_inexact,
    check_like,
    check_positive_int,
    random_probes,
)
from jaxopt2.linalg.tridiagonal import eigh_tridiagonal

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

__all__ = [
    "density_on_grid",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "power_iteration",
    "spectral_density",
    "top_k_eigenpairs",
]

WHICH = ("largest", "smallest")

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def _check_real_like(like: PyTree) -> None:
    check_inexact(like, "like")
    for path, leaf in jax.tree_util.tree_leaves_with_path(like):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"like{jax.tree_util.keystr(path)} is complex; the curvature estimators work "
                "with real symmetric operators and real floating-point leaves only."
            )


def _zeros_like(like: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(np.shape(x), jnp.result_type(x)), like)


class _FlatSpace:
    """``like`` seen as a flat vector: its dimension, dtype, and (un)flattening."""

    def __init__(self, like: PyTree):
        self.template = _zeros_like(like)
        flat, self.unravel = ravel_pytree(self.template)
        self.dim = int(flat.shape[0])
        self.dtype = flat.dtype

    def ravel(self, tree: PyTree) -> jax.Array:
        return ravel_pytree(tree)[0].astype(self.dtype)

    def operator(self, matvec: Matvec) -> Callable[[jax.Array], jax.Array]:
        """The flat map ``x -> ravel(matvec(unravel(x)))``."""

        def flat_matvec(x: jax.Array) -> jax.Array:
            y = matvec(self.unravel(x))
            check_like(y, self.template, "matvec(v)", "like")
            return self.ravel(y)

        return flat_matvec


# On a CPU, probe groups whose batched intermediates stay within about this many bytes run
# fastest: one vmap over many probes spills them out of cache, one probe at a time leaves the
# matrix products skinny (experiments/bench_probe_groups.py maps the trade-off).
CPU_PROBE_GROUP_BYTES = 1 << 20  # 1 MiB (a typical per-core L2 cache)

BatchSize = int | str | None


def _check_batch_size(batch_size: BatchSize) -> BatchSize:
    if batch_size is None or batch_size == "auto":
        return batch_size
    if isinstance(batch_size, str):
        raise ValueError(
            f"batch_size must be None, 'auto' or a positive integer, got {batch_size!r}"
        )
    return check_positive_int(batch_size, "batch_size")


def _peak_intermediate_bytes(fn: Callable[..., Any], *example: Any) -> int:
    """The largest array that one call of `fn` creates (bytes), read from its jaxpr (nested
    jaxprs included); traced abstractly, so nothing runs. An upper bound of what XLA keeps:
    it counts arrays that compilation may fuse away (a transpose feeding a product)."""
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), example
    )
    peak = 0

    def walk(jaxpr: Any) -> None:
        nonlocal peak
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                aval = var.aval
                if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                    peak = max(peak, math.prod(aval.shape) * aval.dtype.itemsize)
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else (param,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*abstract).jaxpr)
    return peak


def _resolve_batch_size(
    batch_size: BatchSize,
    num_probes: int,
    fn: Callable[..., Any],
    *example: Any,
    extra_bytes: int = 0,
) -> int | None:
    """``"auto"``: one ``vmap`` on accelerators; on a CPU, groups of as many probes as keep
    ``fn``'s batched intermediates (or `extra_bytes` per probe, if larger) within
    :data:`CPU_PROBE_GROUP_BYTES`, one ``vmap`` when all fit. `example` is one probe's
    arguments (only shapes and dtypes are used)."""
    if batch_size != "auto":
        # _check_batch_size ran first: the only string it lets through is "auto".
        return cast(int | None, batch_size)
    if num_probes <= 1 or jax.default_backend() != "cpu":
        return None
    per_probe = max(_peak_intermediate_bytes(fn, *example), extra_bytes, 1)
    group = CPU_PROBE_GROUP_BYTES // per_probe
    return None if group >= num_probes else max(1, int(group))


def _map_probes(fn: Callable[..., Any], xs: Any, batch_size: int | None) -> Any:
    """``fn`` over the leading axis of `xs`: one ``vmap`` (None), or groups of `batch_size`.

    Groups run under ``lax.map(..., batch_size=...)``: each group is vmapped, the groups run
    one after another, so memory holds ``batch_size`` probes' intermediates at a time.
    """
    if batch_size is None:
        return jax.vmap(fn)(*xs) if isinstance(xs, tuple) else jax.vmap(fn)(xs)
    if isinstance(xs, tuple):
        return jax.lax.map(lambda args: fn(*args), xs, batch_size=batch_size)
    return jax.lax.map(fn, xs, batch_size=batch_size)


def _stacked_matvec(
    matvec: Matvec, probes: PyTree, like: PyTree, batch_size: BatchSize = None
) -> PyTree:
    """``matvec`` applied to each probe of a stacked batch, in the leaf dtypes of `like`."""
    num_probes = jax.tree.leaves(probes)[0].shape[0]
    batch_size = _resolve_batch_size(batch_size, num_probes, matvec, like)
    out = _map_probes(matvec, probes, batch_size)
    check_like(jax.tree.map(lambda y: y[0], out), like, "matvec(v)", "like")
    return jax.tree.map(lambda y, x: y.astype(jnp.result_type(x)), out, like)


def _check_not_above_dim(value: int, name: str, dim: int) -> None:
    if value > dim:
        raise ValueError(
            f"{name}={value} exceeds the dimension of like ({dim}): a Krylov basis of "
            f"{dim}-vectors has at most {dim} orthonormal vectors."
        )


def _safe_normalize(x: jax.Array) -> jax.Array:
    n = jnp.linalg.norm(x)
    return x / jnp.where(n > 0, n, 1)


# --------------------------------------------------------------------------- Hutchinson


def hutchinson_diagonal(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    num_probes: int,
    *,
    dist: str = "rademacher",
    batch_size: BatchSize = "auto",
) -> PyTree:
    """Hutchinson / Bekas estimate of ``diag(M)``: the mean of ``z ⊙ M z`` over random probes.

    With Rademacher probes the estimate is exact for a diagonal ``M`` and its variance per
    entry is ``Σ_{j≠i} M_ij² / num_probes``; Gaussian probes add ``2 M_ii² / num_probes``.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key; the probes are ``random_probes(key, like, num_probes, dist)``.
      num_probes: the number of probes (matvecs), batched with ``vmap``.
      dist: ``"rademacher"`` (±1 entries) or ``"gaussian"``.
      batch_size: how probes are batched; the result is the same. An integer runs them in
        vmapped groups of that size one after another (``lax.map``: memory for one group's
        intermediates); None runs all in one ``vmap``; ``"auto"`` (default) is one ``vmap``
        on accelerators and, on a CPU, groups whose batched intermediates fit in about
        :data:`CPU_PROBE_GROUP_BYTES` (one ``vmap`` when all probes fit): there one big
        ``vmap`` spills out of cache and runs up to ~2x slower than groups.

    Returns:
      The estimated diagonal, a pytree shaped like `like`.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_probes` is not a positive integer or `dist` is unknown.

    References:
      C. Bekas, E. Kokiopoulou and Y. Saad, "An estimator for the diagonal of a matrix",
      Applied Numerical Mathematics 57 (2007).
    """
    _check_real_like(like)
    num_probes = check_positive_int(num_probes, "num_probes")
    check_choice(dist, "dist", PROBE_DISTRIBUTIONS)
    batch_size = _check_batch_size(batch_size)
    probes = random_probes(key, like, num_probes, dist)
    products = _stacked_matvec(matvec, probes, like, batch_size)
    return jax.tree.map(lambda z, mz: jnp.mean(z * mz, axis=0), probes, products)


def hutchinson_trace(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    num_probes: int,
    *,
    dist: str = "rademacher",
    batch_size: BatchSize = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Hutchinson estimate of ``tr(M)``: the mean of ``zᵀ M z`` over random probes.

    With Rademacher probes each sample has variance ``2 Σ_{i≠j} M_ij²`` (zero for a diagonal
    ``M``); with Gaussian probes ``2 ‖M‖_F²``. The same `key` and `num_probes` give the same
    probes as :func:`spectral_density` (Rademacher).

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key; the probes are ``random_probes(key, like, num_probes, dist)``.
      num_probes: the number of probes (matvecs), batched with ``vmap``.
      dist: ``"rademacher"`` or ``"gaussian"``.
      batch_size: ``"auto"`` (default), None (one ``vmap`` over all probes) or the size of
        vmapped probe groups run one after another (see :func:`hutchinson_diagonal`). Same
        result.

    Returns:
      ``(estimate, stderr)``: the sample mean of ``zᵀ M z`` and its standard error, the
      sample standard deviation (``ddof=1``) over ``sqrt(num_probes)``; NaN when
      ``num_probes == 1``.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_probes` is not a positive integer or `dist` is unknown.

    References:
      M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix for
      Laplacian smoothing splines", Communications in Statistics - Simulation and
      Computation 18(3) (1989).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxopt2.curvature import hutchinson_trace
      >>> d = jnp.array([1.0, 2.0, 3.0])
      >>> est, err = hutchinson_trace(lambda v: d * v, d, jax.random.PRNGKey(0), 4)
      >>> float(est), float(err)   # exact for a diagonal matrix with Rademacher probes
      (6.0, 0.0)
    """
    _check_real_like(like)
    num_probes = check_positive_int(num_probes, "num_probes")
    check_choice(dist, "dist", PROBE_DISTRIBUTIONS)
    batch_size = _check_batch_size(batch_size)
    dtype = _FlatSpace(like).dtype
    probes = random_probes(key, like, num_probes, dist)
    products = _stacked_matvec(matvec, probes, like, batch_size)
    per_leaf = jax.tree.map(
        lambda z, mz: jnp.sum((z * mz).reshape(num_probes, -1).astype(dtype), axis=1),
        probes,
        products,
    )
    samples = sum(jax.tree.leaves(per_leaf)[1:], jax.tree.leaves(per_leaf)[0])
    estimate = jnp.mean(samples)
    if num_probes == 1:
        stderr = jnp.asarray(jnp.nan, dtype)
    else:
        stderr = jnp.std(samples, ddof=1) / math.sqrt(num_probes)
    return estimate, stderr


def hutchpp_trace(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    num_matvecs: int,
    *,
    batch_size: BatchSize = "auto",
) -> jax.Array:
    """Hutch++ estimate of ``tr(M)``: exact trace on a sketched range plus Hutchinson on the rest.

    The budget is split in thirds: ``s = num_matvecs // 3`` Rademacher sketch vectors ``S``
    give an orthonormal basis ``Q`` of ``M S``; ``tr(Qᵀ M Q)`` costs ``s`` more matvecs; the
    remaining ``num_matvecs - 2 s`` Rademacher probes ``g`` estimate the trace of the
    deflated part, ``(I - QQᵀ) M (I - QQᵀ)``. For a spectrum that decays, the error is much
    lower than Hutchinson's at the same number of matvecs (``O(1/num_matvecs)`` instead of
    ``O(1/sqrt(num_matvecs))``), and the estimate is exact when ``rank(M) <= s``.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key.
      num_matvecs: the total number of products with ``M``, at least 3.
      batch_size: how each block of matvecs is batched (``"auto"``, None or an integer; see
        :func:`hutchinson_diagonal`). Same result.

    Returns:
      The trace estimate, a scalar in the dtype of `like`.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_matvecs` is not an integer >= 3.

    References:
      R. A. Meyer, C. Musco, C. Musco and D. P. Woodruff, "Hutch++: Optimal stochastic trace
      estimation", Symposium on Simplicity in Algorithms (SOSA), 2021.
    """
    _check_real_like(like)
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    if num_matvecs < 3:
        raise ValueError(
            f"num_matvecs must be at least 3 for Hutch++ (sketch, projection and residual "
            f"thirds), got {num_matvecs}."
        )
    batch_size = _check_batch_size(batch_size)
    space = _FlatSpace(like)
    flat_mv = space.operator(matvec)
    num_sketch = num_matvecs // 3
    num_residual = num_matvecs - 2 * num_sketch
    key_sketch, key_residual = jax.random.split(key)
    sketch = jax.random.rademacher(key_sketch, (num_sketch, space.dim), space.dtype)
    batch_size = _resolve_batch_size(batch_size, max(num_sketch, num_residual), flat_mv, sketch[0])

    def mv(block: jax.Array) -> jax.Array:
        return _map_probes(flat_mv, block, batch_size)

    q, _ = jnp.linalg.qr(mv(sketch).T)  # [dim, min(dim, num_sketch)], orthonormal columns
    basis = q.T
    low_rank_part = jnp.sum(basis * mv(basis))
    g = jax.random.rademacher(key_residual, (num_residual, space.dim), space.dtype)
    g = g - jnp.matmul(jnp.matmul(g, q, precision=_HIGHEST), basis, precision=_HIGHEST)
    residual_part = jnp.sum(g * mv(g)) / num_residual
    return low_rank_part + residual_part


# --------------------------------------------------------------------------- eigenpairs


def power_iteration(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_iters: int = 100,
    tol: float = 1e-6,
) -> tuple[jax.Array, PyTree]:
    """The dominant (largest-magnitude) eigenvalue of ``M``, with its sign, and its eigenvector.

    Starting from a Gaussian vector drawn with `key`, repeats ``v <- M v / ‖M v‖`` and tracks
    the Rayleigh quotient ``λ = vᵀ M v`` in a ``lax.while_loop`` that stops after `num_iters`
    iterations or once ``|λ_new - λ_old| < tol * |λ_new|``. Convergence is linear with rate
    ``|λ₂ / λ₁|``: a small relative change does not prove convergence when the top two
    magnitudes are close, and the method does not converge when ``λ`` and ``-λ`` are both
    dominant. :func:`top_k_eigenpairs` is more accurate for the same number of matvecs.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key for the starting vector.
      num_iters: the maximum number of iterations (one matvec each, plus one to start).
      tol: the relative change of the Rayleigh quotient below which the loop stops.

    Returns:
      ``(eigenvalue, eigenvector)``: the Rayleigh quotient of the returned unit eigenvector,
      which is a pytree shaped like `like`.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_iters` is not a positive integer or `tol` is negative.

    References:
      G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed., Section 7.3.1.
      Z. Yao, A. Gholami, K. Keutzer and M. W. Mahoney, "PyHessian: Neural networks through
      the lens of the Hessian", IEEE Big Data 2020.
    """
    _check_real_like(like)
    num_iters = check_positive_int(num_iters, "num_iters")
    check_hyperparameter(tol, "tol", low=0.0)
    space = _FlatSpace(like)
    mv = space.operator(matvec)
    v = _safe_normalize(jax.random.normal(key, (space.dim,), space.dtype))
    w = mv(v)
    lam = jnp.dot(v, w, precision=_HIGHEST)
    tiny = jnp.finfo(space.dtype).tiny

    def cond(carry):
        i, _, _, _, rel_change = carry
        return (i < num_iters) & (rel_change >= tol)

    def body(carry):
        i, v, w, lam, _ = carry
        norm_w = jnp.linalg.norm(w)
        v_new = jnp.where(norm_w > 0, w / jnp.where(norm_w > 0, norm_w, 1), v)
        w_new = mv(v_new)
        lam_new = jnp.dot(v_new, w_new, precision=_HIGHEST)
        rel_change = jnp.abs(lam_new - lam) / jnp.maximum(jnp.abs(lam_new), tiny)
        return i + 1, v_new, w_new, lam_new, rel_change

    init = (jnp.asarray(0, jnp.int32), v, w, lam, jnp.asarray(jnp.inf, space.dtype))
    _, v, _, lam, _ = jax.lax.while_loop(cond, body, init)
    return lam, space.unravel(v)


def _orthogonalize(x: jax.Array, basis: jax.Array) -> jax.Array:
    """Classical Gram-Schmidt against the rows of `basis`, twice ("twice is enough")."""
    x = x - jnp.matmul(jnp.matmul(basis, x, precision=_HIGHEST), basis, precision=_HIGHEST)
    return x - jnp.matmul(jnp.matmul(basis, x, precision=_HIGHEST), basis, precision=_HIGHEST)


def _lanczos_flat(
    mv: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos with full reorthogonalization from the unit vector `v0` (flat arrays).

    Returns alphas ``[m]``, betas ``[m - 1]`` and the orthonormal basis ``[m, dim]``. When
    ``β_j <= sqrt(eps) * ‖M‖_est`` (an invariant subspace was found) the next vector is a
    fresh Gaussian vector (from ``fold_in(key, j)``) orthogonalized against the basis, and
    ``β_j = 0``: ``T`` becomes block diagonal and the basis stays orthonormal.
    """
    dim, dtype = v0.shape[0], v0.dtype
    breakdown_tol = jnp.sqrt(jnp.finfo(dtype).eps).astype(dtype)
    # One spare row: the vector computed in the last iteration is dropped.
    basis = jnp.zeros((num_iters + 1, dim), dtype).at[0].set(v0)
    alphas = jnp.zeros(num_iters, dtype)
    betas = jnp.zeros(num_iters, dtype)

    def fresh_vector(j, basis):
        r = jax.random.normal(jax.random.fold_in(key, j), (dim,), dtype)
        return _orthogonalize(r, basis)

    def body(j, carry):
        basis, alphas, betas, scale = carry
        v = basis[j]
        w = mv(v)
        alpha = jnp.dot(v, w, precision=_HIGHEST)
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        # The rows after j are still zero, so this projects out exactly v_0 .. v_j.
        w = _orthogonalize(w, basis)
        beta = jnp.linalg.norm(w)
        breakdown = beta <= breakdown_tol * scale
        w = jax.lax.cond(breakdown, fresh_vector, lambda j, basis: w, j, basis)
        basis = basis.at[j + 1].set(_safe_normalize(w))
        alphas = alphas.at[j].set(alpha)
        betas = betas.at[j].set(jnp.where(breakdown, jnp.zeros_like(beta), beta))
        return basis, alphas, betas, scale

    init = (basis, alphas, betas, jnp.zeros((), dtype))
    basis, alphas, betas, _ = jax.lax.fori_loop(0, num_iters, body, init)
    return alphas, betas[: num_iters - 1], basis[:num_iters]


def lanczos(
    matvec: Matvec, like: PyTree, key: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array, PyTree]:
    """Lanczos tridiagonalization ``Vᵀ M V = T`` with full reorthogonalization.

    Starting from a unit Gaussian vector drawn with `key`, builds an orthonormal basis
    ``V = [v_0 .. v_{m-1}]`` of the Krylov space and the tridiagonal ``T`` with diagonal
    `alphas` and off-diagonal `betas`. Every new vector is orthogonalized against all
    previous ones by classical Gram-Schmidt, twice, so no spurious ("ghost") Ritz values
    appear. On breakdown (``β ≈ 0``: the Krylov space is invariant, e.g. for a low-rank
    ``M``) the iteration continues with a fresh random vector orthogonalized against the
    basis and records ``β = 0``, so the basis stays orthonormal and ``T`` block diagonal.
    Cost: `num_iters` matvecs plus ``O(num_iters² · dim)`` for the reorthogonalization.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key for the starting vector (and any restart vectors).
      num_iters: the number of Lanczos steps ``m``, at most the dimension of `like`.

    Returns:
      ``(alphas, betas, basis)``: ``alphas [m]``, ``betas [m - 1]`` and the Lanczos vectors
      as a pytree shaped like `like` with a leading ``m`` axis.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_iters` is not a positive integer or exceeds the dimension.

    References:
      C. Lanczos, "An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators", J. Res. Nat. Bur. Standards 45 (1950).
      B. N. Parlett, "The Symmetric Eigenvalue Problem", SIAM (1998), Chapters 12-13.
    """
    _check_real_like(like)
    num_iters = check_positive_int(num_iters, "num_iters")
    space = _FlatSpace(like)
    _check_not_above_dim(num_iters, "num_iters", space.dim)
    key_start, key_restart = jax.random.split(key)
    v0 = _safe_normalize(jax.random.normal(key_start, (space.dim,), space.dtype))
    alphas, betas, basis = _lanczos_flat(space.operator(matvec), v0, num_iters, key_restart)
    return alphas, betas, jax.vmap(space.unravel)(basis)


def _default_num_iters(k: int, dim: int, which: str) -> int:
    """The default number of Lanczos steps of :func:`top_k_eigenpairs`.

    The largest end of a network Hessian (well separated outliers) converges much faster
    than the smallest end (a cluster of small negative eigenvalues), hence two floors.
    """
    return min(dim, max(2 * k + 40, 60 if which == "largest" else 100))


def top_k_eigenpairs(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    k: int,
    *,
    num_iters: int | None = None,
    which: str = "largest",
) -> tuple[jax.Array, PyTree]:
    """The `k` algebraically largest (or smallest) eigenpairs of ``M`` by Lanczos.

    Runs :func:`lanczos` for `num_iters` steps, diagonalizes the tridiagonal ``T`` with
    :func:`jaxopt2.linalg.eigh_tridiagonal`, and returns the extreme Ritz values and Ritz
    vectors ``V s``. Extreme eigenvalues converge first; well-separated ones converge to
    machine precision in a few dozen steps, clustered ones need more.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key for the Lanczos starting vector.
      k: the number of eigenpairs, at most the dimension of `like`.
      num_iters: Lanczos steps, between `k` and the dimension. The default is
        ``min(dim, max(2k + 40, 60))`` for ``"largest"`` and ``min(dim, max(2k + 40, 100))``
        for ``"smallest"``: on the Hessian of a 1.4k-parameter tanh MLP in float64 the five
        largest eigenvalues converge to ~1e-15 within 50 steps, while the five smallest
        (clustered negative eigenvalues) need 90-100 (80 steps gave only 1e-5); on the 26k-
        parameter digits MLP in float32, 60 steps give the top five to ~2e-7. With
        ``num_iters == dim`` the Ritz values are the eigenvalues.
      which: ``"largest"`` or ``"smallest"`` (algebraically).

    Returns:
      ``(eigenvalues, eigenvectors)``: eigenvalues ``[k]`` sorted descending (for
      ``"smallest"`` too: the k smallest, largest of them first) and the unit eigenvectors
      as a pytree shaped like `like` with a leading ``k`` axis, in the same order. The sign
      of each eigenvector is arbitrary.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `k` or `num_iters` is not a positive integer, `k` exceeds the
        dimension, `num_iters` is below `k` or above the dimension, or `which` is unknown.

    References:
      G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed., Section 10.1.
      B. Ghorbani, S. Krishnan and Y. Xiao, "An investigation into neural net optimization
      via Hessian eigenvalue density", ICML 2019.
    """
    _check_real_like(like)
    k = check_positive_int(k, "k")
    check_choice(which, "which", WHICH)
    space = _FlatSpace(like)
    _check_not_above_dim(k, "k", space.dim)
    if num_iters is None:
        num_iters = _default_num_iters(k, space.dim, which)
    num_iters = check_positive_int(num_iters, "num_iters")
    if num_iters < k:
        raise ValueError(
            f"num_iters={num_iters} is below k={k}: Lanczos gives at most num_iters Ritz pairs."
        )
    _check_not_above_dim(num_iters, "num_iters", space.dim)
    key_start, key_restart = jax.random.split(key)
    v0 = _safe_normalize(jax.random.normal(key_start, (space.dim,), space.dtype))
    alphas, betas, basis = _lanczos_flat(space.operator(matvec), v0, num_iters, key_restart)
    ritz_values, s = eigh_tridiagonal(alphas, betas)
    if which == "largest":
        idx = np.arange(num_iters - 1, num_iters - 1 - k, -1)
    else:
        idx = np.arange(k - 1, -1, -1)
    vectors = jnp.matmul(s[:, idx].T, basis, precision=_HIGHEST)  # [k, dim]
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    return ritz_values[idx], jax.vmap(space.unravel)(vectors)


# --------------------------------------------------------------------------- spectra


def spectral_density(
    matvec: Matvec,
    like: PyTree,
    key: jax.Array,
    *,
    num_iters: int,
    num_probes: int,
    batch_size: BatchSize = "auto",
) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature (SLQ) of the spectral density of ``M``.

    For each Rademacher probe ``z`` (the probes of :func:`hutchinson_trace` with the same
    `key` and `num_probes`), runs :func:`lanczos` from ``v = z / ‖z‖`` for `num_iters`
    steps; the Ritz values ``θ`` are the quadrature nodes and the squared first components
    of the Ritz vectors ``τ²`` the weights of the Gauss quadrature for the spectral measure
    of ``v``. Averaging over probes gives the density
    ``φ(t) ≈ Σ_{probes, j} weights · δ(t - nodes)`` with weights summing to 1, and
    ``dim * Σ weights · f(nodes) ≈ tr(f(M))`` (the Hutchinson estimate with these probes,
    exactly for polynomials of degree ``< 2 * num_iters``). Probes run under ``vmap``.

    Args:
      matvec: the symmetric linear map ``v -> M v`` on pytrees shaped like `like`.
      like: a pytree with the shapes and real floating dtypes of the vectors.
      key: a PRNG key; the probes are ``random_probes(key, like, num_probes, "rademacher")``.
      num_iters: Lanczos steps per probe, at most the dimension.
      num_probes: the number of probes.
      batch_size: ``"auto"`` (default; see :func:`hutchinson_diagonal`, counting each
        probe's ``num_iters x dim`` Lanczos basis), None (one ``vmap`` over all probes) or
        the size of probe groups run one after another, to bound memory.

    Returns:
      ``(nodes, weights)``, both ``[num_probes, num_iters]``: the Ritz values of each probe
      (ascending) and their weights ``τ² / num_probes``; all weights sum to 1.

    Raises:
      TypeError: if `like` has integer or complex leaves.
      ValueError: if `num_iters` or `num_probes` is not a positive integer, or `num_iters`
        exceeds the dimension.

    References:
      S. Ubaru, J. Chen and Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
      quadrature", SIAM J. Matrix Analysis and Applications 38(4) (2017).
      B. Ghorbani, S. Krishnan and Y. Xiao, "An investigation into neural net optimization
      via Hessian eigenvalue density", ICML 2019.
    """
    _check_real_like(like)
    num_iters = check_positive_int(num_iters, "num_iters")
    num_probes = check_positive_int(num_probes, "num_probes")
    space = _FlatSpace(like)
    _check_not_above_dim(num_iters, "num_iters", space.dim)
    probes = jax.vmap(space.ravel)(random_probes(key, like, num_probes, "rademacher"))
    starts = probes / jnp.linalg.norm(probes, axis=1, keepdims=True)
    restart_keys = jax.random.split(jax.random.fold_in(key, 1), num_probes)
    mv = space.operator(matvec)
    batch_size = _check_batch_size(batch_size)
    basis_bytes = num_iters * space.dim * jnp.dtype(space.dtype).itemsize  # one probe's basis
    batch_size = _resolve_batch_size(batch_size, num_probes, mv, starts[0], extra_bytes=basis_bytes)
    alphas, betas = _map_probes(
        lambda v0, kr: _lanczos_flat(mv, v0, num_iters, kr)[:2], (starts, restart_keys), batch_size
    )
    nodes, vectors = eigh_tridiagonal(alphas, betas)
    weights = vectors[:, 0, :] ** 2 / num_probes
    return nodes, weights


def density_on_grid(
    nodes: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    grid: jax.typing.ArrayLike,
    *,
    sigma: float,
) -> jax.Array:
    """Smooth the SLQ spectral measure with a Gaussian kernel and evaluate it on a grid.

    ``density(t) = Σ weights · exp(-(t - nodes)² / (2 σ²)) / (σ sqrt(2π))``, summed over all
    nodes (all probes), so it integrates to ``Σ weights`` (1 for :func:`spectral_density`).

    Args:
      nodes: quadrature nodes, any shape (e.g. ``[num_probes, num_iters]``).
      weights: their weights, the shape of `nodes`.
      grid: the points at which to evaluate the density, any shape.
      sigma: the kernel width, positive.

    Returns:
      The density at each grid point, shaped like `grid`.

    Raises:
      ValueError: if `weights` and `nodes` differ in shape or `sigma` is not positive.

    References:
      B. Ghorbani, S. Krishnan and Y. Xiao, "An investigation into neural net optimization
      via Hessian eigenvalue density", ICML 2019, Section 2.
    """
    if np.shape(nodes) != np.shape(weights):
        raise ValueError(
            f"weights must have the shape of nodes; got nodes {np.shape(nodes)} and weights "
            f"{np.shape(weights)}."
        )
    check_hyperparameter(sigma, "sigma", low=0.0, low_inclusive=False)
    dtype = jnp.result_type(nodes, weights, grid, float)
    nodes = jnp.ravel(jnp.asarray(nodes, dtype))
    weights = jnp.ravel(jnp.asarray(weights, dtype))
    grid = jnp.asarray(grid, dtype)
    z = (grid[..., None] - nodes) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return jnp.sum(weights * kernel, axis=-1)
