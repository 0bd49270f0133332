"""Sophia: both estimators against dense float64 curvature, the clip bound, a naive loop."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.optimizers.sophia import sophia_estimate
from tests.optimizers import cases, zoo

pytestmark = pytest.mark.timeout(120)

SAMPLES = 4000


def _tagged_mlp():
    """zoo's tagged 4-16-3 softmax MLP in float64, a 24-example batch (131 parameters)."""
    x, labels = zoo._mlp_data()
    params = zoo.mlp_init(jax.random.PRNGKey(3), jnp.float64)
    batch = (jnp.asarray(x[:24], jnp.float64), jnp.asarray(labels[:24], jnp.int32))

    def value_fn(p):
        h = jnp.tanh(batch[0] @ p["w1"] + p["b1"])
        logits = jaxopt2.tag_loss("softmax_cross_entropy", h @ p["w2"] + p["b2"], batch[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    return params, value_fn


def test_hutchinson_estimate_matches_dense_diagonal():
    params, value_fn = _tagged_mlp()
    flat, unravel = ravel_pytree(params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: value_fn(unravel(f))))(flat))
    for probe, extra in (("rademacher", 0.0), ("gaussian", 2.0)):
        estimate = jax.jit(
            lambda p, k, probe=probe: sophia_estimate(
                value_fn, p, k, estimator="hutchinson", num_probes=SAMPLES, probe=probe
            )
        )
        est = estimate(params, jax.random.PRNGKey(0))
        est = np.asarray(ravel_pytree(est)[0])
        # Per-entry variance of one probe: Σ_{j≠i} H_ij² (+ 2 H_ii² for Gaussian probes).
        var = np.sum(h**2, axis=1) - np.diag(h) ** 2 + extra * np.diag(h) ** 2
        std = np.sqrt(var / SAMPLES)
        assert np.all(np.abs(est - np.diag(h)) <= 5 * std + 1e-12), probe


def test_gnb_expectation_is_the_gauss_newton_diagonal():
    params, value_fn = _tagged_mlp()
    split = jaxopt2.curvature.split_loss(value_fn, params)
    flat, unravel = ravel_pytree(params)
    out = split.outputs
    jac = jax.jit(jax.jacobian(lambda f: split.model_fn(unravel(f))))(flat)  # [N, C, n]
    p = jax.nn.softmax(out, axis=-1)
    h_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)  # [N, C, C]
    g_diag = np.asarray(jnp.einsum("ncp,ncd,ndp->p", jac, h_out, jac) / out.shape[0])
    keys = jax.random.split(jax.random.PRNGKey(1), SAMPLES)
    samples = jax.jit(
        jax.vmap(lambda k: ravel_pytree(sophia_estimate(value_fn, params, k, estimator="gnb"))[0])
    )(keys)
    samples = np.asarray(samples)
    mean, std = samples.mean(0), samples.std(0) / np.sqrt(SAMPLES)
    # Unbiased: within 5 standard errors of the Monte-Carlo mean (entries with zero
    # variance, if any, must match exactly up to rounding).
    assert np.all(np.abs(mean - g_diag) <= 5 * std + 1e-12)
    # The averaged estimator (num_probes) is the mean of independent single samples.
    many = sophia_estimate(value_fn, params, keys[0], estimator="gnb", num_probes=8)
    assert np.all(np.isfinite(ravel_pytree(many)[0]))


def test_gnb_needs_a_tagged_loss():
    problem = zoo.quadratic(jnp.float32)
    value_fn = lambda x: problem.loss_fn(x, *problem.batch)
    opt = jaxopt2.sophia(estimator="gnb")
    with pytest.raises(ValueError, match="tag_loss"):
        opt.update(
            jax.grad(value_fn)(problem.params),
            opt.init(problem.params),
            problem.params,
            value_fn=value_fn,
        )


def test_every_coordinate_moves_at_most_lr():
    problem = zoo.quadratic(jnp.float64)
    lr = 0.05
    opt = jaxopt2.sophia(learning_rate=lr, update_interval=3, eps=1e-12, weight_decay=0.0)
    # A loss with a large gradient, zero and negative curvature in places.
    value_fn = lambda x: 1e3 * problem.loss_fn(x, *problem.batch) - 50 * jnp.sum(jnp.cos(x))
    params, state = 10 * problem.params, opt.init(problem.params)
    for i in range(12):
        _, updates, state = jaxopt2.value_and_update(
            opt, lambda p: value_fn(p), params, state, key=jax.random.PRNGKey(i)
        )
        assert float(jnp.max(jnp.abs(updates))) <= lr * (1 + 1e-12)
        params = optax.apply_updates(params, updates)


