"""Curvature estimators against dense references (float64).

The main reference is the dense Hessian of a 1443-parameter tanh MLP with a softmax
cross-entropy loss at a random initialization: an indefinite matrix whose most negative
eigenvalues are tightly clustered, the hard end for Lanczos. The statistical tests use small
synthetic matrices whose estimator variances are known in closed form.
"""

import itertools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from threadpoolctl import threadpool_limits

from jaxopt2.curvature import (
    density_on_grid,
    hessian_operator,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    output_loss,
    power_iteration,
    spectral_density,
    top_k_eigenpairs,
)

pytestmark = pytest.mark.timeout(120)

SIZES = (8, 32, 32, 3)  # 1443 parameters
N = 64


def _mlp_hessian(seed):
    """Parameters and dense Hessian of the MLP loss (data drawn with NumPy: no compiles)."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        params[f"w{i}"] = jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a))
        params[f"b{i}"] = jnp.asarray(0.1 * rng.standard_normal(b))
    x = jnp.asarray(rng.standard_normal((N, SIZES[0])))
    y = jnp.asarray(rng.integers(0, SIZES[-1], N))

    def loss(p):
        h = x
        for i in range(len(SIZES) - 1):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(SIZES) - 2:
                h = jnp.tanh(h)
        return output_loss("softmax_cross_entropy", h, y)

    flat, unravel = ravel_pytree(params)
    return params, jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat)


def _operator(matrix, like):
    """``v -> A v`` on pytrees shaped like `like`, for a dense (traced or concrete) ``A``."""
    _, unravel = ravel_pytree(like)
    return lambda v: unravel(matrix @ ravel_pytree(v)[0])


def _flat(tree):
    return ravel_pytree(tree)[0]


def _rows(tree):
    """A pytree with a leading axis -> a [k, dim] NumPy array."""
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(tree))


def _like(dim, dtype=jnp.float64):
    """A two-leaf pytree of total size `dim` (so unravelling is exercised)."""
    return {"a": jnp.zeros((4, 5), dtype), "b": jnp.zeros((dim - 20,), dtype)}


def _unflat(flat):
    _, unravel = ravel_pytree(_like(flat.shape[0]))
    return unravel(jnp.asarray(flat))


def _random_symmetric(key, dim, eigenvalues=None):
    q, _ = np.linalg.qr(np.random.default_rng(key).standard_normal((dim, dim)))
    if eigenvalues is None:
        a = np.random.default_rng(key + 1).standard_normal((dim, dim))
        return (a + a.T) / 2
    return (q * eigenvalues) @ q.T


# Jitted wrappers that take the matrix as an argument, so one compilation serves every
# matrix of the same shape (compiles dominate the runtime of this module).


@partial(jax.jit, static_argnames=("k", "num_iters", "which"))
def _top_k(a, like, key, k, num_iters=None, which="largest"):
    return top_k_eigenpairs(_operator(a, like), like, key, k, num_iters=num_iters, which=which)


@partial(jax.jit, static_argnames=("num_iters",))
def _lanczos(a, like, key, num_iters):
    return lanczos(_operator(a, like), like, key, num_iters)


@partial(jax.jit, static_argnames=("num_iters",))
def _power(a, like, key, tol, num_iters=100):
    return power_iteration(_operator(a, like), like, key, num_iters=num_iters, tol=tol)


def _tridiagonal(alphas, betas):
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


@pytest.fixture(scope="module")
def mlp():
    params, hessian = _mlp_hessian(0)
    hessian = np.asarray(hessian)
    # One BLAS thread: next to XLA's threads on 2 cores, a threaded eigh can take 10x longer.
    with threadpool_limits(1):
        evals, evecs = np.linalg.eigh(hessian)
    return {
        "params": params,
        "hessian": hessian,
        "matrix": jnp.asarray(hessian),
        "matvec": _operator(jnp.asarray(hessian), params),
        "evals": evals,
        "evecs": evecs,
    }


# --------------------------------------------------------------------------- eigenpairs


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_top_k_eigenpairs_match_dense_eigh(mlp, which):
    """The default num_iters reaches 1e-6 even at the clustered negative end of the spectrum."""
    k = 5
    vals, vecs = _top_k(mlp["matrix"], mlp["params"], jax.random.PRNGKey(3), k, which=which)
    order = np.arange(-1, -k - 1, -1) if which == "largest" else np.arange(k - 1, -1, -1)
    want_vals, want_vecs = mlp["evals"][order], mlp["evecs"][:, order].T
    assert vals.shape == (k,)
    assert np.all(np.diff(vals) <= 0), "eigenvalues must come sorted descending"
    np.testing.assert_allclose(vals, want_vals, rtol=1e-6)
    assert jax.tree.structure(vecs) == jax.tree.structure(mlp["params"])
    for name, leaf in vecs.items():
        assert leaf.shape == (k, *mlp["params"][name].shape)
    got = _rows(vecs)
    overlaps = np.abs(np.sum(got * want_vecs, axis=1))  # equal up to sign
    np.testing.assert_allclose(overlaps, 1.0, atol=1e-6)
    residual = np.linalg.norm(got @ mlp["hessian"] - vals[:, None] * got, axis=1)
    assert np.max(residual) < 1e-6 * np.abs(mlp["evals"]).max()


def test_power_iteration_finds_the_dominant_eigenvalue(mlp):
    lam, vec = _power(mlp["matrix"], mlp["params"], jax.random.PRNGKey(0), 1e-6)
    top = mlp["evals"][-1]  # the largest-magnitude eigenvalue of this Hessian is positive
    assert abs(top) > abs(mlp["evals"][0])
    np.testing.assert_allclose(lam, top, rtol=1e-4)
    assert abs(ravel_pytree(vec)[0] @ mlp["evecs"][:, -1]) > 0.99


def test_power_iteration_keeps_the_sign_and_stops_early():
    dim = 40
    evals = np.concatenate([[-5.0, 3.0], np.linspace(-2.0, 2.0, dim - 2)])
    a = _random_symmetric(1, dim, evals)
    like = _like(dim)
    lam, vec = _power(a, like, jax.random.PRNGKey(0), 1e-12, num_iters=200)
    np.testing.assert_allclose(lam, -5.0, rtol=1e-10)
    flat = ravel_pytree(vec)[0]
    np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=1e-12)
    # The vector error is about the square root of the eigenvalue error (0.6^k vs 0.6^2k).
    np.testing.assert_allclose(a @ flat, -5.0 * flat, atol=1e-5)
    # A loose tolerance (traced here: no recompilation) stops the loop early, less accurate.
    lam_loose, _ = _power(a, like, jax.random.PRNGKey(0), 1e-2, num_iters=200)
    assert 1e-12 < abs(lam_loose + 5.0) / 5.0 < 0.2
    # The zero matrix: eigenvalue 0, a finite unit vector, no NaN.
    lam0, vec0 = _power(np.zeros_like(a), like, jax.random.PRNGKey(1), 1e-12, num_iters=200)
    assert lam0 == 0.0
    np.testing.assert_allclose(np.linalg.norm(ravel_pytree(vec0)[0]), 1.0, rtol=1e-12)


def test_lanczos_basis_is_orthonormal_and_tridiagonalizes(mlp):
    m = 40
    alphas, betas, basis = _lanczos(mlp["matrix"], mlp["params"], jax.random.PRNGKey(5), m)
    assert alphas.shape == (m,) and betas.shape == (m - 1,)
    v = _rows(basis)
    assert v.shape == (m, mlp["hessian"].shape[0])
    np.testing.assert_allclose(v @ v.T, np.eye(m), atol=1e-12)
    np.testing.assert_allclose(v @ mlp["hessian"] @ v.T, _tridiagonal(alphas, betas), atol=1e-10)
    assert np.all(betas > 0)


def test_lanczos_survives_breakdown_on_a_rank_deficient_matrix():
    dim, rank = 30, 8
    diag = np.zeros(dim)
    diag[:rank] = np.arange(1, rank + 1)
    a = np.diag(diag)
    like = _like(dim)
    # The Krylov space of a generic start is the 8 eigenvectors plus the start's null-space
    # component (9 dimensions); every later step breaks down and restarts in the null space.
    alphas, betas, basis = _lanczos(a, like, jax.random.PRNGKey(0), dim)
    v = _rows(basis)
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(v @ v.T, np.eye(dim), atol=1e-12)
    t = _tridiagonal(alphas, betas)
    np.testing.assert_allclose(v @ a @ v.T, t, atol=1e-10)
    assert np.sum(np.asarray(betas) == 0) >= dim - rank - 1
    # With num_iters == dim the Ritz values are the eigenvalues; with fewer steps than the
    # dimension (but past the breakdown) the nonzero ones are already exact.
    np.testing.assert_allclose(np.linalg.eigvalsh(t), np.sort(diag), atol=1e-10)
    vals, vecs = _top_k(a, like, jax.random.PRNGKey(1), 3, num_iters=20)
    np.testing.assert_allclose(vals, [8.0, 7.0, 6.0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(_rows(vecs)), np.eye(dim)[[7, 6, 5]], atol=1e-8)


def test_estimators_vmap_over_keys_and_matrices():
    dim = 40
    like = _like(dim)
    mats = jnp.asarray(np.stack([_random_symmetric(s, dim) for s in range(3)]))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)

    def one(a, key):
        mv = _operator(a, like)
        top = top_k_eigenpairs(mv, like, key, 2, num_iters=dim)[0]
        bottom = top_k_eigenpairs(mv, like, key, 3, num_iters=dim, which="smallest")[0]
        lam = power_iteration(mv, like, key, num_iters=5)[0]
        return top, bottom, lam, hutchpp_trace(mv, like, key, 6)

    top, bottom, lam, pp = jax.jit(jax.vmap(one))(mats, keys)
    evals = np.linalg.eigvalsh(np.asarray(mats))
    np.testing.assert_allclose(top, evals[:, ::-1][:, :2], rtol=1e-10)
    np.testing.assert_allclose(bottom, evals[:, 2::-1], rtol=1e-10)
    # The stochastic ones (5 power steps, a 6-matvec Hutch++) are not converged: each batch
    # member must equal the unbatched call with the same matrix and key.
    single = jax.jit(one)
    for i in range(3):
        _, _, lam_i, pp_i = single(mats[i], keys[i])
        np.testing.assert_allclose(lam[i], lam_i, rtol=1e-12)
        np.testing.assert_allclose(pp[i], pp_i, rtol=1e-12)
    assert len(set(np.round(np.asarray(lam), 10))) == 3  # the members differ


def test_float32_like_stays_float32():
    dim = 40
    like = jnp.zeros(dim, jnp.float32)  # one leaf: faster probe compiles (pytrees: elsewhere)
    spectrum = np.linspace(1.0, 10.0, dim)
    a = jnp.asarray(_random_symmetric(2, dim, spectrum), jnp.float32)

    @jax.jit
    def run(key):
        mv = _operator(a, like)
        return (
            top_k_eigenpairs(mv, like, key, 2),
            hutchinson_trace(mv, like, key, 8),
            hutchinson_diagonal(mv, like, key, 4),
            hutchpp_trace(mv, like, key, 9),
            power_iteration(mv, like, key)[0],
            spectral_density(mv, like, key, num_iters=10, num_probes=2),
        )

    out = run(jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out))
    (vals, _), (est, _) = out[0], out[1]
    np.testing.assert_allclose(vals, spectrum[::-1][:2], rtol=1e-4)
    np.testing.assert_allclose(est, spectrum.sum(), rtol=0.2)


# --------------------------------------------------------------------------- Hutchinson


def test_hutchinson_is_exact_for_a_diagonal_matrix_with_rademacher_probes():
    dim = 30
    like = _like(dim)
    diag = _unflat(np.linspace(-3.0, 5.0, dim))
    matvec = lambda v: jax.tree.map(lambda d, x: d * x, diag, v)

    @jax.jit
    def run(key):
        return (
            hutchinson_diagonal(matvec, like, key, 3),
            hutchinson_trace(matvec, like, key, 5),
            hutchinson_trace(matvec, like, key, 1),
        )

    got, (est, err), (_, err1) = run(jax.random.PRNGKey(0))
    for name in like:
        np.testing.assert_allclose(got[name], diag[name], rtol=1e-14)
    np.testing.assert_allclose(est, np.linspace(-3.0, 5.0, dim).sum(), rtol=1e-13)
    np.testing.assert_allclose(err, 0.0, atol=1e-12)
    assert np.isnan(err1)


@pytest.fixture(scope="module")
def stats_problem():
    """A dense 64-dim symmetric matrix and Hutchinson runs over 400 keys, jitted once each."""
    dim = 64
    a = _random_symmetric(10, dim)
    like = jnp.zeros(dim)  # one leaf: the probe generation compiles faster
    mv = _operator(jnp.asarray(a), like)
    keys = jax.random.split(jax.random.PRNGKey(42), 400)

    @jax.jit
    def runs(keys):
        out = {}
        for n, dist in ((16, "rademacher"), (256, "rademacher"), (16, "gaussian")):
            trace = jax.vmap(lambda k: hutchinson_trace(mv, like, k, n, dist=dist))(keys)
            diag = jax.vmap(lambda k: hutchinson_diagonal(mv, like, k, n, dist=dist))(keys)
            out[f"{dist}{n}"] = (trace, jax.vmap(_flat)(diag))
        return out

    return {
        "a": a,
        "offdiag_sq": np.sum(a**2) - np.sum(np.diag(a) ** 2),
        **jax.tree.map(np.asarray, runs(keys)),
    }


def test_hutchinson_trace_is_unbiased_with_the_predicted_variance(stats_problem):
    a, offdiag_sq = stats_problem["a"], stats_problem["offdiag_sq"]
    truth = np.trace(a)
    for n in (16, 256):
        (est, err), _ = stats_problem[f"rademacher{n}"]
        var = 2 * offdiag_sq / n  # Rademacher: Var(zᵀAz) = 2 Σ_{i≠j} a_ij²
        assert abs(np.mean(est) - truth) < 4 * np.sqrt(var / est.shape[0])
        np.testing.assert_allclose(np.var(est), var, rtol=0.25)
        # The reported standard error matches the observed spread of the estimates.
        np.testing.assert_allclose(np.sqrt(np.mean(err**2)), np.std(est), rtol=0.15)
    rms = {
        n: np.sqrt(np.mean((stats_problem[f"rademacher{n}"][0][0] - truth) ** 2)) for n in (16, 256)
    }
    assert 3.2 < rms[16] / rms[256] < 4.8, rms  # error ~ 1/sqrt(num_probes)


def test_hutchinson_diagonal_is_unbiased_and_error_falls_like_inverse_sqrt(stats_problem):
    a = stats_problem["a"]
    truth = np.diag(a)
    var_per_entry = np.sum(a**2, axis=1) - truth**2  # Σ_{j≠i} a_ij², per probe
    for n in (16, 256):
        diag = stats_problem[f"rademacher{n}"][1]
        z = (diag.mean(axis=0) - truth) / np.sqrt(var_per_entry / n / diag.shape[0])
        assert np.max(np.abs(z)) < 4.5
    err = {
        n: np.sqrt(np.mean((stats_problem[f"rademacher{n}"][1] - truth) ** 2)) for n in (16, 256)
    }
    assert 3.5 < err[16] / err[256] < 4.5, err


def test_gaussian_probes_are_unbiased_too(stats_problem):
    a = stats_problem["a"]
    (est, err), diag = stats_problem["gaussian16"]
    var = 2 * np.sum(a**2) / 16  # Gaussian: Var(zᵀAz) = 2 ‖A‖_F²
    assert abs(np.mean(est) - np.trace(a)) < 4 * np.sqrt(var / est.shape[0])
    np.testing.assert_allclose(np.var(est), var, rtol=0.25)
    np.testing.assert_allclose(np.sqrt(np.mean(err**2)), np.std(est), rtol=0.15)
    var_diag = (np.sum(a**2, axis=1) + np.diag(a) ** 2) / 16  # Σ_j a_ij² + a_ii²
    z = (diag.mean(axis=0) - np.diag(a)) / np.sqrt(var_diag / diag.shape[0])
    assert np.max(np.abs(z)) < 4.5


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    dim, matvecs = 100, 30
    evals = 1.0 / np.arange(1, dim + 1) ** 2
    a = jnp.asarray(_random_symmetric(3, dim, evals))
    like = jnp.zeros(dim)
    keys = jax.random.split(jax.random.PRNGKey(0), 200)

    @jax.jit
    def estimates(a, keys):
        mv = _operator(a, like)
        pp = jax.vmap(lambda k: hutchpp_trace(mv, like, k, matvecs))(keys)
        plain = jax.vmap(lambda k: hutchinson_trace(mv, like, k, matvecs)[0])(keys)
        return pp, plain

    pp, plain = (np.asarray(e) - evals.sum() for e in estimates(a, keys))
    assert abs(np.mean(pp)) < 4 * np.std(pp) / np.sqrt(len(keys))  # unbiased
    assert np.mean(np.abs(pp)) < np.mean(np.abs(plain)) / 4
    # Exact when the rank is at most the sketch size (num_matvecs // 3).
    low_rank = _random_symmetric(4, dim, np.r_[[3.0, -2.0, 1.0, 0.5], np.zeros(dim - 4)])
    pp, _ = estimates(low_rank, keys)
    np.testing.assert_allclose(pp, 2.5, rtol=1e-10)


# --------------------------------------------------------------------------- spectral density


def test_spectral_density_moments_match_hutchinson_with_the_same_probes(mlp):
    h = mlp["hessian"]
    dim = h.shape[0]
    # The flat parameter vector as `like` (one leaf: faster to compile than the 6-leaf params;
    # the pytree case is covered by the breakdown test below).
    params = jnp.zeros(dim)
    mv = _operator(mlp["matrix"], params)
    key = jax.random.PRNGKey(11)
    num_probes = 4

    @jax.jit
    def run(key):
        nodes, weights = spectral_density(mv, params, key, num_iters=30, num_probes=num_probes)
        tr1 = hutchinson_trace(mv, params, key, num_probes)[0]
        tr2 = hutchinson_trace(lambda v: mv(mv(v)), params, key, num_probes)[0]
        return nodes, weights, tr1, tr2

    nodes, weights, tr1, tr2 = run(key)
    assert nodes.shape == weights.shape == (num_probes, 30)
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1.0 / num_probes, rtol=1e-12)
    assert np.all(weights >= 0)
    assert np.all(nodes >= mlp["evals"][0] - 1e-10) and np.all(nodes <= mlp["evals"][-1] + 1e-10)
    np.testing.assert_allclose(dim * np.sum(weights * nodes), tr1, rtol=1e-10)
    np.testing.assert_allclose(dim * np.sum(weights * nodes**2), tr2, rtol=1e-10)
    # The extreme nodes converge to the extreme eigenvalues.
    np.testing.assert_allclose(nodes.max(), mlp["evals"][-1], rtol=1e-8)
    # The smoothed density is a probability density.
    lo, hi = mlp["evals"][0] - 1.0, mlp["evals"][-1] + 1.0
    grid = np.linspace(lo, hi, 4001)
    density = density_on_grid(nodes, weights, grid, sigma=0.02)
    assert density.shape == grid.shape and np.all(density >= 0)
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-6)
    # Its mean is the Hutchinson trace estimate divided by the dimension.
    np.testing.assert_allclose(np.trapezoid(grid * density, grid), tr1 / dim, rtol=1e-6)


def test_spectral_density_with_breakdown_and_under_vmap():
    dim, rank = 30, 5
    evals = np.r_[np.arange(1.0, rank + 1), np.zeros(dim - rank)]
    a = jnp.asarray(_random_symmetric(5, dim, evals))
    like = _like(dim)
    mv = _operator(a, like)

    @jax.jit
    @jax.vmap
    def run(key):
        nodes, weights = spectral_density(mv, like, key, num_iters=12, num_probes=3)
        return nodes, weights, hutchinson_trace(mv, like, key, 3)[0]

    nodes, weights, tr = run(jax.random.split(jax.random.PRNGKey(0), 2))
    assert np.all(np.isfinite(nodes)) and np.all(np.isfinite(weights))
    np.testing.assert_allclose(np.sum(weights, axis=(1, 2)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(dim * np.sum(weights * nodes, axis=(1, 2)), tr, rtol=1e-10)
    # The mass on the eigenvalue 0 (and only there) is large: 25 of 30 dimensions.
    zero_mass = np.sum(np.where(np.abs(nodes) < 1e-8, weights, 0.0), axis=(1, 2))
    assert np.all(zero_mass > 0.5)


def test_density_on_grid_is_a_gaussian_mixture():
    nodes = jnp.array([[0.0, 1.0]])
    weights = jnp.array([[0.25, 0.75]])
    got = density_on_grid(nodes, weights, jnp.array([0.0, 1.0]), sigma=0.5)
    h = lambda t: np.exp(-0.5 * (t / 0.5) ** 2) / (0.5 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(got, [0.25 * h(0) + 0.75 * h(1), 0.25 * h(1) + 0.75 * h(0)])
    at_zero = jax.vmap(lambda s: density_on_grid(nodes, weights, jnp.zeros(()), sigma=s))(
        jnp.array([0.5, 1.0])
    )
    g = lambda t, s: np.exp(-0.5 * (t / s) ** 2) / (s * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(at_zero, [0.25 * g(0, s) + 0.75 * g(1, s) for s in (0.5, 1.0)])


# --------------------------------------------------------------------------- bad input


_INT_LIKE = r"like\['a'\] has dtype int32; curvature products need floating-point leaves"


def test_bad_inputs_raise_at_trace_time_naming_the_argument():
    like = _like(30)
    mv = lambda v: v
    key = jax.random.PRNGKey(0)
    int_like = {"a": jnp.zeros((4, 5), jnp.int32), "b": jnp.zeros((10,))}
    cases = [
        (TypeError, _INT_LIKE, lambda: hutchinson_diagonal(mv, int_like, key, 4)),
        (TypeError, _INT_LIKE, lambda: hutchinson_trace(mv, int_like, key, 4)),
        (TypeError, _INT_LIKE, lambda: hutchpp_trace(mv, int_like, key, 6)),
        (TypeError, _INT_LIKE, lambda: power_iteration(mv, int_like, key)),
        (TypeError, _INT_LIKE, lambda: lanczos(mv, int_like, key, 4)),
        (TypeError, _INT_LIKE, lambda: top_k_eigenpairs(mv, int_like, key, 2)),
        (
            TypeError,
            _INT_LIKE,
            lambda: spectral_density(mv, int_like, key, num_iters=3, num_probes=2),
        ),
        (
            TypeError,
            "like is complex",
            lambda: hutchinson_trace(mv, jnp.zeros(3, jnp.complex64), key, 4),
        ),
        (ValueError, "like is an empty pytree", lambda: hutchinson_trace(mv, {}, key, 4)),
        (
            ValueError,
            "num_probes must be a positive integer, got 0",
            lambda: hutchinson_diagonal(mv, like, key, 0),
        ),
        (
            ValueError,
            "num_probes must be a positive integer, got -2",
            lambda: hutchinson_trace(mv, like, key, -2),
        ),
        (
            ValueError,
            "num_probes must be a positive integer, got 2.0",
            lambda: hutchinson_trace(mv, like, key, 2.0),
        ),
        (
            ValueError,
            "dist must be one of .* got 'uniform'",
            lambda: hutchinson_trace(mv, like, key, 4, dist="uniform"),
        ),
        (
            ValueError,
            "dist must be one of .* got 'normal'",
            lambda: hutchinson_diagonal(mv, like, key, 4, dist="normal"),
        ),
        (
            ValueError,
            "num_matvecs must be a positive integer",
            lambda: hutchpp_trace(mv, like, key, 0),
        ),
        (
            ValueError,
            "num_matvecs must be at least 3 for Hutch",
            lambda: hutchpp_trace(mv, like, key, 2),
        ),
        (
            ValueError,
            "num_iters must be a positive integer, got 0",
            lambda: power_iteration(mv, like, key, num_iters=0),
        ),
        (
            ValueError,
            r"tol must lie in \[0.0, inf\], got -1.0",
            lambda: power_iteration(mv, like, key, tol=-1.0),
        ),
        (
            ValueError,
            "num_iters must be a positive integer, got 0",
            lambda: lanczos(mv, like, key, 0),
        ),
        (
            ValueError,
            r"num_iters=31 exceeds the dimension of like \(30\)",
            lambda: lanczos(mv, like, key, 31),
        ),
        (
            ValueError,
            "k must be a positive integer, got 0",
            lambda: top_k_eigenpairs(mv, like, key, 0),
        ),
        (
            ValueError,
            r"k=31 exceeds the dimension of like \(30\)",
            lambda: top_k_eigenpairs(mv, like, key, 31),
        ),
        (
            ValueError,
            "num_iters=4 is below k=5",
            lambda: top_k_eigenpairs(mv, like, key, 5, num_iters=4),
        ),
        (
            ValueError,
            r"num_iters=31 exceeds the dimension of like \(30\)",
            lambda: top_k_eigenpairs(mv, like, key, 5, num_iters=31),
        ),
        (
            ValueError,
            "which must be one of .* got 'middle'",
            lambda: top_k_eigenpairs(mv, like, key, 2, which="middle"),
        ),
        (
            ValueError,
            "num_iters must be a positive integer, got 0",
            lambda: spectral_density(mv, like, key, num_iters=0, num_probes=2),
        ),
        (
            ValueError,
            r"num_iters=31 exceeds the dimension of like \(30\)",
            lambda: spectral_density(mv, like, key, num_iters=31, num_probes=1),
        ),
        (
            ValueError,
            "num_probes must be a positive integer, got 0",
            lambda: spectral_density(mv, like, key, num_iters=3, num_probes=0),
        ),
        (
            ValueError,
            r"sigma must lie in \(0.0, inf\], got 0.0",
            lambda: density_on_grid(jnp.ones(3), jnp.ones(3), jnp.ones(4), sigma=0.0),
        ),
        (
            ValueError,
            r"weights must have the shape of nodes; got nodes \(3,\) and weights \(2,\)",
            lambda: density_on_grid(jnp.ones(3), jnp.ones(2), jnp.ones(4), sigma=1.0),
        ),
        (
            ValueError,
            r"matvec\(v\) must have the same pytree structure as like",
            lambda: hutchinson_trace(lambda v: v["a"], like, key, 2),
        ),
        (
            ValueError,
            r"matvec\(v\)\['b'\] has shape \(4, 5\) but like has shape \(10,\)",
            lambda: lanczos(lambda v: {"a": v["a"], "b": v["a"]}, like, key, 3),
        ),
    ]
    for error, name, call in cases:
        with pytest.raises(error, match=name):
            call()
    # ... and under jit, at trace time.
    with pytest.raises(ValueError, match="num_iters=2 is below k=3"):
        jax.jit(lambda key: top_k_eigenpairs(mv, like, key, 3, num_iters=2))(key)


def test_works_with_a_real_hessian_operator_under_jit(mlp):
    """The README flow: hessian_operator -> estimators, all inside one jit."""
    params = mlp["params"]
    matrix = jnp.asarray(mlp["hessian"])
    # A quadratic whose Hessian is the MLP Hessian, so the reference is exact.
    fn = lambda p: 0.5 * ravel_pytree(p)[0] @ (matrix @ ravel_pytree(p)[0])

    @jax.jit
    def diagnostics(params, key):
        hv = hessian_operator(fn, params)
        return top_k_eigenpairs(hv, params, key, 2, num_iters=60)[0]

    vals = diagnostics(params, jax.random.PRNGKey(0))
    np.testing.assert_allclose(vals, mlp["evals"][::-1][:2], rtol=1e-8)


def test_hutchinson_standard_error_is_the_probes_sample_standard_error():
    """The estimate and its standard error against the per-probe values ``zᵀAz`` computed
    in numpy from the same probes: mean, and sample standard deviation (ddof=1) / √n."""
    from jaxopt2._tree import random_probes

    a = np.random.default_rng(5).normal(size=(6, 6))
    a = a + a.T  # not diagonal: the per-probe values differ
    like, key, n = jnp.zeros(6), jax.random.PRNGKey(3), 5
    est, err = hutchinson_trace(lambda v: jnp.asarray(a) @ v, like, key, n)
    z = np.asarray(random_probes(key, like, n, "rademacher"), np.float64)
    samples = np.einsum("ki,ij,kj->k", z, a, z)
    assert np.ptp(samples) > 1.0
    np.testing.assert_allclose(float(est), samples.mean(), rtol=1e-12)
    # ddof=0 would be √(4/5) of this: 11% off
    np.testing.assert_allclose(float(err), samples.std(ddof=1) / np.sqrt(n), rtol=1e-12)
