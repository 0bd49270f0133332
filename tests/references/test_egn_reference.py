"""EGN's direction against the dense damped Gauss-Newton solve (float64, tiny MLPs).

The reference forms the Gauss-Newton matrix ``G = Σ_r c_r J_rᵀ H_r J_r`` explicitly (``J``
by ``jax.jacfwd`` of the flattened outputs, ``H_r`` the per-row Hessian of the loss in the
outputs by ``jax.hessian`` of the per-row loss) and solves ``(G + λI) u = g`` with numpy — no
Woodbury or push-through identity. The loss carries an L2 term outside the tag, so both
parts of the library's split (the tag's gradient and the rest) are exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.optimizers.egn import gauss_newton_direction

pytestmark = pytest.mark.timeout(120)

_RNG = np.random.default_rng(11)
X = jnp.asarray(_RNG.standard_normal((6, 3)))
LABELS = jnp.asarray(_RNG.integers(0, 4, 6))
TARGETS = jnp.asarray(_RNG.standard_normal((6, 2)))
P0 = {
    "w1": jnp.asarray(_RNG.standard_normal((3, 5)) * 0.7),
    "w2": jnp.asarray(_RNG.standard_normal((5, 4)) * 0.7),
}
ALPHA = 0.05  # the L2 term outside the tag


def _model(p, width):
    return jnp.tanh(X @ p["w1"]) @ p["w2"][:, :width]


def _value_fn(loss):
    def f(p):
        if loss == "softmax_cross_entropy":
            out = jaxopt2.tag_loss(loss, _model(p, 4), LABELS)
            main = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, LABELS))
        else:
            out = jaxopt2.tag_loss(loss, _model(p, 2), TARGETS)
            main = jnp.mean(jnp.sum(optax.l2_loss(out, TARGETS), axis=-1))
        return main + ALPHA * sum(jnp.sum(v**2) for v in jax.tree.leaves(p))

    return f


def _dense_direction(loss, damping):
    width = 4 if loss == "softmax_cross_entropy" else 2
    flat, unravel = ravel_pytree(P0)
    out = _model(P0, width)
    jac = np.asarray(jax.jacfwd(lambda z: _model(unravel(z), width))(flat))  # [6, C, d]

    def row_loss(o, r):
        if loss == "softmax_cross_entropy":
            return optax.softmax_cross_entropy_with_integer_labels(o, LABELS[r])
        return jnp.sum(optax.l2_loss(o, TARGETS[r]))

    hess = np.asarray(jax.jit(jax.vmap(jax.hessian(row_loss)))(out, jnp.arange(6)))
    g = sum(jac[r].T @ hess[r] @ jac[r] for r in range(6)) / 6
    grad = np.asarray(ravel_pytree(jax.grad(_value_fn(loss))(P0))[0])
    return np.linalg.solve(g + damping * np.eye(flat.size), grad), grad


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "squared_error"])
def test_direction_is_the_damped_gauss_newton_solve(loss, damping=1e-4):
    want, grad = _dense_direction(loss, damping)
    fn = _value_fn(loss)
    got = jax.jit(lambda p: gauss_newton_direction(fn, p, jax.grad(fn)(p), damping))(P0)
    got = np.asarray(ravel_pytree(got)[0])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    # not a rescaled gradient: the curvature turns the step
    cos = got @ grad / np.linalg.norm(got) / np.linalg.norm(grad)
    assert cos < 0.99


def test_egn_step_with_line_search_decreases_the_loss_by_armijo():
    fn = _value_fn("softmax_cross_entropy")
    opt = jaxopt2.egn(learning_rate=1.0, damping=1e-2, line_search=True)
    state = opt.init(P0)
    _, updates, state = jax.jit(lambda p, s: jaxopt2.value_and_update(opt, fn, p, s))(P0, state)
    new = optax.apply_updates(P0, updates)
    direction, grad = _dense_direction("softmax_cross_entropy", 1e-2)
    step = -np.asarray(ravel_pytree(updates)[0])
    alpha = float(step @ direction / (direction @ direction))
    np.testing.assert_allclose(step, alpha * direction, rtol=1e-7, atol=1e-12)
    assert np.isclose(2.0 ** round(np.log2(alpha)), alpha, rtol=1e-9) and alpha <= 1  # halving
    assert float(fn(new)) <= float(fn(P0)) - 1e-4 * alpha * float(grad @ direction)
