"""The problem zoo every registered optimizer must solve (float32 unless asked otherwise).

Each :class:`Problem` has initial parameters, ``loss_fn(params, *batch)``, the batch, the
optimal value ``f_star`` (known in closed form, or from a float64 reference solver), and the
convergence criterion

    f(params_T) - f_star <= rel_tol * (f(params_0) - f_star),

judged on the loss at the *final* iterate (not the best one seen). ``rel_tol`` has a default
per problem; the per-optimizer table (``cases.py``) may tighten or loosen it per row, saying
why.

Problems:
  * ``quadratic``: ``0.5 (x - x*)ᵀ A (x - x*)`` in 20 dims, ``A = Q diag(λ) Qᵀ`` with
    ``λ`` log-spaced in [1, 100] and ``Q`` a random orthogonal basis; ``f* = 0``.
  * ``rosenbrock``: the 2-D Rosenbrock valley from ``(-1.2, 1)``; ``f* = 0`` at ``(1, 1)``.
  * ``logistic``: L2-regularized logistic regression on scikit-learn's breast-cancer data
    (standardized, with an unpenalized intercept): mean log-loss ``+ ||w||² / (2n)``, i.e.
    scikit-learn's ``LogisticRegression(C=1)`` objective divided by ``n``; ``f*`` from
    scikit-learn's solver at a tight tolerance (cross-checked against SciPy's L-BFGS).
  * ``mlp``: a 4-16-3 tanh MLP, softmax cross-entropy on 3 well-separated Gaussian blobs
    (separable, so ``f* = 0`` is the infimum the criterion uses).

Tagged problems (``TAGGED_PROBLEMS``), for optimizers that need the loss split into model
outputs and a named loss (:func:`jaxopt2.tag_loss`: K-FAC, Gauss-Newton methods). The tags
are identities for everyone else.
  * ``linear_regression``: one dense layer ``x @ w + b`` (8 -> 3) with squared error on
    features of scales 1..30 (condition ~10³ of the Gauss-Newton matrix); ``f*`` by float64
    least squares. The generic contract checks run on it for tagged rows (it is their
    quadratic).
  * ``logistic_layer``: ``logistic`` written as one dense layer (``w`` of shape ``[30, 1]``,
    sigmoid cross-entropy on 0/1 labels, the same L2 term): the same ``f*``.
  * ``mlp_tagged``: ``mlp`` with its logits tagged.
  * ``mlp_regression``: a 4-16-2 tanh MLP fitting a teacher network of the same shape
    (realizable, ``f* = 0``).

The matrix problem (:func:`matrix`, in neither dict: no convergence row runs it) is where the
generic contract checks run for optimizers with a structural path: ``w1`` ``[4, 3]`` and
``w2`` ``[3, 3]`` are matrices (Kronecker statistics, their refresh and its ``lax.cond`` are
traced; K-FAC finds two dense layers), and the vector ``b`` ``[3]`` is added to the hidden
units, the *input* of ``w2``, so it is no layer's bias (K-FAC's diagonal Fisher, the graft or
Adam of the Kronecker optimizers). The loss is tagged, so it serves every row. ``w2`` is
square so that a single gradient's factors are full rank on both sides (the factor ``G Gᵀ``
of a ``4 × 3`` gradient is singular, and its roots turn rounding in the null space into
differences the checks' jit-versus-eager comparisons would not survive): the Kronecker rows
precondition ``w1`` on its side of 3 only, ``w2`` on both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxopt2

PyTree = Any

__all__ = [
    "MATRIX_SHAPES",
    "PROBLEMS",
    "TAGGED_PROBLEMS",
    "Problem",
    "get",
    "linear_regression",
    "logistic",
    "logistic_layer",
    "matrix",
    "mlp",
    "mlp_regression",
    "mlp_tagged",
    "quadratic",
    "rosenbrock",
]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One optimization problem of the zoo.

    Attributes:
      name: the zoo name (the keys of ``PROBLEMS``).
      params: initial parameters (a pytree of arrays, in ``dtype``).
      loss_fn: ``loss_fn(params, *batch) -> scalar``.
      batch: the (full) batch, a tuple of arrays.
      f_star: the optimal value (float64 reference) or the infimum the criterion uses.
      rel_tol: default convergence tolerance on the relative optimality gap.
      description: one line for failure messages.
    """

    name: str
    params: PyTree
    loss_fn: Callable[..., jax.Array]
    batch: tuple[Any, ...]
    f_star: float
    rel_tol: float
    description: str

    @property
    def f0(self) -> float:
        return float(self.loss_fn(self.params, *self.batch))

    def rel_gap(self, value: float) -> float:
        """``(f - f*) / (f0 - f*)``: 1 at the start, 0 at the optimum (NaN stays NaN)."""
        return (float(value) - self.f_star) / (self.f0 - self.f_star)

    def converged(self, value: float, rel_tol: float | None = None) -> bool:
        tol = self.rel_tol if rel_tol is None else rel_tol
        gap = self.rel_gap(value)
        return bool(np.isfinite(gap) and gap <= tol)


