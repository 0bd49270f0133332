"""Every registered optimizer on the digits autoencoder: mean step time on this machine's device.

How to run (from the repository root)::

    python experiments/bench_optimizers.py                  # 300 steps, every optimizer
    python experiments/bench_optimizers.py --only adam,kfac --steps 40 --no-write   # smoke

Task and protocol: ``experiments/digits_autoencoder.py`` (MLP 64-512-256-32-256-512-64, batch
256, the same initial weights and batches for everyone; the train step is compiled ahead of
time and every step timed from dispatch to ``block_until_ready``; the mean over all steps is
reported, so periodic refreshes are counted). Each optimizer runs in its own process with the
arguments of its ``configs/opt_<name>.yaml`` (its ``optimizer`` section: the settings the
project ships for it, not tuned for this task), through ``jaxopt2.value_and_update`` (so the
curvature methods get ``value_fn`` and a per-step ``key``); the loss carries
``jaxopt2.tag_loss`` on the logits for the Gauss-Newton methods.

Prints one JSON line per optimizer (mean/median/p99 step time, compile time, final full-data
loss, state bytes per parameter) and a summary line with the platform, the device, and each
optimizer's mean step time relative to ``optax.adam`` measured in the same run. Writes
``experiments/results/bench_optimizers_<platform>.jsonl`` (``cpu`` or ``gpu``) unless
``--no-write``; ``--out`` names another file.
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
CONFIGS = ROOT / "configs"
LOSS_EVERY = 25
# optimizer-section keys that the runner handles around the optimizer (not factory arguments)
RUNNER_KEYS = ("schedule", "warmup_steps", "min_lr_ratio", "clip_grad_norm")


def settings(name: str) -> dict[str, Any]:
    """The factory arguments of ``configs/opt_<name>.yaml``'s optimizer section."""
    import yaml

    path = CONFIGS / f"opt_{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"no config {path} for registered optimizer {name!r}")
    section = dict(yaml.safe_load(path.read_text())["optimizer"])
    if section.pop("name") != name:
        raise ValueError(f"{path} names another optimizer")
    return {k: v for k, v in section.items() if k not in RUNNER_KEYS}


def worker(name: str, inputs: str, out: str) -> None:
    import jaxopt2

    jaxopt2.cpu.apply_cpu_deadlock_workaround()
    import digits_autoencoder as task
    import jax
    import jax.numpy as jnp
    import optax

    from jaxopt2.optimizers import registry

    def tagged_loss(params, batch):
        logits = jaxopt2.tag_loss("sigmoid_cross_entropy", task.forward(params, batch), batch)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(logits, batch), axis=-1))

    args = settings(name)
    optimizer = registry.get(name).factory(**args)
    device = jax.devices()[0]
    result = {
        "name": name,
        "args": args,
        "platform": device.platform,
        "device": device.device_kind,
    }
    result.update(
        task.run_timed(
            optimizer,
            inputs,
            loss_every=LOSS_EVERY,
            step_fn=task.value_and_update_step(tagged_loss),
        )
    )
    Path(out).write_text(json.dumps(result))


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    first = next(iter(results.values()))
    base = results.get("adam")
    return {
        "name": "summary",
        "platform": first["platform"],
        "device": first["device"],
        "cpu_count": os.cpu_count(),
        "steps": first["steps"],
        "mean_step_ms": {k: 1e3 * r["mean_step_s"] for k, r in results.items()},
        "mean_step_vs_adam": None
        if base is None
        else {k: r["mean_step_s"] / base["mean_step_s"] for k, r in results.items()},
        "final_loss": {k: r["final_loss"] for k, r in results.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", help="comma-separated registry names (default: all)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--out", help="JSON lines file (default: results/bench_optimizers_<platform>.jsonl)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "experiments"))
    if args.worker:
        worker(args.worker, args.inputs, args.result)
        return 0
    import digits_autoencoder

    from jaxopt2.optimizers import registry

    names = registry.names() if not args.only else [n.strip() for n in args.only.split(",")]
    for n in names:
        registry.get(n)  # an unknown name: the registry's error, before any run
        settings(n)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        digits_autoencoder.make_inputs(inputs, args.steps)
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--worker", name, "--inputs", inputs,
                   "--result", str(out)]  # fmt: skip
            results[name] = digits_autoencoder.run_process(cmd, out, ROOT)
    summary = summarize(results)
    print(json.dumps(summary), flush=True)
    if not args.no_write:
        path = Path(args.out or RESULTS / f"bench_optimizers_{summary['platform']}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [*results.values(), summary]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
