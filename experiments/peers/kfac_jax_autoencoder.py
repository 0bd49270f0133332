"""DeepMind's kfac-jax training the digits autoencoder (or CNN), run in its own environment.

Usage (with the interpreter of experiments/results/peer_envs/kfac, see setup_kfac_peer.sh):

    python experiments/peers/kfac_jax_autoencoder.py --inputs IN.npz --out OUT.json \
        [--loss-every 25] [--task autoencoder|cnn]

With ``--task cnn`` the task is experiments/digits_cnn.py's (softmax cross-entropy registered
on its logits, two conv layers and one dense layer); everything below holds the same way.

IN.npz is written by experiments/digits_autoencoder.py (weights, training rows, per-step
batch indices); the task and the model (its ``load_inputs``, ``forward`` and ``loss_fn``) are
that module's, shared with every jaxopt2 contender, so only the optimizer differs.

The optimizer is ``kfac_jax.Optimizer`` (kfac-jax 0.0.8) with adaptive learning rate,
adaptive momentum and adaptive (Levenberg-Marquardt) damping from ``initial_damping=1.0``,
``l2_reg=0`` (the task has no regularizer; the argument has no default), no burn-in steps,
and every other argument at the package default, read from the installed signature and
written into the output under ``settings`` (notably: estimation mode ``ggn_curvature_prop``,
curvature EMA 0.95 updated every step, inverses refreshed every 5 steps, damping adapted
every 5 steps by factors of 0.9**5). The loss function registers the sigmoid cross-entropy
loss on the output logits with the inputs as targets; its value is ``loss_fn``'s (sigmoid
binary cross-entropy summed over the 64 pixels, mean over the batch; checked before
training). The step's random keys are ``jax.random.fold_in(jax.random.PRNGKey(0), step)``.

Protocol: that of ``digits_autoencoder.run_timed``, with one difference forced by kfac-jax.
``Optimizer.step`` is a stateful Python method around internally jitted functions (no
ahead-of-time compile is exposed), and it compiles one program per combination of its static
flags (update the curvature estimate this step? adapt the damping this step?). So instead
of ``lower().compile()`` the peer runs one warm-up step per combination that the run will
use, each on a copy of the starting parameters and state (the real state is not advanced),
and reports that under ``warmup``; ``compile_s`` is the wall time of those warm-up steps.
The batch is gathered inside the compiled step (``batch_process_func`` gathers the rows of
``(x_train, idx)``), the Python step number is passed as ``global_step_int`` (so ``step``
does not read the counter back from the device), every step is timed from dispatch to
``block_until_ready``, and the full-training-set loss is computed every ``--loss-every``
steps and after the last one, outside the timed region. Compilations that still happen
inside the timed region are counted (``compiles_during_timing``, expected 0).

The result is written to ``--out`` and printed as one JSON line on standard output.
"""

from __future__ import annotations

import os
import sys

# XLA's concurrency-optimized CPU scheduler can deadlock programs with several eigh/matmul
# branches; turn it off before jax loads (jaxopt2's contenders run with it too).
# jax's CPU LAPACK runs on scipy's OpenBLAS, whose idle threads spin after each call and
# slow the next steps on few cores: one thread, as jaxopt2's contenders run (a user's
# setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import argparse
import importlib.metadata
import inspect
import json
import math
import time
import warnings

# kfac_jax sets jax_pmap_shmap_merge on import, which jax 0.9 flags as deprecated.
warnings.filterwarnings("ignore", message=".*jax_pmap_shmap_merge.*")

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kfac_jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import digits_autoencoder  # noqa: E402
import digits_cnn  # noqa: E402

task = digits_autoencoder  # the task module; main() switches it for --task cnn

PACKAGES = (
    "jax",
    "jaxlib",
    "kfac-jax",
    "optax",
    "chex",
    "distrax",
    "dm-tree",
    "tfp-nightly",
    "numpy",
)
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
INIT_KEY_SEED = 0

