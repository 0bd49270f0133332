"""K-FAC: layer discovery, factors against dense references, the loss tag, bad input."""

import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2 import curvature as cv
from jaxopt2.optimizers.kfac import kfac, kfac_layers, scale_by_kfac
from tests.hang_check import run_without_xla_flag

pytestmark = pytest.mark.timeout(240)


def _mse_loss(model_out):
    def loss_fn(p, x, y):
        out = jaxopt2.tag_loss("squared_error", model_out(p, x), y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return loss_fn


def _data(n=32, d_in=4, d_out=3, seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k1, (n, d_in)), jax.random.normal(k2, (n, d_out))


def test_single_linear_layer_equals_exact_ggn():
    """Squared loss, one dense layer with bias, exact Fisher: A ⊗ G is the GGN itself, so one
    undamped K-FAC direction is the Newton step."""
    x, y = _data()
    loss_fn = _mse_loss(lambda p, x: x @ p["w"] + p["b"])
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    opt = scale_by_kfac(
        learning_rate=1.0, damping=1e-20, fisher="exact", stats_decay=0.0, stats_dtype=jnp.float64
    )
    state = opt.init(params)
    value_fn = lambda p: loss_fn(p, x, y)
    grads = jax.grad(value_fn)(params)
    direction, state = opt.update(grads, state, params, value_fn=value_fn)
    # Dense GGN of (w, b) flattened as rows [x, 1] ⊗ outputs.
    xa = np.concatenate([np.asarray(x), np.ones((32, 1))], axis=1)
    ggn = np.kron(xa.T @ xa / 32, np.eye(3))
    g = np.concatenate([np.asarray(grads["w"]), np.asarray(grads["b"])[None]], 0).reshape(-1)
    newton = np.linalg.solve(ggn, g).reshape(5, 3)
    np.testing.assert_allclose(direction["w"], newton[:4], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(direction["b"], newton[4], rtol=1e-6, atol=1e-9)
    # The factors themselves: A = E[ā āᵀ] in the input slot, G = I in the output slot.
    f_in, f_out = state.factors[1]  # leaves sorted: b, w
    np.testing.assert_allclose(f_in, xa.T @ xa / 32, rtol=1e-10)
    np.testing.assert_allclose(f_out[:3, :3], np.eye(3), rtol=1e-10)


def test_deep_linear_network_factors_equal_dense_kronecker_terms():
    """Each layer's A and G equal E[a aᵀ] and E[g gᵀ] computed by a naive per-example loop."""
    x, y = _data(n=16, d_in=3, d_out=2, seed=1)
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    params = {
        "w1": jax.random.normal(k[0], (3, 4)),
        "w2": jax.random.normal(k[1], (4, 5)),
        "w3": jax.random.normal(k[2], (5, 2)),
    }
    loss_fn = _mse_loss(lambda p, x: x @ p["w1"] @ p["w2"] @ p["w3"])
    opt = scale_by_kfac(learning_rate=1.0, fisher="exact", stats_decay=0.0, stats_dtype=jnp.float64)
    value_fn = lambda p: loss_fn(p, x, y)
    _, state = opt.update(jax.grad(value_fn)(params), opt.init(params), params, value_fn=value_fn)
    w1, w2, w3 = (np.asarray(params[k], np.float64) for k in ("w1", "w2", "w3"))
    xs = np.asarray(x, np.float64)
    acts = [xs, xs @ w1, xs @ w1 @ w2]
    # Output Fisher of ½‖f − y‖² is I: G_l = (1/N) Σ_n J_l,nᵀ J_l,n with J_l = ∂f/∂s_l.
    jac_after = [w2 @ w3, w3, np.eye(2)]  # ∂f/∂s_l (linear network: the same for every example)
    for i, name in enumerate(("w1", "w2", "w3")):
        a_ref = acts[i].T @ acts[i] / 16
        g_ref = jac_after[i] @ jac_after[i].T
        f_in, f_out = state.factors[i]
        d_in, d_out = a_ref.shape[0], g_ref.shape[0]
        np.testing.assert_allclose(f_in[:d_in, :d_in], a_ref, rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(
            f_out[:d_out, :d_out], g_ref, rtol=1e-9, atol=1e-12, err_msg=name
        )


def _equinox_mlp_loss():
    model = eqx.nn.MLP(4, 3, 8, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)

    def loss_fn(p, x, y):
        logits = jax.vmap(eqx.combine(p, static))(x)
        logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn


def test_discovery_plain_jax_and_equinox(capsys):
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    y = jnp.arange(10) % 3

    def plain(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        logits = jaxopt2.tag_loss("softmax_cross_entropy", h @ p["w2"], y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1e-3 * jnp.sum(
            p["w1"] ** 2
        )

    p = {"w1": jnp.ones((4, 6)), "b1": jnp.zeros(6), "w2": jnp.ones((6, 3)), "scale": jnp.ones(())}
    disc = kfac_layers(plain, p, x, y)
    got = {(layer.name, disc.leaf_names[layer.bias] if layer.bias is not None else None)
           for layer in disc.layers}  # fmt: skip
    assert got == {("['w1']", "['b1']"), ("['w2']", None)}
    out = capsys.readouterr().out
    assert "diagonal (no layer): ['scale']" in out
    assert "difference" in out and "L2 penalty" in out  # the penalty term is reported

    params, loss_fn = _equinox_mlp_loss()
    disc = kfac_layers(loss_fn, params, x, y)
    assert len(disc.layers) == 3
    assert [(layer.in_features, layer.out_features) for layer in disc.layers] == [
        (4, 8),
        (8, 8),
        (8, 3),
    ]
    assert all(layer.bias is not None and layer.in_axis == 1 for layer in disc.layers)


def test_kfac_trains_an_equinox_mlp_inside_jit():
    params, loss_fn = _equinox_mlp_loss()
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)
    opt = kfac()
    traces = []

    @jax.jit
    def step(p, s, k):
        traces.append(1)
        loss, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, x, y, key=k)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    first = None
    for i in range(60):
        params, state, loss = step(params, state, jax.random.PRNGKey(i))
        first = float(loss) if first is None else first
    assert len(traces) == 1
    assert float(loss_fn(params, x, y)) < 0.3 * first
    assert int(state.num_failed_inverses) == 0 and int(state.num_nonfinite) == 0


def test_mismatched_loss_kind_is_reported(capsys):
    x, y = _data()

    def summed(p, x, y):  # a sum over the batch where the tag says mean
        out = jaxopt2.tag_loss("squared_error", x @ p["w"], y)
        return 0.5 * jnp.sum((out - y) ** 2)

    kfac_layers(summed, {"w": jnp.ones((4, 3))}, x, y)
    out = capsys.readouterr().out
    assert "a wrong loss name or a sum instead of a mean" in out


def test_bad_input_is_a_clear_error():
    x, y = _data()
    no_tag = lambda p: 0.5 * jnp.mean((x @ p["w"] - y) ** 2)
    opt = kfac()
    p = {"w": jnp.zeros((4, 3))}
    with pytest.raises(ValueError, match="no tagged loss in value_fn"):
        opt.update(p, opt.init(p), p, value_fn=no_tag)
    tagged_no_layer = lambda p: jnp.mean(jaxopt2.tag_loss("squared_error", p["w"] * x[:, :1], y))
    p2 = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="kfac found no layer in value_fn"):
        opt.update(p2, opt.init(p2), p2, value_fn=tagged_no_layer)
    tied = _mse_loss(lambda p, x: (x @ p["w"]) @ p["w"].T @ p["w"])
    p3 = {"w": jnp.ones((4, 4))}
    x4 = jnp.ones((8, 4))
    with pytest.raises(ValueError, match=r"parameter \['w'\] is the weight of 3 products \(tied weights"):
        opt.update(p3, opt.init(p3), p3, value_fn=lambda p: tied(p, x4, jnp.ones((8, 4))))
    with pytest.raises(ValueError, match="fisher must be one of"):
        kfac(fisher="true")


def test_nonfinite_statistics_keep_the_last_good_factors():
    x, y = _data()
    loss_fn = _mse_loss(lambda p, x: x @ p["w"])
    opt = kfac(1.0)
    p = {"w": jnp.ones((4, 3))}
    value_fn = lambda p: loss_fn(p, x, y)
    _, s1 = opt.update(jax.grad(value_fn)(p), opt.init(p), p, value_fn=value_fn)
    bad_x = x.at[0, 0].set(jnp.nan)
    bad_fn = lambda p: loss_fn(p, bad_x, y)
    _, s2 = opt.update(jax.grad(bad_fn)(p), s1, p, value_fn=bad_fn)
    inner1, inner2 = s1[0], s2[0]
    for a, b in zip(jax.tree.leaves(inner1.factors), jax.tree.leaves(inner2.factors), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(inner2.num_nonfinite) == 1


def test_split_loss_gives_the_gauss_newton_product():
    x, y = _data(seed=3)
    k = jax.random.split(jax.random.PRNGKey(4), 2)
    p = {"w1": jax.random.normal(k[0], (4, 5)), "w2": jax.random.normal(k[1], (5, 3))}
    loss_fn = _mse_loss(lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"])
    split = cv.split_loss(lambda q: loss_fn(q, x, y), p)
    v = jax.tree.map(jnp.ones_like, p)
    got = cv.fisher_vp(split.model_fn, p, v, loss=split.loss, kind="exact")
    model = lambda q: jnp.tanh(x @ q["w1"]) @ q["w2"]
    want = cv.ggn_vp(model, lambda o: cv.output_loss("squared_error", o, y), p, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), got, want)
    assert float(split.value) == pytest.approx(float(loss_fn(p, x, y)))


_HANG_CHECK = textwrap.dedent(
    """
    import jax  # imported first, no XLA_FLAGS: K-FAC must be safe by itself
    import jax.numpy as jnp
    import optax
    import jaxopt2
    from jaxopt2.optimizers.kfac import kfac

    sizes = [64, 256, 128, 32, 128, 256, 64]  # factors of many sizes: several inverse batches
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    params = {f"w{i}": 0.3 * jax.random.normal(k, (a, b))
              for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}

    def loss_fn(p, x):
        h = x
        for i in range(len(sizes) - 1):
            h = h @ p[f"w{i}"]
            h = jnp.tanh(h) if i < len(sizes) - 2 else h
        out = jaxopt2.tag_loss("squared_error", h, x)
        return 0.5 * jnp.mean(jnp.sum((out - x) ** 2, axis=-1))

    opt = kfac(invert_every=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 64))

    @jax.jit
    def step(p, s, k):
        loss, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, x, key=k)
        return optax.apply_updates(p, u), s, loss

    state = opt.init(params)
    for i in range(20):
        params, state, loss = step(params, state, jax.random.PRNGKey(i))
    jax.block_until_ready(loss)
    print("finished", int(state.num_failed_inverses))
    """
)


def test_jitted_inverse_refresh_does_not_hang_without_the_xla_flag():
    for out in run_without_xla_flag(_HANG_CHECK, "a jitted K-FAC inverse refresh"):
        assert "finished 0" in out


def test_sequence_inputs_sum_statistics_over_time():
    """Dense layer on [batch, time, features]: A averages over all batch×time rows, G sums the
    per-position terms over time and averages over the batch (K-FAC "expand")."""
    b, t, f, c = 6, 5, 3, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, f))
    y = jax.random.normal(jax.random.PRNGKey(1), (b, t, c))

    def loss_fn(p, x, y):
        out = jaxopt2.tag_loss("squared_error", x @ p["w"], y)
        return 0.5 * jnp.sum((out - y) ** 2) / b  # mean over the batch, sum over time, outputs

    p = {"w": jnp.ones((f, c))}
    opt = scale_by_kfac(learning_rate=1.0, fisher="exact", stats_decay=0.0, stats_dtype=jnp.float64)
    value_fn = lambda q: loss_fn(q, x, y)
    _, state = opt.update(jax.grad(value_fn)(p), opt.init(p), p, value_fn=value_fn)
    rows = np.asarray(x, np.float64).reshape(-1, f)
    f_in, f_out = state.factors[0]
    np.testing.assert_allclose(f_in[:f, :f], rows.T @ rows / (b * t), rtol=1e-10)
    np.testing.assert_allclose(f_out[:c, :c], t * np.eye(c), rtol=1e-10)
    # A ⊗ G reproduces the exact GGN of this linear model: (Σ_rows a aᵀ / b) ⊗ I.
    np.testing.assert_allclose(
        np.kron(f_in[:f, :f], f_out[:c, :c]), np.kron(rows.T @ rows / b, np.eye(c)), rtol=1e-10
    )


def test_discovery_flax_nnx_and_inside_remat():
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def nnx_loss(p, x, y):
        logits = jaxopt2.tag_loss("softmax_cross_entropy", nnx.merge(graphdef, p)(x), y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    x, y = jnp.ones((5, 4)), jnp.arange(5) % 3
    disc = kfac_layers(nnx_loss, params, x, y)
    assert [(layer.in_features, layer.out_features, layer.in_axis) for layer in disc.layers] == [
        (4, 8, 0),
        (8, 3, 0),
    ]
    assert all(layer.bias is not None for layer in disc.layers)

    def remat_loss(p, x, y):  # the first layer lives inside jax.checkpoint
        h = jax.checkpoint(lambda w, b, h: jnp.tanh(h @ w + b))(p["w1"], p["b1"], x)
        out = jaxopt2.tag_loss("squared_error", h @ p["w2"], y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

    p = {"w1": jnp.ones((4, 6)), "b1": jnp.zeros(6), "w2": jnp.ones((6, 2))}
    disc = kfac_layers(remat_loss, p, jnp.ones((8, 4)), jnp.ones((8, 2)))
    assert {(layer.name, layer.bias is not None) for layer in disc.layers} == {
        ("['w1']", True),
        ("['w2']", False),
    }
