"""hessian_free against dense float64 solves, its curvature modes, damping and CG rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.optimizers.newton import _curvature_matvec, truncated_cg
from tests.optimizers import zoo

pytestmark = pytest.mark.timeout(120)


def _exact(**kw):
    """hessian_free that solves its system to float64 precision."""
    base = dict(cg_rtol=1e-13, cg_progress_tol=0.0, stats_dtype=jnp.float64, min_damping=1e-14)
    return jaxopt2.hessian_free(**{**base, **kw})


def _dense_gauss_newton(problem):
    """``Jᵀ H_out J`` from the dense Jacobian of the tagged outputs (float64)."""
    value_fn = lambda p: problem.loss_fn(p, *problem.batch)
    split = jaxopt2.curvature.split_loss(value_fn, problem.params)
    flat, unravel = ravel_pytree(problem.params)
    out = split.outputs
    jac = jax.jit(jax.jacobian(lambda f: split.model_fn(unravel(f)).reshape(-1)))(flat)  # [N*C, n]
    n = out.shape[0]
    cols = jax.vmap(
        lambda e: jaxopt2.curvature.products.output_fisher_vp(split.loss, out, e.reshape(out.shape))
    )(jnp.eye(out.size, dtype=out.dtype))
    h_out = cols.reshape(out.size, out.size)
    return np.asarray(jac.T @ h_out @ jac / n), flat, unravel, value_fn


def test_gauss_newton_step_matches_dense_solve_on_linear_least_squares():
    problem = zoo.linear_regression(jnp.float64)
    g_dense, flat, _, value_fn = _dense_gauss_newton(problem)
    damping = 1e-10
    opt = _exact(damping=damping, max_cg_iters=flat.size)
    grads = jax.grad(value_fn)(problem.params)
    updates, state = opt.update(grads, opt.init(problem.params), problem.params, value_fn=value_fn)
    g = np.asarray(ravel_pytree(grads)[0])
    expected = -np.linalg.solve(g_dense + damping * np.eye(flat.size), g)
    np.testing.assert_allclose(ravel_pytree(updates)[0], expected, rtol=1e-7, atol=1e-10)
    # Linear least squares: the Gauss-Newton step is the Newton step, so one step solves it.
    new = optax.apply_updates(problem.params, updates)
    assert abs(float(value_fn(new)) - problem.f_star) <= 1e-9 * problem.f_star
    assert int(state[0].cg_iters) <= flat.size and int(state[0].num_rejected) == 0


def test_auto_picks_gauss_newton_for_tagged_and_hessian_for_untagged():
    # Tagged, nonlinear: the product is Jᵀ H_out J, not the Hessian.
    problem = zoo.mlp_regression(jnp.float64)
    g_dense, flat, unravel, value_fn = _dense_gauss_newton(problem)
    h_dense = np.asarray(jax.jit(jax.hessian(lambda f: value_fn(unravel(f))))(flat))
    v = jax.random.normal(jax.random.PRNGKey(0), flat.shape, jnp.float64)
    auto = ravel_pytree(_curvature_matvec(value_fn, problem.params, "auto")(unravel(v)))[0]
    hess = ravel_pytree(_curvature_matvec(value_fn, problem.params, "hessian")(unravel(v)))[0]
    np.testing.assert_allclose(auto, g_dense @ np.asarray(v), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hess, h_dense @ np.asarray(v), rtol=1e-10, atol=1e-12)
    assert not np.allclose(auto, hess, rtol=1e-3)

    # Untagged: auto is the Hessian; forcing Gauss-Newton is a clear error. (zoo.mlp computes
    # its log-softmax in float32, hence the float32-level tolerance.)
    untagged = zoo.mlp(jnp.float64)
    fn = lambda p: untagged.loss_fn(p, *untagged.batch)
    flat_u, unravel_u = ravel_pytree(untagged.params)
    hu = np.asarray(jax.jit(jax.hessian(lambda f: fn(unravel_u(f))))(flat_u))
    vu = jax.random.normal(jax.random.PRNGKey(1), flat_u.shape, jnp.float64)
    got = ravel_pytree(_curvature_matvec(fn, untagged.params, "auto")(unravel_u(vu)))[0]
    np.testing.assert_allclose(got, hu @ np.asarray(vu), rtol=1e-4, atol=1e-6)
    opt = jaxopt2.hessian_free(curvature="gauss_newton")
    with pytest.raises(ValueError, match="tag_loss"):
        opt.update(
            jax.grad(fn)(untagged.params), opt.init(untagged.params), untagged.params, value_fn=fn
        )


def test_hessian_mode_newton_step_on_a_quadratic():
    problem = zoo.quadratic(jnp.float64)
    value_fn = lambda p: problem.loss_fn(p, *problem.batch)
    # Rounding delays CG's finite termination: allow 3n iterations (it stops on the residual).
    opt = _exact(damping=1e-12, max_cg_iters=3 * problem.params.size)
    state = opt.init(problem.params)
    grads = jax.grad(value_fn)(problem.params)
    updates, state = opt.update(grads, state, problem.params, value_fn=value_fn)
    new = optax.apply_updates(problem.params, updates)
    assert float(value_fn(new)) <= 1e-12 * float(value_fn(problem.params))
    # rho = 1 on a quadratic: the damping drops by damping_decrease.
    np.testing.assert_allclose(float(state[0].rho), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(state[0].damping), 1e-12 * 2 / 3, rtol=1e-6)


def test_rejected_step_is_zero_and_raises_damping():
    # Pseudo-Huber far from its minimum: the Newton step overshoots enormously (rho < 0).
    value_fn = lambda w: jnp.sum(jnp.sqrt(1.0 + w**2))
    w = jnp.array([10.0, -8.0])
    opt = jaxopt2.hessian_free(damping=1e-6)
    state = opt.init(w)
    updates, state = opt.update(jax.grad(value_fn)(w), state, w, value_fn=value_fn)
    assert not np.any(np.asarray(updates))
    assert int(state[0].num_rejected) == 1 and float(state[0].rho) < 0
    np.testing.assert_allclose(float(state[0].damping), 1.5e-6, rtol=1e-6)
    # Enough rejections later the damping makes the step a short gradient step, accepted.
    step = jax.jit(lambda w, s: jaxopt2.value_and_update(opt, value_fn, w, s))
    for _ in range(40):
        _, updates, state = step(w, state)
        w = optax.apply_updates(w, updates)
    assert float(value_fn(w)) < 0.5 * float(value_fn(jnp.array([10.0, -8.0])))


def test_negative_curvature_gives_a_descent_step():
    # f = -w²/2 + w⁴/4 at w = 0.1: Hessian -0.97 < 0, minimum at w = 1.
    value_fn = lambda w: jnp.sum(-0.5 * w**2 + 0.25 * w**4)
    w = jnp.array([0.1])
    opt = jaxopt2.hessian_free(damping=1e-4)
    g = jax.grad(value_fn)(w)
    updates, _ = opt.update(g, opt.init(w), w, value_fn=value_fn)
    assert float(jnp.vdot(updates, g)) < 0
    assert float(value_fn(w + updates)) < float(value_fn(w))


def test_nonfinite_gradient_keeps_state():
    problem = zoo.quadratic(jnp.float32)
    value_fn = lambda p: problem.loss_fn(p, *problem.batch)
    opt = jaxopt2.hessian_free()
    state = opt.init(problem.params)
    bad = jnp.full_like(problem.params, jnp.nan)
    updates, new = opt.update(bad, state, problem.params, value_fn=value_fn)
    assert not np.any(np.asarray(updates)) and np.all(np.isfinite(updates))
    assert int(new[0].num_nonfinite) == 1
    assert float(new[0].damping) == float(state[0].damping)


def test_truncated_cg_progress_rule_and_warm_start():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    a = jnp.asarray(q @ np.diag(np.logspace(0, 4, 200)) @ q.T)
    b = jnp.asarray(rng.standard_normal(200))
    mv = lambda x: a @ x
    zero = jnp.zeros(200)
    early = truncated_cg(mv, b, zero, max_iters=200, rtol=1e-14, progress_tol=5e-4)
    # cond 1e4: rounding delays finite termination, so the full solve gets 5n iterations.
    full = truncated_cg(mv, b, zero, max_iters=1000, rtol=1e-10, progress_tol=0.0)
    assert 10 < int(early.num_iters) < int(full.num_iters)
    exact = np.linalg.solve(np.asarray(a), np.asarray(b))
    phi = lambda x: 0.5 * x @ np.asarray(a) @ x - np.asarray(b) @ x
    np.testing.assert_allclose(float(full.model_value), phi(exact), rtol=1e-8)
    # Martens' rule stops once the model has nearly stopped improving.
    assert float(early.model_value) <= 0.99 * phi(exact) * (1 + 1e-9)
    np.testing.assert_allclose(float(early.model_value), phi(np.asarray(early.x)), rtol=1e-8)
    # A start worse than zero is replaced by zero; a good one saves iterations.
    bad = truncated_cg(mv, b, 1e3 * b, max_iters=1000, rtol=1e-10, progress_tol=0.0)
    np.testing.assert_allclose(bad.x, full.x, rtol=1e-6, atol=1e-9)
    warm = truncated_cg(mv, b, 0.95 * full.x, max_iters=1000, rtol=1e-10, progress_tol=0.0)
    assert int(warm.num_iters) <= int(full.num_iters)


@pytest.mark.parametrize("problem_name", list(zoo.TAGGED_PROBLEMS))
def test_gauss_newton_mode_converges_on_tagged_zoo(problem_name):
    from tests.optimizers import cases

    problem = zoo.get(problem_name, jnp.float32)
    f_final, _, _, _ = cases.run_scan(jaxopt2.hessian_free(), problem, 25)
    assert problem.converged(float(f_final)), (problem_name, problem.rel_gap(float(f_final)))


def test_validation():
    with pytest.raises(ValueError, match="damping"):
        jaxopt2.hessian_free(damping=0.0)
    with pytest.raises(ValueError, match="max_cg_iters"):
        jaxopt2.hessian_free(max_cg_iters=0)
    with pytest.raises(ValueError, match="curvature"):
        jaxopt2.hessian_free(curvature="fisher")
    with pytest.raises(ValueError, match="damping_increase"):
        jaxopt2.hessian_free(damping_increase=0.5)