def test_against_a_naive_loop():
    params, value_fn = _tagged_mlp()
    lr, b1, b2, gamma, wd, every = 0.02, 0.9, 0.95, 0.05, 0.1, 2
    for estimator in ("hutchinson", "gnb"):
        opt = jaxopt2.sophia(
            learning_rate=lr,
            b1=b1,
            b2=b2,
            gamma=gamma,
            eps=1e-12,
            weight_decay=wd,
            update_interval=every,
            estimator=estimator,
            stats_dtype=jnp.float64,
        )
        p_opt, state = params, opt.init(params)
        theta = np.asarray(ravel_pytree(params)[0])
        unravel = ravel_pytree(params)[1]
        m = np.zeros_like(theta)
        h = np.zeros_like(theta)
        refreshes = 0
        for t in range(5):
            key = jax.random.PRNGKey(10 + t)
            _, updates, state = jaxopt2.value_and_update(opt, value_fn, p_opt, state, key=key)
            p_opt = optax.apply_updates(p_opt, updates)

            g = np.asarray(ravel_pytree(jax.grad(value_fn)(unravel(theta)))[0])
            if t % every == 0:
                est = sophia_estimate(value_fn, unravel(theta), key, estimator=estimator)
                h = b2 * h + (1 - b2) * np.asarray(ravel_pytree(est)[0])
                refreshes += 1
            m = b1 * m + (1 - b1) * g
            h_hat = h / (1 - b2**refreshes)
            u = np.clip(m / np.maximum(gamma * h_hat, 1e-12), -1, 1)
            theta = theta - lr * (u + wd * theta)
            np.testing.assert_allclose(
                ravel_pytree(p_opt)[0], theta, rtol=1e-9, atol=1e-12, err_msg=estimator
            )


@pytest.mark.parametrize(
    ("problem_name", "steps"), [("linear_regression", 300), ("mlp_tagged", 100)]
)
def test_gnb_converges_on_tagged_zoo(problem_name, steps):
    problem = zoo.get(problem_name, jnp.float32)
    opt = jaxopt2.sophia(learning_rate=0.03, estimator="gnb", eps=1e-12, weight_decay=0.0)
    f_final, _, _, state = cases.run_scan(opt, problem, steps)
    assert problem.converged(float(f_final)), (problem_name, problem.rel_gap(float(f_final)))
    assert int(state[0].num_nonfinite) == 0


def test_validation():
    with pytest.raises(ValueError, match="gamma"):
        jaxopt2.sophia(gamma=0.0)
    with pytest.raises(ValueError, match="estimator"):
        jaxopt2.sophia(estimator="exact")
    with pytest.raises(ValueError, match="b1"):
        jaxopt2.sophia(b1=1.0)
    with pytest.raises(ValueError, match="update_interval"):
        jaxopt2.sophia(update_interval=0)


def test_optax_names_order_and_defaults():
    """The arguments optax.contrib.sophia also has come in its order with its defaults
    (update_interval: None meaning 10, a structural argument; see the docstring)."""
    ours = inspect.signature(jaxopt2.sophia).parameters
    theirs = inspect.signature(optax.contrib.sophia).parameters
    shared = [k for k in theirs if k in ours]
    assert shared == [k for k in ours if k in theirs]
    assert {"update_interval", "weight_decay_mask", "eps", "weight_decay"} <= set(shared)
    for k in shared:
        if k not in ("learning_rate", "update_interval"):
            assert ours[k].default == theirs[k].default, k
    assert theirs["update_interval"].default == 10


def test_update_every_is_a_deprecated_spelling_of_update_interval():
    problem = zoo.quadratic(jnp.float32)
    with pytest.warns(DeprecationWarning, match="'update_every' is deprecated.*'update_interval'"):
        old = jaxopt2.sophia(learning_rate=0.1, update_every=3)
    new = jaxopt2.sophia(learning_rate=0.1, update_interval=3)
    with pytest.warns(DeprecationWarning, match="'update_every' is deprecated"):
        old_scale = jaxopt2.scale_by_sophia(update_every=3)
    assert old_scale is not None
    got, want = (cases.run_scan(o, problem, 7)[1] for o in (old, new))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="update_every"):
        jaxopt2.sophia(update_every=3, update_interval=3)


def test_old_positional_order_maps_to_the_old_names():
    """sophia(lr, b1, b2, gamma, eps, weight_decay, ...) was the order before; a positional
    call still means what it meant (with a warning), though the keyword order is optax's."""
    with pytest.warns(DeprecationWarning) as record:
        old = jaxopt2.sophia(0.1, 0.9, 0.95, 0.05, 1e-12, 0.0)
    named = [str(w.message).split("'")[1] for w in record]
    assert named == ["b1", "b2", "gamma", "eps", "weight_decay"]
    new = jaxopt2.sophia(0.1, b1=0.9, b2=0.95, gamma=0.05, eps=1e-12, weight_decay=0.0)
    problem = zoo.quadratic(jnp.float32)
    got, want = (cases.run_scan(o, problem, 4)[1] for o in (old, new))
    np.testing.assert_array_equal(got, want)


def test_clip_threshold_none_does_not_clip():
    problem = zoo.quadratic(jnp.float32)
    kw = dict(learning_rate=0.01, update_interval=1, weight_decay=0.0, gamma=1e-4)
    clipped = cases.run_scan(jaxopt2.sophia(**kw), problem, 1)[2]
    free = cases.run_scan(jaxopt2.sophia(**kw, clip_threshold=None), problem, 1)[2]
    moves = jax.tree.map(lambda a, b: jnp.abs(a - b), free, problem.params)
    assert float(jnp.max(jnp.abs(ravel_pytree(moves)[0]))) > 0.01
    assert not np.allclose(ravel_pytree(clipped)[0], ravel_pytree(free)[0])
