"""Google's Distributed Shampoo training the digits autoencoder, run in its own environment.

Usage (with the interpreter of experiments/results/peer_envs/shampoo, see
setup_shampoo_peer.sh; experiments/bench_shampoo.py calls it):

    python experiments/peers/distributed_shampoo_autoencoder.py --inputs IN.npz --out OUT.json \
        --learning-rate 1e-3 --block-size 128 --precondition-every 10 [--loss-every 25]

IN.npz is written by experiments/digits_autoencoder.py (weights, training rows, per-step
batch indices); the task, the step and the timing protocol are that module's, shared with
every jaxopt2 contender, so only the optimizer differs.

The optimizer is ``precondition.distributed_shampoo.distributed_shampoo`` (PyPI package
precondition-opt) with ``learning_rate``, ``block_size`` and ``preconditioning_compute_steps``
set from the command line and every other argument at the package default; the defaults are
read from the installed function's signature and written into the output (notably: SGD
grafting, Nesterov momentum 0.9, roots by coupled Newton iteration, preconditioning from step
5).

The result is written to ``--out`` and printed as one JSON line on standard output.
"""

from __future__ import annotations

import os
import sys

# XLA's concurrency-optimized CPU scheduler can deadlock programs with several eigh/matmul
# branches on jax 0.10; turn it off before jax loads (jaxopt2's contenders run with it too).
# jax's CPU LAPACK runs on scipy's OpenBLAS, whose idle threads spin after each call and
# slow the next steps on few cores: one thread, as jaxopt2's contenders run (a user's
# setting wins).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
).strip()

import argparse
import enum
import importlib.metadata
import inspect
import json
import warnings

import jax
import jax.tree_util

# precondition-opt still calls these aliases, which current jax has removed.
for _name in ("tree_map", "tree_flatten", "tree_unflatten", "tree_leaves"):
    if not hasattr(jax, _name):
        setattr(jax, _name, getattr(jax.tree_util, _name))

from precondition import distributed_shampoo as ds  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import digits_autoencoder as task  # noqa: E402

# The module asks for float64 inverse-root arithmetic; without jax_enable_x64 (jax's default,
# left off here) jax runs it in float32 and warns on every trace.
warnings.filterwarnings("ignore", message="Explicitly requested dtype float64")

SET_ARGUMENTS = ("learning_rate", "block_size", "preconditioning_compute_steps")
PACKAGES = ("jax", "jaxlib", "precondition-opt", "flax", "optax", "chex", "numpy")


def json_value(value):
    """A JSON-friendly default (enums by name: GraftingType etc. are IntEnums)."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def package_defaults() -> dict:
    """Every default of distributed_shampoo except the three arguments we set."""
    signature = inspect.signature(ds.distributed_shampoo)
    return {
        name: json_value(p.default)
        for name, p in signature.parameters.items()
        if name not in SET_ARGUMENTS and p.default is not inspect.Parameter.empty
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--learning-rate", type=float, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--precondition-every", type=int, required=True)
    parser.add_argument("--loss-every", type=int, default=25)
    args = parser.parse_args(argv)

    optimizer = ds.distributed_shampoo(
        learning_rate=args.learning_rate,
        block_size=args.block_size,
        preconditioning_compute_steps=args.precondition_every,
    )
    result = {
        "name": "distributed_shampoo",
        "learning_rate": args.learning_rate,
        "block_size": args.block_size,
        "precondition_every": args.precondition_every,
        **task.run_timed(optimizer, args.inputs, loss_every=args.loss_every),
        "defaults": package_defaults(),
        "x64_enabled": bool(jax.config.jax_enable_x64),
    }
    result["versions"] = {p: importlib.metadata.version(p) for p in PACKAGES}
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
