"""linearize_model (first-order Taylor model) and the training Jacobian's singular values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.curvature import training_jacobian_singular_values

pytestmark = pytest.mark.timeout(180)

_RNG = np.random.default_rng(0)
P0 = {
    "w1": jnp.asarray(_RNG.standard_normal((3, 5)) / 2),
    "b1": jnp.asarray(_RNG.standard_normal(5) / 4),
    "w2": jnp.asarray(_RNG.standard_normal((5, 2))),
}
X = jnp.asarray(_RNG.standard_normal((7, 3)))
Y = jnp.asarray(_RNG.standard_normal((7, 2)))


def mlp(p, x, *, scale=1.0):
    return scale * jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _direction(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)), P0)


def test_linearized_model_is_the_first_order_taylor_expansion():
    """Against the dense Jacobian of the flattened parameters: f(θ₀) + J (θ - θ₀), with a
    keyword argument passed through; equal to the model at θ₀, not elsewhere."""
    f_lin = jax.jit(jaxopt2.linearize_model(mlp, P0), static_argnames="scale")
    flat0, unravel = ravel_pytree(P0)
    jac = jax.jit(jax.jacfwd(lambda z: mlp(unravel(z), X, scale=0.7).ravel()))(flat0)
    theta = jax.tree.map(lambda a, d: a + 0.3 * d, P0, _direction(1))
    want = mlp(P0, X, scale=0.7).ravel() + jac @ (ravel_pytree(theta)[0] - flat0)
    np.testing.assert_allclose(f_lin(theta, X, scale=0.7).ravel(), want, rtol=1e-12)
    np.testing.assert_allclose(f_lin(P0, X, scale=0.7), mlp(P0, X, scale=0.7), rtol=1e-14)
    assert not np.allclose(f_lin(theta, X, scale=0.7), mlp(theta, X, scale=0.7), rtol=1e-3)


def test_linearized_model_is_affine_in_the_parameters():
    f_lin = jax.jit(jaxopt2.linearize_model(mlp, P0))
    d1, d2 = _direction(2), _direction(3)
    at = lambda a, b: f_lin(jax.tree.map(lambda p, u, v: p + a * u + b * v, P0, d1, d2), X)
    base = at(0.0, 0.0)
    combo = at(2.0, -1.5) - base
    np.testing.assert_allclose(combo, 2.0 * (at(1.0, 0.0) - base) - 1.5 * (at(0.0, 1.0) - base),
                               rtol=1e-11, atol=1e-12)  # fmt: skip


def test_a_squared_error_fit_of_the_linearized_model_is_one_gauss_newton_step():
    """Residuals linear in θ: Gauss-Newton's first step is the exact least-squares solution
    (the minimum-norm one: J has more columns than rows here)."""
    f_lin = jaxopt2.linearize_model(mlp, P0)
    residual = lambda p: (f_lin(p, X) - Y).ravel()
    sol = jax.jit(lambda p: jaxopt2.least_squares(residual, p, method="gauss_newton"))(P0)
    assert bool(sol.success) and int(sol.num_steps) == 1
    flat0, unravel = ravel_pytree(P0)
    jac = jax.jacfwd(lambda z: mlp(unravel(z), X).ravel())(flat0)
    want = flat0 + np.linalg.lstsq(np.asarray(jac), -np.asarray(residual(P0)), rcond=None)[0]
    np.testing.assert_allclose(ravel_pytree(sol.x)[0], want, rtol=1e-8, atol=1e-9)


def test_linearized_model_names_a_parameter_mismatch():
    f_lin = jaxopt2.linearize_model(mlp, P0)
    bad = {**P0, "w2": jnp.zeros((5, 3))}
    with pytest.raises(ValueError, match=r"params\['w2'\] has shape \(5, 3\) but params0"):
        f_lin(bad, X)


def test_training_jacobian_of_gradient_descent_on_a_quadratic():
    """T steps of gradient descent on ½θᵀAθ - bᵀθ: θ_T = (I - ηA)ᵀθ₀ + c, so the singular
    values are |1 - ηλᵢ(A)|^T — the directions of small curvature keep theirs near 1."""
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    lam = np.array([0.05, 0.2, 1.0, 3.0, 6.0, 8.0])
    a = jnp.asarray((q * lam) @ q.T)
    b = jnp.asarray(rng.standard_normal(6))
    eta, steps = 0.1, 3

    def train(theta):
        def step(t, _):
            return t - eta * (a @ t - b), None

        return jax.lax.scan(step, theta, None, length=steps)[0]

    want = np.sort(np.abs(1 - eta * lam) ** steps)[::-1]
    theta0 = jnp.asarray(rng.standard_normal(6))
    top, vecs = training_jacobian_singular_values(train, theta0, jax.random.key(0), 2, num_iters=6)
    np.testing.assert_allclose(top, want[:2], rtol=1e-10)
    # right singular vectors: the eigenvectors of A with those eigenvalues (up to sign)
    np.testing.assert_allclose(np.abs(np.asarray(vecs) @ q[:, :2]), np.eye(2), atol=1e-8)
    low, _ = training_jacobian_singular_values(
        train, theta0, jax.random.key(0), 2, which="smallest", num_iters=6
    )
    np.testing.assert_allclose(low, want[-2:], rtol=1e-8)
