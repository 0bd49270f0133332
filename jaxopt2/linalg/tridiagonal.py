"""Eigendecomposition of small symmetric tridiagonal matrices (the Lanczos ``T``).

``jax.scipy.linalg.eigh_tridiagonal`` only implements ``eigvals_only=True``, but Ritz vectors
and stochastic Lanczos quadrature weights need the eigenvectors. The matrices here are
small (tens to a few hundred Lanczos steps), so :func:`eigh_tridiagonal` builds the dense
tridiagonal and calls :func:`jax.numpy.linalg.eigh`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["eigh_tridiagonal"]


def eigh_tridiagonal(alphas: jax.Array, betas: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues and eigenvectors of the symmetric tridiagonal matrix ``T(alphas, betas)``.

    Args:
      alphas: the diagonal, shape ``[..., m]`` (leading axes are batch axes).
      betas: the off-diagonal, shape ``[..., m - 1]`` (same batch axes).

    Returns:
      ``(eigenvalues, eigenvectors)``: eigenvalues ``[..., m]`` in ascending order and the
      orthonormal eigenvectors as the columns of ``[..., m, m]``, so that
      ``T @ eigenvectors[..., :, i] == eigenvalues[..., i] * eigenvectors[..., :, i]``.

    Raises:
      ValueError: if the shapes of `alphas` and `betas` do not fit together.

    References:
      G. H. Golub and C. F. Van Loan, "Matrix Computations", 4th ed., Section 8.4.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxopt2.linalg import eigh_tridiagonal
      >>> w, v = eigh_tridiagonal(jnp.array([2.0, 2.0]), jnp.array([1.0]))
      >>> w.tolist()
      [1.0, 3.0]
    """
    a_shape, b_shape = np.shape(alphas), np.shape(betas)
    if len(a_shape) < 1 or a_shape[-1] < 1:
        raise ValueError(f"alphas must have shape [..., m] with m >= 1, got {a_shape}.")
    m = a_shape[-1]
    if tuple(b_shape) != (*a_shape[:-1], m - 1):
        raise ValueError(
            f"betas must have shape {(*a_shape[:-1], m - 1)} to go with alphas of shape "
            f"{a_shape}, got {b_shape}."
        )
    dtype = jnp.result_type(alphas, betas)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    alphas = jnp.asarray(alphas, dtype)
    betas = jnp.asarray(betas, dtype)
    idx = np.arange(m)
    t = jnp.zeros((*a_shape, m), dtype)
    t = t.at[..., idx, idx].set(alphas)
    t = t.at[..., idx[:-1], idx[1:]].set(betas)
    t = t.at[..., idx[1:], idx[:-1]].set(betas)
    eigenvalues, eigenvectors = jnp.linalg.eigh(t)
    return eigenvalues, eigenvectors
