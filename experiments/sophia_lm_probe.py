"""Sophia-GNB on the byte LM: how many coordinates its clip holds, and what γ does.

Sophia's step is ``η · clip(m / max(γ ĥ, ε), 1)`` per coordinate: a clipped coordinate moves
by ``η`` (a signed-momentum step), an unclipped one by the Newton-like ``η m / (γ ĥ)``. On the
``configs/lm_tiny.yaml`` model (300 steps, batch 32, warmup then cosine decay, the same start
and batches for every setting) this records, every 50 steps, the validation bits per byte,
the share of coordinates at the clip (``|u| ≥ 0.999 η``) and the mean and median ``|u| / η``,
for (learning rate, γ) pairs: the shoot-out's best (3e-3, the default γ 0.01) and two with a
larger γ, where fewer coordinates are clipped (a larger rate to keep the step's size).

    python experiments/sophia_lm_probe.py [--settings 3e-3:0.01,1e-2:0.1,3e-2:0.5]

Output: one JSON line per setting and evaluation, also written to ``--out`` (default
``experiments/results/sophia_lm_probe.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxopt2  # noqa: E402
from jaxopt2.experiment.lm import ByteLMConfig, ByteTransformer, byte_lm_data, lm_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(lr: float, gamma: float, steps: int, train: np.ndarray, eval_w: jax.Array) -> list[dict]:
    model = ByteTransformer(64, 64, 4, 256, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    loss_fn = lambda p, w: lm_loss(eqx.combine(p, static), w)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(30, steps // 2), steps, 0.1 * lr)
    # eps and weight decay as when the results were recorded (before sophia took
    # optax.contrib.sophia's defaults of 1e-8 and 1e-4)
    opt = jaxopt2.sophia(sched, estimator="gnb", gamma=gamma, eps=1e-12, weight_decay=0.0)

    @jax.jit
    def step(p, s, w, key, t):
        value_fn = lambda q: loss_fn(q, w)
        g = jax.grad(value_fn)(p)
        u, s = opt.update(g, s, p, value_fn=value_fn, key=key)
        ratio = jnp.concatenate([jnp.ravel(jnp.abs(x)) for x in jax.tree.leaves(u)])
        ratio = ratio / jnp.maximum(sched(t), 1e-12)
        stats = (jnp.mean(ratio >= 0.999), jnp.mean(ratio), jnp.median(ratio))
        return optax.apply_updates(p, u), s, stats

    evaluate = jax.jit(lambda p: loss_fn(p, eval_w) / math.log(2))
    state = opt.init(params)
    order = np.random.default_rng(0).integers(0, len(train), (steps, 32))
    rows = []
    for t in range(steps):
        params, state, (clipped, mean, median) = step(
            params, state, jnp.asarray(train[order[t]]), jax.random.PRNGKey(t), t
        )
        if (t + 1) % 50 == 0:
            row = {"learning_rate": lr, "gamma": gamma, "step": t + 1,
                   "eval_bits_per_byte": float(evaluate(params)), "clipped": float(clipped),
                   "mean_update_over_lr": float(mean),
                   "median_update_over_lr": float(median)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--settings", default="3e-3:0.01,1e-2:0.1,3e-2:0.5", help="lr:gamma,...")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/sophia_lm_probe.jsonl")
    args = ap.parse_args()
    cfg = ByteLMConfig(context_length=64, train_bytes=1_000_000, eval_bytes=100_000)
    train, eval_np = byte_lm_data(cfg)
    eval_w = jnp.asarray(eval_np)
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for setting in args.settings.split(","):
            lr, gamma = (float(v) for v in setting.split(":"))
            for row in run(lr, gamma, args.steps, train, eval_w):
                f.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
    main()
