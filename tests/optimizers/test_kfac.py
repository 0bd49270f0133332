"""K-FAC: layer discovery, factors against dense references, the loss tag, bad input."""

import itertools
import textwrap

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2 import curvature as cv
from jaxopt2.optimizers.kfac import kfac, kfac_layers, leafwise, scale_by_kfac
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
    f_in, f_out = leafwise(state, params).factors[1]  # leaves sorted: b, w
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
        f_in, f_out = leafwise(state, params).factors[i]
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
    assert "= the 32 rows: a sum instead of a mean" in out and "compute that value" in out


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
    msg = r"parameter \['w'\] is the weight of 3 products \(tied weights"
    with pytest.raises(ValueError, match=msg):
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
    chex.assert_trees_all_equal(inner1.factors, inner2.factors)
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

    x = jax.random.normal(jax.random.PRNGKey(1), (128, 64))
    failed = 0
    for opt in (kfac(invert_every=1), kfac(invert_every=1, ekfac=True)):  # inverses, eigenbases

        @jax.jit
        def step(p, s, k):
            loss, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, x, key=k)
            return optax.apply_updates(p, u), s, loss

        p, state = params, opt.init(params)
        for i in range(20):
            p, state, loss = step(p, state, jax.random.PRNGKey(i))
        jax.block_until_ready(loss)
        failed += int(state.num_failed_inverses)
    print("finished", failed)
    """
)


def test_jitted_inverse_refresh_does_not_hang_without_the_xla_flag():
    # K-FAC's inverses and EKFAC's eigenbases, one after the other in each child process
    for out in run_without_xla_flag(_HANG_CHECK, "a jitted K-FAC or EKFAC refresh"):
        assert "finished 0" in out


def test_sequence_outputs_count_every_position_as_a_row():
    """Dense layer on [batch, time, features] with the loss a mean over every position: A and G
    average over all batch×time rows, as for the flattened [batch·time, features] rows."""
    b, t, f, c = 6, 5, 3, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (b, t, f))
    y = jax.random.normal(jax.random.PRNGKey(1), (b, t, c))

    def loss_fn(p, x, y):
        out = jaxopt2.tag_loss("squared_error", x @ p["w"], y)
        return 0.5 * jnp.sum((out - y) ** 2) / (b * t)  # mean over batch and time, sum outputs

    p = {"w": jnp.ones((f, c))}
    opt = scale_by_kfac(learning_rate=1.0, fisher="exact", stats_decay=0.0, stats_dtype=jnp.float64)
    value_fn = lambda q: loss_fn(q, x, y)
    _, state = opt.update(jax.grad(value_fn)(p), opt.init(p), p, value_fn=value_fn)
    rows = np.asarray(x, np.float64).reshape(-1, f)
    f_in, f_out = leafwise(state, p).factors[0]
    np.testing.assert_allclose(f_in[:f, :f], rows.T @ rows / (b * t), rtol=1e-10)
    np.testing.assert_allclose(f_out[:c, :c], np.eye(c), rtol=1e-10)
    # A ⊗ G reproduces the exact GGN of this linear model: (Σ_rows a aᵀ / (b t)) ⊗ I.
    np.testing.assert_allclose(
        np.kron(f_in[:f, :f], f_out[:c, :c]),
        np.kron(rows.T @ rows / (b * t), np.eye(c)),
        rtol=1e-10,
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

    # The product inside a jitted function, its bias added outside: followed out of the call,
    # the bias is found, and the factors are those of the same model written inline.
    def jit_loss(p, x, y, inline):
        s = x @ p["w1"] if inline else jax.jit(jnp.matmul)(x, p["w1"])
        out = jaxopt2.tag_loss("squared_error", jnp.tanh(s + p["b1"]) @ p["w2"], y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

    x, y = jax.random.normal(jax.random.PRNGKey(0), (8, 4)), jnp.ones((8, 2))
    p = {**p, "w1": jax.random.normal(jax.random.PRNGKey(1), (4, 6))}
    disc = kfac_layers(lambda q, x, y: jit_loss(q, x, y, False), p, x, y)
    assert {(layer.name, layer.bias is not None) for layer in disc.layers} == {
        ("['w1']", True),
        ("['w2']", False),
    }
    f_jit = _factors_of(_exact_opt(), p, lambda q: jit_loss(q, x, y, False))
    f_inline = _factors_of(_exact_opt(), p, lambda q: jit_loss(q, x, y, True))
    chex.assert_trees_all_close(f_jit, f_inline, rtol=1e-12, atol=1e-14)


def _factors_of(opt, params, value_fn):
    """One exact-Fisher K-FAC update from a fresh state; the new state's factors."""
    _, state = opt.update(jax.grad(value_fn)(params), opt.init(params), params, value_fn=value_fn)
    return leafwise(state, params).factors


