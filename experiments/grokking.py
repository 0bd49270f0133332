"""Grokking on modular addition: does the bundled config generalize long after it memorizes?

Runs ``configs/task_modular_arithmetic.yaml`` ((a + b) mod 97 from 30% of the pairs, a
one-layer transformer, AdamW with weight decay 1) through the runner and prints one JSON
object: the first step whose training-loss window mean is below 0.01 (memorized), the first
evaluation with accuracy >= 0.99 (generalized), the delay between them, and the evaluation
curve. On 2 CPU cores a step takes about 22 ms (about 2.5 minutes for 6000 steps).

    python experiments/grokking.py [--steps 6000] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import jax  # noqa: E402

from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.rundir import read_metrics  # noqa: E402
from jaxopt2.experiment.trainer import run_config  # noqa: E402

CONFIG = "task_modular_arithmetic"
MEMORIZED_LOSS = 0.01
GENERALIZED_ACC = 0.99


def first_step(rows, key, test) -> int | None:
    return next((r["step"] for r in rows if r.get(key) is not None and test(r[key])), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the run here")
    args = ap.parse_args()
    rc, _ = load_config(CONFIG, [f"steps={args.steps}"])
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or Path(tmp) / "run"
        result = run_config(rc, run_dir, progress=None, stream=None)
        rows = read_metrics(run_dir / "metrics.jsonl")
    memorized = first_step(rows, "loss_mean", lambda v: v < MEMORIZED_LOSS)
    generalized = first_step(rows, "eval_accuracy", lambda v: v >= GENERALIZED_ACC)
    evals = [r for r in rows if r.get("eval_accuracy") is not None]
    out = {
        "config": CONFIG,
        "steps": result.step,
        "status": result.status,
        "memorized_step": memorized,
        "memorized_rule": f"train loss window mean < {MEMORIZED_LOSS}",
        "generalized_step": generalized,
        "generalized_rule": f"eval accuracy >= {GENERALIZED_ACC}",
        "delay_steps": None if None in (memorized, generalized) else generalized - memorized,
        "grokked": memorized is not None and generalized is not None and generalized > memorized,
        "eval_accuracy": {r["step"]: round(r["eval_accuracy"], 4) for r in evals},
        "mean_step_time_s": result.summary["mean_step_time_s"],
        "backend": jax.default_backend(),
        "machine": platform.machine(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