def _cast(tree: PyTree, dtype: Any) -> PyTree:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


# --------------------------------------------------------------------------------------
# Ill-conditioned quadratic with a known spectrum.
# --------------------------------------------------------------------------------------

QUADRATIC_DIM = 20
QUADRATIC_EIGS = np.logspace(0.0, 2.0, QUADRATIC_DIM)  # condition number 100


@functools.cache
def _quadratic_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    q, r = np.linalg.qr(rng.standard_normal((QUADRATIC_DIM, QUADRATIC_DIM)))
    q = q * np.sign(np.diag(r))  # a Haar-distributed orthogonal basis
    a = (q * QUADRATIC_EIGS) @ q.T
    a = 0.5 * (a + a.T)
    x_star = rng.standard_normal(QUADRATIC_DIM)
    x0 = x_star + rng.standard_normal(QUADRATIC_DIM)
    return a, x_star, x0


def quadratic_loss(x: jax.Array, a: jax.Array, x_star: jax.Array) -> jax.Array:
    d = x - x_star
    return 0.5 * jnp.dot(d, a @ d)


def quadratic(dtype: Any = jnp.float32) -> Problem:
    a, x_star, x0 = _quadratic_data()
    return Problem(
        name="quadratic",
        params=jnp.asarray(x0, dtype),
        loss_fn=quadratic_loss,
        batch=(jnp.asarray(a, dtype), jnp.asarray(x_star, dtype)),
        f_star=0.0,
        rel_tol=1e-3,
        description="20-dim quadratic, eigenvalues logspaced in [1, 100], rotated basis",
    )


# --------------------------------------------------------------------------------------
# Rosenbrock.
# --------------------------------------------------------------------------------------


def rosenbrock_loss(p: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    x, y = p[0], p[1]
    return (a - x) ** 2 + b * (y - x**2) ** 2


def rosenbrock(dtype: Any = jnp.float32) -> Problem:
    return Problem(
        name="rosenbrock",
        params=jnp.asarray([-1.2, 1.0], dtype),
        loss_fn=rosenbrock_loss,
        batch=(jnp.asarray(1.0, dtype), jnp.asarray(100.0, dtype)),
        f_star=0.0,
        rel_tol=1e-4,  # f <= 2.4e-3 from f0 = 24.2: inside the valley's last bend, near (1, 1)
        description="2-D Rosenbrock (a=1, b=100) from (-1.2, 1)",
    )


# --------------------------------------------------------------------------------------
# Logistic regression on breast cancer (sklearn C=1 objective / n).
# --------------------------------------------------------------------------------------


@functools.cache
def _logistic_data() -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y_pm = np.where(y == 1, 1.0, -1.0)
    clf = LogisticRegression(C=1.0, tol=1e-12, max_iter=100_000).fit(x, y)
    w, b = clf.coef_[0], clf.intercept_[0]
    f_star = _logistic_loss_np(w, b, x, y_pm)

    # Cross-check the reference with SciPy's L-BFGS on the same objective.
    import scipy.optimize

    def fun(theta):
        return _logistic_loss_np(theta[:-1], theta[-1], x, y_pm)

    def jac(theta):
        z = x @ theta[:-1] + theta[-1]
        s = -y_pm / (1.0 + np.exp(y_pm * z)) / len(y_pm)
        return np.concatenate([x.T @ s + theta[:-1] / len(y_pm), [s.sum()]])

    res = scipy.optimize.minimize(
        fun,
        np.zeros(x.shape[1] + 1),
        jac=jac,
        method="L-BFGS-B",
        options={"maxiter": 100_000, "gtol": 1e-12, "ftol": 1e-16},
    )
    assert abs(res.fun - f_star) <= 1e-8, (res.fun, f_star)
    return x, y_pm, float(min(f_star, res.fun))


def _logistic_loss_np(w: np.ndarray, b: float, x: np.ndarray, y_pm: np.ndarray) -> float:
    z = x @ w + b
    return float(np.mean(np.logaddexp(0.0, -y_pm * z)) + 0.5 * np.dot(w, w) / len(y_pm))


def logistic_loss(p: dict[str, jax.Array], x: jax.Array, y_pm: jax.Array) -> jax.Array:
    z = x @ p["w"] + p["b"]
    n = y_pm.shape[0]
    return jnp.mean(jax.nn.softplus(-y_pm * z)) + 0.5 * jnp.dot(p["w"], p["w"]) / n


def logistic(dtype: Any = jnp.float32) -> Problem:
    x, y_pm, f_star = _logistic_data()
    return Problem(
        name="logistic",
        params={"w": jnp.zeros(x.shape[1], dtype), "b": jnp.zeros((), dtype)},
        loss_fn=logistic_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray(y_pm, dtype)),
        f_star=f_star,
        rel_tol=1e-3,
        description="breast-cancer logistic regression, sklearn C=1 objective / n",
    )


