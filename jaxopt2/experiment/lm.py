"""A byte-level language model on the Python standard library's own source code.

Data. Every Python install ships real text: the ``*.py`` files under
``sysconfig.get_paths()["stdlib"]``. :func:`stdlib_files` lists them sorted by their path
relative to that folder, leaving out test suites (any folder named ``test``, ``tests`` or
``idle_test``), installed packages (``site-packages``, ``dist-packages``) and the
machine-generated ``_sysconfigdata*`` modules. The split is by file, by position in that
sorted list: file ``i`` is a validation file when ``i % holdout_every == holdout_every - 1``,
a training file otherwise, so no file is in both. Each split is its files' bytes concatenated
in sorted order, cut at ``train_bytes`` / ``eval_bytes`` (no file past the cut is read). The
text is the running interpreter's own library, so it differs between Python versions: compare
numbers within one version.

Tokens are bytes (vocabulary 256). Training rows are the windows of ``context_length + 1``
bytes that tile the training text at stride ``context_length`` (every byte after the first
is a target exactly once per epoch; a window may span two adjacent files). The runner
draws each step's rows from its epoch order, a function of (seed, step) only, so a resumed
run sees the same batches. Evaluation is on a fixed set of ``eval_windows`` windows spread
evenly over the validation text; its metric is bits per byte, the mean token cross-entropy
in nats divided by ln 2 (8 for uniform predictions).

Model: :class:`ByteTransformer`, a decoder-only transformer that works on a whole batch,
``[B, T]`` bytes to ``[B, T, 256]`` logits, with ``[B, T, D]`` activations throughout: byte
and learned position embeddings, pre-LayerNorm blocks of causal multi-head self-attention
and a GELU MLP, a final LayerNorm and an untied linear head. Every dense layer is a ``[in,
out]`` weight applied as ``x @ w + b`` to the ``[B, T, in]`` activations, one product whose
rows are all (batch, position) pairs, which is what K-FAC's layer discovery and the
Kronecker-factored preconditioners see. Weights are N(0, 0.02²) (the residual output
projections scaled by 1/sqrt(2 num_layers)), biases zero, so the initial loss is close to
ln 256.

Loss: the mean token cross-entropy, tagged for the curvature methods as a softmax
cross-entropy on the ``[B, T, 256]`` logits and ``[B, T]`` targets as they are (every axis of
a tag but the last counts rows, so its mean over rows is the mean over tokens, the same as a
tag on the flattened ``[B*T, 256]`` logits).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sysconfig
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt2.curvature.tags import tag_loss

__all__ = [
    "VOCAB",
    "ByteLMConfig",
    "ByteTransformer",
    "bits_per_byte",
    "byte_lm_data",
    "eval_windows",
    "lm_eval_metrics",
    "lm_loss",
    "stdlib_corpus",
    "stdlib_files",
    "train_windows",
]

VOCAB = 256
F32 = jnp.float32
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})


@dataclasses.dataclass
class ByteLMConfig:
    """The byte-level LM task (see the module docstring); the model's sizes are in ``model``."""

    context_length: int = 128  # bytes of context per window (T)
    train_bytes: int = 2_000_000  # at most this many bytes of training files
    eval_bytes: int = 200_000  # at most this many bytes of validation files
    eval_windows: int = 64  # fixed validation windows the metrics average over
    holdout_every: int = 10  # every k-th file (sorted order) is a validation file


# ----------------------------------------------------------------------------- data


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=4)
def stdlib_files(root: str | None = None) -> tuple[str, ...]:
    """The standard library's source files, as sorted paths relative to `root` (default: this
    interpreter's ``stdlib`` folder), without test suites, installed packages or the
    generated ``_sysconfigdata*`` modules."""
    base = Path(root) if root is not None else _stdlib_root()
    out = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # pruned: never walked
        rel = Path(folder).relative_to(base)
        out += [
            (rel / n).as_posix()
            for n in names
            if n.endswith(".py") and not n.startswith("_sysconfigdata")
        ]
    return tuple(sorted(out))


