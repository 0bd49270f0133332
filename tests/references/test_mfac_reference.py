"""M-FAC against a numpy float64 transcription of the paper's definition.

Frantar, Kurtic & Alistarh (2021): with the window of the last ``m`` gradients (the current
one included), ``F̂ = λI + (1/m) Σᵢ gᵢgᵢᵀ`` and the direction ``u = F̂⁻¹ g`` — here formed
as a dense ``d × d`` matrix and solved with ``numpy.linalg.solve`` (no Woodbury identity, no
Gram matrix), then heavy-ball momentum ``b ← μ b + u`` and the step ``-lr · (b + wd · θ)``.
The path runs past the window's length, so rows are overwritten (the ring buffer and the
Gram matrix's row/column updates are exercised), on a logistic-regression loss whose
gradients change direction from step to step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxopt2

from .common import library_path

pytestmark = pytest.mark.timeout(120)

_RNG = np.random.default_rng(5)
X = _RNG.standard_normal((20, 4))
Y = (_RNG.uniform(size=20) < 0.5).astype(float)
P0 = {"w": _RNG.standard_normal(4) * 0.5, "b": np.array([0.3])}


def _loss(p, x, y):
    z = x @ p["w"] + p["b"][0]
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z)


def _grad_np(w, b):
    z = X @ w + b
    s = 1 / (1 + np.exp(-z))
    r = (s - Y) / len(Y)
    return np.concatenate([[r.sum()], X.T @ r])  # ravel_pytree order: "b" then "w"


def reference_mfac(steps, lr, m, damping, momentum, weight_decay):
    w, b = P0["w"].copy(), P0["b"][0]
    window, buf, path = [], np.zeros(5), []
    for _ in range(steps):
        g = _grad_np(w, b)
        window = [*window, g][-m:]
        fisher = damping * np.eye(5) + sum(np.outer(v, v) for v in window) / m
        u = np.linalg.solve(fisher, g)
        buf = momentum * buf + u
        theta = np.concatenate([[b], w])
        theta = theta - lr * (buf + weight_decay * theta)
        b, w = theta[0], theta[1:]
        path.append((w.copy(), b))
    return path


@pytest.mark.parametrize(
    ("m", "damping", "momentum", "weight_decay"),
    [(3, 1e-2, 0.0, 0.0), (4, 1e-3, 0.9, 0.1)],
)
def test_mfac_path_matches_the_dense_damped_inverse_fisher(m, damping, momentum, weight_decay):
    steps, lr = 9, 0.05
    opt = jaxopt2.mfac(
        learning_rate=lr, num_grads=m, damping=damping, momentum=momentum,
        weight_decay=weight_decay, stats_dtype="float64",
    )  # fmt: skip
    got = library_path(opt, _loss, P0, steps, jnp.asarray(X), jnp.asarray(Y))
    want = reference_mfac(steps, lr, m, damping, momentum, weight_decay)
    for i, (p, (w, b)) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(p["w"], w, rtol=1e-9, atol=1e-12, err_msg=f"step {i}")
        np.testing.assert_allclose(p["b"][0], b, rtol=1e-9, atol=1e-12, err_msg=f"step {i}")
    # the window has wrapped around and the path has moved far from a gradient step's
    assert steps > m
    sgd = library_path(jaxopt2.sgd(lr), _loss, P0, steps, jnp.asarray(X), jnp.asarray(Y))
    assert np.abs(got[-1]["w"] - sgd[-1]["w"]).max() > 1e-2


def test_inverse_fisher_product_is_woodbury_exact():
    """The state's Gram matrix and window give ``F̂⁻¹v`` for any ``v``, not only the current
    gradient (the identity, not a property of ``g`` being in the window)."""
    from jaxopt2.optimizers.mfac import inverse_fisher_product

    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 12))
    v = rng.standard_normal(12)
    want = np.linalg.solve(0.3 * np.eye(12) + g.T @ g / 5, v)
    got = jax.jit(inverse_fisher_product)(jnp.asarray(g), jnp.asarray(g @ g.T), jnp.asarray(v), 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-11)