# Every Optimizer argument this peer sets (JSON-friendly descriptions of the callables).
SET_ARGUMENTS = {
    "value_and_grad_func": "jax.value_and_grad(value_fn): value_fn(params, batch) registers "
    "kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch) and returns "
    "digits_autoencoder.loss_fn's value",
    "l2_reg": 0.0,
    "use_adaptive_learning_rate": True,
    "use_adaptive_momentum": True,
    "use_adaptive_damping": True,
    "initial_damping": 1.0,
    "num_burnin_steps": 0,
    "batch_process_func": "gathers the batch rows of every data array inside the step",
}
# The defaults that shape this run most (all defaults are listed under settings.defaults).
KEY_DEFAULTS = (
    "estimation_mode",
    "curvature_ema",
    "curvature_update_period",
    "inverse_update_period",
    "use_exact_inverses",
    "damping_adaptation_interval",
    "damping_adaptation_decay",
    "damping_lower_threshold",
    "damping_upper_threshold",
    "min_damping",
    "max_damping",
    "include_damping_in_quad_change",
    "always_use_exact_qmodel_for_damping_adjustment",
    "precon_damping_mult",
    "use_initial_damping_calibration",
    "use_step_rejection",
    "norm_constraint",
    "num_estimator_samples",
    "precon_power",
    "exact_quad_model_matrix_type",
    "use_automatic_registration",
    "register_only_generic",
)


def json_value(value):
    """A JSON-friendly (strict JSON: no NaN/Infinity) version of a default."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        value = value.item() if np.ndim(value) == 0 else np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [json_value(v) for v in value]
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', value)}"
    return str(value)


def package_defaults() -> dict:
    """Every default of kfac_jax.Optimizer except the arguments we set."""
    signature = inspect.signature(kfac_jax.Optimizer.__init__)
    return {
        name: json_value(p.default)
        for name, p in signature.parameters.items()
        if name not in SET_ARGUMENTS and p.default is not inspect.Parameter.empty
    }


def value_fn(params, batch):
    """digits_autoencoder.loss_fn, with the logits registered as a sigmoid cross-entropy loss.

    kfac_jax's registration assumes ``weight * sum(sigmoid_ce) / batch_size``, i.e. summed over
    the pixels and averaged over the rows, which is loss_fn's normalization (weight 1).
    """
    if task is digits_cnn:
        x, y = batch
        logits = task.forward(params, x)
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    logits = task.forward(params, batch)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, batch)
    return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1))


def gather_batch(batch):
    data, idx = batch
    return jax.tree.map(lambda d: d[idx], data)


def make_optimizer() -> kfac_jax.Optimizer:
    kwargs = {k: v for k, v in SET_ARGUMENTS.items() if not isinstance(v, str)}
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(value_fn),
        batch_process_func=gather_batch,
        **kwargs,
    )


def copy_tree(tree):
    """Fresh buffers (kfac_jax's step donates its params and state)."""
    return jax.tree.map(lambda a: a.copy(), tree)


def run_timed(inputs: str, *, loss_every: int = 25) -> dict:
    """digits_autoencoder.run_timed's protocol, with kfac_jax's stateful step (see above)."""
    params_np, x_np, batch_idx = task.load_inputs(inputs)
    steps = int(batch_idx.shape[0])

    params = jax.device_put(params_np)
    x_train = jax.device_put(x_np)
    idx = [jax.device_put(batch_idx[t]) for t in range(steps)]
    base_key = jax.random.PRNGKey(0)
    keys = [jax.random.fold_in(base_key, t) for t in range(steps)]

    # The registered loss's value is the task's loss (checked on the first batch).
    xb = gather_batch((x_train, idx[0]))
    ours, theirs = float(jax.jit(value_fn)(params, xb)), float(jax.jit(task.loss_fn)(params, xb))
    if not abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)):
        raise AssertionError(f"value_fn {ours} != digits_autoencoder.loss_fn {theirs}")

    optimizer = make_optimizer()
    state = optimizer.init(params, jax.random.PRNGKey(INIT_KEY_SEED), (x_train, idx[0]))
    blocks = optimizer._estimator.blocks
    block_index = optimizer._estimator.params_block_index
    curvature_blocks = {name: type(blocks[i]).__name__ for name, i in sorted(block_index.items())}
    expected = {"DenseTwoKroneckerFactored"}
    if task is digits_cnn:
        expected.add("Conv2DTwoKroneckerFactored")
    if set(curvature_blocks.values()) != expected:
        raise AssertionError(f"kfac_jax did not register the task's layers: {curvature_blocks}")
    jax.block_until_ready((params, state, x_train, idx, keys))

    # The step's static flags for each step number (kfac_jax.Optimizer.step's own logic).
    def flags(t):
        return (
            bool(optimizer._should_update_estimate_curvature(t)),
            bool(optimizer._should_update_damping(t)),
        )

    first_step_of = {}
    for t in range(steps):
        first_step_of.setdefault(flags(t), t)

    # Warm-up (compile) on copies: one step per flag combination, at its first step number.
    t0 = time.perf_counter()
    for t in first_step_of.values():
        out = optimizer.step(
            *copy_tree((params, state)), keys[t], batch=(x_train, idx[t]), global_step_int=t
        )
        jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    warmup = (
        "kfac_jax.Optimizer.step exposes no ahead-of-time compile; before timing, one warm-up "
        f"step ran for each of its {len(first_step_of)} compiled variants (static flags "
        "update_curvature, update_damping = "
        + ", ".join(f"{f} at step {t}" for f, t in first_step_of.items())
        + ") on a copy of the starting params and optimizer state, whose results were "
        "discarded; compile_s is their wall time (compile + one execution each)"
    )
    full_loss = jax.jit(task.loss_fn).lower(params, x_train).compile()

    compiles = []

    def on_event(event, duration_secs, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration_secs)

    times, losses, step_stats = [], [], []
    compiles_during_timing = 0
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        for t in range(steps):
            if t % loss_every == 0:
                losses.append([t, float(full_loss(params, x_train))])
            before = len(compiles)
            t0 = time.perf_counter()
            params, state, stats = optimizer.step(
                params, state, keys[t], batch=(x_train, idx[t]), global_step_int=t
            )
            jax.block_until_ready((params, state, stats))
            times.append(time.perf_counter() - t0)
            compiles_during_timing += len(compiles) - before
            step_stats.append([t] + [float(stats[k]) for k in STEP_STATS])
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    losses.append([steps, float(full_loss(params, x_train))])
    return {
        **digits_autoencoder.timing_record(times, losses, compile_s, state, params_np),
        "warmup": warmup,
        "compiles_during_timing": compiles_during_timing,
        "step_stats_columns": ["step", *STEP_STATS],
        "step_stats": step_stats,
        "curvature_blocks": curvature_blocks,
        "estimation_mode_resolved": optimizer._estimator.default_estimation_mode,
    }


