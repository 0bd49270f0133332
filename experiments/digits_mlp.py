"""The digits MLP classifier used by the benchmarks in this folder.

Data: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels divided by 16,
shuffled by ``numpy.random.default_rng(0).permutation``; the first 1437 rows (80 %) are the
training set, the remaining 360 the evaluation set.

Model: ``64 -> W -> W -> 10`` with tanh hidden units and the softmax cross-entropy averaged
over the batch. Weights are stored ``(fan_in, fan_out)`` and initialized like PyTorch's
``nn.Linear`` default: weights and biases uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.
The same arrays are written to an ``.npz`` file so the PyTorch peer evaluates the same
function at the same point.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

NUM_TRAIN = 1437
NUM_CLASSES = 10
LAYERS = ("1", "2", "3")


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_eval, y_eval)`` as float32 pixels in [0, 1] and int32 labels."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return x[:NUM_TRAIN], y[:NUM_TRAIN], x[NUM_TRAIN:], y[NUM_TRAIN:]


def init_params(width: int, seed: int = 0) -> dict[str, jax.Array]:
    """float32 parameters ``{"w1", "b1", "w2", "b2", "w3", "b3"}`` of the 64-W-W-10 MLP."""
    sizes = [64, width, width, NUM_CLASSES]
    keys = jax.random.split(jax.random.PRNGKey(seed), 2 * len(LAYERS))
    params = {}
    for i, name in enumerate(LAYERS):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        bound = 1.0 / np.sqrt(fan_in)
        params[f"w{name}"] = jax.random.uniform(
            keys[2 * i], (fan_in, fan_out), jnp.float32, -bound, bound
        )
        params[f"b{name}"] = jax.random.uniform(
            keys[2 * i + 1], (fan_out,), jnp.float32, -bound, bound
        )
    return params


def logits_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    h = jnp.tanh(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy with integer labels, a mean over the batch."""
    logp = jax.nn.log_softmax(logits_fn(params, x), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def accuracy(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits_fn(params, x), axis=-1) == y)


def cast(tree, dtype):
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def num_params(params) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(params)))


def save_inputs(path: str | Path, params: dict[str, jax.Array], x: np.ndarray, y: np.ndarray):
    """Write the weights and the batch for the PyTorch peer (weights as ``(fan_in, fan_out)``)."""
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
    np.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64), **arrays)