# --------------------------------------------------------------------------------------
# Tiny MLP.
# --------------------------------------------------------------------------------------

MLP_SIZES = (4, 16, 3)


@functools.cache
def _mlp_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    centers = 3.0 * np.eye(3, 4)  # three classes, 3 apart in 4-D
    labels = np.repeat(np.arange(3), 30)
    x = centers[labels] + 0.5 * rng.standard_normal((labels.size, 4))
    return x, labels


def mlp_init(key: jax.Array, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(key)
    n_in, n_hid, n_out = MLP_SIZES
    return {
        "w1": (jax.random.normal(k1, (n_in, n_hid)) / np.sqrt(n_in)).astype(dtype),
        "b1": jnp.zeros(n_hid, dtype),
        "w2": (jax.random.normal(k2, (n_hid, n_out)) / np.sqrt(n_hid)).astype(dtype),
        "b2": jnp.zeros(n_out, dtype),
    }


def mlp_loss(p: dict[str, jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.mean(nll).astype(x.dtype)


def mlp(dtype: Any = jnp.float32) -> Problem:
    x, labels = _mlp_data()
    return Problem(
        name="mlp",
        params=mlp_init(jax.random.PRNGKey(0), dtype),
        loss_fn=mlp_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray(labels, jnp.int32)),
        f_star=0.0,
        rel_tol=1e-3,  # cross-entropy <= 1e-3 of its start (~1e-3 nats): every point fit
        description="4-16-3 tanh MLP, cross-entropy on 3 separable Gaussian blobs",
    )


# --------------------------------------------------------------------------------------
# Tagged problems (the loss marked with jaxopt2.tag_loss).
# --------------------------------------------------------------------------------------

REGRESSION_SIZES = (64, 8, 3)  # examples, features, outputs


@functools.cache
def _regression_data() -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(2)
    n, d, k = REGRESSION_SIZES
    x = rng.standard_normal((n, d)) * np.logspace(0.0, np.log10(30.0), d)
    y = x @ rng.standard_normal((d, k)) / 10 + 0.5 + 0.3 * rng.standard_normal((n, k))
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)
    coef, *_ = np.linalg.lstsq(xb, y, rcond=None)
    f_star = 0.5 * np.mean(np.sum((xb @ coef - y) ** 2, axis=1))
    return x, y, float(f_star)


def regression_loss(p: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    out = jaxopt2.tag_loss("squared_error", x @ p["w"] + p["b"], y)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def linear_regression(dtype: Any = jnp.float32) -> Problem:
    x, y, f_star = _regression_data()
    _, d, k = REGRESSION_SIZES
    return Problem(
        name="linear_regression",
        params={"w": jnp.zeros((d, k), dtype), "b": jnp.zeros(k, dtype)},
        loss_fn=regression_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray(y, dtype)),
        f_star=f_star,
        rel_tol=1e-3,
        description="tagged linear regression 8 -> 3, feature scales 1..30, squared error",
    )


def logistic_layer_loss(p: dict[str, jax.Array], x: jax.Array, y01: jax.Array) -> jax.Array:
    z = jaxopt2.tag_loss("sigmoid_cross_entropy", x @ p["w"] + p["b"], y01)
    n = y01.shape[0]
    ce = jnp.mean(jnp.sum(jax.nn.softplus(z) - y01 * z, axis=-1))
    return ce + 0.5 * jnp.sum(p["w"] ** 2) / n


def logistic_layer(dtype: Any = jnp.float32) -> Problem:
    x, y_pm, f_star = _logistic_data()
    return Problem(
        name="logistic_layer",
        params={"w": jnp.zeros((x.shape[1], 1), dtype), "b": jnp.zeros(1, dtype)},
        loss_fn=logistic_layer_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray((y_pm[:, None] + 1) / 2, dtype)),
        f_star=f_star,
        rel_tol=1e-3,
        description="breast-cancer logistic regression as one tagged dense layer 30 -> 1",
    )