# Per-step statistics from kfac_jax's step, read after the timed region of each step
# (new_loss and rho are NaN on steps that do not adapt the damping).
STEP_STATS = ("loss", "learning_rate", "momentum", "damping", "new_loss", "rho")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--loss-every", type=int, default=25)
    parser.add_argument("--task", choices=("autoencoder", "cnn"), default="autoencoder")
    args = parser.parse_args(argv)
    global task
    task = digits_cnn if args.task == "cnn" else digits_autoencoder

    timed = run_timed(args.inputs, loss_every=args.loss_every)
    defaults = package_defaults()
    settings = {
        "set": {**SET_ARGUMENTS, "step(global_step_int=...)": "the Python step number"},
        "key_defaults": {k: defaults[k] for k in KEY_DEFAULTS},
        "estimation_mode_resolved": timed.pop("estimation_mode_resolved"),
        "curvature_blocks": timed.pop("curvature_blocks"),
        "step_keys": "jax.random.fold_in(jax.random.PRNGKey(0), step)",
        "init_key": f"jax.random.PRNGKey({INIT_KEY_SEED})",
        "defaults": defaults,
    }
    warmup = timed.pop("warmup")
    result = {"name": "kfac_jax", **timed, "settings": settings, "warmup": warmup}
    result["versions"] = {p: importlib.metadata.version(p) for p in PACKAGES}
    result["x64_enabled"] = bool(jax.config.jax_enable_x64)
    # step_stats may hold NaN (rho/new_loss off the damping steps): write them as null.
    result["step_stats"] = [
        [None if isinstance(v, float) and not math.isfinite(v) else v for v in row]
        for row in result["step_stats"]
    ]
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
