"""Low-bit storage of orthogonal matrices: the eigenvectors of Kronecker preconditioners.

Following "4-bit Shampoo" (Wang et al., 2024), a preconditioner ``X^{-e} = Q diag(f) Qᵀ`` is
stored as its eigenvector matrix ``Q`` in 8 or 4 bits plus its spectrum ``f`` in float32,
rather than as the dense root: eigenvector entries are bounded and evenly spread, so they
quantize far better than the root itself, whose entries span the spectrum's dynamic range.
Before use the dequantized ``Q̃`` is re-orthogonalized by one Björck step
``Q̃ ← Q̃ (3I − Q̃ᵀQ̃) / 2`` and the root rebuilt as ``Q̃ diag(f) Q̃ᵀ``.

Format (block-wise absmax): each eigenvector (a column of ``Q``) is cut into blocks of
``BLOCK`` entries; a block stores ``absmax`` in float32 and one code per entry.

* 8 bits: signed linear codes ``round(127 · x / absmax)`` (int8).
* 4 bits: the 16-value NormalFloat codebook (Dettmers et al., 2023: quantiles of a normal
  distribution, which eigenvector entries of a large random-like basis follow), two codes
  per byte (uint8).

±1 and 0 are exact in both formats, so the identity round-trips exactly. The measured
reconstruction errors are in tests/optimizers/test_lowbit.py and docs/shampoo-soap.md.

References:
  Wang, Zhou, Ni, Huang, Song, Tang, Xiao, Wang. "4-bit Shampoo for Memory-Efficient Network
  Training." NeurIPS 2024. arXiv:2405.18144.
  Dettmers, Pagnoni, Holtzman, Zettlemoyer. "QLoRA: Efficient Finetuning of Quantized LLMs."
  NeurIPS 2023 (the NormalFloat-4 codebook).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BITS", "QuantizedBasis", "dequantize", "orthogonalize", "quantize", "reconstruct"]

BITS = (32, 8, 4)
BLOCK = 64
HIGHEST = jax.lax.Precision.HIGHEST
# NormalFloat-4 (NF4): 16 normal quantiles scaled to [-1, 1], with an exact 0.
NF4 = np.array(
    [-1.0, -0.6961928, -0.52507305, -0.3949175, -0.28444138, -0.18477343, -0.09105004, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.33791524, 0.44070983, 0.562617, 0.72295684, 1.0],
    np.float32,
)  # fmt: skip


class QuantizedBasis(NamedTuple):
    """A stack of ``[N, D, D]`` orthogonal matrices in low-bit form, plus a spectrum.

    Attributes:
      codes: int8 ``[N, D, D_pad]`` (8 bits) or uint8 ``[N, D, D_pad / 2]`` (4 bits), one row
        per column of the stored matrices (``D_pad``: ``D`` rounded up to the block size).
      scales: float32 ``[N, D, D_pad / BLOCK]``, the absmax of each block.
      spectrum: float32 ``[N, D]``: what the owner keeps beside the basis (Shampoo: the
        inverse-root eigenvalues).
    """

    codes: jax.Array
    scales: jax.Array
    spectrum: jax.Array


def _blocks(dim: int) -> tuple[int, int]:
    block = min(BLOCK, dim + dim % 2)  # even: 4-bit codes are packed in pairs
    padded = -(-dim // block) * block
    return block, padded


def quantize(q: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Codes and scales of the columns of ``q`` (``[..., D, D]``)."""
    d = q.shape[-1]
    block, padded = _blocks(d)
    rows = jnp.swapaxes(q, -1, -2).astype(jnp.float32)  # one row per column of q
    rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, padded - d)])
    shaped = rows.reshape(*rows.shape[:-1], padded // block, block)
    scales = jnp.max(jnp.abs(shaped), axis=-1, keepdims=True)
    unit = shaped / jnp.where(scales > 0, scales, 1.0)
    if bits == 8:
        codes = jnp.round(unit * 127.0).astype(jnp.int8).reshape(rows.shape)
    else:
        idx = jnp.argmin(jnp.abs(unit[..., None] - NF4), axis=-1).astype(jnp.uint8)
        idx = idx.reshape(*rows.shape[:-1], padded // 2, 2)
        codes = idx[..., 0] | (idx[..., 1] << 4)
    return codes, scales[..., 0]


def dequantize(codes: jax.Array, scales: jax.Array, bits: int, dim: int) -> jax.Array:
    """The ``[..., D, D]`` matrices (columns restored) from :func:`quantize`'s output."""
    block, padded = _blocks(dim)
    if bits == 8:
        unit = codes.astype(jnp.float32) / 127.0
    else:
        idx = jnp.stack([codes & 15, codes >> 4], axis=-1).reshape(*codes.shape[:-1], padded)
        unit = jnp.asarray(NF4)[idx.astype(jnp.int32)]
    unit = unit.reshape(*unit.shape[:-1], padded // block, block)
    rows = (unit * scales[..., None]).reshape(*unit.shape[:-2], padded)[..., :dim]
    return jnp.swapaxes(rows, -1, -2)


def orthogonalize(q: jax.Array) -> jax.Array:
    """One Björck step towards the nearest orthogonal matrix: ``q (3I − qᵀq) / 2``."""
    gram = jnp.matmul(jnp.swapaxes(q, -1, -2), q, precision=HIGHEST)
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    return jnp.matmul(q, 1.5 * eye - 0.5 * gram, precision=HIGHEST)


def pack(q: jax.Array, spectrum: jax.Array, bits: int) -> QuantizedBasis:
    codes, scales = quantize(q, bits)
    return QuantizedBasis(codes, scales, spectrum.astype(jnp.float32))


def basis(stored: QuantizedBasis, bits: int, dim: int) -> jax.Array:
    """The re-orthogonalized basis ``Q̃``."""
    return orthogonalize(dequantize(stored.codes, stored.scales, bits, dim))


def reconstruct(stored: QuantizedBasis, bits: int, dim: int) -> jax.Array:
    """``Q̃ diag(spectrum) Q̃ᵀ`` for the whole stack."""
    q = basis(stored, bits, dim)
    return jnp.matmul(q * stored.spectrum[..., None, :], jnp.swapaxes(q, -1, -2), precision=HIGHEST)


def where(ok: jax.Array, new: QuantizedBasis, old: QuantizedBasis) -> QuantizedBasis:
    """Per-matrix select (``ok``: ``[N]``) between two stacks."""
    pick = lambda a, b: jnp.where(ok.reshape(ok.shape + (1,) * (a.ndim - 1)), a, b)
    return QuantizedBasis(*(pick(a, b) for a, b in zip(new, old, strict=True)))
