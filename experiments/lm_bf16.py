"""bfloat16 parameters on the byte-level LM: does a bf16 run track the float32 run?

K-FAC, Shampoo and SOAP keep their statistics, inverses/roots and (K-FAC) the adaptive step in
float32 whatever the parameter dtype; AdamW (optax) is the reference for what bf16 costs a
first-order method. Each optimizer trains the ``configs/lm_tiny.yaml`` transformer (d=64,
2 layers, 64-byte context, batch 32) twice from the same float32 initialization (rounded to
bfloat16 for the second run), on the same batches, with the same warmup-cosine schedule:

* ``float32``: parameters, activations and logits in float32;
* ``bfloat16``: parameters (so the forward and backward pass) in bfloat16, the logits cast to
  float32 for the loss, the optimizer's updates bf16;
* ``mixed`` (``--mixed``): float32 master parameters and optimizer, the forward and backward
  pass in bfloat16 (the parameters cast to bf16 inside the loss, the logits back to float32):
  the usual mixed-precision recipe, where a small step is not rounded away.

It records the training loss every step and the validation bits per byte every
``--eval-every`` steps (both runs evaluated in float32 arithmetic on their own parameters;
the seconds recorded include the compiles),
and prints one JSON line per optimizer: final validation bits per byte of both runs, their
difference, and the largest relative gap of the (16-step moving average) training loss. It also
records, at every evaluation, the share of the matrix entries whose last update is under half
a bfloat16 ulp of the weight (``|u| < 2⁻⁹ |w|``), the steps a bf16 parameter rounds away: a
bf16 run can fall behind for that reason alone, with every statistic exact.

    python experiments/lm_bf16.py [--steps 300] [--optimizers kfac,shampoo,soap,adamw]

Learning rates: the best of each in the LM shoot-out on the same model
(``experiments/lm_shootout.py --config configs/lm_tiny.yaml``); K-FAC with the shoot-out's
momentum, damping and norm constraint. Output: ``experiments/results/lm_bf16.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround, limit_lapack_threads

apply_cpu_deadlock_workaround()
# one OpenBLAS thread for every contender: spinning LAPACK workers after an eigh would take a
# core from the steps that follow a refresh (Shampoo, SOAP, K-FAC) and bias their step times
limit_lapack_threads()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxopt2  # noqa: E402
from jaxopt2.experiment.lm import (  # noqa: E402
    ByteLMConfig,
    ByteTransformer,
    byte_lm_data,
    lm_eval_metrics,
)

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 30  # steps (fewer in a run shorter than 60 steps)
WEIGHT_DECAY = 0.01


def _schedule(lr: float, steps: int) -> optax.Schedule:
    warmup = min(WARMUP, steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=0.1 * lr)


OPTIMIZERS = {
    "kfac": lambda lr, steps: jaxopt2.kfac(
        _schedule(lr, steps),
        momentum=0.9,
        damping=1e-3,
        norm_constraint=1e-3,
        weight_decay=WEIGHT_DECAY,
    ),
    "shampoo": lambda lr, steps: jaxopt2.shampoo(_schedule(lr, steps), weight_decay=WEIGHT_DECAY),
    "soap": lambda lr, steps: jaxopt2.soap(_schedule(lr, steps), weight_decay=WEIGHT_DECAY),
    "adamw": lambda lr, steps: optax.adamw(_schedule(lr, steps), weight_decay=WEIGHT_DECAY),
}
LEARNING_RATES = {"kfac": 3e-3, "shampoo": 3e-3, "soap": 1e-2, "adamw": 3e-3}


def _loss(model: ByteTransformer, windows: jax.Array) -> jax.Array:
    x, y = windows[:, :-1], windows[:, 1:]
    logits = model(x).astype(jnp.float32)
    logits = jaxopt2.tag_loss("softmax_cross_entropy", logits, y)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _cast(tree, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree, is_leaf=eqx.is_array
    )


def train(name: str, lr: float, dtype, model0, train_w, eval_w, order, eval_every: int):
    """`dtype`: float32, bfloat16, or "mixed" (float32 parameters, bfloat16 compute)."""
    steps = order.shape[0]
    opt = OPTIMIZERS[name](lr, steps)
    mixed = isinstance(dtype, str) and dtype == "mixed"
    params, static = eqx.partition(
        _cast(model0, jnp.float32 if mixed else dtype), eqx.is_inexact_array
    )
    compute = (lambda p: _cast(p, jnp.bfloat16)) if mixed else (lambda p: p)
    loss = lambda p, w: _loss(eqx.combine(compute(p), static), w)

    @jax.jit
    def chunk(params, state, idx):
        def body(carry, i):
            params, state, _ = carry
            value, updates, state = jaxopt2.value_and_update(opt, loss, params, state, train_w[i])
            return (optax.apply_updates(params, updates), state, updates), value

        zeros = jax.tree.map(jnp.zeros_like, params)
        (params, state, last), values = jax.lax.scan(body, (params, state, zeros), idx)
        return (params, state), values, below_half_ulp(last, params)

    @jax.jit
    def evaluate(params):
        model = _cast(eqx.combine(params, static), jnp.float32)
        return lm_eval_metrics(model, eval_w)["bits_per_byte"]

    state = opt.init(params)
    losses, curve, small = [], [(0, float(evaluate(params)))], []
    t0 = time.perf_counter()
    for start in range(0, steps, eval_every):
        (params, state), values, lost = chunk(params, state, order[start : start + eval_every])
        losses.append(np.asarray(values, np.float64))
        curve.append((start + eval_every, float(evaluate(params))))
        small.append((start + eval_every, float(lost)))
    return np.concatenate(losses), curve, time.perf_counter() - t0, small


def below_half_ulp(updates, params) -> jax.Array:
    """Share of the matrix entries whose update is under half a bfloat16 ulp of the weight
    (``|u| < 2⁻⁹ |w|``): a bf16 parameter rounds such a step away."""
    pairs = [(u, p) for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                    strict=True) if p.ndim == 2]  # fmt: skip
    lost = sum(jnp.sum(jnp.abs(u.astype(jnp.float32)) < 2.0**-9 * jnp.abs(p.astype(jnp.float32)))
               for u, p in pairs)  # fmt: skip
    return lost / sum(p.size for _, p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="also train with float32 master parameters and bfloat16 compute",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/lm_bf16.jsonl")
    args = ap.parse_args()
    if args.steps % args.eval_every:
        ap.error("--steps must be a multiple of --eval-every")
    cfg = ByteLMConfig(context_length=64, train_bytes=1_000_000, eval_bytes=100_000)
    train_np, eval_np = byte_lm_data(cfg)
    train_w, eval_w = jnp.asarray(train_np), jnp.asarray(eval_np)
    order = np.random.default_rng(0).integers(0, len(train_np), (args.steps, 32))
    model0 = ByteTransformer(64, 64, 4, 256, 2, key=jax.random.PRNGKey(0))
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "steps": args.steps,
           "python": platform.python_version()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for name in args.optimizers.split(","):
            lr = LEARNING_RATES[name]
            runs = {}
            modes = [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]
            for label, dtype in modes + ([("mixed", "mixed")] if args.mixed else []):
                runs[label] = train(name, lr, dtype, model0, train_w, eval_w, order,
                                    args.eval_every)  # fmt: skip
            (l32, c32, t32, s32), (l16, c16, t16, s16) = runs["float32"], runs["bfloat16"]
            smooth = lambda v: np.convolve(v, np.ones(16) / 16, mode="valid")
            gap = np.abs(smooth(l16) - smooth(l32)) / smooth(l32)
            rec = {
                "optimizer": name,
                "learning_rate": lr,
                "final_eval_bits_per_byte_float32": c32[-1][1],
                "final_eval_bits_per_byte_bfloat16": c16[-1][1],
                "eval_bits_per_byte_difference": c16[-1][1] - c32[-1][1],
                "max_rel_train_loss_gap_smoothed": float(gap.max()),
                "finite_bfloat16": bool(np.all(np.isfinite(l16))),
                # the last update of each chunk: share of matrix entries a bf16 weight
                # would round away (float32 run) / did round away (bfloat16 run)
                "updates_below_half_bf16_ulp_float32": s32,
                "updates_below_half_bf16_ulp_bfloat16": s16,
                "eval_curve_float32": c32,
                "eval_curve_bfloat16": c16,
                "seconds_float32": t32,
                "seconds_bfloat16": t16,
                **env,
            }
            if args.mixed:
                lm, cm, tm, _ = runs["mixed"]
                gap_m = np.abs(smooth(lm) - smooth(l32)) / smooth(l32)
                rec.update(
                    final_eval_bits_per_byte_mixed=cm[-1][1],
                    eval_bits_per_byte_difference_mixed=cm[-1][1] - c32[-1][1],
                    max_rel_train_loss_gap_smoothed_mixed=float(gap_m.max()),
                    eval_curve_mixed=cm,
                    seconds_mixed=tm,
                )
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(json.dumps({k: v for k, v in rec.items() if "curve" not in k}), flush=True)


if __name__ == "__main__":
    main()
