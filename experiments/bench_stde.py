"""The Laplacian of an MLP u: Rᵈ -> R three ways: Taylor-mode STDE, Hutchinson over
Hessian-vector products, and the dense Hessian's trace.

    python experiments/bench_stde.py            # d = 100, 1,000, 10,000; JSON on stdout
    python experiments/bench_stde.py --quick    # d = 100 only

u: a tanh MLP d -> 256 -> 256 -> 1 (float64, the input is the point x: the operator is over
x, as in a physics-informed loss). Per d and method: run time of the jitted computation
(the fastest of 20 runs after a warm-up; compile excluded), the compiled program's temporary
memory (``memory_analysis().temp_size_in_bytes``), and the value.

* ``stde``: ``jaxopt2.curvature.stde_laplacian(u, x, key, k)``, k = 16 Rademacher
  directions, one second-order jet each (vmapped);
* ``hutchinson_hvp``: the same 16 directions, ``mean vᵀ(∇²u v)`` with forward-over-reverse
  Hessian-vector products (``jax.jvp`` of ``jax.grad``, vmapped) — the route through
  ``jaxopt2.curvature.hutchinson_trace``;
* ``dense``: ``trace(jax.hessian(u)(x))`` (d ≤ 1,000; at d = 10,000 the Hessian alone is
  800 MB) and ``jaxopt2.curvature.laplacian`` (d second-order jets) as the exact values.

Error vs directions (d = 100): the relative error of the STDE estimate against the exact
Laplacian for k = 1, 4, 16, 64, 256, the root mean square over 32 keys.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt2.curvature import laplacian, stde_laplacian

jax.config.update("jax_enable_x64", True)

WIDTH = 256
K = 16


def make_mlp(d, seed=0):
    rng = np.random.default_rng(seed)
    ws = [
        jnp.asarray(rng.standard_normal((a, b)) / math.sqrt(a))
        for a, b in ((d, WIDTH), (WIDTH, WIDTH), (WIDTH, 1))
    ]

    def u(x):
        h = jnp.tanh(x @ ws[0])
        h = jnp.tanh(h @ ws[1])
        return (h @ ws[2])[0]

    return u


def timed(fn, *args, reps=20):
    c = jax.jit(fn).lower(*args).compile()
    mem = c.memory_analysis()
    temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
    out = jax.block_until_ready(c(*args))
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(c(*args))
        best = min(best, time.perf_counter() - t)
    return float(out), best, temp


def hutchinson_hvp(u, x, key, k):
    vs = jax.random.rademacher(key, (k, *x.shape), dtype=x.dtype)
    hv = jax.vmap(lambda v: jax.jvp(jax.grad(u), (x,), (v,))[1])(vs)
    return jnp.mean(jnp.sum(vs * hv, axis=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    dims = (100,) if a.quick else (100, 1000, 10_000)
    key = jax.random.key(0)
    rows = []
    for d in dims:
        u = make_mlp(d)
        x = jnp.asarray(np.random.default_rng(1).standard_normal(d) / 2)
        row = {"d": d}
        for name, fn in (
            ("stde", lambda x, k: stde_laplacian(u, x, k, K)),
            ("hutchinson_hvp", lambda x, k: hutchinson_hvp(u, x, k, K)),
        ):
            v, t, mem = timed(fn, x, key)
            row[name] = {"value": v, "run_s": t, "temp_bytes": mem}
        if d <= 1000:
            v, t, mem = timed(lambda x: jnp.trace(jax.hessian(u)(x)), x)
            row["dense_hessian_trace"] = {"value": v, "run_s": t, "temp_bytes": mem}
        v, t, mem = timed(lambda x: laplacian(u, x), x, reps=3)
        row["exact_jets"] = {"value": v, "run_s": t, "temp_bytes": mem}
        row["stde_over_hutchinson_time"] = row["stde"]["run_s"] / row["hutchinson_hvp"]["run_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    # error against the number of directions, d = 100
    u = make_mlp(100)
    x = jnp.asarray(np.random.default_rng(1).standard_normal(100) / 2)
    exact = float(jax.jit(lambda x: laplacian(u, x))(x))
    keys = jax.random.split(jax.random.key(7), 32)
    errors = {}
    for k in (1, 4, 16, 64, 256):
        est = jax.jit(jax.vmap(lambda kk, k=k: stde_laplacian(u, x, kk, k)))(keys)
        errors[k] = float(np.sqrt(np.mean((np.asarray(est) - exact) ** 2)) / abs(exact))
    out = {
        "model": f"tanh MLP d -> {WIDTH} -> {WIDTH} -> 1, float64, CPU",
        "directions": K,
        "rows": rows,
        "relative_rms_error_vs_directions_d100": errors,
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
