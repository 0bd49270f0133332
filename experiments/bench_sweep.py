"""`jaxopt2 sweep` (one vmapped program) vs the same grid as sequential `jaxopt2 run`s.

Grid: 8 learning rates x 2 seeds of Adam on the digits classifier (MLP 64-128-128-10 tanh,
batch 128). The sweep is one call of :func:`jaxopt2.experiment.sweep.sweep`; the baseline is
16 in-process :func:`jaxopt2.experiment.trainer.run_config` calls, one per member config (the
`jaxopt2 run` code path, each compiling its own program). Both write their usual outputs
(metrics, summaries, plots; the runs also a final checkpoint). Wall times are end to end;
compile and training-loop times are reported separately. The final losses of the two are
compared member by member (they agree to float32 rounding, which the chaotic dynamics of the
larger learning rates amplify over 300 steps). Prints one JSON object; target: the sweep is
faster.

    python experiments/bench_sweep.py [--steps 300] [--log-every 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import jax  # noqa: E402

from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.sweep import sweep  # noqa: E402
from jaxopt2.experiment.trainer import run_config  # noqa: E402

CONFIG = "task_digits_classifier"
LRS = [1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]
SEEDS = [0, 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    base = [
        f"steps={args.steps}",
        f"log_every={args.log_every}",
        f"eval_every={args.steps}",
        f"checkpoint.every={args.steps}",
    ]
    grid = [
        "optimizer.learning_rate=" + ",".join(map(repr, LRS)),
        "seed=" + ",".join(map(str, SEEDS)),
    ]
    with tempfile.TemporaryDirectory() as d:
        # Warm the process (imports, data loading, small eager ops) for both contenders alike.
        rc, _ = load_config(CONFIG, ["steps=2", "log_every=2", "model.hidden=[4]"])
        run_config(rc, Path(d) / "warm", progress=False, stream=None)

        t0 = time.perf_counter()
        res = sweep(CONFIG, base + grid, Path(d) / "sweep", progress=False, stream=None)
        sweep_wall = time.perf_counter() - t0

        seq_compile = seq_train = 0.0
        diffs: dict[float, float] = {}
        within = 0
        t0 = time.perf_counter()
        for m in res.members:
            over = [
                f"optimizer.learning_rate={m['optimizer.learning_rate']!r}",
                f"seed={m['seed']}",
            ]
            rc, _ = load_config(CONFIG, base + over)
            s = run_config(rc, Path(d) / f"run{m['member']}", progress=False, stream=None).summary
            seq_compile += s["compile_time_s"]
            seq_train += s["train_time_s"]
            lr = m["optimizer.learning_rate"]
            rel = abs(s["final_loss_mean"] - m["final_loss_mean"]) / abs(s["final_loss_mean"])
            diffs[lr] = max(diffs.get(lr, 0.0), rel)
            within += rel < 1e-5
        seq_wall = time.perf_counter() - t0
    out = {
        "benchmark": "jaxopt2 sweep (one vmapped program) vs sequential jaxopt2 run, same grid",
        "grid": f"{len(LRS)} learning rates x {len(SEEDS)} seeds = {len(res.members)} members",
        "task": "digits_classifier, MLP 64-128-128-10 tanh, adam, batch 128",
        "steps": args.steps,
        "log_every": args.log_every,
        "device": str(jax.devices()[0]),
        "machine": platform.machine(),
        "sweep_wall_s": round(sweep_wall, 3),
        "sweep_compile_s": round(res.compile_time_s, 3),
        "sweep_train_loop_s": round(res.train_time_s, 3),
        "sequential_wall_s": round(seq_wall, 3),
        "sequential_compile_s": round(seq_compile, 3),
        "sequential_train_loop_s": round(seq_train, 3),
        "wall_ratio_sequential_over_sweep": round(seq_wall / sweep_wall, 2),
        "train_loop_ratio_sequential_over_sweep": round(seq_train / res.train_time_s, 2),
        "sweep_faster": sweep_wall < seq_wall,
        # |run - sweep| / run of the final loss (last-window mean), max over seeds, per lr.
        # Identical semantics, different XLA programs: float32 rounding differs in the last
        # bit after a few steps, and the large learning rates amplify it (chaotic dynamics).
        "final_loss_rel_diff_by_lr": {f"{k:g}": float(f"{v:.2e}") for k, v in diffs.items()},
        "members_within_1e-5": within,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
