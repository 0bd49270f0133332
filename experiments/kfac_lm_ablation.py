"""Why K-FAC with a learning rate stalls on the byte LM: ablations of the shoot-out's setting.

The LM shoot-out (``experiments/lm_shootout.py``) runs K-FAC with a learning rate (momentum
0.9, damping 1e-3, norm constraint 1e-3, warmup then cosine decay); it plateaus near 3.6 bits
per byte where AdamW reaches 2.84. Each variant here changes one thing and trains the
``configs/lm_tiny.yaml`` model (d=64, 2 layers, 64-byte context, batch 32) for ``--steps``
steps from the same initialization on the same batches, a plain loop around
:func:`jaxopt2.optimizers.kfac.scale_by_kfac`:

* ``lr``: the shoot-out's setting at lr 3e-3;
* ``damping_1e-2`` / ``damping_1e-1``: a larger damping λ;
* ``adam_off_layers`` / ``adam_off_layers_lr1e-2``: Adam (lr 3e-3, same schedule) on the leaves
  in no layer (embeddings, positions, LayerNorms), whose diagonal-Fisher direction carries
  most of ``Δ·∇`` (printed as ``share_off_layers``), K-FAC on the layers;
* ``adaptive``: ``learning_rate=None`` (step size, momentum and damping from the quadratic
  model; no schedule), λ₀ = 1.

Prints one JSON line per variant and evaluation (validation bits per byte on 64 fixed
windows) and writes them to ``--out`` (default ``experiments/results/kfac_lm_ablation.jsonl``).

    python experiments/kfac_lm_ablation.py [--steps 300] [--variants lr,adaptive]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround, limit_lapack_threads

apply_cpu_deadlock_workaround()
limit_lapack_threads()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxopt2.experiment.lm import ByteLMConfig, ByteTransformer, byte_lm_data, lm_loss  # noqa: E402
from jaxopt2.optimizers.kfac import scale_by_kfac  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OFF_LAYERS = ("embed", "pos", "ln")  # key-path fragments of the leaves in no layer

# name -> (learning rate or None, scale_by_kfac keywords, Adam on the leaves in no layer)
VARIANTS = {
    "lr": (3e-3, {"damping": 1e-3, "norm_constraint": 1e-3}, False),
    "damping_1e-2": (3e-3, {"damping": 1e-2, "norm_constraint": 1e-3}, False),
    "damping_1e-1": (3e-3, {"damping": 1e-1, "norm_constraint": 1e-3}, False),
    "adam_off_layers": (3e-3, {"damping": 1e-3, "norm_constraint": 1e-3}, True),
    "adam_off_layers_lr1e-2": (1e-2, {"damping": 1e-3, "norm_constraint": 1e-3}, True),
    "adaptive": (None, {"damping": 1.0}, False),
}


def _schedule(lr: float, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, min(30, steps // 2), steps, 0.1 * lr)


def run(name: str, steps: int, train: np.ndarray, eval_w: jax.Array, every: int) -> list[dict]:
    lr, kwargs, adam_off = VARIANTS[name]
    model = ByteTransformer(64, 64, 4, 256, 2, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_array)
    loss_fn = lambda p, w: lm_loss(eqx.combine(p, static), w)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)]
    off = [any(f in p for f in OFF_LAYERS) for p in paths]
    inner = scale_by_kfac(learning_rate=lr, **kwargs)
    if lr is None:
        opt = inner
    else:
        opt = optax.chain(
            inner, optax.trace(0.9), optax.scale_by_learning_rate(_schedule(lr, steps))
        )
    adam = optax.adam(_schedule(3e-3, steps))

    @jax.jit
    def step(p, s, a, w, key):
        value_fn = lambda q: loss_fn(q, w)
        loss, g = jax.value_and_grad(value_fn)(p)
        inner_state = s if lr is None else s[0]
        direction, _ = inner.update(g, inner_state, p, value_fn=value_fn, key=key)
        u, s = opt.update(g, s, p, value_fn=value_fn, key=key)
        ua, a = adam.update(g, a, p)
        if adam_off:
            leaves = [x if o else y for x, y, o in
                      zip(jax.tree.leaves(ua), jax.tree.leaves(u), off, strict=True)]  # fmt: skip
            u = jax.tree.unflatten(jax.tree.structure(u), leaves)
        dg = [jnp.sum(d * x) for d, x in zip(jax.tree.leaves(direction), jax.tree.leaves(g),
                                             strict=True)]  # fmt: skip
        share = sum(v for v, o in zip(dg, off, strict=True) if o) / sum(dg)
        return optax.apply_updates(p, u), s, a, loss, share

    evaluate = jax.jit(lambda p: loss_fn(p, eval_w) / math.log(2))
    state, adam_state = opt.init(params), adam.init(params)
    order = np.random.default_rng(0).integers(0, len(train), (steps, 32))
    rows = []
    for t in range(steps):
        params, state, adam_state, loss, share = step(
            params, state, adam_state, jnp.asarray(train[order[t]]), jax.random.PRNGKey(t)
        )
        if (t + 1) % every == 0:
            row = {"variant": name, "step": t + 1, "train_loss": float(loss),
                   "eval_bits_per_byte": float(evaluate(params)),
                   "share_off_layers": float(share)}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/kfac_lm_ablation.jsonl")
    args = ap.parse_args()
    cfg = ByteLMConfig(context_length=64, train_bytes=1_000_000, eval_bytes=100_000)
    train, eval_np = byte_lm_data(cfg)
    eval_w = jnp.asarray(eval_np)
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "steps": args.steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for name in args.variants.split(","):
            for row in run(name, args.steps, train, eval_w, args.eval_every):
                f.write(json.dumps({**row, **env}) + "\n")


if __name__ == "__main__":
    main()
