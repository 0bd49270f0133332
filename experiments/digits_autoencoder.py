"""The digits autoencoder benchmark task and its timing protocol, shared by every contender.

Task: scikit-learn's bundled 8x8 digits, pixels / 16, shuffled with
``numpy.random.default_rng(0).permutation``; the first 1437 rows are the training set. Model:
MLP 64-512-256-32-256-512-64 with tanh hidden units and a linear output; loss: sigmoid
cross-entropy of the output logits against the input pixels, summed over the 64 pixels and
averaged over the batch. Weights are stored ``(fan_in, fan_out)`` and initialized like
PyTorch's ``nn.Linear`` (uniform in ``±1/sqrt(fan_in)``, biases too) from seed 0. Batches of
256 rows: a fresh permutation per epoch (seed 1), remainder dropped.

:func:`make_inputs` writes all of that (weights, training rows, per-step row indices) to one
``.npz``; every contender, jaxopt2's and the peers' (run in their own environments), loads
that file, so they all start from the same weights and see the same batches.

Protocol (:func:`run_timed`): the train step (gradient + optimizer update + apply, batch
gathered inside ``jit``) is compiled ahead of time (``jit(...).lower(...).compile()``: no
warm-up call advances the state), then every step is timed from dispatch to
``block_until_ready``. The full-training-set loss is computed every ``loss_every`` steps and
after the last one, outside the timed region. This module imports only jax, numpy and optax
(scikit-learn lazily in :func:`make_inputs`), so it runs in the peers' environments too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SIZES = (64, 512, 256, 32, 256, 512, 64)
NUM_TRAIN = 1437
BATCH = 256


def make_inputs(path: str, steps: int, *, seed: int = 0, batch_seed: int = 1) -> None:
    """Write the shared starting point (weights, data, batch indices) to ``path`` (.npz)."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0).astype(np.float32)
    x = x[np.random.default_rng(0).permutation(len(x))][:NUM_TRAIN]
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES), start=1):
        bound = 1.0 / np.sqrt(fan_in)
        arrays[f"w{i}"] = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        arrays[f"b{i}"] = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    batch_rng = np.random.default_rng(batch_seed)
    per_epoch = NUM_TRAIN // BATCH
    epochs = -(-steps // per_epoch)
    rows = [batch_rng.permutation(NUM_TRAIN)[: per_epoch * BATCH] for _ in range(epochs)]
    batch_idx = np.concatenate(rows).reshape(-1, BATCH)[:steps].astype(np.int32)
    np.savez(path, x_train=x, batch_idx=batch_idx, **arrays)


def load_inputs(path: str) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """``(params, x_train, batch_idx)`` from a file written by :func:`make_inputs`."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    names = [f"{kind}{i}" for i in range(1, len(SIZES)) for kind in "wb"]
    params = {k: arrays[k].astype(np.float32) for k in names}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(SIZES), start=1):
        if params[f"w{i}"].shape != (fan_in, fan_out) or params[f"b{i}"].shape != (fan_out,):
            raise ValueError(f"layer {i} of {path} is not {fan_in} -> {fan_out}")
    batch_idx = arrays["batch_idx"].astype(np.int32)
    x_train = arrays["x_train"].astype(np.float32)
    if batch_idx.min() < 0 or batch_idx.max() >= len(x_train):
        raise ValueError(f"batch_idx of {path} indexes outside x_train")
    return params, x_train, batch_idx


def forward(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Output logits: tanh on the five hidden layers, linear output."""
    n = len(SIZES) - 1
    h = x
    for i in range(1, n):
        h = jnp.tanh(h @ params[f"w{i}"] + params[f"b{i}"])
    return h @ params[f"w{n}"] + params[f"b{n}"]


def loss_fn(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy against the inputs, summed over pixels, mean over rows."""
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(forward(params, x), x), axis=-1))


def state_bytes(tree: Any) -> int:
    leaves = jax.tree.leaves(tree)
    return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in leaves))


def run_timed(
    optimizer: optax.GradientTransformation,
    inputs: str,
    *,
    loss_every: int = 25,
    step_fn: Callable[..., Any] | None = None,
    task: Any = None,
) -> dict[str, Any]:
    """Train from ``inputs`` with `optimizer` under the protocol of the module docstring.

    ``step_fn(optimizer, params, state, batch, step) -> (params, state, loss)`` replaces the
    default step (gradient, ``optimizer.update(grads, state, params)``, apply) when given;
    ``step`` is the traced int32 step number (for per-step PRNG keys). ``task`` is the task
    module (this one by default; ``digits_cnn`` has the same functions): its
    ``load_inputs(path) -> (params, data, batch_idx)`` and ``loss_fn(params, batch)``, a batch
    being the rows ``idx`` of every array of ``data``.
    """
    import sys

    task = task or sys.modules[__name__]
    params_np, x_np, batch_idx = task.load_inputs(inputs)
    steps = int(batch_idx.shape[0])

    def default_step(opt, params, state, xb, step):
        del step
        loss, grads = jax.value_and_grad(task.loss_fn)(params, xb)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    inner = step_fn or default_step

    def train_step(params, state, x_train, idx, step):
        batch = jax.tree.map(lambda d: d[idx], x_train)
        return inner(optimizer, params, state, batch, step)

    params = jax.device_put(params_np)
    x_train = jax.device_put(x_np)
    state = optimizer.init(params)
    idx = [jax.device_put(batch_idx[t]) for t in range(steps)]
    step_no = [jax.device_put(np.int32(t)) for t in range(steps)]
    jax.block_until_ready((params, state, x_train, idx, step_no))

    t0 = time.perf_counter()
    step = jax.jit(train_step).lower(params, state, x_train, idx[0], step_no[0]).compile()
    compile_s = time.perf_counter() - t0
    full_loss = jax.jit(task.loss_fn).lower(params, x_train).compile()

    times, losses = [], []
    for t in range(steps):
        if t % loss_every == 0:
            losses.append([t, float(full_loss(params, x_train))])
        t0 = time.perf_counter()
        params, state, loss = step(params, state, x_train, idx[t], step_no[t])
        jax.block_until_ready((params, state, loss))
        times.append(time.perf_counter() - t0)
    losses.append([steps, float(full_loss(params, x_train))])
    record = timing_record(times, losses, compile_s, state, params_np)
    return {**record, "versions": {"jax": jax.__version__, "optax": optax.__version__}}


def value_and_update_step(loss: Callable[[Any, Any], jax.Array]) -> Callable[..., Any]:
    """A :func:`run_timed` ``step_fn`` for the curvature methods: ``jaxopt2.value_and_update``
    on ``loss(params, batch)`` (so the update gets ``value_fn``), with the key
    ``fold_in(PRNGKey(0), step)``. Main environment only (imports jaxopt2)."""
    import jaxopt2

    def step_fn(opt, params, state, batch, step):
        key = jax.random.fold_in(jax.random.PRNGKey(0), step)
        value, updates, state = jaxopt2.value_and_update(opt, loss, params, state, batch, key=key)
        return optax.apply_updates(params, updates), state, value

    return step_fn


def timing_record(
    times: list[float], losses: list[list[float]], compile_s: float, state: Any, params_np: Any
) -> dict[str, Any]:
    """The per-contender result every benchmark reports: step-time statistics, losses, the
    optimizer state's bytes per parameter."""
    arr = np.asarray(times)
    num_params = sum(int(np.size(v)) for v in jax.tree.leaves(params_np))
    return {
        "steps": len(times),
        "mean_step_s": float(arr.mean()),
        "median_step_s": float(np.median(arr)),
        "p99_step_s": float(np.percentile(arr, 99)),
        "max_step_s": float(arr.max()),
        "compile_s": compile_s,
        "step_times_s": times,
        "losses": losses,
        "final_loss": losses[-1][1],
        "state_bytes_per_param": state_bytes(state) / num_params,
        "num_params": num_params,
    }


# ------------------------------------------------------------------------------------------
# Helpers of the benchmark drivers (main environment only).
# ------------------------------------------------------------------------------------------


def run_process(cmd: list[str], out: Any, cwd: Any, name: str | None = None) -> dict[str, Any]:
    """Run one contender's process, print its result (without per-step times) as a JSON line,
    and return the JSON it wrote to `out` (its ``name`` set to `name` when given)."""
    import json
    import subprocess
    from pathlib import Path

    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(Path(out).read_text())
    if name is not None:
        result["name"] = name
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}), flush=True)
    return result


