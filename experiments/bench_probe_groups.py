"""When to batch Hutchinson probes with one ``vmap`` and when in groups: a map of the trade-off.

``hutchinson_trace(matvec, like, key, num_probes, batch_size=B)`` runs the probes as one
``vmap`` (``B=None``, the default) or as vmapped groups of ``B`` probes one after another
(``lax.map``; ``B=1`` is a plain sequential loop). The numbers are the same; the speed is not.
Batching turns the matvec's skinny matrix products into wide ones, but multiplies the size of
its intermediates by the number of probes batched; once those fall out of cache (on a CPU),
copying them costs more than the wider products gain.

Model: the digits MLP of ``digits_mlp.py`` (64-W-W-10, tanh, softmax cross-entropy) on the
first ``rows`` training rows; operator ``hessian_operator`` (linearized once). For each case
(width, probes, rows), every batch size in ``BATCH_SIZES`` is timed against ``B=1`` (warm,
interleaved rounds; see ``timing.py``) and one JSON line is printed with the median times,
the per-round ratios to the loop, the fastest choice, and what the library default
``batch_size="auto"`` chose and how it compares with the fastest. ``peak_intermediate_kib`` is the
largest array one matvec creates (from its jaxpr): the quantity the trade-off turns on.

    python experiments/bench_probe_groups.py [--rounds 7] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import digits_mlp as dm  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402

from jaxopt2.curvature import hessian_operator, hutchinson_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZES = (None, 4, 8, 16, 32)
# (hidden width, probes, training rows): large and small intermediates, many and few probes.
CASES = (
    (8, 100, 1437),
    (32, 100, 1437),
    (128, 100, 1437),
    (128, 32, 1437),
    (32, 100, 64),
    (8, 1000, 64),
)


def peak_intermediate_bytes(matvec, like) -> int:
    """The largest array in the jaxpr of one matvec (bytes)."""
    jaxpr = jax.make_jaxpr(matvec)(like).jaxpr
    sizes = [
        int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
        for eqn in jaxpr.eqns
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    ]
    return max(sizes, default=0)


def bench_case(width: int, probes: int, rows: int, rounds: int) -> dict:
    x, y, _, _ = dm.digits_split()
    x, y = jnp.asarray(x[:rows]), jnp.asarray(y[:rows])
    params = dm.init_params(width)

    def operator(p):
        return hessian_operator(lambda q: dm.loss_fn(q, x, y), p)

    fns = {"loop": jax.jit(lambda p, k: hutchinson_trace(operator(p), p, k, probes, batch_size=1))}
    for b in (*BATCH_SIZES, "auto"):
        fns["vmap" if b is None else "auto" if b == "auto" else f"groups_{b}"] = jax.jit(
            lambda p, k, b=b: hutchinson_trace(operator(p), p, k, probes, batch_size=b)
        )
    key = jax.random.PRNGKey(0)
    first = {name: timing.first_call(lambda f=f: f(params, key))[1] for name, f in fns.items()}
    estimates = {name: float(f(params, key)[0]) for name, f in fns.items()}
    samples = timing.interleaved({n: (lambda f=f: f(params, key)) for n, f in fns.items()}, rounds)
    ratios = {n: timing.paired_ratio(s, samples["loop"]) for n, s in samples.items() if n != "loop"}
    auto_ratio = ratios.pop("auto")
    from jaxopt2.curvature.estimators import _resolve_batch_size

    auto_choice = _resolve_batch_size("auto", probes, operator(params), params)
    spread = max(estimates.values()) - min(estimates.values())
    return timing.rounded(
        {
            "metric": "probe_groups",
            "width": width,
            "probes": probes,
            "rows": rows,
            "num_params": dm.num_params(params),
            "peak_intermediate_kib": peak_intermediate_bytes(operator(params), params) / 1024,
            "median_ms": {n: 1e3 * timing.median(s) for n, s in samples.items()},
            "over_loop": ratios,
            "fastest": min(ratios, key=ratios.get) if min(ratios.values()) < 1 else "loop",
            "auto_choice": "vmap" if auto_choice is None else auto_choice,
            "auto_over_loop": auto_ratio,
            "auto_over_fastest": auto_ratio / min(1.0, *ratios.values()),
            "estimate_spread_rel": spread / abs(estimates["loop"]),
            "first_call_s": first,
            "rounds": rounds,
        }
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "bench_probe_groups.jsonl"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    lines = [
        {
            "metric": "environment",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "load_average": timing.load_average(),
        }
    ]
    print(json.dumps(lines[0]), flush=True)
    for case in CASES:
        lines.append(bench_case(*case, rounds=args.rounds))
        print(json.dumps(lines[-1]), flush=True)
    if not args.no_write:
        Path(args.out).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
