"""Modular arithmetic with a small transformer: the "grokking" setup.

Data: every pair ``(a, b)`` with ``0 <= a, b < p`` as the token sequence ``[a, b, =]``
(``=`` is token ``p``), labelled ``(a op b) mod p``; a fixed seeded permutation splits the
``p²`` pairs into train and evaluation sets (Power et al., 2022, train on a fraction and watch
evaluation accuracy jump long after training accuracy saturates).

Model: token + learned position embeddings, ``num_layers`` pre-LayerNorm blocks of
multi-head self-attention and a GELU MLP, a final LayerNorm and an unembedding read at the
last position. Built from ``eqx.nn`` layers (``Linear``, ``MultiheadAttention``), so
curvature methods see ordinary dense layers inside attention.

References:
  Power, Burda, Edwards, Babuschkin, Misra. "Grokking: Generalization Beyond Overfitting on
  Small Algorithmic Datasets." 2022. https://arxiv.org/abs/2201.02177
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

__all__ = ["OPERATIONS", "ModularTransformer", "modular_arithmetic_data"]

OPERATIONS = ("add", "sub", "mul")


def modular_arithmetic_data(
    p: int, operation: str = "add", train_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All ``p²`` equations, split by a seeded permutation.

    Returns:
      ``(x_train, y_train, x_eval, y_eval)``: tokens int32 ``[N, 3]``, labels int32 ``[N]``.
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}.")
    if not isinstance(p, int) or p < 2:
        raise ValueError(f"p must be an integer >= 2, got {p!r}.")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must lie in (0, 1), got {train_fraction!r}.")
    grid_a, grid_b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = grid_a.ravel(), grid_b.ravel()
    y = {"add": a + b, "sub": a - b, "mul": a * b}[operation] % p
    x = np.stack([a, b, np.full_like(a, p)], axis=1)
    perm = np.random.default_rng(seed).permutation(p * p)
    n_train = max(1, round(train_fraction * p * p))
    tr, ev = perm[:n_train], perm[n_train:]
    return (
        x[tr].astype(np.int32),
        y[tr].astype(np.int32),
        x[ev].astype(np.int32),
        y[ev].astype(np.int32),
    )


class _Block(eqx.Module):
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, d_model: int, num_heads: int, d_mlp: int, *, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.ln1 = eqx.nn.LayerNorm(d_model)
        self.attn = eqx.nn.MultiheadAttention(num_heads, d_model, key=k1)
        self.ln2 = eqx.nn.LayerNorm(d_model)
        self.fc1 = eqx.nn.Linear(d_model, d_mlp, key=k2)
        self.fc2 = eqx.nn.Linear(d_mlp, d_model, key=k3)

    def __call__(self, h: jax.Array) -> jax.Array:
        n = jax.vmap(self.ln1)(h)
        h = h + self.attn(n, n, n)
        n = jax.vmap(self.ln2)(h)
        return h + jax.vmap(self.fc2)(jax.nn.gelu(jax.vmap(self.fc1)(n)))


class ModularTransformer(eqx.Module):
    """A small transformer mapping ``[a, b, =]`` tokens to logits over ``p`` classes.

    Call it on one sequence (``[T]`` int tokens); ``jax.vmap`` it over a batch.
    """

    embed: eqx.nn.Embedding
    pos: jax.Array
    blocks: tuple[_Block, ...]
    ln: eqx.nn.LayerNorm
    unembed: eqx.nn.Linear

    def __init__(
        self,
        p: int,
        d_model: int = 64,
        num_heads: int = 4,
        d_mlp: int = 256,
        num_layers: int = 1,
        seq_len: int = 3,
        *,
        key: jax.Array,
    ):
        keys = jax.random.split(key, num_layers + 3)
        self.embed = eqx.nn.Embedding(p + 1, d_model, key=keys[0])
        self.pos = 0.02 * jax.random.normal(keys[1], (seq_len, d_model))
        self.blocks = tuple(
            _Block(d_model, num_heads, d_mlp, key=k) for k in keys[2 : 2 + num_layers]
        )
        self.ln = eqx.nn.LayerNorm(d_model)
        self.unembed = eqx.nn.Linear(d_model, p, key=keys[-1])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        h = jax.vmap(self.embed)(tokens) + self.pos[: tokens.shape[0]]
        for block in self.blocks:
            h = block(h)
        return self.unembed(self.ln(h[-1]))
