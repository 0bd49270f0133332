"""Curvature diagnostics of a training run, as pure functions of (loss, params, key).

* :func:`curvature_metrics` — what a run logs every N steps: the sharpness (top Hessian
  eigenvalue), optionally the Hutchinson trace and the share of the gradient that lies in the
  top-k eigenspace. Jit-able; the runner calls it on the training batch.
* :func:`hessian_spectrum` — what ``jaxopt2 spectrum`` reports for a checkpoint: top-k
  eigenvalues, the trace with its standard error, and the stochastic-Lanczos-quadrature
  density (nodes, weights, and a smoothed density on a grid).
* :func:`minibatch_sharpness` — the top Hessian eigenvalue of the loss on random minibatches
  of a given size (rows drawn without replacement), one Lanczos run per minibatch: how much
  the curvature a step of batch size B sees exceeds the full-batch one.

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

__all__ = ["curvature_metrics", "hessian_spectrum", "minibatch_sharpness"]


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


def minibatch_sharpness(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    data: tuple[jax.Array, ...],
    key: jax.Array,
    *,
    batch_size: int,
    num_batches: int,
    num_iters: int = 20,
) -> tuple[jax.Array, jax.Array]:
    """Top Hessian eigenvalue of ``loss_fn(params, *batch)`` on random minibatches.

    Each of the `num_batches` minibatches holds `batch_size` rows of `data` drawn without
    replacement (a fresh draw per minibatch); its top eigenvalue is computed by Lanczos
    (`num_iters` steps, clamped to the number of parameters). The minibatches run one after
    the other (``lax.map``), so memory is that of one. Jit-able (`batch_size` and
    `num_batches` static).

    Args:
      loss_fn: ``(params, *batch) -> loss``, a mean over the batch's rows.
      params: where the Hessians are taken.
      data: the arrays to draw rows from (leading axis: rows, the same for all).
      key: PRNG key for the rows and the Lanczos start vectors.
      batch_size: rows per minibatch (at most the number of rows; equal to it: the full
        batch, the same for every draw).
      num_batches: minibatches drawn.
      num_iters: Lanczos steps per minibatch.

    Returns:
      ``(eigenvalues [num_batches], rows [num_batches, batch_size])``: each minibatch's top
      eigenvalue and the indices of its rows.
    """
    n = data[0].shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n} (the rows of data), got {batch_size}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    dim = sum(int(x.size) for x in jax.tree.leaves(params))
    iters = max(1, min(num_iters, dim))

    def one(k: jax.Array) -> tuple[jax.Array, jax.Array]:
        k_rows, k_eig = jax.random.split(k)
        rows = jax.random.permutation(k_rows, n)[:batch_size]
        batch = tuple(a[rows] for a in data)
        matvec = curvature.hessian_operator(lambda p: loss_fn(p, *batch), params)
        evals, _ = curvature.top_k_eigenpairs(matvec, params, k_eig, 1, num_iters=iters)
        return evals[0], rows

    return jax.lax.map(one, jax.random.split(key, num_batches))