def _exact_opt():
    return scale_by_kfac(
        learning_rate=1.0, fisher="exact", stats_decay=0.0, stats_dtype=jnp.float64
    )


def test_explicit_dense_tags_give_the_discovered_layers_and_factors(capsys):
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 4))
    y = jnp.arange(10) % 3
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    p = {
        "w1": jax.random.normal(k1, (4, 6)),
        "b1": jnp.zeros(6),
        "w2": jax.random.normal(k2, (3, 6)),
    }  # fmt: skip  (w2 stored [out, in])

    def loss(p, x, y, tag):
        h = x @ p["w1"] + p["b1"]
        h = jaxopt2.tag_dense(h, x, p["w1"], p["b1"]) if tag else h
        z = jnp.tanh(h)
        logits = z @ p["w2"].T
        logits = jaxopt2.tag_dense(logits, z, p["w2"]) if tag else logits
        logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    found = kfac_layers(lambda p, x, y: loss(p, x, y, False), p, x, y)
    tagged = kfac_layers(lambda p, x, y: loss(p, x, y, True), p, x, y)
    key = lambda d: [(x.name, x.bias, x.weight_perm, x.in_features, x.out_features)
                     for x in d.layers]  # fmt: skip
    assert key(found) == key(tagged)
    assert all(layer.tagged for layer in tagged.layers)
    assert "(tagged)" in capsys.readouterr().out
    f_found = _factors_of(_exact_opt(), p, lambda q: loss(q, x, y, False))
    f_tagged = _factors_of(_exact_opt(), p, lambda q: loss(q, x, y, True))
    chex.assert_trees_all_close(f_found, f_tagged, rtol=1e-12, atol=1e-14)


def test_tied_weight_tagged_at_each_use_gathers_both_uses():
    """A weight applied twice (a two-step linear recurrence h2 = (x W) W), tagged at each use:
    A and G are the naive sums over the two uses' rows (A: mean over all rows; G: summed
    over uses, mean over examples)."""
    n, d = 12, 3
    x, y = _data(n=n, d_in=d, d_out=d, seed=3)
    w = jax.random.normal(jax.random.PRNGKey(4), (d, d)) / 2

    def loss(p, x, y):
        h1 = jaxopt2.tag_dense(x @ p["w"], x, p["w"], layout="in_out")
        h2 = jaxopt2.tag_dense(h1 @ p["w"], h1, p["w"], layout="in_out")
        out = jaxopt2.tag_loss("squared_error", h2, y)
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, -1))

    untagged = _mse_loss(lambda p, x: (x @ p["w"]) @ p["w"])
    with pytest.raises(ValueError, match=r"parameter \['w'\] is the weight of 2 products"):
        kfac_layers(untagged, {"w": w}, x, y)
    f_in, f_out = _factors_of(_exact_opt(), {"w": w}, lambda p: loss(p, x, y))[0]
    xs, ws = np.asarray(x), np.asarray(w)
    h1 = xs @ ws
    a_ref = (xs.T @ xs + h1.T @ h1) / (2 * n)
    # ∂f/∂s for the first use's output s1 = x W: f = s1 W, so J = Wᵀ; for the second, I.
    g_ref = ws.T.T @ ws.T + np.eye(d)  # Σ_uses J Jᵀ (the output Fisher of ½‖·‖² is I)
    np.testing.assert_allclose(f_in[:d, :d], a_ref, rtol=1e-10)
    np.testing.assert_allclose(f_out[:d, :d], g_ref, rtol=1e-10)


