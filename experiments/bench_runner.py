"""Runner overhead: time per step of `jaxopt2 run` vs a bare jitted loop (digits classifier).

Both train the same model (MLP 64-128-128-10 tanh) with the same optimizer (Adam, 1e-3) on the
same batches (the runner's own batch sampler, precomputed for the bare loop). The bare loop is
``jax.jit(step)`` called once per step from Python, the way a hand-written training script
runs; the runner fuses ``log_every`` steps per call and writes metrics, evaluations and a
checkpoint. Compile time is excluded from both. Prints JSON; target: runner within 10%.

    python experiments/bench_runner.py [--steps 3000] [--log-every 50] [--repeats 3]
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
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.rundir import prepare_run_dir  # noqa: E402
from jaxopt2.experiment.trainer import Trainer  # noqa: E402
from jaxopt2.optimizers._contract import value_and_update  # noqa: E402


def runner_time(steps: int, log_every: int) -> dict[str, float]:
    overrides = [
        f"steps={steps}",
        f"log_every={log_every}",
        "optimizer.schedule=constant",
        f"checkpoint.every={steps}",
    ]
    rc, _ = load_config("quickstart", overrides)
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        prepare_run_dir(run_dir, rc)
        trainer = Trainer(rc, run_dir, progress=False, stream=None, plots=False)
        trainer.compile()
        t0 = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - t0
    return {
        "train_loop_s_per_step": result.summary["train_time_s"] / steps,
        "wall_s_per_step": wall / steps,  # + evaluations, metrics file, final checkpoint
        "final_loss": result.summary["final_loss"],
        "trainer": trainer,
    }


def bare_time(trainer: Trainer, steps: int) -> dict[str, float]:
    tx, loss_fn = trainer.opt.tx, trainer.loss_fn
    batches = [trainer.batch(trainer.train_data, jnp.int32(s)) for s in range(steps)]
    keys = [jax.random.fold_in(trainer.opt_key, s) for s in range(steps)]

    @jax.jit
    def step(params, opt_state, key, *batch):
        loss, updates, opt_state = value_and_update(tx, loss_fn, params, opt_state, *batch, key=key)
        return optax.apply_updates(params, updates), opt_state, loss

    params = trainer.init_carry["params"]
    opt_state = tx.init(params)
    p, s, loss = step(params, opt_state, keys[0], *batches[0])  # compile
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    p, s = params, opt_state
    for i in range(steps):
        p, s, loss = step(p, s, keys[i], *batches[i])
    jax.block_until_ready((p, loss))
    dt = time.perf_counter() - t0
    return {"s_per_step": dt / steps, "final_loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    runs, bares = [], []
    for _ in range(args.repeats):
        r = runner_time(args.steps, args.log_every)
        trainer = r.pop("trainer")
        runs.append(r)
        bares.append(bare_time(trainer, args.steps))
    best_run = min(r["train_loop_s_per_step"] for r in runs)
    best_wall = min(r["wall_s_per_step"] for r in runs)
    best_bare = min(b["s_per_step"] for b in bares)
    print(
        json.dumps(
            {
                "benchmark": "runner vs bare jitted loop, digits classifier MLP + adam, batch 128",
                "steps": args.steps,
                "log_every": args.log_every,
                "repeats": args.repeats,
                "device": str(jax.devices()[0]),
                "machine": platform.machine(),
                "runner_ms_per_step": best_run * 1e3,
                "runner_wall_ms_per_step_incl_eval_ckpt": best_wall * 1e3,
                "bare_loop_ms_per_step": best_bare * 1e3,
                "runner_over_bare": best_run / best_bare,
                "runner_wall_over_bare": best_wall / best_bare,
                "within_10_percent": best_wall <= 1.10 * best_bare,
                "final_loss_runner": runs[-1]["final_loss"],
                "final_loss_bare": bares[-1]["final_loss"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