def mlp_tagged_loss(p: dict[str, jax.Array], x: jax.Array, labels: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    logits = jaxopt2.tag_loss("softmax_cross_entropy", h @ p["w2"] + p["b2"], labels)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.mean(nll).astype(x.dtype)


def mlp_tagged(dtype: Any = jnp.float32) -> Problem:
    return dataclasses.replace(
        mlp(dtype), name="mlp_tagged", loss_fn=mlp_tagged_loss, description="mlp, logits tagged"
    )


MLP_REGRESSION_SIZES = (4, 16, 2)


def _mlp_apply(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.cache
def _mlp_regression_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    n_in, n_hid, n_out = MLP_REGRESSION_SIZES
    teacher = {
        "w1": rng.standard_normal((n_in, n_hid)) / np.sqrt(n_in),
        "b1": 0.1 * rng.standard_normal(n_hid),
        "w2": rng.standard_normal((n_hid, n_out)) / np.sqrt(n_hid),
        "b2": 0.1 * rng.standard_normal(n_out),
    }
    x = rng.standard_normal((96, n_in))
    h = np.tanh(x @ teacher["w1"] + teacher["b1"])
    return x, h @ teacher["w2"] + teacher["b2"]


def mlp_regression_loss(p: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    out = jaxopt2.tag_loss("squared_error", _mlp_apply(p, x), y)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


def mlp_regression(dtype: Any = jnp.float32) -> Problem:
    x, y = _mlp_regression_data()
    n_in, n_hid, n_out = MLP_REGRESSION_SIZES
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    params = {
        "w1": (jax.random.normal(k1, (n_in, n_hid)) / np.sqrt(n_in)).astype(dtype),
        "b1": jnp.zeros(n_hid, dtype),
        "w2": (jax.random.normal(k2, (n_hid, n_out)) / np.sqrt(n_hid)).astype(dtype),
        "b2": jnp.zeros(n_out, dtype),
    }
    return Problem(
        name="mlp_regression",
        params=params,
        loss_fn=mlp_regression_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray(y, dtype)),
        f_star=0.0,
        rel_tol=1e-3,
        description="tagged 4-16-2 tanh MLP fitting a same-shape teacher (realizable)",
    )


# --------------------------------------------------------------------------------------
# The matrix problem of the generic checks.
# --------------------------------------------------------------------------------------

MATRIX_SHAPES = {"w1": (4, 3), "w2": (3, 3), "b": (3,)}


def matrix_loss(p: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    out = jaxopt2.tag_loss("squared_error", (jnp.tanh(x @ p["w1"]) + p["b"]) @ p["w2"], y)
    return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))


@functools.cache
def _matrix_data() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    draw = lambda shape: rng.standard_normal(shape) / np.sqrt(shape[0])
    teacher = {k: draw(v) for k, v in MATRIX_SHAPES.items()}
    start = {k: draw(v) for k, v in MATRIX_SHAPES.items()}
    x = rng.standard_normal((16, 4))
    y = (np.tanh(x @ teacher["w1"]) + teacher["b"]) @ teacher["w2"]
    return start, x, y


def matrix(dtype: Any = jnp.float32) -> Problem:
    start, x, y = _matrix_data()
    return Problem(
        name="matrix",
        params=_cast(start, dtype),
        loss_fn=matrix_loss,
        batch=(jnp.asarray(x, dtype), jnp.asarray(y, dtype)),
        f_star=0.0,
        rel_tol=1e-3,
        description="tagged (tanh(x w1) + b) w2 with w1 [4, 3], w2 [3, 3], b [3] (a teacher's)",
    )


PROBLEMS: dict[str, Callable[..., Problem]] = {
    "quadratic": quadratic,
    "rosenbrock": rosenbrock,
    "logistic": logistic,
    "mlp": mlp,
}

TAGGED_PROBLEMS: dict[str, Callable[..., Problem]] = {
    "linear_regression": linear_regression,
    "logistic_layer": logistic_layer,
    "mlp_tagged": mlp_tagged,
    "mlp_regression": mlp_regression,
}


def get(name: str, dtype: Any = jnp.float32) -> Problem:
    return {**PROBLEMS, **TAGGED_PROBLEMS}[name](dtype)
