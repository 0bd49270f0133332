"""K-FAC and EKFAC against a numpy float64 reference, whole trajectories.

The reference follows Martens & Grosse (2015) with the conventions of
:mod:`jaxopt2.optimizers.kfac`'s docstrings, written out for a two-layer tanh network with
biases: ``A = E[ā āᵀ]`` over the batch (``ā`` the layer input with a homogeneous coordinate),
``G = E[Jᵀ F J]`` with ``F`` the exact per-example output Fisher (softmax:
``diag(p) − p pᵀ``; sigmoid: ``diag(p(1 − p))``) and ``J`` the Jacobian of the network's
outputs with respect to the layer's outputs, both EMAs from zero; every ``invert_every``
steps the bias-corrected factors are inverted with factored Tikhonov damping and the
π-correction, ``(A + π√λ I)⁻¹ ∇ (G + √λ/π I)⁻¹`` with ``∇`` seen as ``[in + 1, out]`` and
``π = √((tr A / dim A) / (tr G / dim G))``; then heavy-ball momentum (optax's ``trace``) and
a fixed learning rate. EKFAC (George et al., 2018) keeps the factors' eigenbases and an EMA
of the Fisher's diagonal in that basis, reset to the products of the factors' eigenvalues at
every refresh. Every quantity is computed densely here, not taken from the library.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2.optimizers.kfac import kfac
from tests.references.common import assert_paths_close, library_path

pytestmark = pytest.mark.timeout(120)

N, D_IN, HIDDEN, C = 8, 3, 4, 3
LR, MOMENTUM, LAM, DECAY, EVERY = 0.3, 0.5, 0.1, 0.8, 2


def _data(loss, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_IN))
    if loss == "softmax_cross_entropy":
        y = rng.integers(0, C, N)
    else:
        y = (rng.uniform(size=(N, C)) < 0.5).astype(np.float64)
    params = {
        "w1": rng.normal(size=(D_IN, HIDDEN)),
        "b1": 0.3 * rng.normal(size=HIDDEN),
        "w2": rng.normal(size=(HIDDEN, C)),
        "b2": 0.3 * rng.normal(size=C),
    }
    return params, x, y


def _loss_fn(loss):
    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        out = jaxopt2.tag_loss(loss, h @ p["w2"] + p["b2"], y)
        if loss == "softmax_cross_entropy":
            per = optax.softmax_cross_entropy_with_integer_labels(out, y)
        else:
            per = jnp.sum(optax.sigmoid_binary_cross_entropy(out, y), axis=-1)
        return jnp.mean(per)

    return loss_fn


def _forward(p, x, y, loss):
    """Layer inputs (with the homogeneous coordinate), per-example ``Jᵀ F J`` per layer, and
    the gradient of the mean loss per leaf."""
    s1 = x @ p["w1"] + p["b1"]
    a1 = np.tanh(s1)
    s2 = a1 @ p["w2"] + p["b2"]
    if loss == "softmax_cross_entropy":
        z = np.exp(s2 - s2.max(axis=1, keepdims=True))
        prob = z / z.sum(axis=1, keepdims=True)
        fisher = np.stack([np.diag(q) - np.outer(q, q) for q in prob])
        resid = prob - np.eye(C)[y]
    else:
        prob = 1 / (1 + np.exp(-s2))
        fisher = np.stack([np.diag(q * (1 - q)) for q in prob])
        resid = prob - y
    # ∂s2/∂s1 per example: W2ᵀ diag(1 − a1²)
    jac = np.stack([p["w2"].T * (1 - a**2)[None, :] for a in a1])
    per_example_g = [np.einsum("nci,ncd,ndj->nij", jac, fisher, jac), fisher]
    ones = np.ones((N, 1))
    inputs = [np.hstack([x, ones]), np.hstack([a1, ones])]
    d2 = resid / N
    d1 = (d2 @ p["w2"].T) * (1 - a1**2)
    grads = {"w2": a1.T @ d2, "b2": d2.sum(0), "w1": x.T @ d1, "b1": d1.sum(0)}
    return inputs, per_example_g, grads


def reference_kfac(params, x, y, loss, steps, ekfac=False, every=EVERY, stats_every=1):
    """The parameters after each step (a list of dicts), plain numpy float64. The factors'
    EMAs move at steps ``0, stats_every, ...`` only; their bias correction counts those
    updates."""
    p = {k: v.copy() for k, v in params.items()}
    layers = [("w1", "b1"), ("w2", "b2")]
    a_ema = [0.0, 0.0]
    g_ema = [0.0, 0.0]
    inv = [None, None]  # K-FAC: (A⁻¹, G⁻¹); EKFAC: (Q_A, Q_G)
    scaling = [None, None]
    velocity = {k: np.zeros_like(v) for k, v in p.items()}
    path = []
    updates = 0
    for t in range(steps):
        inputs, per_g, grads = _forward(p, x, y, loss)
        if t % stats_every == 0:
            updates += 1
            for i in range(2):
                a_ema[i] = DECAY * a_ema[i] + (1 - DECAY) * inputs[i].T @ inputs[i] / N
                g_ema[i] = DECAY * g_ema[i] + (1 - DECAY) * per_g[i].mean(0)
        if t % every == 0:
            corr = 1 - DECAY**updates
            for i in range(2):
                a, g = a_ema[i] / corr, g_ema[i] / corr
                if ekfac:
                    wa, qa = np.linalg.eigh(a)
                    wg, qg = np.linalg.eigh(g)
                    inv[i] = (qa, qg)
                    scaling[i] = np.outer(np.maximum(wa, 0), np.maximum(wg, 0))
                else:
                    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
                    inv[i] = (
                        np.linalg.inv(a + pi * np.sqrt(LAM) * np.eye(a.shape[0])),
                        np.linalg.inv(g + np.sqrt(LAM) / pi * np.eye(g.shape[0])),
                    )
        direction = {}
        for i, (w, b) in enumerate(layers):
            grad = np.vstack([grads[w], grads[b][None, :]])  # [in + 1, out]
            if ekfac:
                qa, qg = inv[i]
                # E over examples (and the output Fisher) of the squared gradient in the basis
                fresh = np.mean(
                    [
                        np.outer((qa.T @ a_n) ** 2, np.diag(qg.T @ g_n @ qg))
                        for a_n, g_n in zip(inputs[i], per_g[i], strict=True)
                    ],
                    axis=0,
                )
                scaling[i] = DECAY * scaling[i] + (1 - DECAY) * fresh
                pre = qa @ ((qa.T @ grad @ qg) / (scaling[i] + LAM)) @ qg.T
            else:
                pre = inv[i][0] @ grad @ inv[i][1]
            direction[w], direction[b] = pre[:-1], pre[-1]
        for k in p:
            velocity[k] = direction[k] + MOMENTUM * velocity[k]
            p[k] = p[k] - LR * velocity[k]
        path.append({k: v.copy() for k, v in p.items()})
    return path


def _check(loss, seed, ekfac=False, steps=4, every=EVERY, stats_every=None):
    params, x, y = _data(loss, seed)
    want = reference_kfac(
        params, x, y, loss, steps, ekfac=ekfac, every=every, stats_every=stats_every or 1
    )
    opt = kfac(
        LR, momentum=MOMENTUM, damping=LAM, stats_decay=DECAY, invert_every=every,
        stats_every=stats_every, fisher="exact", ekfac=ekfac, stats_dtype=jnp.float64,
    )  # fmt: skip
    got = library_path(opt, _loss_fn(loss), params, steps, x, y, extra_args=True)
    assert_paths_close(got, want)


def test_kfac_softmax_exact_fisher_path():
    """Softmax outputs: ``G`` of the last layer is ``E[diag(p) − p pᵀ]``, not the identity; a
    refresh at steps 0 and 2 and momentum over four steps, λ = 0.1 (π far from 1)."""
    _check("softmax_cross_entropy", seed=0)


def test_kfac_sigmoid_exact_fisher_path():
    """Sigmoid outputs: the output Fisher ``diag(p(1 − p))``."""
    _check("sigmoid_cross_entropy", seed=1)


def test_kfac_statistics_interval_path():
    """``stats_every=2`` with inverses refreshed every 3 steps: the factors move at steps 0,
    2, 4 only, the refresh at step 3 inverts the factors of step 2, and the bias correction
    counts two updates there, not four steps."""
    _check("softmax_cross_entropy", seed=3, steps=6, every=3, stats_every=2)


def test_ekfac_softmax_exact_fisher_path():
    """EKFAC's eigenbasis scaling: reset to the eigenvalue products at steps 0 and 2 and
    moved towards the Fisher's diagonal in the basis every step."""
    _check("softmax_cross_entropy", seed=2, ekfac=True)


