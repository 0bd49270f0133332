"""Curvature diagnostics of a training run, as pure functions of (loss, params, key).

* :func:`curvature_metrics` — what a run logs every N steps: the sharpness (top Hessian
  eigenvalue), optionally the Hutchinson trace and the share of the gradient that lies in the
  top-k eigenspace. Jit-able; the runner calls it on the training batch.
* :func:`hessian_spectrum` — what ``jaxopt2 spectrum`` reports for a checkpoint: top-k
  eigenvalues, the trace with its standard error, and the stochastic-Lanczos-quadrature
  density (nodes, weights, and a smoothed density on a grid).

Edge of stability (Cohen et al., 2021): full-batch gradient descent with step size η is
stable on a quadratic only while the sharpness stays below ``2/η``; in practice the sharpness
rises to that line and hovers there. The runner plots the sharpness against it.

References:
  Cohen, Kaur, Li, Kolter, Talwalkar. "Gradient Descent on Neural Networks Typically Occurs
  at the Edge of Stability." ICLR 2021. https://arxiv.org/abs/2103.00065
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxopt2 import curvature

PyTree = Any

__all__ = ["curvature_metrics", "hessian_spectrum"]


def curvature_metrics(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    top_k: int = 1,
    num_iters: int = 20,
    trace_probes: int = 0,
    grad: PyTree | None = None,
) -> dict[str, jax.Array]:
    """Sharpness and friends at `params`.

    Args:
      value_fn: ``params -> loss`` on the batch the diagnostics are computed on.
      params: the current parameters.
      key: PRNG key for the Lanczos start vector and the trace probes.
      top_k: eigenpairs computed; ``sharpness`` is the largest. With ``top_k > 1`` and a
        gradient, ``grad_topk_share`` is ``‖P_k g‖² / ‖g‖²``, the fraction of the gradient's
        squared norm in the span of the top-k eigenvectors, and ``grad_share_by_k``
        ``[top_k]`` the same fraction for the top 1, 2, ..., ``top_k`` (cumulative).
      num_iters: Lanczos iterations (at least ``top_k``).
      trace_probes: Rademacher probes for the trace estimate; 0 skips it.
      grad: the gradient at `params` (for ``grad_topk_share``); None skips it.

    Returns:
      A dict of scalars (and ``top_eigenvalues`` ``[top_k]``).
    """
    k_eig, k_tr = jax.random.split(key)
    matvec = curvature.hessian_operator(value_fn, params)
    evals, evecs = curvature.top_k_eigenpairs(matvec, params, k_eig, top_k, num_iters=num_iters)
    out: dict[str, jax.Array] = {"sharpness": evals[0], "top_eigenvalues": evals}
    if trace_probes > 0:
        out["trace"], out["trace_stderr"] = curvature.hutchinson_trace(
            matvec, params, k_tr, trace_probes
        )
    if grad is not None:
        coeffs = jax.vmap(lambda v: optax.tree.vdot(v, grad))(evecs)
        gnorm2 = optax.tree.vdot(grad, grad)
        by_k = jnp.cumsum(coeffs**2) / jnp.maximum(gnorm2, jnp.finfo(gnorm2.dtype).tiny)
        out["grad_topk_share"] = by_k[-1]
        if top_k > 1:
            out["grad_share_by_k"] = by_k
    return out


def hessian_spectrum(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    *,
    top_k: int = 5,
    num_iters: int | None = None,
    trace_probes: int = 100,
    density_iters: int = 60,
    density_probes: int = 8,
    probe_batch_size: int | str | None = "auto",
) -> dict[str, jax.Array]:
    """Top-k eigenvalues, trace (with standard error) and SLQ density nodes/weights.

    ``probe_batch_size`` runs the trace and density probes in groups of that size (bounded
    memory for large models or batches); None runs each set of probes in one ``vmap``;
    ``"auto"`` chooses per backend (see :func:`jaxopt2.curvature.hutchinson_diagonal`).
    """
    k_eig, k_tr, k_den = jax.random.split(key, 3)
    matvec = curvature.hessian_operator(value_fn, params)
    evals, _ = curvature.top_k_eigenpairs(matvec, params, k_eig, top_k, num_iters=num_iters)
    trace, stderr = curvature.hutchinson_trace(
        matvec, params, k_tr, trace_probes, batch_size=probe_batch_size
    )
    nodes, weights = curvature.spectral_density(
        matvec,
        params,
        k_den,
        num_iters=density_iters,
        num_probes=density_probes,
        batch_size=probe_batch_size,
    )
    return {
        "top_eigenvalues": evals,
        "trace": trace,
        "trace_stderr": stderr,
        "density_nodes": nodes,
        "density_weights": weights,
    }