def test_tag_shape_errors_name_the_problem():
    x, w = jnp.ones((5, 4)), jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"tag_dense: a weight of shape \(4, 3\) does not map"):
        jaxopt2.tag_dense(jnp.ones((5, 2)), x, w)
    with pytest.raises(ValueError, match=r"tag_dense: the weight .* is square"):
        jaxopt2.tag_dense(jnp.ones((5, 4)), x, jnp.ones((4, 4)))
    with pytest.raises(ValueError, match=r"tag_conv2d: convolving inputs \(2, 3, 8, 8\)"):
        jaxopt2.tag_conv2d(jnp.ones((2, 5, 8, 8)), jnp.ones((2, 3, 8, 8)), jnp.ones((5, 3, 3, 3)))
    computed = lambda p: jaxopt2.tag_loss(
        "squared_error", jaxopt2.tag_dense(x @ (2 * p["w"]), x, 2 * p["w"]), jnp.ones((5, 3))
    ).mean()
    with pytest.raises(ValueError, match="tag_dense: its weight is not a parameter"):
        kfac_layers(lambda p: computed(p), {"w": w})


def _naive_conv_factors(x, kernel_oihw, out_grads, pad):
    """KFC by loops: A = mean over (example, position) of patch patchᵀ (patch: channel-major
    [c, kh, kw] then 1); G = Σ_positions g gᵀ averaged over examples."""
    n, _, h, wd = x.shape
    kh, kw = kernel_oihw.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows, grows = [], []
    for i in range(n):
        for r in range(h):
            for s in range(wd):
                rows.append(np.concatenate([xp[i, :, r : r + kh, s : s + kw].reshape(-1), [1.0]]))
                grows.append(out_grads[i, :, r, s])
    rows, grows = np.array(rows), np.array(grows)
    return rows.T @ rows / len(rows), grows.T @ grows / n