@pytest.mark.parametrize("damping", [1e-3, 10.0])
def test_adaptive_damping_follows_the_levenberg_marquardt_rule(damping):
    """K-FAC's adaptive mode (Martens & Grosse, section 6.5), adapting every step: after each
    step ``λ ← λ / ω`` when ``ρ < 1/4``, ``λ ← λ ω`` when ``ρ > 3/4`` (``ω = 0.95⁵``), kept
    otherwise; and ``ρ`` has the sign of the loss decrease of the step taken (a positive
    ratio is a decrease: the model's predicted change is negative). Both ends of the rule
    occur on the path (asserted), from a small and from a large initial damping."""
    import jax

    from jaxopt2.optimizers.kfac._optimizer import scale_by_kfac

    params, x, y = _data("softmax_cross_entropy", 0)
    params = {k: jnp.asarray(v) for k, v in params.items()}
    loss_fn = _loss_fn("softmax_cross_entropy")
    # the transformation itself: kfac() keeps the adaptation interval at its default of 5
    opt = scale_by_kfac(damping=damping, fisher="exact", damping_adaptation_interval=1,
                        invert_every=1, stats_dtype=jnp.float64)  # fmt: skip
    omega = 0.95**5

    @jax.jit
    def step(p, s):
        value, u, s = jaxopt2.value_and_update(opt, loss_fn, p, s, x, y)
        return value, loss_fn(jax.tree.map(jnp.add, p, u), x, y), jax.tree.map(jnp.add, p, u), s

    state, rhos = opt.init(params), []
    for i in range(8):
        lam = float(state.damping)
        before, after, params, state = step(params, state)
        rho, new_lam = float(state.rho), float(state.damping)
        want = lam / omega if rho < 0.25 else (lam * omega if rho > 0.75 else lam)
        np.testing.assert_allclose(new_lam, max(want, 1e-8), rtol=1e-12, err_msg=f"step {i}")
        change = float(after) - float(before)
        if abs(change) > 1e-12:
            assert (rho > 0) == (change < 0), (i, rho, change)
        rhos.append(rho)
    rhos = np.array(rhos)
    assert (rhos < 0.25).any() or (rhos > 0.75).any(), rhos
    if damping < 1:
        assert (rhos < 0.25).any(), rhos  # too little damping: the model overshoots
    else:
        assert (rhos > 0.75).any(), rhos  # heavy damping: the model is trusted, λ falls
