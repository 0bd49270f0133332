"""Curvature diagnostics against dense eigendecompositions of small problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.experiment.diagnostics import curvature_metrics, hessian_spectrum

pytestmark = pytest.mark.timeout(120)


def _quadratic(dim=30, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    evals = np.concatenate([[50.0, 20.0, 10.0], np.linspace(-1.0, 3.0, dim - 3)])
    a = (q * evals) @ q.T
    b = rng.normal(size=dim)
    f = lambda w: 0.5 * w @ (a @ w) - b @ w
    return jnp.asarray(a), f, jnp.asarray(rng.normal(size=dim)), np.sort(evals)[::-1]


def test_spectrum_recovers_known_eigenvalues_and_trace():
    _a, f, w, evals = _quadratic()
    out = jax.jit(
        lambda w: hessian_spectrum(
            f,
            w,
            jax.random.PRNGKey(0),
            top_k=3,
            trace_probes=200,
            density_iters=20,
            density_probes=4,
        )
    )(w)
    np.testing.assert_allclose(out["top_eigenvalues"], evals[:3], rtol=1e-8)
    assert abs(out["trace"] - evals.sum()) < 4 * out["trace_stderr"] + 1e-8
    np.testing.assert_allclose(jnp.sum(out["density_weights"]), 1.0, rtol=1e-10)
    # A quadratic's SLQ nodes lie inside its spectrum.
    assert out["density_nodes"].max() <= evals[0] + 1e-8
    assert out["density_nodes"].min() >= evals[-1] - 1e-8


def test_sharpness_and_gradient_share():
    a, f, w, evals = _quadratic(seed=1)
    g = jax.grad(f)(w)
    out = curvature_metrics(
        f, w, jax.random.PRNGKey(1), top_k=2, num_iters=30, grad=g, trace_probes=8
    )
    np.testing.assert_allclose(out["sharpness"], evals[0], rtol=1e-8)
    _vals, vecs = np.linalg.eigh(np.asarray(a))
    top2 = vecs[:, -2:]
    share = np.sum((top2.T @ np.asarray(g)) ** 2) / np.sum(np.asarray(g) ** 2)
    np.testing.assert_allclose(out["grad_topk_share"], share, rtol=1e-8)
    # cumulative: the top-1 share, then the top-2 share (eigh sorts ascending)
    top1 = np.sum((vecs[:, -1:].T @ np.asarray(g)) ** 2) / np.sum(np.asarray(g) ** 2)
    np.testing.assert_allclose(out["grad_share_by_k"], [top1, share], rtol=1e-8)
    assert top1 < share
    assert np.isfinite(out["trace"]) and out["trace_stderr"] > 0


def test_minibatch_sharpness_matches_dense_per_batch():
    """Each minibatch's top eigenvalue against a dense eigendecomposition of that minibatch's
    Hessian (a small tanh regression; rows read back from the returned indices)."""
    from jaxopt2.experiment.diagnostics import minibatch_sharpness

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(40, 3)))
    y = jnp.asarray(rng.normal(size=40))
    w = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}

    def loss(p, xb, yb):
        return 0.5 * jnp.mean((jnp.tanh(xb @ p["a"]) @ p["b"] - yb) ** 2)

    evals, rows = jax.jit(
        lambda p: minibatch_sharpness(
            loss, p, (x, y), jax.random.PRNGKey(0), batch_size=8, num_batches=5, num_iters=16
        )
    )(w)
    assert evals.shape == (5,) and rows.shape == (5, 8)
    rows = np.asarray(rows)
    assert all(len(set(r)) == 8 for r in rows)  # without replacement within a minibatch
    assert len({tuple(sorted(r)) for r in rows}) == 5  # a fresh draw each time
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(w)

    hessian = jax.jit(jax.hessian(lambda v, xb, yb: loss(unravel(v), xb, yb)))

    def dense_top(r):
        return np.linalg.eigvalsh(np.asarray(hessian(flat, x[r], y[r])))[-1]

    dense = [dense_top(r) for r in rows]
    np.testing.assert_allclose(evals, dense, rtol=1e-8)
    full = np.linalg.eigvalsh(np.asarray(hessian(flat, x, y)))[-1]
    assert not np.allclose(dense, full, rtol=1e-3)  # the minibatches differ from the full batch
    same, _ = minibatch_sharpness(
        loss, w, (x, y), jax.random.PRNGKey(1), batch_size=40, num_batches=2, num_iters=16
    )
    np.testing.assert_allclose(same, [full, full], rtol=1e-8)
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.40"):
        minibatch_sharpness(loss, w, (x, y), jax.random.PRNGKey(0), batch_size=41, num_batches=1)
