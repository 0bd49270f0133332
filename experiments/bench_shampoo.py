"""Shampoo and SOAP against Distributed Shampoo, Adam and Muon on the digits autoencoder.

How to run (from the repository root; about 5 minutes on 2 CPU cores)::

    bash experiments/peers/setup_shampoo_peer.sh     # once: Distributed Shampoo's own venv
    python experiments/bench_shampoo.py              # 300 steps, every contender
    python experiments/bench_shampoo.py --steps 40 --no-peer --no-write   # a smoke run

Task and protocol: ``experiments/digits_autoencoder.py`` (MLP 64-512-256-32-256-512-64,
sigmoid cross-entropy, batch 256, same initial weights and batches for everyone, ahead-of-time
compiled step timed from dispatch to ``block_until_ready``, full-data loss every 5 steps).
Every contender runs in its own process, one after the other; Distributed Shampoo
(``precondition-opt``) runs in its own virtualenv. Reported per contender: mean (amortized)
step time, median, p99 and max step time, compile time, the loss curve, optimizer-state bytes
per parameter. The targets of the Shampoo issue hold at exactly these calls:
``shampoo(1e-3, block_size=128, precondition_every=10)`` and ``precondition_every=1``,
``soap(3e-3, precondition_every=10)``, against ``optax.adam(1e-3)`` and Distributed Shampoo at
learning rate 1e-3, block size 128 and the same frequencies (its other arguments at their
defaults). Muon (``optax.contrib.muon``) is run on a small learning-rate grid and reported at
its best final loss.

Prints one JSON line per contender and a summary line (ratios to the peer, steps to reach
Adam's final loss); writes ``experiments/results/bench_shampoo.jsonl`` and
``bench_shampoo.png`` unless ``--no-write``.
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
PEER_PYTHON = RESULTS / "peer_envs" / "shampoo" / "bin" / "python"
PEER_SCRIPT = ROOT / "experiments" / "peers" / "distributed_shampoo_autoencoder.py"

# name -> the exact call (evaluated in a worker process with jaxopt2 and optax imported).
CONTENDERS = {
    "adam": "optax.adam(1e-3)",
    "muon_1e-3": "jaxopt2.muon(1e-3)",
    "muon_3e-3": "jaxopt2.muon(3e-3)",
    "muon_1e-2": "jaxopt2.muon(1e-2)",
    "shampoo_k10": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=10)",
    "shampoo_k1": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=1)",
    "shampoo_k10_stagger": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=10, "
    "stagger=True)",
    "shampoo_k10_kl": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=10, "
    "statistics='kl')",
    "shampoo_k10_8bit": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=10, "
    "precondition_bits=8)",
    "shampoo_k10_4bit": "jaxopt2.shampoo(1e-3, block_size=128, precondition_every=10, "
    "precondition_bits=4)",
    "soap_k10": "jaxopt2.soap(3e-3, precondition_every=10)",
    "soap_k10_kl": "jaxopt2.soap(3e-3, precondition_every=10, statistics='kl')",
}
PEERS = {"distributed_shampoo_k10": 10, "distributed_shampoo_k1": 1}
LOSS_EVERY = 5


def worker(name: str, inputs: str, out: str) -> None:
    """Run one contender in this process and write its result."""
    import jaxopt2

    jaxopt2.cpu.apply_cpu_deadlock_workaround()
    jaxopt2.cpu.limit_lapack_threads()
    import digits_autoencoder as task
    import optax

    optimizer = eval(CONTENDERS[name], {"jaxopt2": jaxopt2, "optax": optax})  # a fixed table
    result = {"name": name, "call": CONTENDERS[name]}
    result.update(task.run_timed(optimizer, inputs, loss_every=LOSS_EVERY))
    Path(out).write_text(json.dumps(result))


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import digits_autoencoder as task
    import numpy as np

    adam_final = results["adam"]["final_loss"]
    summary: dict[str, Any] = {"name": "summary", "adam_final_loss": adam_final}
    for name, r in results.items():
        summary[f"{name}_steps_to_adam_loss"] = task.steps_to_reach(r["losses"], adam_final)
    for ours, peer in (("shampoo_k10", "distributed_shampoo_k10"),
                       ("shampoo_k1", "distributed_shampoo_k1")):  # fmt: skip
        if peer in results:
            summary[f"{ours}_mean_step_vs_peer"] = (
                results[ours]["mean_step_s"] / results[peer]["mean_step_s"]
            )
    # p99 / median step time, over all steps and without step 0 (the first execution of a
    # compiled program pays one-off allocation costs); Adam's ratio is the machine's noise floor.
    for name in ("adam", "shampoo_k10", "shampoo_k10_stagger"):
        times = np.asarray(results[name]["step_times_s"])
        median = np.median(times)
        summary[f"{name}_p99_over_median"] = float(np.percentile(times, 99) / median)
        summary[f"{name}_p99_over_median_after_step0"] = float(
            np.percentile(times[1:], 99) / median
        )
    for bits in ("8bit", "4bit"):
        name = f"shampoo_k10_{bits}"
        if name in results:
            full = results["shampoo_k10"]["final_loss"]
            summary[f"{name}_final_loss_vs_fp32"] = results[name]["final_loss"] / full - 1.0
    muons = {k: v for k, v in results.items() if k.startswith("muon")}
    if muons:
        summary["muon_best"] = min(muons, key=lambda k: muons[k]["final_loss"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", default=None, help="comma-separated contender names")
    parser.add_argument("--no-peer", action="store_true", help="skip Distributed Shampoo")
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

    names = list(CONTENDERS) if args.only is None else args.only.split(",")
    unknown = set(names) - set(CONTENDERS) - set(PEERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; known: {[*CONTENDERS, *PEERS]}")
    run_peer = not args.no_peer
    if run_peer and not PEER_PYTHON.exists():
        parser.error(f"no peer environment at {PEER_PYTHON}: run "
                     "experiments/peers/setup_shampoo_peer.sh or pass --no-peer")  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        task.make_inputs(inputs, args.steps)
        for name in names:
            if name in PEERS:
                continue
            out = Path(tmp) / f"{name}.json"
            cmd = task.worker_command(__file__, name, inputs, out)
            results[name] = task.run_process(cmd, out, ROOT)
        for name, every in PEERS.items() if run_peer else ():
            if args.only is not None and name not in names:
                continue
            out = Path(tmp) / f"{name}.json"
            cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--inputs", inputs, "--out", str(out),
                   "--learning-rate", "1e-3", "--block-size", "128",
                   "--precondition-every", str(every), "--loss-every", str(LOSS_EVERY)]  # fmt: skip
            results[name] = task.run_process(cmd, out, ROOT, name=name)
    summary = (
        summarize(results)
        if {"adam", "shampoo_k10", "shampoo_k10_stagger"} <= set(results)
        else None
    )
    if summary:
        print(json.dumps(summary), flush=True)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        lines = [*results.values(), *([summary] if summary else [])]
        (RESULTS / "bench_shampoo.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        task.plot_losses(
            results,
            RESULTS / "bench_shampoo.png",
            "digits autoencoder, batch 256: jaxopt2 Shampoo/SOAP vs peers",
        )


if __name__ == "__main__":
    main()