def test_conv_layers_equinox_flax_and_tagged_match_naive_patches():
    """An equinox Conv2d (OIHW, bias [O,1,1], vmapped) and a flax.nnx Conv (NHWC, HWIO) are
    found; their factors equal the naive patch sums; tag_conv2d gives the same factors."""
    from flax import nnx

    n, c, o, side = 3, 2, 4, 5
    x = jax.random.normal(jax.random.PRNGKey(0), (n, c, side, side))
    y = jax.random.normal(jax.random.PRNGKey(1), (n, o * side * side))
    conv = eqx.nn.Conv2d(c, o, 3, padding=1, key=jax.random.PRNGKey(2), dtype=jnp.float64)
    params, static = eqx.partition(conv, eqx.is_array)

    def eqx_out(p, x):
        return jax.vmap(eqx.combine(p, static))(x).reshape(x.shape[0], -1)

    eqx_loss = _mse_loss(eqx_out)
    disc = kfac_layers(eqx_loss, params, x, y)
    (layer,) = disc.layers
    assert (layer.kind, layer.in_features, layer.out_features) == ("conv2d", c * 9, o)
    assert disc.leaf_names[layer.bias] == ".bias"
    value_fn = lambda p: eqx_loss(p, x, y)
    opt = scale_by_kfac(learning_rate=1.0, fisher="empirical", stats_decay=0.0,
                        stats_dtype=jnp.float64)  # fmt: skip
    _, state = opt.update(jax.grad(value_fn)(params), opt.init(params), params, value_fn=value_fn)
    f_a, f_g = leafwise(state, params).factors[layer.weight]
    # Output gradients of the per-example loss (empirical Fisher: true targets): f − y.
    out = np.asarray(eqx_out(params, x))
    g = (out - np.asarray(y)).reshape(n, o, side, side)
    a_ref, g_ref = _naive_conv_factors(np.asarray(x), np.asarray(params.weight), g, 1)
    np.testing.assert_allclose(f_a[: c * 9 + 1, : c * 9 + 1], a_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(f_g[:o, :o], g_ref, rtol=1e-10, atol=1e-12)

    # The same convolution tagged explicitly (NCHW/OIHW, SAME padding): identical factors.
    def tagged_out(p, x):
        s = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME")
        s = s + p["b"][:, None, None]
        s = jaxopt2.tag_conv2d(s, x, p["k"], p["b"], padding="SAME")
        return s.reshape(x.shape[0], -1)

    tp = {"b": params.bias.reshape(-1), "k": params.weight}
    tagged_loss = _mse_loss(tagged_out)
    (tagged_layer,) = kfac_layers(tagged_loss, tp, x, y).layers
    assert tagged_layer.tagged
    tv = lambda p: tagged_loss(p, x, y)
    _, ts = opt.update(jax.grad(tv)(tp), opt.init(tp), tp, value_fn=tv)
    # Factors sit at the weight's leaf: equinox orders (weight, bias), the dict (b, k).
    chex.assert_trees_all_close(
        leafwise(state, params).factors[layer.weight],
        leafwise(ts, tp).factors[tagged_layer.weight],
        rtol=1e-10,
        atol=1e-12,
    )

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(c, o, (3, 3), padding="SAME", rngs=rngs)

        def __call__(self, x):  # x: NHWC
            return self.conv(x).reshape(x.shape[0], -1)

    graphdef, nparams = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    nnx_loss = _mse_loss(lambda p, x: nnx.merge(graphdef, p)(x))
    (nl,) = kfac_layers(nnx_loss, nparams, jnp.transpose(x, (0, 2, 3, 1)), y).layers
    assert (nl.kind, nl.in_features, nl.out_features, nl.bias is not None) == (
        "conv2d", c * 9, o, True,
    )  # fmt: skip


def test_norm_constraint_caps_the_fisher_norm_of_the_step():
    x, y = _data()
    loss_fn = _mse_loss(lambda p, x: x @ p["w"])
    p = {"w": jnp.ones((4, 3))}
    value_fn = lambda q: loss_fn(q, x, y)
    g = jax.grad(value_fn)(p)
    lr = 0.5

    def step(**kw):
        opt = kfac(lr, fisher="exact", **kw)
        u, _ = opt.update(g, opt.init(p), p, value_fn=value_fn)
        return u["w"]

    free = step()
    direction = -free / lr  # the preconditioned gradient Δ
    sq = lr**2 * abs(float(jnp.sum(direction * g["w"])))
    capped = step(norm_constraint=sq / 4)  # binding: the step halves
    np.testing.assert_allclose(capped, free / 2, rtol=1e-5)
    np.testing.assert_allclose(step(norm_constraint=4 * sq), free, rtol=1e-6)  # not binding
    with pytest.raises(ValueError, match="norm_constraint needs a learning rate"):
        kfac(norm_constraint=1e-3)


def _ekfac_reference(loss_per_example, params, x, y, state, leaf_names):
    """Naive EKFAC scaling and direction from per-example gradients (jax.grad per example),
    eigenbases by numpy from the state's factors."""
    out = {}
    grads_n = jax.vmap(lambda xn, yn: jax.grad(loss_per_example)(params, xn[None], yn[None]))(x, y)
    for w_name, b_name, leaf in leaf_names:
        gw = np.asarray(grads_n[w_name], np.float64)  # [n, in, out]
        if b_name is not None:
            gw = np.concatenate([gw, np.asarray(grads_n[b_name], np.float64)[:, None, :]], 1)
        ka, kg = gw.shape[1:]
        f_a, f_g = (np.asarray(f, np.float64) for f in leafwise(state, params).factors[leaf])
        qa = np.linalg.eigh(f_a[:ka, :ka])[1]
        qg = np.linalg.eigh(f_g[:kg, :kg])[1]
        out[w_name] = (qa, qg, np.mean((qa.T @ gw @ qg) ** 2, axis=0))
    return out


@pytest.mark.parametrize("sequence", [False, True], ids=["rows", "sequence"])
def test_ekfac_scaling_and_direction_match_per_example_gradients(sequence):
    """Empirical Fisher, no EMA: the EKFAC scaling equals E_n[(Q_Aᵀ ∇_n Q_G)²] from per-example
    gradients (jax.grad per example; per position for sequences, whose loss is the mean over
    every position: each is a row of the tag), and the direction is
    Q_A ((Q_Aᵀ ∇ Q_G) / (s + λ)) Q_Gᵀ."""
    n, d, h, k, t = 12, 3, 5, 2, 4
    shape_x = (n, t, d) if sequence else (n, d)
    x = jax.random.normal(jax.random.PRNGKey(0), shape_x)
    y = jax.random.normal(jax.random.PRNGKey(1), (*shape_x[:-1], k))
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    params = {"w1": jax.random.normal(k1, (d, h)), "b1": 0.1 * jnp.ones(h),
              "w2": jax.random.normal(k2, (h, k)) / 2}  # fmt: skip

    def per_example_sum(p, x, y):  # Σ over examples (and time) of ½‖f − y‖²
        out = jaxopt2.tag_loss("squared_error", jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], y)
        return 0.5 * jnp.sum((out - y) ** 2)

    loss = lambda p, x, y: per_example_sum(p, x, y) / np.prod(x.shape[:-1])
    lam = 0.1
    opt = scale_by_kfac(learning_rate=1.0, fisher="empirical", stats_decay=0.0, damping=lam,
                        ekfac=True, stats_dtype=jnp.float64)  # fmt: skip
    value_fn = lambda p: loss(p, x, y)
    grads = jax.grad(value_fn)(params)
    direction, state = opt.update(grads, opt.init(params), params, value_fn=value_fn)
    leaves = {name: i for i, name in enumerate(sorted(params))}  # dict leaves are key-sorted
    rows = lambda z: z.reshape(-1, z.shape[-1])
    ref = _ekfac_reference(
        per_example_sum, params, rows(x), rows(y), state,
        [("w1", "b1", leaves["w1"]), ("w2", None, leaves["w2"])],
    )  # fmt: skip
    for w_name, b_name in (("w1", "b1"), ("w2", None)):
        qa, qg, s_ref = ref[w_name]
        ka, kg = s_ref.shape
        np.testing.assert_allclose(
            leafwise(state, params).scaling[leaves[w_name]][:ka, :kg],
            s_ref,
            rtol=1e-8,
            atol=1e-12,
            err_msg=w_name,
        )
        v = np.asarray(grads[w_name], np.float64)
        if b_name is not None:
            v = np.concatenate([v, np.asarray(grads[b_name])[None]], 0)
        pre = qa @ ((qa.T @ v @ qg) / (s_ref + lam)) @ qg.T
        np.testing.assert_allclose(direction[w_name], pre[: v.shape[0] - (b_name is not None)],
                                   rtol=1e-7, atol=1e-10, err_msg=w_name)  # fmt: skip
        if b_name is not None:
            np.testing.assert_allclose(direction[b_name], pre[-1], rtol=1e-7, atol=1e-10)


