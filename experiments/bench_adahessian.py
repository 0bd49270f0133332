"""AdaHessian against Adam on the digits MLP classifier: loss curves and step time.

How to run (from the repository root, CPU only, about a minute on 2 cores)::

    python experiments/bench_adahessian.py            # 300 steps per run
    python experiments/bench_adahessian.py --steps 60 # a smoke test

Setup (``experiments/digits_mlp.py``): scikit-learn's digits, pixels / 16, permutation with
seed 0, 1437 training and 360 evaluation rows; MLP 64-128-128-10 with tanh units, softmax
cross-entropy averaged over the batch, PyTorch-style uniform initialization from seed 0.
Every run starts from the same weights and sees the same mini-batches of 256 (one fixed
shuffle per epoch, remainder dropped) and the same per-step PRNG keys (used by AdaHessian's
Rademacher probes only). Learning rates: Adam {1e-3, 3e-3, 1e-2}, AdaHessian
{0.03, 0.1, 0.3}; everything else at the library defaults (AdaHessian: one probe per step,
``hessian_power=1``, ``eps=1e-4``). Steps go through ``jaxopt2.value_and_update`` inside a
jitted ``lax.scan`` over segments of ``--segment`` steps.

Protocol: the full training loss and the evaluation loss and accuracy are computed between
segments, outside the timed region. Each segment function is compiled and run once on the
initial state first (discarded); then the segments of all runs are interleaved (each round
runs the next segment of every run, in a rotating order), each timed to
``block_until_ready``. The step time is the total warm segment time over the number of
steps (mean) and the median segment time over the segment length.

Prints one JSON object per run, then a summary; writes ``experiments/results/
bench_adahessian.jsonl`` and ``bench_adahessian.png`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import digits_mlp as dm
import jax
import jax.numpy as jnp
import numpy as np
import optax
import timing
from timing import rounded

import jaxopt2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BATCH = 256
GRID = {"adam": (1e-3, 3e-3, 1e-2), "adahessian": (0.03, 0.1, 0.3)}

_lines: list[dict[str, Any]] = []


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)
    _lines.append(obj)


def batch_indices(num_steps: int, n: int, seed: int) -> np.ndarray:
    """``[num_steps, BATCH]`` row indices: a fresh shuffle per epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // BATCH
    epochs = -(-num_steps // per_epoch)
    rows = [
        rng.permutation(n)[: per_epoch * BATCH].reshape(per_epoch, BATCH) for _ in range(epochs)
    ]
    return np.concatenate(rows)[:num_steps]


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    return jaxopt2.adam(lr) if name == "adam" else jaxopt2.adahessian(lr)


def make_segment(opt):
    @jax.jit
    def segment(params, state, x, y, idx, keys):
        def step(carry, inp):
            params, state = carry
            rows, key = inp
            loss, updates, state = jaxopt2.value_and_update(
                opt, dm.loss_fn, params, state, x[rows], y[rows], key=key
            )
            return (optax.apply_updates(params, updates), state), loss

        (params, state), losses = jax.lax.scan(step, (params, state), (idx, keys))
        return params, state, losses

    return segment


@jax.jit
def evaluate(params, x_train, y_train, x_eval, y_eval):
    return (
        dm.loss_fn(params, x_train, y_train),
        dm.loss_fn(params, x_eval, y_eval),
        dm.accuracy(params, x_eval, y_eval),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="AdaHessian vs Adam on digits (JSON lines).")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--segment", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.steps % args.segment:
        parser.error("--steps must be a multiple of --segment")
    t_start = time.perf_counter()

    x_tr, y_tr, x_ev, y_ev = (jnp.asarray(a) for a in dm.digits_split())
    params0 = dm.init_params(128, seed=args.seed)
    idx = jnp.asarray(batch_indices(args.steps, x_tr.shape[0], args.seed))
    keys = jax.random.split(jax.random.PRNGKey(args.seed + 1), args.steps)
    num_segments = args.steps // args.segment

    runs = []
    for name, lrs in GRID.items():
        for lr in lrs:
            opt = make_optimizer(name, lr)
            run = {"optimizer": name, "lr": lr, "segment": make_segment(opt)}
            run["params"], run["state"] = params0, opt.init(params0)
            # Compile + one throwaway segment from the initial state (not timed, not kept).
            t0 = time.perf_counter()
            jax.block_until_ready(
                run["segment"](
                    params0, run["state"], x_tr, y_tr, idx[: args.segment], keys[: args.segment]
                )
            )
            run["first_call_s"] = time.perf_counter() - t0
            run["seconds"], run["batch_loss"] = [], []
            run["curve"] = [[0, *map(float, evaluate(params0, x_tr, y_tr, x_ev, y_ev))]]
            runs.append(run)

    for s in range(num_segments):
        sl = slice(s * args.segment, (s + 1) * args.segment)
        shift = s % len(runs)
        for run in runs[shift:] + runs[:shift]:
            t0 = time.perf_counter()
            params, state, losses = jax.block_until_ready(
                run["segment"](run["params"], run["state"], x_tr, y_tr, idx[sl], keys[sl])
            )
            run["seconds"].append(time.perf_counter() - t0)
            run["params"], run["state"] = params, state
            run["batch_loss"].extend(np.asarray(losses).tolist())
            evals = evaluate(params, x_tr, y_tr, x_ev, y_ev)
            run["curve"].append([sl.stop, *map(float, evals)])

    results = []
    for run in runs:
        curve = np.asarray(run["curve"])
        res = {
            "metric": "adahessian_vs_adam_run",
            "optimizer": run["optimizer"],
            "lr": run["lr"],
            "steps": args.steps,
            "batch": BATCH,
            "final_train_loss": curve[-1, 1],
            "final_eval_loss": curve[-1, 2],
            "final_eval_accuracy": curve[-1, 3],
            "min_eval_loss": float(np.min(curve[:, 2])),
            "finite": bool(np.all(np.isfinite(curve))),
            "mean_step_ms": 1e3 * sum(run["seconds"]) / args.steps,
            "median_step_ms": 1e3 * timing.median(run["seconds"]) / args.segment,
            "first_call_s": run["first_call_s"],
        }
        emit(rounded(res))
        results.append((run, res))

    def best(name):
        cands = [r for _, r in results if r["optimizer"] == name and r["finite"]]
        return min(cands, key=lambda r: r["final_train_loss"]) if cands else None

    b_adam, b_ah = best("adam"), best("adahessian")
    summary = {
        "metric": "adahessian_vs_adam_summary",
        "selection": "best learning rate of each optimizer by final full-batch training loss",
        "adam": {k: b_adam[k] for k in ("lr", "final_train_loss", "final_eval_loss")},
        "adahessian": {k: b_ah[k] for k in ("lr", "final_train_loss", "final_eval_loss")},
        "adahessian_over_adam_step_time": float(
            np.median([r["median_step_ms"] for _, r in results if r["optimizer"] == "adahessian"])
            / np.median([r["median_step_ms"] for _, r in results if r["optimizer"] == "adam"])
        ),
        "wall_s": time.perf_counter() - t_start,
        "load_average": timing.load_average(),
    }
    emit(rounded(summary))

    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "bench_adahessian.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in _lines)
        )
        plot(RESULTS / "bench_adahessian.png", results)
    return 0


def plot(path: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = {"adam": plt.cm.Blues, "adahessian": plt.cm.Oranges}
    for run, res in results:
        name, lr = run["optimizer"], run["lr"]
        shade = 0.45 + 0.5 * GRID[name].index(lr) / (len(GRID[name]) - 1)
        color = colors[name](shade)
        curve = np.asarray(run["curve"])
        label = f"{name} lr={lr:g} ({res['median_step_ms']:.2f} ms/step)"
        axes[0].plot(curve[:, 0], curve[:, 1], color=color, label=label)
        axes[1].plot(curve[:, 0], curve[:, 2], color=color, label=label)
        axes[2].plot(curve[:, 0], curve[:, 3], color=color, label=label)
    axes[0].set_title("full-batch training loss")
    axes[1].set_title("evaluation loss (360 held-out digits)")
    axes[2].set_title("evaluation accuracy")
    for ax in axes[:2]:
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel(f"step (batch {BATCH})")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