def _read_until(base: Path, files: list[str], budget: int) -> tuple[np.ndarray, list[str]]:
    """The bytes of `files` concatenated in order and cut at `budget` (uint8), and the files
    that were read (the last one possibly cut)."""
    parts, names, total = [], [], 0
    for name in files:
        if total >= budget:
            break
        data = (base / name).read_bytes()[: budget - total]
        parts.append(data)
        names.append(name)
        total += len(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy(), names


def stdlib_corpus(
    train_bytes: int, eval_bytes: int, holdout_every: int, root: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """The split text: ``(train, validation, train_files, validation_files)``.

    File ``i`` of :func:`stdlib_files` is a validation file when
    ``i % holdout_every == holdout_every - 1``; each side is its files' bytes in sorted order,
    cut at its budget. The file lists name the files each side read (the last one possibly
    cut).
    """
    files = stdlib_files(root)
    base = Path(root) if root is not None else _stdlib_root()
    k = holdout_every
    train, tr = _read_until(base, [f for i, f in enumerate(files) if i % k != k - 1], train_bytes)
    valid, ev = _read_until(base, [f for i, f in enumerate(files) if i % k == k - 1], eval_bytes)
    return train, valid, tr, ev


def train_windows(text: np.ndarray, context_length: int) -> np.ndarray:
    """The ``[N, T + 1]`` int32 windows tiling `text` at stride ``T = context_length``."""
    t = context_length
    n = (len(text) - 1) // t
    starts = np.arange(n) * t
    return text[starts[:, None] + np.arange(t + 1)].astype(np.int32)


def eval_windows(text: np.ndarray, context_length: int, count: int) -> np.ndarray:
    """`count` ``[T + 1]``-byte windows of `text` at evenly spaced starts (int32)."""
    t = context_length
    starts = np.round(np.linspace(0, len(text) - t - 1, count)).astype(np.int64)
    return text[starts[:, None] + np.arange(t + 1)].astype(np.int32)


def byte_lm_data(cfg: ByteLMConfig, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The task's ``(train windows, evaluation windows)``, int32 ``[N, T + 1]``; each side's
    text must hold at least ``context_length + 1`` bytes (a ValueError otherwise)."""
    train, valid, _, _ = stdlib_corpus(cfg.train_bytes, cfg.eval_bytes, cfg.holdout_every, root)
    for side, text in (("training", train), ("validation", valid)):
        if len(text) < cfg.context_length + 1:
            raise ValueError(
                f"byte_lm: {len(text)} bytes of {side} text, fewer than context_length + 1 "
                f"= {cfg.context_length + 1}"
            )
    return (
        train_windows(train, cfg.context_length),
        eval_windows(valid, cfg.context_length, cfg.eval_windows),
    )


# ----------------------------------------------------------------------------- model


class _Dense(eqx.Module):
    """``x @ weight + bias`` on any leading axes; weight ``[in, out]``."""

    weight: jax.Array
    bias: jax.Array

    def __init__(self, n_in: int, n_out: int, std: float, *, key: jax.Array):
        self.weight = std * jax.random.normal(key, (n_in, n_out), F32)
        self.bias = jnp.zeros((n_out,), F32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight + self.bias


class _LayerNorm(eqx.Module):
    """LayerNorm over the last axis (eps 1e-5), scale and shift ``[D]``."""

    weight: jax.Array
    bias: jax.Array

    def __init__(self, d: int):
        self.weight = jnp.ones((d,), F32)
        self.bias = jnp.zeros((d,), F32)

    def __call__(self, x: jax.Array) -> jax.Array:
        mu = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
        return (x - mu) * jax.lax.rsqrt(var + 1e-5) * self.weight + self.bias


class _CausalAttention(eqx.Module):
    query: _Dense
    key: _Dense
    value: _Dense
    out: _Dense
    num_heads: int = eqx.field(static=True)

    def __init__(self, d: int, num_heads: int, out_std: float, *, key: jax.Array):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.query = _Dense(d, d, 0.02, key=kq)
        self.key = _Dense(d, d, 0.02, key=kk)
        self.value = _Dense(d, d, 0.02, key=kv)
        self.out = _Dense(d, d, out_std, key=ko)
        self.num_heads = num_heads

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads

        def heads(z: jax.Array) -> jax.Array:
            return z.reshape(b, t, h, d // h)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // h)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # query q sees keys k <= q
        scores = jnp.where(causal, scores, jnp.asarray(-1e30, scores.dtype))
        weights = jax.nn.softmax(scores, axis=-1)
        return self.out(jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, t, d))


class _Block(eqx.Module):
    ln1: _LayerNorm
    attn: _CausalAttention
    ln2: _LayerNorm
    fc1: _Dense
    fc2: _Dense

    def __init__(self, d: int, num_heads: int, d_mlp: int, out_std: float, *, key: jax.Array):
        ka, k1, k2 = jax.random.split(key, 3)
        self.ln1 = _LayerNorm(d)
        self.attn = _CausalAttention(d, num_heads, out_std, key=ka)
        self.ln2 = _LayerNorm(d)
        self.fc1 = _Dense(d, d_mlp, 0.02, key=k1)
        self.fc2 = _Dense(d_mlp, d, out_std, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class ByteTransformer(eqx.Module):
    """Decoder-only transformer over bytes: ``[B, T]`` int tokens -> ``[B, T, 256]`` logits
    (``T <= context_length``); the logits at position ``t`` depend on bytes ``0..t`` only."""

    embed: jax.Array  # [256, D]
    pos: jax.Array  # [context_length, D]
    blocks: tuple[_Block, ...]
    ln: _LayerNorm
    head: _Dense  # untied from the embedding

    def __init__(
        self,
        context_length: int,
        d_model: int = 64,
        num_heads: int = 4,
        d_mlp: int = 256,
        num_layers: int = 2,
        *,
        key: jax.Array,
    ):
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        keys = jax.random.split(key, num_layers + 3)
        out_std = 0.02 / math.sqrt(2 * num_layers)
        self.embed = 0.02 * jax.random.normal(keys[0], (VOCAB, d_model), F32)
        self.pos = 0.02 * jax.random.normal(keys[1], (context_length, d_model), F32)
        self.blocks = tuple(
            _Block(d_model, num_heads, d_mlp, out_std, key=k) for k in keys[2 : 2 + num_layers]
        )
        self.ln = _LayerNorm(d_model)
        self.head = _Dense(d_model, VOCAB, 0.02, key=keys[-1])

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = self.embed[tokens] + self.pos[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


# ----------------------------------------------------------------------------- loss, metric


def lm_loss(model: ByteTransformer, windows: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy (nats) of `model` on ``[B, T + 1]`` windows, tagged as a
    softmax cross-entropy on the ``[B, T, 256]`` logits (``B·T`` rows)."""
    x, y = windows[:, :-1], windows[:, 1:]
    # [B, T, V] logits tagged as they are: every position is a row of the tag (B·T tokens),
    # and the mean over all of them is the loss the tag's curvature belongs to
    logits = tag_loss("softmax_cross_entropy", model(x), y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def bits_per_byte(mean_nats: jax.Array) -> jax.Array:
    """Bits per byte of a mean per-byte cross-entropy in nats: ``nats / ln 2``."""
    return mean_nats / math.log(2.0)


def lm_eval_metrics(model: ByteTransformer, windows: jax.Array) -> dict[str, jax.Array]:
    """``loss`` (mean cross-entropy, nats) and ``bits_per_byte`` on the evaluation windows."""
    x, y = windows[:, :-1], windows[:, 1:]
    logits = model(x)
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return {"loss": nats, "bits_per_byte": bits_per_byte(nats)}
