"""Benchmark of ``jaxopt2.minimize`` / ``jaxopt2.least_squares`` against scipy.optimize,
scikit-learn, optax's L-BFGS and optimistix.

How to run (from the repository root, CPU only)::

    python experiments/bench_newton.py           # a few minutes on 2 cores
    python experiments/bench_newton.py --quick   # fewer repeats, for a smoke test

optimistix is optional: ``pip install optimistix`` (it adds lineax); without it the
optimistix contenders print a ``skipped`` line. Each measurement is one JSON object per line
(one per problem and solver), followed by ``target`` lines and a ``summary``; the lines are
also written to ``experiments/results/bench_newton.jsonl`` (``--no-write`` turns that off).

Problems (float64 throughout):

* ``logistic``: scikit-learn's breast cancer data, standardized features plus an intercept
  column (569 × 31), mean logistic loss + ‖w‖²/(2n) on the weights, from w = 0: the
  objective of ``LogisticRegression(C=1)`` divided by n.
* ``rosenbrock``: from (-1.2, 1).
* ``quadratic_1e2`` / ``1e4`` / ``1e6``: ``½xᵀQx - bᵀx`` in 20 dimensions, ``Q`` with
  eigenvalues log-spaced from 1 to the condition number and random eigenvectors (seed 0),
  from x = 0.
* ``exp_fit``: least squares ``a·exp(-k t) + c - y`` on 25 noisy points (seed 0), from
  (1, 0.5, 0).
* ``batch_rosenbrock``: 1000 shifted Rosenbrock problems ``(a - x₀)² + 100(x₁ - x₀²)²``,
  ``a ~ U(0.5, 1.5)``, starts ``~ U(-1.5, 1.5)²``: one jitted ``vmap`` of ``minimize``
  against a Python loop of scipy solves.

Contenders (exact calls):

* jaxopt2: ``jax.jit(lambda x0, *args: minimize(f, x0, *args, method=m, tol=1e-8))`` for
  every method, ``least_squares(..., method=m, tol=1e-8)``; data passed as arguments.
* scipy: ``scipy.optimize.minimize(f, x0, jac, hess|hessp, method=...)`` for
  ``Newton-CG`` (``xtol=1e-10``), ``trust-ncg`` / ``trust-exact`` (``gtol=1e-8``),
  ``L-BFGS-B`` (``gtol=1e-10, ftol=1e-16, maxiter=10000``); the callbacks are jitted jax
  functions of the same objective (value, gradient, dense Hessian, HVP) returning NumPy
  arrays. ``scipy.optimize.least_squares(method='lm', xtol=ftol=gtol=1e-15)`` with a jitted
  Jacobian.
* scikit-learn: ``LogisticRegression(C=1, tol=1e-10, max_iter=10000, solver=...)`` with
  ``lbfgs`` and ``newton-cholesky`` (its own objective and stopping rule; grad norm
  evaluated with ours).
* optax: ``optax.lbfgs()`` (memory 10, zoom line search) in a jitted ``lax.while_loop`` that
  stops when ``‖g‖ <= 1e-6`` (the "100x larger gradient norm" comparison point) or after
  10000 steps.
* optimistix (if installed): ``optx.minimise(f, optx.BFGS(rtol=1e-10, atol=1e-10), ...)``
  and ``optx.least_squares(r, optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10), ...)``,
  jitted.

Reported per contender: iterations (scipy ``nit``; for jaxopt2 ``num_steps``, rejected steps
included), Hessian / Jacobian evaluations and HVPs where the solver reports them, the final
gradient norm ``‖∇f‖₂`` evaluated with our own jax gradient, and the wall time after compile:
medians over interleaved rounds (``experiments/timing.py``), each call to
``block_until_ready``; the first call (trace + compile + run) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import scipy.optimize  # noqa: E402
import timing  # noqa: E402
from timing import rounded  # noqa: E402

from jaxopt2.solvers import least_squares, minimize, status_message  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
TOL = 1e-8
LBFGS_TOL = 1e-6
METHODS = (
    "newton",
    "trust_region",
    "newton_cg",
    "cubic",
    "lazy_newton",
    "damped_newton",
    "saddle_free",
)

_lines: list[dict[str, Any]] = []


def emit(obj: dict[str, Any]) -> dict[str, Any]:
    obj = rounded(obj)
    print(json.dumps(obj), flush=True)
    _lines.append(obj)
    return obj


# --------------------------------------------------------------------------- problems


def logistic(w, a, s):
    return jnp.mean(jax.nn.softplus(-s * (a @ w))) + 0.5 / a.shape[0] * jnp.sum(w[:-1] ** 2)


def rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def shifted_rosenbrock(x, a):
    return (a - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def quadratic(x, q, b):
    return 0.5 * x @ q @ x - b @ x


def exp_residual(p, t, y):
    return p[0] * jnp.exp(-p[1] * t) + p[2] - y


def problems() -> dict[str, tuple]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    a = np.hstack([x, np.ones((x.shape[0], 1))])
    out = {
        "logistic": (logistic, np.zeros(31), (a, 2.0 * y - 1.0)),
        "rosenbrock": (rosenbrock, np.array([-1.2, 1.0]), ()),
    }
    rng = np.random.default_rng(0)
    q_basis, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    b = rng.standard_normal(20)
    for cond in (1e2, 1e4, 1e6):
        q = (q_basis * np.geomspace(1.0, cond, 20)) @ q_basis.T
        out[f"quadratic_{cond:.0e}".replace("+0", "")] = (quadratic, np.zeros(20), (q, b))
    return out


# --------------------------------------------------------------------------- contenders


def jaxopt2_contender(f, x0, args, method):
    solve = jax.jit(lambda z, *a: minimize(f, z, *a, method=method, tol=TOL, max_steps=500))
    x0 = jnp.asarray(x0)
    args = tuple(jnp.asarray(v) for v in args)

    def call():
        return solve(x0, *args)

    def report(sol):
        return {
            "iterations": int(sol.num_steps),
            "hessians": int(sol.num_hessians),
            "hvps": int(sol.num_hvps),
            "status": status_message(sol.status),
            "x": np.asarray(sol.x),
        }

    return call, report


def scipy_contender(f, x0, args, method):
    fj = jax.jit(f)
    gj = jax.jit(jax.grad(f))
    hj = jax.jit(jax.hessian(f))
    hpj = jax.jit(lambda x, p, *a: jax.jvp(lambda z: jax.grad(f)(z, *a), (x,), (p,))[1])
    args = tuple(jnp.asarray(v) for v in args)
    kw: dict[str, Any] = {
        "fun": lambda x: float(fj(x, *args)),
        "jac": lambda x: np.asarray(gj(x, *args)),
    }
    if method == "Newton-CG":
        kw["hessp"] = lambda x, p: np.asarray(hpj(x, p, *args))
        kw["options"] = {"xtol": 1e-10, "maxiter": 1000}
    elif method == "trust-ncg":
        kw["hessp"] = lambda x, p: np.asarray(hpj(x, p, *args))
        kw["options"] = {"gtol": TOL, "maxiter": 1000}
    elif method == "trust-exact":
        kw["hess"] = lambda x: np.asarray(hj(x, *args))
        kw["options"] = {"gtol": TOL, "maxiter": 1000}
    else:
        kw["options"] = {"gtol": 1e-10, "ftol": 1e-16, "maxiter": 10000}

    def call():
        return scipy.optimize.minimize(x0=np.asarray(x0, float), method=method, **kw)

    def report(r):
        return {
            "iterations": int(r.nit),
            "hessians": int(getattr(r, "nhev", 0) or 0),
            "fevals": int(r.nfev),
            "status": str(r.message),
            "x": np.asarray(r.x),
        }

    return call, report


def optax_lbfgs_contender(f, x0, args):
    opt = optax.lbfgs()

    @jax.jit
    def solve(w0, *a):
        fun = lambda w: f(w, *a)
        vg = optax.value_and_grad_from_state(fun)

        def cond(c):
            _, _, k, gnorm = c
            return (k < 10_000) & (gnorm > LBFGS_TOL)

        def body(c):
            w, st, k, _ = c
            v, g = vg(w, state=st)
            u, st = opt.update(g, st, w, value=v, grad=g, value_fn=fun)
            w = optax.apply_updates(w, u)
            return w, st, k + 1, jnp.linalg.norm(jax.grad(fun)(w))

        init = (w0, opt.init(w0), 0, jnp.linalg.norm(jax.grad(fun)(w0)))
        w, _, k, _ = jax.lax.while_loop(cond, body, init)
        return w, k

    x0 = jnp.asarray(x0)
    args = tuple(jnp.asarray(v) for v in args)
    return (lambda: solve(x0, *args)), (
        lambda out: {"iterations": int(out[1]), "x": np.asarray(out[0])}
    )


def optimistix_contender(f, x0, args):
    import optimistix as optx

    solver = optx.BFGS(rtol=1e-10, atol=1e-10)

    @jax.jit
    def solve(w0, *a):
        sol = optx.minimise(lambda w, aa: f(w, *aa), solver, w0, a, max_steps=10_000, throw=False)
        return sol.value, sol.stats["num_steps"]

    x0 = jnp.asarray(x0)
    args = tuple(jnp.asarray(v) for v in args)
    return (lambda: solve(x0, *args)), (
        lambda out: {"iterations": int(out[1]), "x": np.asarray(out[0])}
    )


def measure(problem, name, f, args, call, report, rounds) -> dict[str, Any]:
    out, first = timing.first_call(call)
    rep = report(out)
    samples = timing.interleaved({name: call}, rounds)[name]
    x = rep.pop("x")
    gnorm = float(jnp.linalg.norm(jax.grad(f)(jnp.asarray(x), *[jnp.asarray(v) for v in args])))
    return {
        "metric": "solve",
        "problem": problem,
        "solver": name,
        **rep,
        "grad_norm": gnorm,
        "value": float(f(jnp.asarray(x), *[jnp.asarray(v) for v in args])),
        "median_s": timing.median(samples),
        "first_call_s": first,
    }


def run_minimize_problems(rounds: int) -> dict[tuple[str, str], dict]:
    results = {}
    have_optx = True
    try:
        import optimistix  # noqa: F401
    except ImportError:
        have_optx = False
        emit({"metric": "skipped", "solver": "optimistix", "reason": "pip install optimistix"})
    for problem, (f, x0, args) in problems().items():
        contenders = {}
        for m in METHODS:
            contenders[f"jaxopt2.{m}"] = jaxopt2_contender(f, x0, args, m)
        for m in ("Newton-CG", "trust-ncg", "trust-exact", "L-BFGS-B"):
            contenders[f"scipy.{m}"] = scipy_contender(f, x0, args, m)
        contenders["optax.lbfgs"] = optax_lbfgs_contender(f, x0, args)
        if have_optx:
            contenders["optimistix.BFGS"] = optimistix_contender(f, x0, args)
        if problem == "logistic":
            contenders.update(sklearn_contenders(*args))
        for name, (call, report) in contenders.items():
            r = emit(measure(problem, name, f, args, call, report, rounds))
            results[(problem, name)] = r
    return results


def sklearn_contenders(a, s):
    from sklearn.linear_model import LogisticRegression

    x, y = a[:, :-1], (s > 0).astype(int)
    out = {}
    for solver in ("lbfgs", "newton-cholesky"):

        def call(solver=solver):
            clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000, solver=solver)
            return clf.fit(x, y)

        def report(clf):
            w = np.concatenate([clf.coef_.ravel(), clf.intercept_])
            return {"iterations": int(clf.n_iter_[0]), "x": w}

        out[f"sklearn.{solver}"] = (call, report)
    return out


def run_least_squares(rounds: int) -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 4.0, 25)
    y = 3.0 * np.exp(-1.3 * t) + 0.5 + 0.02 * rng.standard_normal(25)
    p0 = np.array([1.0, 0.5, 0.0])
    tj, yj = jnp.asarray(t), jnp.asarray(y)
    cost = lambda p, tt, yy: 0.5 * jnp.sum(exp_residual(p, tt, yy) ** 2)
    contenders = {}
    for m in ("gauss_newton", "levenberg_marquardt"):
        solve = jax.jit(
            lambda z, tt, yy, m=m: least_squares(exp_residual, z, tt, yy, method=m, tol=TOL)
        )
        contenders[f"jaxopt2.{m}"] = (
            lambda solve=solve: solve(jnp.asarray(p0), tj, yj),
            lambda s: {
                "iterations": int(s.num_steps),
                "jacobians": int(s.num_hessians),
                "x": np.asarray(s.x),
            },
        )
    rj = jax.jit(exp_residual)
    jj = jax.jit(jax.jacfwd(exp_residual))
    contenders["scipy.least_squares(lm)"] = (
        lambda: scipy.optimize.least_squares(
            lambda p: np.asarray(rj(p, tj, yj)),
            p0,
            jac=lambda p: np.asarray(jj(p, tj, yj)),
            method="lm",
            xtol=1e-15,
            ftol=1e-15,
            gtol=1e-15,
        ),
        lambda r: {"iterations": int(r.nfev), "jacobians": int(r.njev), "x": np.asarray(r.x)},
    )
    try:
        import optimistix as optx

        lm = optx.LevenbergMarquardt(rtol=1e-10, atol=1e-10)

        def osolve_fn(z, tt, yy):
            sol = optx.least_squares(
                lambda p, a: exp_residual(p, *a), lm, z, (tt, yy), max_steps=1000, throw=False
            )
            return sol.value, sol.stats["num_steps"]

        osolve = jax.jit(osolve_fn)
        contenders["optimistix.LevenbergMarquardt"] = (
            lambda: osolve(jnp.asarray(p0), tj, yj),
            lambda out: {"iterations": int(out[1]), "x": np.asarray(out[0])},
        )
    except ImportError:
        pass
    for name, (call, report) in contenders.items():
        emit(measure("exp_fit", name, cost, (t, y), call, report, rounds))


def run_batch(rounds: int, size: int = 1000) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 1.5, size)
    x0 = rng.uniform(-1.5, 1.5, (size, 2))
    out: dict[str, Any] = {"metric": "batch", "problem": "batch_rosenbrock", "size": size}
    fns = {}
    for m in ("trust_region", "newton"):
        solve = jax.jit(
            jax.vmap(
                lambda z, p, m=m: minimize(
                    shifted_rosenbrock, z, p, method=m, tol=TOL, max_steps=500
                )
            )
        )
        fns[f"jaxopt2.{m} (vmap)"] = lambda solve=solve: solve(jnp.asarray(x0), jnp.asarray(a))
    gj = jax.jit(jax.grad(shifted_rosenbrock))
    hj = jax.jit(jax.hessian(shifted_rosenbrock))
    fj = jax.jit(shifted_rosenbrock)

    def scipy_loop():
        res = []
        for i in range(size):
            ai = jnp.asarray(a[i])
            res.append(
                scipy.optimize.minimize(
                    lambda x: float(fj(x, ai)),
                    x0[i],
                    jac=lambda x: np.asarray(gj(x, ai)),
                    hess=lambda x: np.asarray(hj(x, ai)),
                    method="trust-exact",
                    options={"gtol": TOL},
                )
            )
        return res

    fns["scipy.trust-exact (Python loop)"] = scipy_loop
    details = {}
    for name, fn in fns.items():
        res, first = timing.first_call(fn)
        if isinstance(res, list):
            xs = np.array([r.x for r in res])
            ok = np.mean([r.success for r in res])
            its = np.array([r.nit for r in res])
        else:
            xs, ok, its = np.asarray(res.x), float(np.mean(res.success)), np.asarray(res.num_steps)
        err = np.max(np.abs(xs - np.stack([a, a**2], 1)))
        details[name] = {
            "first_call_s": first,
            "success_rate": ok,
            "mean_iterations": float(its.mean()),
            "max_abs_error": float(err),
        }
    samples = timing.interleaved(fns, rounds)
    for name in fns:
        details[name]["median_s"] = timing.median(samples[name])
    out["contenders"] = details
    ref = "scipy.trust-exact (Python loop)"
    out["speedup_vs_scipy_loop"] = {
        n: timing.paired_ratio(samples[ref], samples[n]) for n in fns if n != ref
    }
    return emit(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "bench_newton.jsonl"))
    args = p.parse_args(argv)
    rounds = 5 if args.quick else 30
    t_start = time.perf_counter()
    import os
    import platform

    emit(
        {
            "metric": "environment",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "quick": args.quick,
            "load_average": timing.load_average(),
        }
    )
    res = run_minimize_problems(rounds)
    run_least_squares(rounds)
    batch = run_batch(2 if args.quick else 3, size=200 if args.quick else 1000)

    targets = []
    best_name, best = min(
        ((k[1], v) for k, v in res.items() if k[0] == "logistic" and k[1].startswith("jaxopt2")),
        key=lambda kv: kv[1]["median_s"],
    )
    ncg = res[("logistic", "scipy.trust-ncg")]
    lb = res[("logistic", "optax.lbfgs")]
    ratio = best["median_s"] / ncg["median_s"]
    targets.append(
        {
            "target": "logistic: fastest jaxopt2 method / scipy trust-ncg wall time",
            "solver": best_name,
            "value": ratio,
            "goal": "<= 0.5",
            "pass": ratio <= 0.5,
        }
    )
    ratio_lb = best["median_s"] / lb["median_s"]
    gap = lb["grad_norm"] / best["grad_norm"]
    targets.append(
        {
            "target": "logistic: fastest jaxopt2 method / optax.lbfgs wall time, at a 100x "
            "smaller gradient norm",
            "solver": best_name,
            "value": ratio_lb,
            "grad_norm_ratio_lbfgs_over_jaxopt2": gap,
            "goal": "<= 2 with grad norm ratio >= 100",
            "pass": ratio_lb <= 2 and gap >= 100,
        }
    )
    targets.append(
        {
            "target": "batch of 1000 Rosenbrock problems: scipy loop time / jaxopt2 vmap time",
            "value": batch["speedup_vs_scipy_loop"],
            "goal": "> 1",
            "pass": all(v > 1 for v in batch["speedup_vs_scipy_loop"].values()),
        }
    )
    for t in targets:
        emit({"metric": "target", **t})
    emit(
        {
            "metric": "summary",
            "all_pass": all(t["pass"] for t in targets),
            "wall_s": time.perf_counter() - t_start,
            "load_average": timing.load_average(),
        }
    )
    if not args.no_write:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(line) + "\n" for line in _lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