def test_ekfac_converges_on_the_tagged_mlp_regression():
    """kfac(ekfac=True), from the registry, meets the zoo criterion on the tagged MLP
    regression in the steps K-FAC's own row uses."""
    from tests.optimizers import cases, zoo

    problem = zoo.mlp_regression()
    opt = jaxopt2.registry.get("kfac").factory(ekfac=True)
    f_final, _, _, state = cases.run_scan(
        opt, problem, cases.CASES["kfac"].zoo["mlp_regression"].steps
    )
    assert problem.converged(float(f_final)), problem.rel_gap(float(f_final))
    assert int(state.num_failed_inverses) == 0 and int(state.num_nonfinite) == 0


def test_layers_inside_lax_scan_gather_every_iteration(capsys):
    """An RNN cell inside lax.scan (weights closed over by the body) is found, and its factors
    equal those of the same network unrolled in Python with each use tagged (tied weights);
    (a weight sliced from a stacked parameter, a scan over layers: the next test)."""
    n, t, d, h, k = 6, 4, 3, 5, 2
    x = jax.random.normal(jax.random.PRNGKey(0), (n, t, d))
    y = jax.random.normal(jax.random.PRNGKey(1), (n, k))
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    p = {"w": jax.random.normal(ks[0], (d, h)) / 2, "u": jax.random.normal(ks[1], (h, h)) / 3,
         "b": 0.1 * jnp.ones(h), "v": jax.random.normal(ks[2], (h, k)) / 2}  # fmt: skip

    def scanned(p, x):
        def cell(hs, xt):
            hs = jnp.tanh(xt @ p["w"] + hs @ p["u"] + p["b"])
            return hs, None

        hs, _ = jax.lax.scan(cell, jnp.zeros((x.shape[0], h)), jnp.swapaxes(x, 0, 1))
        return hs @ p["v"]

    def unrolled(p, x):
        hs = jnp.zeros((x.shape[0], h))
        for i in range(t):
            xw = jaxopt2.tag_dense(x[:, i] @ p["w"], x[:, i], p["w"])
            hu = jaxopt2.tag_dense(hs @ p["u"], hs, p["u"], layout="in_out")
            hs = jnp.tanh(xw + hu + p["b"])
        return hs @ p["v"]

    scan_loss, loop_loss = _mse_loss(scanned), _mse_loss(unrolled)
    disc = kfac_layers(scan_loss, p, x, y)
    assert {(x.name, x.calls) for x in disc.layers} == {("['w']", t), ("['u']", t), ("['v']", 1)}
    assert "4 scan iterations" in capsys.readouterr().out
    f_scan = _factors_of(_exact_opt(), p, lambda q: scan_loss(q, x, y))
    f_loop = _factors_of(_exact_opt(), p, lambda q: loop_loss(q, x, y))
    chex.assert_trees_all_close(f_scan, f_loop, rtol=1e-10, atol=1e-13)


