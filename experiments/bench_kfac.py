"""jaxopt2 K-FAC against kfac-jax and Adam on the digits autoencoder.

How to run (from the repository root; a few minutes on 2 CPU cores)::

    bash experiments/peers/setup_kfac_peer.sh        # once: kfac-jax 0.0.8 on jax 0.9.0, own venv
    python experiments/bench_kfac.py                 # 300 steps, every contender
    python experiments/bench_kfac.py --task cnn       # the digits CNN (digits_cnn.py)
    python experiments/bench_kfac.py --steps 40 --no-peer --no-write   # a smoke run

Task and protocol: ``experiments/digits_autoencoder.py`` (same initial weights and batches for
everyone, ahead-of-time compiled step timed to ``block_until_ready``, full-data loss every 5
steps). Contenders, each in its own process: ``jaxopt2.optimizers.kfac.kfac()`` with its
defaults (adaptive learning rate, momentum and damping; no per-task tuning), kfac-jax with
adaptive learning rate, momentum and damping (its own venv, see
``experiments/peers/kfac_jax_autoencoder.py`` for its settings), and ``optax.adam`` at 1e-3
and 3e-3. jaxopt2's loss is the task's loss with ``jaxopt2.tag_loss`` on the logits.

``--breakdown`` adds K-FAC with parts switched off (see ``BREAKDOWN``) and reports where the
step time goes (``breakdown_ms`` in the summary).

Prints one JSON line per contender and a summary (mean step time ratio to kfac-jax, final
losses, Adam's loss at K-FAC's step count and at K-FAC's training time); writes
``experiments/results/bench_kfac.jsonl`` and ``bench_kfac.png`` (``bench_kfac_cnn.*`` for the
CNN) unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
PEER_PYTHON = RESULTS / "peer_envs" / "kfac" / "bin" / "python"
PEER_SCRIPT = ROOT / "experiments" / "peers" / "kfac_jax_autoencoder.py"
CONTENDERS = {
    "adam_1e-3": "optax.adam(1e-3)",
    "adam_3e-3": "optax.adam(3e-3)",
    "kfac": "kfac()",
}
# --breakdown: where K-FAC's step time goes, each row adding one part to the previous one.
BREAKDOWN = {
    "sgd": "optax.sgd(1e-3)",  # the gradient (and apply): the floor of any method
    "kfac_stats": "kfac(1e-3, invert_every=10**9)",  # + sampled-Fisher backward, statistics,
    # preconditioning (inverses only at step 0)
    "kfac_inverses": "kfac(1e-3)",  # + the inverses every 5 steps, amortized
}  # "kfac" (the default) adds the two Gauss-Newton products and the damping adaptation
LOSS_EVERY = 5
TASKS = {"autoencoder": "digits_autoencoder", "cnn": "digits_cnn"}


def worker(name: str, inputs: str, out: str, task_name: str) -> None:
    import jaxopt2

    jaxopt2.cpu.apply_cpu_deadlock_workaround()
    jaxopt2.cpu.limit_lapack_threads()
    import digits_autoencoder
    import jax.numpy as jnp
    import optax

    from jaxopt2 import kfac

    task = importlib.import_module(TASKS[task_name])

    def tagged_loss(params, batch):
        if task_name == "cnn":
            x, y = batch
            logits = jaxopt2.tag_loss("softmax_cross_entropy", task.forward(params, x), y)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        logits = jaxopt2.tag_loss("sigmoid_cross_entropy", task.forward(params, batch), batch)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1))

    call = {**CONTENDERS, **BREAKDOWN}[name]
    optimizer = eval(call, {"optax": optax, "kfac": kfac})  # a fixed table
    result = {"name": name, "call": call}
    result.update(
        digits_autoencoder.run_timed(
            optimizer,
            inputs,
            loss_every=LOSS_EVERY,
            step_fn=digits_autoencoder.value_and_update_step(tagged_loss),
            task=task,
        )
    )
    Path(out).write_text(json.dumps(result))


def loss_at(r: dict[str, Any], *, step: int | None = None, seconds: float | None = None) -> float:
    """Full-data loss at the last logged step <= `step`, or reached within `seconds`."""
    import numpy as np

    cum = np.concatenate([[0.0], np.cumsum(r["step_times_s"])])
    best = r["losses"][0][1]
    for s, loss in r["losses"]:
        if (step is not None and s <= step) or (seconds is not None and cum[int(s)] <= seconds):
            best = loss
    return best


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ours = results["kfac"]
    summary: dict[str, Any] = {"name": "summary", "kfac_final_loss": ours["final_loss"]}
    kfac_time = sum(ours["step_times_s"])
    for name in ("adam_1e-3", "adam_3e-3"):
        summary[f"{name}_loss_at_equal_steps"] = results[name]["final_loss"]
        summary[f"{name}_loss_at_kfac_time"] = loss_at(results[name], seconds=kfac_time)
    if "kfac_stats" in results:  # the floor: each part's share of the mean step time
        parts = ["sgd", "kfac_stats", "kfac_inverses", "kfac"]
        means = [results[p]["mean_step_s"] for p in parts]
        summary["breakdown_ms"] = {
            "gradient": 1e3 * means[0],
            "fisher_backward_statistics_preconditioning": 1e3 * (means[1] - means[0]),
            "inverses_amortized": 1e3 * (means[2] - means[1]),
            "adaptive_step_gauss_newton_products_damping": 1e3 * (means[3] - means[2]),
            "total": 1e3 * means[3],
        }
    if "kfac_jax" in results:
        peer = results["kfac_jax"]
        summary["kfac_mean_step_vs_kfac_jax"] = ours["mean_step_s"] / peer["mean_step_s"]
        summary["kfac_jax_final_loss"] = peer["final_loss"]
        summary["kfac_final_loss_minus_kfac_jax"] = ours["final_loss"] - peer["final_loss"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-peer", action="store_true", help="skip kfac-jax")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--task", choices=sorted(TASKS), default="autoencoder")
    parser.add_argument(
        "--breakdown", action="store_true", help="also time K-FAC with parts switched off"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.inputs, args.out, args.task)
        return
    sys.path.insert(0, str(ROOT / "experiments"))
    import digits_autoencoder

    task = importlib.import_module(TASKS[args.task])
    stem = "bench_kfac" if args.task == "autoencoder" else f"bench_kfac_{args.task}"
    if not args.no_peer and not PEER_PYTHON.exists():
        parser.error(
            f"no peer environment at {PEER_PYTHON}: run experiments/peers/setup_kfac_peer.sh "
            "or pass --no-peer"
        )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        task.make_inputs(inputs, args.steps)
        for name in [*CONTENDERS, *(BREAKDOWN if args.breakdown else ())]:
            out = Path(tmp) / f"{name}.json"
            cmd = [*digits_autoencoder.worker_command(__file__, name, inputs, out),
                   "--task", args.task]  # fmt: skip
            results[name] = digits_autoencoder.run_process(cmd, out, ROOT)
        if not args.no_peer:
            out = Path(tmp) / "kfac_jax.json"
            cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--inputs", inputs, "--out", str(out),
                   "--loss-every", str(LOSS_EVERY), "--task", args.task]  # fmt: skip
            results["kfac_jax"] = digits_autoencoder.run_process(cmd, out, ROOT, name="kfac_jax")
    summary = summarize(results)
    print(json.dumps(summary), flush=True)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        lines = [*results.values(), summary]
        (RESULTS / f"{stem}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        digits_autoencoder.plot_losses(
            results, RESULTS / f"{stem}.png", f"digits {args.task}: K-FAC vs peers"
        )


if __name__ == "__main__":
    main()
