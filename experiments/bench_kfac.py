"""jaxopt2 K-FAC against kfac-jax and Adam on the digits autoencoder.

How to run (from the repository root; a few minutes on 2 CPU cores)::

    bash experiments/peers/setup_kfac_peer.sh        # once: kfac-jax 0.0.8 on jax 0.9.0, own venv
    python experiments/bench_kfac.py                 # 300 steps, every contender
    python experiments/bench_kfac.py --steps 40 --no-peer --no-write   # a smoke run

Task and protocol: ``experiments/digits_autoencoder.py`` (same initial weights and batches for
everyone, ahead-of-time compiled step timed to ``block_until_ready``, full-data loss every 5
steps). Contenders, each in its own process: ``jaxopt2.optimizers.kfac.kfac()`` with its
defaults (adaptive learning rate, momentum and damping; no per-task tuning), kfac-jax with
adaptive learning rate, momentum and damping (its own venv, see
``experiments/peers/kfac_jax_autoencoder.py`` for its settings), and ``optax.adam`` at 1e-3
and 3e-3. jaxopt2's loss is the task's loss with ``jaxopt2.tag_loss`` on the logits.

Prints one JSON line per contender and a summary (mean step time ratio to kfac-jax, final
losses, Adam's loss at K-FAC's step count and at K-FAC's training time); writes
``experiments/results/bench_kfac.jsonl`` and ``bench_kfac.png`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
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
LOSS_EVERY = 5


def worker(name: str, inputs: str, out: str) -> None:
    import jaxopt2

    jaxopt2.apply_cpu_deadlock_workaround()
    import digits_autoencoder as task
    import jax
    import jax.numpy as jnp
    import optax

    from jaxopt2.optimizers.kfac import kfac

    def tagged_loss(params, x):
        logits = jaxopt2.tag_loss("sigmoid_cross_entropy", task.forward(params, x), x)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, x), axis=-1))

    def step_fn(opt, params, state, xb, step):
        key = jax.random.fold_in(jax.random.PRNGKey(0), step)
        loss, updates, state = jaxopt2.value_and_update(
            opt, tagged_loss, params, state, xb, key=key
        )
        return optax.apply_updates(params, updates), state, loss

    optimizer = eval(CONTENDERS[name], {"optax": optax, "kfac": kfac})  # a fixed table
    result = {"name": name, "call": CONTENDERS[name]}
    result.update(task.run_timed(optimizer, inputs, loss_every=LOSS_EVERY, step_fn=step_fn))
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.inputs, args.out)
        return
    sys.path.insert(0, str(ROOT / "experiments"))
    import digits_autoencoder as task

    if not args.no_peer and not PEER_PYTHON.exists():
        parser.error(
            f"no peer environment at {PEER_PYTHON}: run experiments/peers/setup_kfac_peer.sh "
            "or pass --no-peer"
        )
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        task.make_inputs(inputs, args.steps)
        for name in CONTENDERS:
            out = Path(tmp) / f"{name}.json"
            cmd = task.worker_command(__file__, name, inputs, out)
            results[name] = task.run_process(cmd, out, ROOT)
        if not args.no_peer:
            out = Path(tmp) / "kfac_jax.json"
            cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--inputs", inputs, "--out", str(out),
                   "--loss-every", str(LOSS_EVERY)]  # fmt: skip
            results["kfac_jax"] = task.run_process(cmd, out, ROOT, name="kfac_jax")
    summary = summarize(results)
    print(json.dumps(summary), flush=True)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        lines = [*results.values(), summary]
        (RESULTS / "bench_kfac.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        task.plot_losses(results, RESULTS / "bench_kfac.png", "digits autoencoder: K-FAC vs peers")


if __name__ == "__main__":
    main()