def _two_kfac_steps(loss_fn, params, x, y, ekfac):
    """Two exact-Fisher K-FAC steps with a fixed learning rate (EMA and refresh each step)."""
    opt = scale_by_kfac(learning_rate=1.0, fisher="exact", stats_decay=0.5, invert_every=1,
                        ekfac=ekfac, stats_dtype=jnp.float64)  # fmt: skip
    value_fn = lambda q: loss_fn(q, x, y)
    state = opt.init(params)
    for _ in range(2):
        d, state = opt.update(jax.grad(value_fn)(params), state, params, value_fn=value_fn)
        params = jax.tree.map(lambda p, u: p - 0.1 * u, params, d)
    return d, state


@pytest.mark.parametrize(
    "reverse,timed,ekfac",
    [(False, False, False), (True, True, False), (True, True, True)],
    ids=["forward", "reversed-with-time-loop", "ekfac"],
)
def test_scan_over_layers_gives_each_slice_its_own_factors(reverse, timed, ekfac, capsys):
    """Stacked weights ``[L, d, d]`` and biases ``[L, d]`` applied by lax.scan (the
    scan-over-layers pattern; forwards, backwards, and with a time loop inside each layer) are
    L layers: slice l's factors, inverses (or eigenbases and scaling) and direction equal those
    of layer l of the same network unrolled with separate leaves."""
    n, t, d, k, depth = 8, 2, 3, 2, 3
    x = jax.random.normal(jax.random.PRNGKey(0), (n, t, d))
    y = jax.random.normal(jax.random.PRNGKey(1), (n, k))
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    p = {"ws": jax.random.normal(ks[0], (depth, d, d)) / 2,
         "bs": 0.1 * jax.random.normal(ks[1], (depth, d)),
         "v": jax.random.normal(ks[2], (d, k))}  # fmt: skip
    q = {"v": p["v"], **{f"w{i}": p["ws"][i] for i in range(depth)},
         **{f"b{i}": p["bs"][i] for i in range(depth)}}  # fmt: skip

    def layer(h, w, b, timed):
        if not timed:
            return jnp.tanh(h @ w + b)
        # a loop over time inside the layer: the slice is the inner scan's loop invariant
        step = lambda c, ht: (c, jnp.tanh(ht @ w + b))
        return jnp.swapaxes(jax.lax.scan(step, 0.0, jnp.swapaxes(h, 0, 1))[1], 0, 1)

    def head(h, v):
        return jnp.mean(h, axis=1) @ v

    def scanned(p, x):
        body = lambda h, wb: (layer(h, *wb, timed), None)
        h, _ = jax.lax.scan(body, x, (p["ws"], p["bs"]), reverse=reverse)
        return head(h, p["v"])

    def unrolled(q, x):
        h = x
        for i in range(depth - 1, -1, -1) if reverse else range(depth):
            h = layer(h, q[f"w{i}"], q[f"b{i}"], timed)
        return head(h, q["v"])

    disc = kfac_layers(_mse_loss(scanned), p, x, y)
    stacked = {ly.name: ly for ly in disc.layers}["['ws']"]
    assert stacked.stack == (depth, t if timed else 1, reverse)
    assert disc.leaf_names[stacked.bias] == "['bs']"
    assert f"stacked: {depth} layers of a scan" in capsys.readouterr().out

    d_s, s_s = _two_kfac_steps(_mse_loss(scanned), p, x, y, ekfac)
    d_u, s_u = _two_kfac_steps(_mse_loss(unrolled), q, x, y, ekfac)
    s_s, s_u = leafwise(s_s, p), leafwise(s_u, q)
    names_p = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(p)]
    names_q = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(q)]
    ip, iq = names_p.index("['ws']"), {nm: j for j, nm in enumerate(names_q)}
    for i in range(depth):
        j = iq[f"['w{i}']"]
        for axis in (0, 1):
            for field in ("factors", "inverses"):
                np.testing.assert_allclose(
                    getattr(s_s, field)[ip][axis][i], getattr(s_u, field)[j][axis],
                    rtol=1e-9, atol=1e-12, err_msg=f"{field} slice {i} axis {axis}",
                )  # fmt: skip
        if ekfac:
            np.testing.assert_allclose(s_s.scaling[ip][i], s_u.scaling[j], rtol=1e-9,
                                       atol=1e-12)  # fmt: skip
        np.testing.assert_allclose(d_s["ws"][i], d_u[f"w{i}"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(d_s["bs"][i], d_u[f"b{i}"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d_s["v"], d_u["v"], rtol=1e-9, atol=1e-12)


def test_loss_tag_inside_a_scan_is_refused():
    def loss(p, xs):
        def body(c, x):
            out = jaxopt2.tag_loss("squared_error", x @ p["w"], x[:, :2])
            return c + jnp.sum(out), None

        return jax.lax.scan(body, 0.0, xs)[0]

    with pytest.raises(ValueError, match=r"tag_loss is inside a lax\.scan body"):
        kfac_layers(loss, {"w": jnp.ones((3, 2))}, jnp.ones((4, 5, 3)))


def test_weight_also_used_with_the_data_elsewhere_is_refused_unless_tagged():
    """A tied embedding: the table is gathered with token ids and reused as the output layer.
    Parameter-only uses (an L2 term) are fine."""
    vocab, d, n = 7, 4, 10
    ids = jnp.arange(n) % vocab
    emb = jax.random.normal(jax.random.PRNGKey(0), (vocab, d))

    def loss(p, ids, tag):
        h = jnp.tanh(p["emb"][ids] @ p["w"])
        logits = h @ p["emb"].T
        if tag:
            logits = jaxopt2.tag_dense(logits, h, p["emb"])
        logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, ids)
        l2 = 1e-3 * jnp.sum(p["w"] ** 2)  # parameter-only: allowed
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean() + l2

    p = {"emb": emb, "w": jnp.eye(d)}
    with pytest.raises(ValueError, match=r"parameter \['emb'\] is the weight of a dense layer "
                                         r"and is also used with the data elsewhere"):  # fmt: skip
        kfac_layers(lambda p, ids: loss(p, ids, False), p, ids)
    layers = kfac_layers(lambda p, ids: loss(p, ids, True), p, ids).layers
    assert {(layer.name, layer.tagged) for layer in layers} == {("['emb']", True), ("['w']", False)}


def test_equinox_scan_over_layers_is_found_and_trains(capsys):
    """The equinox idiom: layers built by eqx.filter_vmap, applied by lax.scan over their
    array part. The stacked Linear's weight and bias are one stacked layer; kfac() trains."""
    depth, d, n = 3, 4, 16
    keys = jax.random.split(jax.random.PRNGKey(0), depth + 1)
    stack = eqx.filter_vmap(lambda k: eqx.nn.Linear(d, d, key=k))(keys[:depth])
    model = (stack, eqx.nn.Linear(d, 2, key=keys[-1]))
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(jax.random.PRNGKey(1), (n, d))
    y = jax.random.normal(jax.random.PRNGKey(2), (n, 2))

    def out(p, x):
        stack, head = eqx.combine(p, static)
        dyn, st = eqx.partition(stack, eqx.is_array)
        body = lambda h, layer: (jnp.tanh(jax.vmap(eqx.combine(layer, st))(h)), None)
        h, _ = jax.lax.scan(body, x, dyn)
        return jax.vmap(head)(h)

    loss_fn = _mse_loss(out)
    disc = kfac_layers(loss_fn, params, x, y)
    found = {ly.name: ly for ly in disc.layers}
    assert set(found) == {"[0].weight", "[1].weight"}
    assert found["[0].weight"].stack == (depth, 1, False)
    assert disc.leaf_names[found["[0].weight"].bias] == "[0].bias"
    assert "stacked: 3 layers of a scan" in capsys.readouterr().out

    opt = kfac()
    step = jax.jit(lambda p, s, k: jaxopt2.value_and_update(opt, loss_fn, p, s, x, y, key=k))
    state = opt.init(params)
    first = None
    for i in range(10):
        loss, u, state = step(params, state, jax.random.PRNGKey(i))
        params = optax.apply_updates(params, u)
        first = float(loss) if first is None else first
    assert float(loss_fn(params, x, y)) < 0.5 * first
    assert int(state.num_nonfinite) == 0 and int(state.num_failed_inverses) == 0


def test_statistics_interval_keeps_the_factors_between_updates_in_the_adaptive_mode():
    """``stats_every=3`` in the adaptive mode (its loss value and the tag's weights then come
    from the quadratic model's own forward pass): the factors and the diagonal Fisher move at
    steps 0 and 3 only, the inverses are refreshed from the stored factors, and the loss
    falls; the trajectory's first step equals ``stats_every=1``'s (both update at step 0)."""
    x, y = _data(n=32, d_in=4, d_out=3, seed=5)
    labels = jnp.argmax(y, axis=-1)
    k1, k2 = jax.random.split(jax.random.PRNGKey(6))
    params = {"w1": 0.5 * jax.random.normal(k1, (4, 8)), "w2": 0.5 * jax.random.normal(k2, (8, 3)),
              "scale": jnp.ones(3)}  # fmt: skip

    def loss_fn(p, x, labels):
        logits = (jnp.tanh(x @ p["w1"]) @ p["w2"]) * p["scale"]
        out = jaxopt2.tag_loss("softmax_cross_entropy", logits, labels)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels))

    def run(opt, steps):
        update = lambda p, s, k: jaxopt2.value_and_update(opt, loss_fn, p, s, x, labels, key=k)
        step = jax.jit(update)
        p, s, out = params, opt.init(params), []
        for i in range(steps):
            loss, u, s = step(p, s, jax.random.PRNGKey(i))
            p = optax.apply_updates(p, u)
            out.append((float(loss), s, p))
        assert step._cache_size() == 1
        return out

    every = run(kfac(stats_every=3, invert_every=2), 6)
    snap = lambda s: np.concatenate([np.ravel(a) for a in jax.tree.leaves((s.factors, s.diag))])
    moved = [not np.array_equal(snap(a[1]), snap(b[1])) for a, b in itertools.pairwise(every)]
    assert moved == [False, False, True, False, False]  # after steps 1, 2 | 3 | 4, 5
    assert every[-1][0] < 0.8 * every[0][0]
    first = run(kfac(invert_every=2), 1)
    chex.assert_trees_all_close(every[0][2], first[0][2], rtol=1e-6)
