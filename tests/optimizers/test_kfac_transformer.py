"""K-FAC on transformers: attention projections as layers, memory bounded by max_factor_dim
and the layer plan (factors for the found layers alone)."""

import contextlib
import io

import equinox as eqx
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxopt2
from jaxopt2.optimizers.kfac import kfac, kfac_layers, leafwise, scale_by_kfac

pytestmark = pytest.mark.timeout(240)

B, T, D, H, DH = 2, 3, 4, 2, 3  # batch, time, model width, heads, head width


def _quiet_plan(loss_fn, params, *batch):
    with contextlib.redirect_stdout(io.StringIO()):
        return kfac_layers(loss_fn, params, *batch)


def _sq_loss(out_fn):
    def loss(p, x, y):
        out = jaxopt2.tag_loss("squared_error", out_fn(p, x), y)
        return 0.5 * jnp.sum((out - y) ** 2) / out.shape[0]

    return loss


def _heads_attention(q, k, v, **unused):
    """Softmax attention of ``[B, T, H, Dh]`` heads: ``[B, T, H, Dh]`` (in the inputs' dtype;
    flax's own computes the softmax in float32)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _attend(q, k, v):
    """:func:`_heads_attention`, heads concatenated: ``[B, T, H·Dh]``."""
    out = _heads_attention(q, k, v)
    return out.reshape(*out.shape[:2], -1)


def _direction_and_state(loss, params, x, y, **kw):
    opt = scale_by_kfac(
        learning_rate=1.0, damping=1e-2, fisher="exact", stats_decay=0.0,
        stats_dtype=jnp.float64, **kw,
    )  # fmt: skip

    @jax.jit
    def update(p):
        value_fn = lambda p: loss(p, x, y)
        return opt.update(jax.grad(value_fn)(p), opt.init(p), p, value_fn=value_fn)

    return update(params)


def _layer_sizes(disc):
    return [(la.weight, la.in_features, la.out_features, la.bias) for la in disc.layers]


def test_nnx_multihead_attention_equals_its_tagged_dense_layers():
    """nnx.MultiHeadAttention's rank-3 LinearGeneral kernels ([D, H, Dh] for q/k/v, [H, Dh, D]
    for the output) are found as the dense layers D -> H·Dh and H·Dh -> D with their [H, Dh]
    and [D] biases: the same layers, factors and direction as the same attention written
    with 2-D weights and explicit tag_dense."""
    mha = nnx.MultiHeadAttention(
        H, D, qkv_features=H * DH, decode=False, attention_fn=_heads_attention,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    graph, state = nnx.split(mha)
    state = jax.tree.map(lambda v: v.astype(jnp.float64) + 0.1, state)  # nonzero biases
    found = _sq_loss(lambda s, x: nnx.merge(graph, s)(x))

    def tagged_out(p, x):
        def dense(lin, h):
            w = lin["kernel"]
            return jaxopt2.tag_dense(h @ w + lin["bias"], h, w, lin["bias"])

        heads = [dense(p[n], x).reshape(B, T, H, DH) for n in ("query", "key", "value")]
        return dense(p["out"], _attend(*heads))

    flat = {  # the same weights as matrices, and the same leaf order
        n: {"bias": state[n]["bias"][...].reshape(-1),
            "kernel": state[n]["kernel"][...].reshape(D, H * DH)}
        for n in ("query", "key", "value")
    }  # fmt: skip
    flat["out"] = {"bias": state["out"]["bias"][...],
                   "kernel": state["out"]["kernel"][...].reshape(H * DH, D)}  # fmt: skip
    tagged = _sq_loss(tagged_out)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
    y = jax.random.normal(jax.random.PRNGKey(2), (B, T, D))
    np.testing.assert_allclose(found(state, x, y), tagged(flat, x, y), rtol=1e-12)

    plan_found = _quiet_plan(found, state, x, y)
    plan_tagged = _quiet_plan(tagged, flat, x, y)
    assert [la.tagged for la in plan_tagged.layers] == [True] * 4
    assert not any(la.tagged for la in plan_found.layers)
    assert _layer_sizes(plan_found) == _layer_sizes(plan_tagged)
    assert {la.in_features for la in plan_found.layers} == {D, H * DH}

    d_found, s_found = _direction_and_state(found, state, x, y, layers=plan_found)
    d_tagged, s_tagged = _direction_and_state(tagged, flat, x, y, layers=plan_tagged)
    f_found = leafwise(s_found, state, plan_found).factors
    f_tagged = leafwise(s_tagged, flat, plan_tagged).factors
    for a, b in zip(f_found, f_tagged, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a[0], b[0], rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(a[1], b[1], rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(d_found), jax.tree.leaves(d_tagged), strict=True):
        np.testing.assert_allclose(np.reshape(a, -1), np.reshape(b, -1), rtol=1e-9, atol=1e-12)


def test_equinox_multihead_attention_equals_its_tagged_dense_layers():
    """eqx.nn.MultiheadAttention's projections (vmapped [out, in] Linears, heads split after
    the product) are found with their biases, giving what explicit tags give."""
    mha = eqx.nn.MultiheadAttention(
        H, D, qk_size=DH, vo_size=DH, use_query_bias=True, use_key_bias=True,
        use_value_bias=True, use_output_bias=True, key=jax.random.PRNGKey(0),
    )  # fmt: skip
    params, static = eqx.partition(mha, eqx.is_array)
    params = jax.tree.map(lambda v: v + 0.1, params)
    found = _sq_loss(lambda p, x: jax.vmap(lambda s: eqx.combine(p, static)(s, s, s))(x))

    def tagged_out(p, x):
        def dense(lin, h):
            return jaxopt2.tag_dense(h @ lin.weight.T + lin.bias, h, lin.weight, lin.bias)

        projs = (p.query_proj, p.key_proj, p.value_proj)
        return dense(p.output_proj, _attend(*[dense(lin, x).reshape(B, T, H, DH) for lin in projs]))

    tagged = _sq_loss(tagged_out)
    x = jax.random.normal(jax.random.PRNGKey(1), (B, T, D))
    y = jax.random.normal(jax.random.PRNGKey(2), (B, T, D))
    np.testing.assert_allclose(found(params, x, y), tagged(params, x, y), rtol=1e-12)
    plan_found = _quiet_plan(found, params, x, y)
    plan_tagged = _quiet_plan(tagged, params, x, y)
    assert len(plan_found.layers) == 4 and all(la.bias is not None for la in plan_found.layers)
    assert _layer_sizes(plan_found) == _layer_sizes(plan_tagged)
    d_found, s_found = _direction_and_state(found, params, x, y)
    d_tagged, s_tagged = _direction_and_state(tagged, params, x, y)
    for a, b in zip(
        jax.tree.leaves(leafwise(s_found, params).factors),
        jax.tree.leaves(leafwise(s_tagged, params).factors),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    for a, b in zip(jax.tree.leaves(d_found), jax.tree.leaves(d_tagged), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["split_heads", "merge_heads"])
def test_single_linear_general_layer_direction_is_the_newton_step(kind):
    """One LinearGeneral layer with bias under squared error, exact Fisher: A ⊗ G is the
    Gauss-Newton matrix (the Hessian, the loss being quadratic), so an almost undamped K-FAC
    direction is the Newton step of a dense jax.hessian. Both contraction patterns: one
    input axis to [H, Dh] outputs, and two input axes [H, Dh] (the output projection)."""
    n = 16
    if kind == "split_heads":
        layer = nnx.LinearGeneral(D, (H, DH), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (n, D))
        y = jax.random.normal(jax.random.PRNGKey(2), (n, H, DH))
    else:
        layer = nnx.LinearGeneral((H, DH), D, axis=(-2, -1), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.PRNGKey(1), (n, H, DH))
        y = jax.random.normal(jax.random.PRNGKey(2), (n, D))
    graph, state = nnx.split(layer)
    state = jax.tree.map(lambda v: v.astype(jnp.float64) + 0.1, state)
    # the loss sees the outputs as [n, out] (every output a unit, not H positions)
    loss = _sq_loss(lambda s, x: nnx.merge(graph, s)(x).reshape(n, -1))
    y = y.reshape(n, -1)
    plan = _quiet_plan(loss, state, x, y)
    assert len(plan.layers) == 1 and plan.layers[0].bias is not None
    opt = scale_by_kfac(
        learning_rate=1.0, damping=1e-20, fisher="exact", stats_decay=0.0,
        stats_dtype=jnp.float64, layers=plan,
    )  # fmt: skip
    value_fn = lambda s: loss(s, x, y)
    grads = jax.grad(value_fn)(state)
    direction, _ = opt.update(grads, opt.init(state), state, value_fn=value_fn)
    flat, unravel = ravel_pytree(state)
    hess = jax.jit(jax.hessian(lambda v: value_fn(unravel(v))))(flat)
    newton = np.linalg.solve(hess, ravel_pytree(grads)[0])
    np.testing.assert_allclose(ravel_pytree(direction)[0], newton, rtol=1e-6, atol=1e-9)


def _softmax_dense_reference(x, w, b, grads_w, grads_b, lam, ekfac):
    """numpy float64 K-FAC (or EKFAC) direction of one dense softmax layer with the exact
    Fisher and a diagonal output side: A = E[ā āᵀ], G = diag E[p − p²], factored
    Tikhonov damping with the π correction."""
    n = x.shape[0]
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    logits = x @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    a = xa.T @ xa / n
    g_diag = np.mean(p - p**2, axis=0)
    grad = np.concatenate([grads_w, grads_b[None]], axis=0)
    if not ekfac:
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (g_diag.sum() / g_diag.size))
        left = np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(a.shape[0]))
        return left @ grad / (g_diag + np.sqrt(lam) / pi)
    # EKFAC: eigenbasis of A (the diagonal side's basis is the coordinates); scaling from
    # per-example gradients ā_n g_nᵀ summed over the exact Fisher's columns g_nc, the
    # columns of the output Fisher's square root diag(√p) − p √pᵀ
    _, qa = np.linalg.eigh(a)
    s = np.zeros_like(grad)
    for i in range(n):
        sq = np.diag(np.sqrt(p[i])) - np.outer(p[i], np.sqrt(p[i]))  # columns: B e_c
        for c in range(p.shape[1]):
            s += np.square(np.outer(qa.T @ xa[i], sq[:, c])) / n
    return qa @ ((qa.T @ grad) / (s + lam))


@pytest.mark.parametrize(
    "layout,planned,ekfac",
    [("in_out", False, False), ("out_in", False, False), ("in_out", True, False),
     ("in_out", False, True)],
)  # fmt: skip
def test_big_side_is_diagonal_one_sided_kfac(layout, planned, ekfac):
    """A softmax head whose output side (7) exceeds max_factor_dim (5): its G factor is
    kept diagonal, A full; the direction matches the numpy one-sided reference (a full G,
    which has off-diagonal terms -p pᵀ, gives a different one)."""
    d_in, v, n, lam = 3, 7, 6, 0.1
    kx, kw, kb, ky = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(kx, (n, d_in))
    w = jax.random.normal(kw, (d_in, v))
    params = {"b": 0.3 * jax.random.normal(kb, (v,)), "w": w if layout == "in_out" else w.T}
    labels = jax.random.randint(ky, (n,), 0, v)

    def loss(p, x, labels):
        logits = x @ p["w"] + p["b"] if layout == "in_out" else x @ p["w"].T + p["b"]
        logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    plan = _quiet_plan(loss, params, x, labels) if planned else None
    opt = scale_by_kfac(
        learning_rate=1.0, damping=lam, fisher="exact", stats_decay=0.0, ekfac=ekfac,
        stats_dtype=jnp.float64, max_factor_dim=5, layers=plan,
    )  # fmt: skip
    value_fn = lambda p: loss(p, x, labels)
    grads = jax.grad(value_fn)(params)
    direction, state = opt.update(grads, opt.init(params), params, value_fn=value_fn)
    gw = np.asarray(grads["w"]) if layout == "in_out" else np.asarray(grads["w"]).T
    ref = _softmax_dense_reference(
        np.asarray(x), np.asarray(w), np.asarray(params["b"]), gw, np.asarray(grads["b"]),
        lam, ekfac,
    )  # fmt: skip
    dw = np.asarray(direction["w"]) if layout == "in_out" else np.asarray(direction["w"]).T
    np.testing.assert_allclose(dw, ref[:d_in], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(direction["b"], ref[d_in], rtol=1e-8, atol=1e-12)
    sides = leafwise(state, params, plan, max_factor_dim=5).factors[1]
    assert sorted(s.ndim for s in sides) == [1, 2]  # one diagonal side, one full


V_LM, D_LM, T_LM, MAX_DIM = 512, 16, 4, 64


def _tiny_lm():
    """Embedding [V, D] (indexed), a learned positional table [T, D] (added), a 4x MLP with
    biases, an untied [D, V] head with bias; next-token cross-entropy."""
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    init = lambda k, shape: 0.1 * jax.random.normal(k, shape)
    params = {
        "embed": init(keys[0], (V_LM, D_LM)),
        "pos": init(keys[1], (T_LM, D_LM)),
        "up": {"w": init(keys[2], (D_LM, 4 * D_LM)), "b": jnp.zeros(4 * D_LM)},
        "down": {"w": init(keys[3], (4 * D_LM, D_LM)), "b": jnp.zeros(D_LM)},
        "head": {"w": init(keys[4], (D_LM, V_LM)), "b": jnp.zeros(V_LM)},
    }

    def loss(p, tokens):
        h = p["embed"][tokens[:, :-1]] + p["pos"]
        h = h + (jax.nn.gelu(h @ p["up"]["w"] + p["up"]["b"]) @ p["down"]["w"] + p["down"]["b"])
        logits = jaxopt2.tag_loss("softmax_cross_entropy", h @ p["head"]["w"] + p["head"]["b"],
                                  tokens[:, 1:])  # fmt: skip
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.mean(jnp.sum(ce, axis=-1))

    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T_LM + 1), 0, V_LM)
    return params, loss, tokens


def _side_entries(size):
    return size * size if size <= MAX_DIM + 1 else size  # + 1: the bias's coordinate


def test_lm_state_bytes_within_the_bound_of_the_rule():
    """State bytes (jaxopt2.state_memory) of K-FAC on a tiny LM with a 512 vocabulary are at
    most the rule's bound: the diagonal Fisher and previous step (two parameter copies) plus,
    per layer, factor and inverse of each side: S² if S <= max_factor_dim + 1, else S. With the
    layer plan the embedding and positional tables cost nothing; with the shape rule every
    rank-2 leaf gets its (bounded) slots. Without the bound the factors dwarf both."""
    params, loss, tokens = _tiny_lm()
    plan = _quiet_plan(loss, params, tokens)
    num = sum(x.size for x in jax.tree.leaves(params))
    scalars = 64  # count, damping, key, rho, counters
    layers = [(D_LM + 1, 4 * D_LM), (4 * D_LM + 1, D_LM), (D_LM + 1, V_LM)]  # (in+1, out)
    plan_bound = 8 * (2 * num + 2 * sum(_side_entries(a) + _side_entries(g) for a, g in layers))
    shapes = [x.shape for x in jax.tree.leaves(params)]
    rule_bound = 8 * (
        2 * num
        + 2 * sum(_side_entries(s[0] + 1) + _side_entries(s[1] + 1) for s in shapes if len(s) == 2)
    )
    kw = dict(stats_dtype=jnp.float64, max_factor_dim=MAX_DIM)
    with_plan = jaxopt2.state_memory(kfac(layers=plan, **kw), params)
    with_rule = jaxopt2.state_memory(kfac(**kw), params)
    unbounded = jaxopt2.state_memory(kfac(stats_dtype=jnp.float64, max_factor_dim=10**9), params)
    adam = jaxopt2.state_memory(optax.adam(1e-3), jax.tree.map(lambda x: x.astype(jnp.float64),
                                                                params))  # fmt: skip
    assert plan_bound <= with_plan <= plan_bound + scalars
    assert with_plan < with_rule <= rule_bound + scalars
    assert with_plan <= 2.5 * adam
    assert unbounded > 4 * adam


def test_leaves_that_are_no_layer_cost_no_factor_state_with_a_plan():
    """With the layer plan the embedding table (indexed) and the positional table (added)
    have no factor slots, while the shape rule gives every rank-2 leaf a pair; a step runs
    with either and both precondition the head one-sided."""
    params, loss, tokens = _tiny_lm()
    plan = _quiet_plan(loss, params, tokens)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for layers in (plan, None):
        opt = kfac(1e-2, max_factor_dim=MAX_DIM, layers=layers, invert_every=1)
        state = opt.init(params)
        step = jax.jit(lambda p, s, opt=opt: jaxopt2.value_and_update(
            opt, loss, p, s, tokens, key=jax.random.PRNGKey(0)))  # fmt: skip
        _, updates, state = step(params, state)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        kfac_state = state[0]
        by_name = dict(zip(names, leafwise(kfac_state, params, layers, MAX_DIM).factors,
                           strict=True))  # fmt: skip
        for name in ("['embed']", "['pos']"):
            assert (by_name[name] is None) == (layers is not None)
        head = by_name["['head']['w']"]
        assert [s.shape for s in head] == [(D_LM + 1, D_LM + 1), (V_LM + (layers is None),)]
        assert float(jnp.sum(head[1])) > 0  # the diagonal statistic was gathered


def test_a_plan_that_does_not_match_is_refused():
    params, loss, tokens = _tiny_lm()
    plan = _quiet_plan(loss, params, tokens)
    with pytest.raises(ValueError, match="the layer plan was made for parameters of shapes"):
        kfac(layers=plan).init({**params, "pos": jnp.zeros((T_LM + 1, D_LM))})
    # the head's weight scaled by a constant first: a value computed from it, not a layer
    without_head = lambda p, t: loss({**p, "head": {"w": 1.0 * p["head"]["w"],
                                                    "b": p["head"]["b"]}}, t)  # fmt: skip
    other = _quiet_plan(without_head, params, tokens)
    assert len(other.layers) == 2
    opt = scale_by_kfac(1e-2, layers=other)
    grads = jax.grad(loss)(params, tokens)
    with pytest.raises(ValueError, match="which the layer plan does not have"):
        opt.update(grads, opt.init(params), params, value_fn=lambda p: loss(p, tokens))
    with pytest.raises(TypeError, match="must be the layer plan"):
        kfac(layers=[("head", 16, 512)])