def worker_command(script: str, name: str, inputs: str, out: Any) -> list[str]:
    """The command line that runs contender `name` of a benchmark script in its own process."""
    import sys

    return [sys.executable, script, "--worker", name, "--inputs", inputs, "--out", str(out)]


def steps_to_reach(losses: list[list[float]], target: float) -> int | None:
    """The first logged step whose full-data loss is at most `target`."""
    return next((int(step) for step, loss in losses if loss <= target), None)


def plot_losses(results: dict[str, dict[str, Any]], path: Any, title: str, peers=()) -> None:
    """Full-data loss against steps and against training time; `peers` drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, r) in enumerate(results.items()):
        steps, losses = np.asarray(r["losses"]).T
        cum = np.concatenate([[0.0], np.cumsum(r["step_times_s"])])
        dashed = name.startswith(("distributed", "kfac_jax", *peers))
        style = {
            "label": name,
            "color": colors[i % len(colors)],
            "linestyle": "--" if dashed else "-",
        }
        ax1.plot(steps, losses, **style)
        ax2.plot(cum[steps.astype(int)][1:], losses[1:], **style)
    for ax, xlabel in ((ax1, "step"), (ax2, "training time (s, compile excluded)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("full-data loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    ax2.set_xscale("log")
    ax1.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
