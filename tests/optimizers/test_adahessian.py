"""AdaHessian against a naive loop written here, plus its error handling and fallbacks."""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2._tree import random_probes
from jaxopt2.optimizers.adahessian import scale_by_adahessian

pytestmark = pytest.mark.timeout(120)


def _problem():
    """A small conv-ish model: a 4-D kernel (exercises spatial averaging), a matrix, a bias."""
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "kernel": 0.3 * jax.random.normal(k[0], (2, 3, 2, 2), jnp.float64),  # (out, in, h, w)
        "w": 0.3 * jax.random.normal(k[1], (8, 4), jnp.float64),
        "b": jnp.zeros(4, jnp.float64),
    }
    x = jax.random.normal(k[2], (16, 3, 2, 2), jnp.float64)
    y = jax.random.normal(k[3], (16, 4), jnp.float64)

    def loss_fn(p, x, y):
        h = jnp.tanh(jnp.einsum("oihw,nihw->no", p["kernel"], x))  # [n, 2]
        h = jnp.concatenate([h, h**2, jnp.sin(h), h**3], axis=1)  # [n, 8]
        out = h @ p["w"] + p["b"]
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=1))

    return params, loss_fn, (x, y)


def _naive_adahessian(
    params, loss_fn, batch, keys, *, lr, b1, b2, eps, wd, power, num_probes, update_every, layout
):
    """Textbook AdaHessian, one step at a time with NumPy and a dense Hessian."""
    flat0, unravel = ravel_pytree(params)
    f = lambda flat: loss_fn(unravel(flat), *batch)
    grad = jax.grad(f)
    hess = jax.jit(jax.hessian(f))
    theta = np.asarray(flat0, np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    d = np.zeros_like(theta)
    for t, key in enumerate(keys, start=1):
        g = np.asarray(grad(theta))
        if (t - 1) % update_every == 0:
            h = np.asarray(hess(theta))
            zs = random_probes(key, params, num_probes)
            zs = np.stack(
                [
                    np.asarray(ravel_pytree(jax.tree.map(lambda a: a[s], zs))[0])
                    for s in range(num_probes)
                ]
            )
            est = np.abs(np.mean([z * (h @ z) for z in zs], axis=0))
            tree = unravel(jnp.asarray(est))
            kern = np.asarray(tree["kernel"])
            if layout == "channels_first":
                kern = np.broadcast_to(kern.mean(axis=(2, 3), keepdims=True), kern.shape)
            tree["kernel"] = jnp.asarray(kern)
            d = np.asarray(ravel_pytree(tree)[0])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d * d
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        u = m_hat / (np.sqrt(v_hat) ** power + eps)
        theta = theta - lr * (u + wd * theta)
    return theta


@pytest.mark.parametrize(
    "num_probes,update_every,power,layout",
    [(1, 1, 1.0, "channels_first"), (3, 2, 0.5, None)],
)
def test_matches_naive_loop(num_probes, update_every, power, layout):
    params, loss_fn, batch = _problem()
    hp = dict(lr=0.05, b1=0.9, b2=0.99, eps=1e-4, wd=1e-2)
    opt = jaxopt2.adahessian(
        learning_rate=hp["lr"],
        b1=hp["b1"],
        b2=hp["b2"],
        eps=hp["eps"],
        weight_decay=hp["wd"],
        hessian_power=power,
        num_probes=num_probes,
        update_every=update_every,
        spatial_averaging=layout,
        stats_dtype=jnp.float64,
    )
    keys = [jax.random.PRNGKey(100 + i) for i in range(6)]

    @jax.jit
    def step(p, s, k):
        _, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, *batch, key=k)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    for k in keys:
        p, s = step(p, s, k)
    expected = _naive_adahessian(
        params,
        loss_fn,
        batch,
        keys,
        power=power,
        num_probes=num_probes,
        update_every=update_every,
        layout=layout,
        **hp,
    )
    np.testing.assert_allclose(np.asarray(ravel_pytree(p)[0]), expected, rtol=1e-10, atol=1e-12)


def test_spatial_averaging_layouts():
    d = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
    from jaxopt2.optimizers.adahessian import _spatial_average

    first = _spatial_average(d, "channels_first")
    np.testing.assert_allclose(first[1, 2], np.full((4, 5), np.mean(d[1, 2])))
    last = _spatial_average(d, "channels_last")  # window = first two axes
    np.testing.assert_allclose(last[:, :, 3, 4], np.full((2, 3), np.mean(d[:, :, 3, 4])))
    vec = jnp.arange(3.0)
    assert _spatial_average(vec, "channels_first") is vec


def test_nonfinite_estimate_is_discarded_and_counted():
    params = jnp.ones(3)
    opt = scale_by_adahessian()
    state = opt.init(params)
    good = lambda p: jnp.sum(p**2)
    _, state = opt.update(jnp.ones(3), state, params, value_fn=good)
    np.testing.assert_allclose(state.hessian_diag, 2.0)
    bad = lambda p: jnp.sum(p**2) * jnp.sqrt(-1.0)  # NaN curvature
    _, state = opt.update(jnp.ones(3), state, params, value_fn=bad)
    np.testing.assert_allclose(state.hessian_diag, 2.0)
    assert int(state.num_nonfinite) == 1


