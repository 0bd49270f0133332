"""Test problems for the solvers, with references computed by scipy / scikit-learn."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MINIMIZE_METHODS = (
    "newton",
    "trust_region",
    "newton_cg",
    "cubic",
    "lazy_newton",
    "damped_newton",
    "saddle_free",
)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def logistic_objective(w, a, s):
    """Mean logistic loss + (1/(2n))‖w‖² on the weights (the last entry is the intercept):
    scikit-learn's ``LogisticRegression(C=1)`` objective divided by n."""
    z = a @ w
    return jnp.mean(jax.nn.softplus(-s * z)) + 0.5 / a.shape[0] * jnp.sum(w[:-1] ** 2)


@functools.cache
def breast_cancer():
    """Standardized features with an intercept column, labels ±1, and scikit-learn's optimum."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    a = np.hstack([x, np.ones((x.shape[0], 1))])
    s = 2.0 * y - 1.0
    clf = LogisticRegression(C=1.0, tol=1e-14, max_iter=10_000, solver="newton-cholesky")
    clf.fit(x, y)
    w_ref = np.concatenate([clf.coef_.ravel(), clf.intercept_])
    return a, s, w_ref
