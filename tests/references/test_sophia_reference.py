"""Sophia-G against a numpy float64 reference, whole trajectories.

The module docstring of :mod:`jaxopt2.optimizers.sophia` fixes the rule (Liu et al., 2023,
Algorithm 3): an EMA ``m`` of the gradient; on refresh steps ``0, k, 2k, ...`` an EMA ``h``
of the Gauss-Newton-Bartlett estimate ``ĥ = B · ĝ ⊙ ĝ`` (``ĝ`` the gradient of the tagged
loss, a batch mean, against labels sampled from the model); optionally ``h`` divided by
``1 − b2^r`` after ``r`` refreshes; the step ``−lr (clip(m / max(γ h, ε), ±c) + wd θ)``.
It does not say which ``jax.random`` call draws the labels, so the reference takes the
labels from the library's sampler (:func:`jaxopt2.curvature.products.sample_targets`, the
predictive distribution at the tagged outputs) with the step's key and computes everything
after the draw itself: the gradient against those labels, the estimate, the EMAs, the bias
correction, the clip and the decay.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxopt2
from jaxopt2.curvature.products import sample_targets
from jaxopt2.optimizers.sophia import sophia_estimate
from tests.references.common import assert_paths_close, library_path

pytestmark = pytest.mark.timeout(120)

N, D, C = 16, 3, 4
L2 = 0.05  # a penalty outside the tagged loss: in the gradient, not in the estimate


def _setup(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, C, N)
    params = {"w": 0.5 * rng.normal(size=(D, C)), "b": 0.2 * rng.normal(size=C)}

    def loss_fn(p, x, y):
        out = jaxopt2.tag_loss("softmax_cross_entropy", x @ p["w"] + p["b"], y)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
        return ce + 0.5 * L2 * jnp.sum(p["w"] ** 2)

    return params, x, y, loss_fn


def _softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _ce_grad(p, x, labels):
    d = (_softmax(x @ p["w"] + p["b"]) - np.eye(C)[labels]) / N
    return {"w": x.T @ d, "b": d.sum(0)}


def _gnb(p, x, key):
    logits = x @ p["w"] + p["b"]
    labels = np.asarray(sample_targets("softmax_cross_entropy", jnp.asarray(logits), key))
    return {k: N * v**2 for k, v in _ce_grad(p, x, labels).items()}


def reference_sophia(params, x, y, keys, *, lr, b1, b2, gamma, eps, clip_threshold, wd, every,
                     bias_correction):  # fmt: skip
    """The parameters after each step (a list of dicts), plain numpy float64."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    h = {k: np.zeros_like(v) for k, v in p.items()}
    refreshes = 0
    path = []
    for t, key in enumerate(keys):
        g = _ce_grad(p, x, y)
        g["w"] = g["w"] + L2 * p["w"]
        if t % every == 0:
            est = _gnb(p, x, key)
            h = {k: b2 * h[k] + (1 - b2) * est[k] for k in p}
            refreshes += 1
        scale = 1 - b2**refreshes if bias_correction else 1.0
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            u = np.clip(
                m[k] / np.maximum(gamma * h[k] / scale, eps), -clip_threshold, clip_threshold
            )
            p[k] = p[k] - lr * (u + wd * p[k])
        path.append({k: v.copy() for k, v in p.items()})
    return path


def test_gnb_estimate_uses_the_tagged_loss_against_sampled_labels():
    """``ĥ = B ĝ²`` with ``ĝ`` the tagged loss's gradient against the sampled labels: the L2
    term of the value is left out and the batch size multiplies."""
    params, x, y, loss_fn = _setup(0)
    key = jax.random.PRNGKey(3)
    estimate = jax.jit(
        lambda p, k: sophia_estimate(lambda q: loss_fn(q, x, y), p, k, estimator="gnb")
    )
    got = estimate(jax.tree.map(jnp.asarray, params), key)
    want = _gnb(params, x, key)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bias_correction, gamma", [(True, 0.3), (False, 3.0)])
def test_sophia_gnb_path(bias_correction, gamma):
    """Five steps, refreshes at steps 0, 2 and 4; γ puts some coordinates past the clip and
    others inside it at every step (checked), so both branches of the clip are on the path
    (without the bias correction ``h`` is small: a larger γ does it)."""
    params, x, y, loss_fn = _setup(1)
    keys = list(jax.random.split(jax.random.PRNGKey(7), 5))
    lr, wd, clip = 0.1, 0.01, 0.5
    kw = dict(b1=0.8, b2=0.9, gamma=gamma, eps=1e-12, clip_threshold=clip)
    want = reference_sophia(
        params, x, y, keys, lr=lr, wd=wd, every=2, bias_correction=bias_correction, **kw
    )
    for before, after in zip([params, *want[:-1]], want, strict=True):
        moves = np.concatenate(
            [np.abs(before[k] * (1 - lr * wd) - after[k]).ravel() for k in after]
        )
        assert np.any(np.isclose(moves, lr * clip)) and np.any(moves < 0.9 * lr * clip)
    opt = jaxopt2.sophia(
        lr, weight_decay=wd, estimator="gnb", update_interval=2, bias_correction=bias_correction,
        stats_dtype=jnp.float64, **kw,
    )  # fmt: skip
    got = library_path(opt, loss_fn, params, 5, x, y, keys=keys, extra_args=True)
    assert_paths_close(got, want)