def test_key_fallback_and_explicit_key():
    params = {"a": jnp.linspace(0.5, 1.5, 6), "b": jnp.ones((6, 6))}
    # Many off-diagonal Hessian entries: different probes give different estimates.
    f = lambda p: jnp.sum(p["a"] ** 4) + p["a"] @ jnp.sin(p["b"]) @ p["a"]
    opt = scale_by_adahessian(seed=3)
    g = jax.tree.map(jnp.ones_like, params)
    s0 = opt.init(params)
    _, s1 = opt.update(g, s0, params, value_fn=f)
    _, s1_again = opt.update(g, s0, params, value_fn=f)
    chex.assert_trees_all_equal(s1, s1_again, custom_message="fallback key: not deterministic")
    assert not np.array_equal(s1.key, s0.key), "the carried key advances without an explicit key"
    _, s2 = opt.update(g, s0, params, value_fn=f, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(s2.key, s0.key)  # explicit key: the carried key stays put
    assert not np.allclose(ravel_pytree(s2.hessian_diag)[0], ravel_pytree(s1.hessian_diag)[0])


def test_clear_errors():
    params = jnp.ones(3)
    opt = jaxopt2.adahessian(1e-2)
    state = opt.init(params)
    with pytest.raises(ValueError, match="value_fn"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="params"):
        scale_by_adahessian().update(params, state[0], None, value_fn=lambda p: jnp.sum(p))
    with pytest.raises(ValueError, match="b1"):
        jaxopt2.adahessian(1e-2, b1=1.0)
    with pytest.raises(ValueError, match="hessian_power"):
        jaxopt2.adahessian(1e-2, hessian_power=0.0)
    with pytest.raises(ValueError, match="num_probes"):
        jaxopt2.adahessian(1e-2, num_probes=0)
    with pytest.raises(ValueError, match="spatial_averaging"):
        jaxopt2.adahessian(1e-2, spatial_averaging="nhwc")
    with pytest.raises(ValueError, match="weight_decay"):
        jaxopt2.adahessian(1e-2, weight_decay=-1.0)


def test_traced_hyperparameters_pass_unchecked():
    """A vmapped grid over b2 traces (the constructor's range check is skipped for traced
    values) and each row equals the run with that b2 as a Python float. Two steps on a quartic,
    whose Hessian diagonal changes between them, so b2 changes the result."""
    params = jnp.array([1.0, -0.5, 0.8])
    f = lambda p: jnp.sum(jnp.arange(1.0, 4.0) * p**4)

    def run(b2):
        opt = jaxopt2.adahessian(0.1, b2=b2)
        p, s = params, opt.init(params)
        for i in range(2):
            _, u, s = jaxopt2.value_and_update(opt, f, p, s, key=jax.random.PRNGKey(i))
            p = optax.apply_updates(p, u)
        return p

    grid = (0.5, 0.9, 0.999)
    out = jax.vmap(run)(jnp.array(grid))
    for row, b2 in zip(out, grid, strict=True):
        np.testing.assert_allclose(row, run(b2), rtol=1e-6)  # float32 statistics
    assert not np.allclose(out[0], out[2], rtol=1e-4)  # b2 matters on this problem


def test_spatial_averaging_reaches_the_runners_cnn_kernels():
    """One estimate on the runner's digits CNN against a dense Hessian and averaging by hand."""
    from sklearn.datasets import load_digits

    from jaxopt2.experiment.models import CNNConfig, build_cnn

    model = build_cnn(CNNConfig(channels=[2, 3], kernel_size=3), 8, 10, jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    digits = load_digits()
    x, y = digits.data[:24] / 16.0, digits.target[:24]

    def loss_fn(p):
        logits = jax.vmap(eqx.combine(p, static))(jnp.asarray(x, p.head.weight.dtype))
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    kernels = [c.weight for c in params.convs]
    assert [k.shape for k in kernels] == [(2, 1, 3, 3), (3, 2, 3, 3)]  # (out, in, h, w)
    key, num_probes = jax.random.PRNGKey(5), 2
    opt = scale_by_adahessian(num_probes=num_probes)
    update = jax.jit(
        lambda p: opt.update(jax.grad(loss_fn)(p), opt.init(p), p, key=key, value_fn=loss_fn)[1]
    )
    state = update(params)

    params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    flat, unravel = ravel_pytree(params64)
    hess = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat))
    zs = random_probes(key, params, num_probes)
    zs = [np.asarray(ravel_pytree(jax.tree.map(lambda a: a[s], zs))[0]) for s in range(num_probes)]
    raw = unravel(jnp.asarray(np.abs(np.mean([z * (hess @ z) for z in zs], axis=0))))
    expected = jax.tree.map(np.asarray, raw)
    for i, conv in enumerate(expected.convs):
        window_mean = conv.weight.mean(axis=(2, 3), keepdims=True)
        expected.convs[i] = eqx.tree_at(
            lambda c: c.weight, conv, np.broadcast_to(window_mean, conv.weight.shape)
        )
    chex.assert_trees_all_close(state.hessian_diag, expected, rtol=2e-4, atol=1e-7)
    # The averaging changed the estimate: every kernel's raw diagonal varies over its window.
    for conv in raw.convs:
        assert np.all(np.ptp(np.asarray(conv.weight), axis=(2, 3)) > 1e-6)
