"""The digits CNN benchmark task: the same data, batches and timing protocol as
``digits_autoencoder`` (whose ``run_timed`` takes this module as ``task``).

Task: scikit-learn's 8x8 digits, pixels / 16, shuffled with ``default_rng(0)``, the first
1437 rows, as ``[N, 8, 8, 1]`` images (NHWC) with their integer labels. Model: conv 3x3
1 -> 16 (SAME) tanh, conv 3x3 16 -> 32 (SAME) tanh, flatten (64·32 = 2048), dense 2048 -> 10;
kernels HWIO (the layout flax uses and kfac-jax's conv blocks require), biases per channel,
initialized like PyTorch (uniform in ``±1/sqrt(fan_in)``) from seed 0. Loss: softmax
cross-entropy with the integer labels, mean over the batch. Batches of 256 rows, a fresh
permutation per epoch (seed 1). Imports only jax, numpy and optax (scikit-learn lazily), so it
runs in the peers' environments too.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_autoencoder import BATCH, NUM_TRAIN, state_bytes  # noqa: F401  (shared protocol)

CHANNELS = (1, 16, 32)
NUM_CLASSES = 10
SIDE = 8


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i, (c_in, c_out) in enumerate(itertools.pairwise(CHANNELS), start=1):
        shapes[f"k{i}"] = (3, 3, c_in, c_out)
        shapes[f"b{i}"] = (c_out,)
    shapes["w"] = (CHANNELS[-1] * SIDE * SIDE, NUM_CLASSES)
    shapes["b"] = (NUM_CLASSES,)
    return shapes


def make_inputs(path: str, steps: int, *, seed: int = 0, batch_seed: int = 1) -> None:
    """Write weights, images, labels and per-step batch indices to ``path`` (.npz)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    perm = np.random.default_rng(0).permutation(len(digits.data))[:NUM_TRAIN]
    x = (digits.data[perm] / 16.0).astype(np.float32).reshape(-1, SIDE, SIDE, 1)
    y = digits.target[perm].astype(np.int32)
    rng = np.random.default_rng(seed)
    shapes = _shapes()
    fan_in = {"w": shapes["w"][0], "b": shapes["w"][0]}
    for i in range(1, len(CHANNELS)):
        fan_in[f"k{i}"] = fan_in[f"b{i}"] = int(np.prod(shapes[f"k{i}"][:-1]))
    arrays = {}
    for name, shape in shapes.items():
        bound = 1.0 / np.sqrt(fan_in[name])
        arrays[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    batch_rng = np.random.default_rng(batch_seed)
    per_epoch = NUM_TRAIN // BATCH
    epochs = -(-steps // per_epoch)
    rows = [batch_rng.permutation(NUM_TRAIN)[: per_epoch * BATCH] for _ in range(epochs)]
    batch_idx = np.concatenate(rows).reshape(-1, BATCH)[:steps].astype(np.int32)
    np.savez(path, x_train=x, y_train=y, batch_idx=batch_idx, **arrays)


def load_inputs(path: str):
    """``(params, (x_train, y_train), batch_idx)`` from a file written by :func:`make_inputs`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    params = {k: arrays[k].astype(np.float32) for k in _shapes()}
    for k, shape in _shapes().items():
        if params[k].shape != shape:
            raise ValueError(f"{k} of {path} has shape {params[k].shape}, expected {shape}")
    batch_idx = arrays["batch_idx"].astype(np.int32)
    data = (arrays["x_train"].astype(np.float32), arrays["y_train"].astype(np.int32))
    return params, data, batch_idx


def forward(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Logits of NHWC images."""
    h = x
    for i in range(1, len(CHANNELS)):
        h = jax.lax.conv_general_dilated(
            h, params[f"k{i}"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jnp.tanh(h + params[f"b{i}"])
    return h.reshape(h.shape[0], -1) @ params["w"] + params["b"]


def loss_fn(params: dict[str, jax.Array], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy with the integer labels, mean over the batch."""
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y).mean()
