"""``jaxopt2.minimize`` on the CUTEst unconstrained test set (sif2jax), against scipy and
optimistix.

Install and run (from the repository root, CPU, float64)::

    pip install -e '.[bench]'                         # sif2jax and optimistix
    python experiments/bench_cutest.py                # every problem with n <= 100
    python experiments/bench_cutest.py --quick        # 10 small problems, a smoke test
    python experiments/bench_cutest.py --max-n 10     # the n <= 10 subset
    python experiments/bench_cutest.py --problems ROSENBR,BEALE --solvers newton,optx_bfgs
    python experiments/bench_cutest.py --large        # matrix-free solvers, 1,000 <= n <= 100,000
    python experiments/bench_cutest.py --summarize    # summary and plot of an existing .jsonl

Importing sif2jax builds all of its ~1,000 problem modules: it takes one to two minutes on
two busy CPU cores before the first problem runs (``--quick`` is that plus about a minute).

Problems: every problem in ``sif2jax.unconstrained_minimisation_problems`` (names
deduplicated), with ``n = problem.num_variables()`` at most ``--max-n`` (100), or with
``1,000 <= n <= 100,000`` under ``--large``; the objective ``problem.objective(y, args)``
from ``problem.y0`` with ``problem.args``; ``problem.expected_objective_value`` recorded when
sif2jax gives one. Everything in float64 (``jax_enable_x64``); ``y0`` is flattened to one
float64 vector.

Solvers (``--solvers``, default all but ``--large``'s dense ones):

* jaxopt2 ``newton``, ``trust_region``, ``newton_cg``:
  ``jax.jit(lambda x0, args: jaxopt2.minimize(f, x0, args, method=m, tol=gtol,
  max_steps=500))``, default method options; ``newton_cg_diag`` is ``newton_cg`` with
  ``preconditioner="diagonal"`` (8 Hutchinson probes of the Hessian's diagonal per step).
* scipy (``scipy_trust_exact``, ``scipy_trust_ncg``, ``scipy_newton_cg``, ``scipy_bfgs``):
  ``scipy.optimize.minimize(method="trust-exact" | "trust-ncg" | "Newton-CG" | "BFGS")``
  with ``maxiter=500``, given the same objective as AOT-compiled jax functions (value,
  gradient, dense ``jax.hessian``, forward-over-reverse Hessian-vector product) returning
  NumPy values. ``gtol=gtol`` for the trust-region methods and BFGS (with ``norm=2``).
  Newton-CG has no gradient test (only a step-size one, here ``xtol=1e-14``): a callback
  evaluates ‖∇f‖ after each iteration and stops it at ``gtol`` (one extra gradient per
  iteration, included in its run time, not in its counts).
* optimistix ``optx_bfgs``: ``optx.minimise(f, optx.BFGS(rtol=1e-10, atol=1e-10), x0,
  args, max_steps=500, throw=False)`` jitted. Its stopping rule is a small change in both
  ``x`` and ``f`` (no gradient test); 1e-10 is the setting of experiments/bench_newton.py.

``--large`` runs the matrix-free ones only (``newton_cg``, ``newton_cg_diag``,
``scipy_trust_ncg``, ``scipy_newton_cg``).

``--least-squares``: the least-squares set instead, every problem of
``sif2jax.nonlinear_equations_problems`` without bounds or inequalities (``F(y) = 0``, the
residual ``r = F`` given by the equality constraints; 96 with n <= 100 and at most
``--max-m`` = 1,000 residuals, which leaves out DMN15102/3, FBRAIN/2/3 and VESUVIA/O/OU,
with 1,025 to 4,643 residuals), as
``min ½‖r‖²``: jaxopt2 ``least_squares`` (``levenberg_marquardt``, ``gauss_newton``, jitted
like ``minimize``, ``tol=gtol``), optimistix ``optx.least_squares`` with
``LevenbergMarquardt`` / ``GaussNewton`` (``rtol = atol = 1e-10``, ``throw=False``) and scipy
``least_squares`` (``lm``, MINPACK, and ``trf``) given the jitted residual and Jacobian, with
``ftol = xtol = gtol = 1e-15`` and ``max_nfev=500``. Success is the same gradient test on
``f = ½‖r‖²`` (``∇f = Jᵀr``).

``--starts``: the unconstrained problems with several of CUTEst's starting points
(``provided_y0s``; 16 with n <= 100, run with ``--max-n 10``: 14, all NIST fits with two
starts — DMN15102LS/DMN15103LS, n = 66/99 with 4,643 terms, take minutes a solve): each
jaxopt2 method solves all starts in one
``jax.vmap``-ed, jitted solve and one start at a time with the same single solve; the
points agree, and the batch's time is compared with the sum of the single ones.

Protocol:

* Success is decided here, on the returned point, whatever the solver says:
  ``‖∇f(x)‖₂ <= gtol = 1e-6 · max(1, ‖∇f(x0)‖₂)`` with our jitted jax gradient (a point with
  a non-finite value or gradient fails). Every solver is given this ``gtol`` as its own
  tolerance where it has one, so they all aim for the same target.
* At most 500 iterations (``max_steps`` / ``maxiter``).
* Times: compile (the ``.lower().compile()`` of the jitted solve, or for scipy of the jax
  functions it calls) and run time excluding compile: the jitted solve is run once to warm
  up, then timed (``block_until_ready``) up to 5 times, stopping once the timed runs have
  taken 1 s, and the fastest run is recorded (the one least disturbed by the rest of the
  machine); a scipy solve likewise, its compiled callbacks already warmed up. (Results
  before this rule were one timed run.)
* Per-solve wall-clock cap (``--timeout``, 120 s): problems run in a worker process that
  reports each solve as it finishes; a solve (its compile included) that has not finished
  within the cap is recorded as ``timeout``, the worker is killed and a fresh one goes on
  with the remaining solves. A crash (any Python exception) is recorded, never stops the
  run.

Output: one JSON line per (problem, solver) in ``experiments/results/bench_cutest.jsonl``
(problem, n, solver, success, iterations, nfev/ngev/nhev/nhvp where the solver reports them,
grad_norm, grad_norm0, gtol, f, f_expected, compile_s, run_s, solver_success, status,
message, exception, timeout); ``bench_cutest_summary.json`` (solved counts per solver per size
band n <= 10, 10 < n <= 100, n > 100; geometric-mean run-time ratio against ``optx_bfgs``
on the problems every compared solver solved, and pairwise on the problems both solved); and
``bench_cutest.png``, Dolan-Moré performance profiles of run time and iterations (a failure
counts as an infinite ratio). Iteration counts are each solver's own: jaxopt2 and scipy's
trust-region methods count rejected steps, line-search methods do not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JAXOPT2_METHODS = ("newton", "trust_region", "newton_cg", "newton_cg_diag")
# solver name -> (minimize method, options); newton_cg_diag: Jacobi-preconditioned CG
JAXOPT2_VARIANTS = {"newton_cg_diag": ("newton_cg", {"preconditioner": "diagonal"})}
SCIPY_METHODS = {
    "scipy_trust_exact": "trust-exact",
    "scipy_trust_ncg": "trust-ncg",
    "scipy_newton_cg": "Newton-CG",
    "scipy_bfgs": "BFGS",
}
ALL_SOLVERS = (*JAXOPT2_METHODS, *SCIPY_METHODS, "optx_bfgs")
MATRIX_FREE = ("newton_cg", "newton_cg_diag", "scipy_trust_ncg", "scipy_newton_cg")
BASELINE = "optx_bfgs"
# the least-squares set (--least-squares): residual form of CUTEst's nonlinear equations
LS_METHODS = ("levenberg_marquardt", "gauss_newton")
SCIPY_LS_METHODS = {"scipy_lm": "lm", "scipy_trf": "trf"}
OPTX_LS = ("optx_lm", "optx_gn")
LS_SOLVERS = (*LS_METHODS, *OPTX_LS, *SCIPY_LS_METHODS)
LS_BASELINE = "optx_lm"
LS_SAME_KIND = {
    "levenberg_marquardt": ("optx_lm", "scipy_lm", "scipy_trf"),
    "gauss_newton": ("optx_gn",),
}
# jaxopt2 method -> the peers of the same kind (for the "peer solves, we do not" lists)
SAME_KIND = {
    "trust_region": ("scipy_trust_exact",),
    "newton_cg": ("scipy_trust_ncg", "scipy_newton_cg"),
}
QUICK = (
    "ROSENBR",
    "BEALE",
    "BARD",
    "BOX3",
    "DENSCHNB",
    "HELIX",
    "KOWOSB",
    "BIGGS6",
    "HILBERTB",
    "TRIGON1",
)
MAX_ITER = 500
REPEATS, REPEAT_BUDGET = 5, 1.0  # timed runs per solve: the fastest of up to 5 (1 s budget)
GTOL_REL = 1e-6
OPTX_TOL = 1e-10
BANDS = (("n<=10", 0, 10), ("10<n<=100", 11, 100), ("n>100", 101, math.inf))


# --------------------------------------------------------------------------- worker side


def _float(v):
    try:
        v = float(v)
    except Exception:
        return None
    return v if math.isfinite(v) else (None if math.isnan(v) else v)


def _emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class _Problem:
    """One sif2jax problem as a flat float64 objective with AOT-compiled derivatives."""

    def __init__(self, prob, least_squares=False):
        import jax
        import jax.numpy as jnp
        from jax.flatten_util import ravel_pytree

        self.name = prob.name
        y0 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), prob.y0)
        z0, unravel = ravel_pytree(y0)
        self.z0 = z0
        self.n = int(z0.size)
        self.args = prob.args
        self.res = None
        if least_squares:
            # F(y) = 0 as least squares: r(z) = the equality constraints, f = ½‖r‖²
            def res(z, a):
                eq = prob.constraint(unravel(z))[0]
                return jnp.concatenate([jnp.ravel(e) for e in jax.tree.leaves(eq)]).astype(
                    jnp.float64
                )

            self.res = res
            self.m = int(jax.eval_shape(res, z0, self.args).shape[0])
            self.fun = lambda z, a: 0.5 * jnp.sum(res(z, a) ** 2)
        else:
            self.fun = lambda z, a: jnp.asarray(prob.objective(unravel(z), a), jnp.float64)
        try:
            exp = prob.expected_objective_value
            self.f_expected = None if exp is None else _float(jnp.asarray(exp))
        except Exception:
            self.f_expected = None
        self._compiled = {}
        self._compile_s = {}
        f = self.compiled("f")
        g = self.compiled("g")
        self.f0 = float(f(z0, self.args))
        self.gnorm0 = float(jnp.linalg.norm(g(z0, self.args)))
        self.gtol = GTOL_REL * max(1.0, self.gnorm0) if math.isfinite(self.gnorm0) else GTOL_REL

    def compiled(self, what):
        import jax

        if what not in self._compiled:
            fun = self.fun
            if what == "f":
                fn, ex = fun, (self.z0, self.args)
            elif what == "g":
                fn, ex = jax.grad(fun), (self.z0, self.args)
            elif what == "h":
                fn, ex = jax.hessian(fun), (self.z0, self.args)
            elif what == "r":
                fn, ex = self.res, (self.z0, self.args)
            elif what == "jac":
                jac = jax.jacfwd if self.n <= self.m else jax.jacrev
                fn, ex = jac(self.res), (self.z0, self.args)
            else:  # "hvp"

                def fn(z, v, a):
                    return jax.jvp(lambda y: jax.grad(fun)(y, a), (z,), (v,))[1]

                ex = (self.z0, self.z0, self.args)
            t = time.perf_counter()
            c = jax.jit(fn).lower(*ex).compile()
            self._compile_s[what] = time.perf_counter() - t
            c(*ex)  # warm up
            self._compiled[what] = c
        return self._compiled[what]

    def check(self, x):
        """(success, ‖∇f(x)‖, f(x)) by our own gradient test."""
        import jax.numpy as jnp
        import numpy as np

        x = jnp.asarray(np.asarray(x, np.float64))
        gn = float(jnp.linalg.norm(self.compiled("g")(x, self.args)))
        fx = float(self.compiled("f")(x, self.args))
        ok = math.isfinite(gn) and math.isfinite(fx) and gn <= self.gtol
        return ok, gn, fx

    def repeat_timed(self, fn, *a):
        """(result, seconds): the fastest of up to REPEATS runs (stopping once they have
        taken REPEAT_BUDGET seconds); the minimum is the run least disturbed by the rest of
        the machine."""
        import jax

        best, out, spent = math.inf, None, 0.0
        for _ in range(REPEATS):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a))
            dt = time.perf_counter() - t
            best, spent = min(best, dt), spent + dt
            if spent >= REPEAT_BUDGET:
                break
        return out, best


def _timed_jit(solve, p):
    import jax

    t = time.perf_counter()
    c = jax.jit(solve).lower(p.z0, p.args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(c(p.z0, p.args))
    out, run_s = p.repeat_timed(c, p.z0, p.args)
    return out, compile_s, run_s


def _jaxopt2_record(solve, p, counts):
    """Time a jitted jaxopt2 solve; (x, record) with `counts(sol)` merged in."""
    from jaxopt2.solvers import status_message

    sol, compile_s, run_s = _timed_jit(solve, p)
    code = int(sol.status)
    return sol.x, {
        "iterations": int(sol.num_steps),
        **counts(sol),
        "solver_success": bool(sol.success),
        "solver_grad_norm": _float(sol.grad_norm),
        "status": code,
        "message": status_message(code),
        "compile_s": compile_s,
        "run_s": run_s,
    }


def _run_jaxopt2(p, name):
    import jaxopt2

    method, options = JAXOPT2_VARIANTS.get(name, (name, {}))

    def solve(z0, a):
        return jaxopt2.minimize(
            p.fun, z0, a, method=method, tol=p.gtol, max_steps=MAX_ITER, **options
        )

    cg = method == "newton_cg"
    return _jaxopt2_record(
        solve,
        p,
        lambda sol: {
            "nhev": None if cg else int(sol.num_hessians),
            "nhvp": int(sol.num_hvps) if cg else None,
        },
    )


def _optx_record(solve, p):
    """Time a jitted optimistix solve returning (x, result code, steps); (x, record)."""
    import optimistix as optx

    (x, code, steps), compile_s, run_s = _timed_jit(solve, p)
    code = int(code)
    return x, {
        "iterations": int(steps),
        "solver_success": code == 0,
        "status": code,
        "message": optx.RESULTS._index_to_message[code] or "successful",
        "compile_s": compile_s,
        "run_s": run_s,
    }


def _run_optx(p):
    import optimistix as optx

    solver = optx.BFGS(rtol=OPTX_TOL, atol=OPTX_TOL)

    def solve(z0, a):
        s = optx.minimise(p.fun, solver, z0, a, max_steps=MAX_ITER, throw=False)
        return s.value, s.result._value, s.stats["num_steps"]

    return _optx_record(solve, p)


def _run_scipy(p, name):
    import numpy as np
    import scipy.optimize as so

    method = SCIPY_METHODS[name]
    a = p.args
    f_c, g_c = p.compiled("f"), p.compiled("g")
    kw = {}
    needs = ["f", "g"]
    options = {"maxiter": MAX_ITER}
    if method == "trust-exact":
        h_c = p.compiled("h")
        kw["hess"] = lambda x: np.asarray(h_c(x, a))
        needs.append("h")
    if method in ("trust-ncg", "Newton-CG"):
        v_c = p.compiled("hvp")
        kw["hessp"] = lambda x, v: np.asarray(v_c(x, v, a))
        needs.append("hvp")
    if method in ("trust-exact", "trust-ncg"):
        options["gtol"] = p.gtol
    elif method == "BFGS":
        options.update(gtol=p.gtol, norm=2)
    else:  # Newton-CG: stop on the gradient test through the callback

        def callback(intermediate_result):
            if float(np.linalg.norm(np.asarray(g_c(intermediate_result.x, a)))) <= p.gtol:
                raise StopIteration

        kw["callback"] = callback
        options["xtol"] = 1e-14
    fun = lambda x: float(f_c(x, a))
    jac = lambda x: np.asarray(g_c(x, a))
    x0 = np.asarray(p.z0, np.float64)
    res, run_s = p.repeat_timed(
        lambda: so.minimize(fun, x0, jac=jac, method=method, options=options, **kw)
    )
    return res.x, {
        "iterations": int(getattr(res, "nit", -1)),
        "nfev": int(getattr(res, "nfev", 0)),
        "ngev": int(getattr(res, "njev", 0)),
        "nhev": int(res.nhev) if "nhev" in res and method == "trust-exact" else None,
        "nhvp": int(res.nhev) if "nhev" in res and method != "trust-exact" else None,
        "solver_success": bool(res.success),
        "status": int(res.status),
        "message": str(res.message),
        "compile_s": sum(p._compile_s[k] for k in needs),
        "run_s": run_s,
    }


def _run_jaxopt2_ls(p, method):
    import jaxopt2

    def solve(z0, a):
        return jaxopt2.least_squares(p.res, z0, a, method=method, tol=p.gtol, max_steps=MAX_ITER)

    return _jaxopt2_record(solve, p, lambda sol: {"njev": int(sol.num_hessians)})


def _run_optx_ls(p, name):
    import optimistix as optx

    kind = {"optx_lm": optx.LevenbergMarquardt, "optx_gn": optx.GaussNewton}[name]
    solver = kind(rtol=OPTX_TOL, atol=OPTX_TOL)

    def solve(z0, a):
        s = optx.least_squares(p.res, solver, z0, a, max_steps=MAX_ITER, throw=False)
        return s.value, s.result._value, s.stats["num_steps"]

    return _optx_record(solve, p)


def _run_scipy_ls(p, name):
    import numpy as np
    import scipy.optimize as so

    method = SCIPY_LS_METHODS[name]
    a = p.args
    r_c, j_c = p.compiled("r"), p.compiled("jac")
    fun = lambda x: np.asarray(r_c(x, a))
    jac = lambda x: np.asarray(j_c(x, a))
    x0 = np.asarray(p.z0, np.float64)
    # the tightest tolerances scipy accepts (the gradient test is ours); one function
    # evaluation per iteration for "lm", a Jacobian per iteration for "trf"
    tols = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15)
    res, run_s = p.repeat_timed(
        lambda: so.least_squares(fun, x0, jac=jac, method=method, max_nfev=MAX_ITER, **tols)
    )
    return res.x, {
        "iterations": int(res.nfev),
        "nfev": int(res.nfev),
        "njev": None if res.njev is None else int(res.njev),
        "solver_success": bool(res.success),
        "status": int(res.status),
        "message": str(res.message),
        "compile_s": p._compile_s["r"] + p._compile_s["jac"],
        "run_s": run_s,
    }


def _run_one(p, solver):
    if solver in LS_METHODS:
        return _run_jaxopt2_ls(p, solver)
    if solver in OPTX_LS:
        return _run_optx_ls(p, solver)
    if solver in SCIPY_LS_METHODS:
        return _run_scipy_ls(p, solver)
    if solver in JAXOPT2_METHODS:
        return _run_jaxopt2(p, solver)
    if solver in SCIPY_METHODS:
        return _run_scipy(p, solver)
    if solver == "optx_bfgs":
        return _run_optx(p)
    raise ValueError(f"unknown solver {solver!r}")


def _exception_text(e):
    """(one-line message, the innermost frames as ``file.py:line in function``)."""
    frames = traceback.extract_tb(e.__traceback__)[-8:]
    tb = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames))
    return (f"{type(e).__name__}: {e}"[:2000], tb)


def _num_equations(prob):
    """The number of residuals of a nonlinear-equations problem without bounds or
    inequalities (a plain F(y) = 0); 0 for any other; -1 if that cannot be told (the
    problem is kept and its failure recorded at setup)."""
    import jax

    try:
        if prob.bounds is not None:
            return 0
        eq, ineq = jax.eval_shape(prob.constraint, prob.y0)
    except Exception:
        return -1
    if eq is None or ineq is not None:
        return 0
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(eq))


def _select(cfg, sif2jax):
    seen = {}
    if cfg.get("least_squares"):
        for prob in sif2jax.nonlinear_equations_problems:
            if prob.name not in seen:
                m = _num_equations(prob)
                if m == -1 or 0 < m <= cfg.get("max_m", math.inf):
                    seen[prob.name] = prob
    else:
        for prob in sif2jax.unconstrained_minimisation_problems:
            seen.setdefault(prob.name, prob)
    if cfg["problems"]:
        names = cfg["problems"]
        missing = [nm for nm in names if nm not in seen]
        if missing:
            _emit({"event": "warning", "text": f"unknown problems {missing}"})
        names = [nm for nm in names if nm in seen]
    else:
        names = []
        for nm in sorted(seen):
            try:
                n = int(seen[nm].num_variables())
            except Exception:
                continue
            lo, hi = (1000, 100_000) if cfg["large"] else (0, cfg["max_n"])
            if lo <= n <= hi:
                names.append(nm)
    return seen, [[nm, list(cfg["solvers"])] for nm in names]


def worker(cfg_path):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_enable_x64", True)
    import sif2jax

    cfg = json.loads(Path(cfg_path).read_text())
    probs, tasks = _select(cfg, sif2jax)
    if cfg.get("tasks") is not None:
        tasks = cfg["tasks"]
    skip = {tuple(k) for k in cfg.get("skip", [])}
    tasks = [[nm, [s for s in sols if (nm, s) not in skip]] for nm, sols in tasks]
    tasks = [t for t in tasks if t[1]]
    _emit({"event": "plan", "tasks": tasks})
    for name, solvers in tasks:
        _emit({"event": "setup", "problem": name, "solver": solvers[0]})
        base = {"problem": name, "n": None, "timeout": False}
        try:
            p = _Problem(probs[name], least_squares=bool(cfg.get("least_squares")))
            base.update(n=p.n, gtol=p.gtol, grad_norm0=p.gnorm0, f0=_float(p.f0))
            if p.res is not None:
                base["m"] = p.m
            base["f_expected"] = p.f_expected
        except Exception as e:
            msg, tb = _exception_text(e)
            for s in solvers:
                _emit(
                    {
                        "event": "record",
                        **base,
                        "solver": s,
                        "success": False,
                        "exception": "setup: " + msg,
                        "traceback": tb,
                    }
                )
            continue
        for s in solvers:
            _emit({"event": "start", "problem": name, "solver": s})
            rec = {**base, "solver": s, "exception": None}
            try:
                x, info = _run_one(p, s)
                ok, gn, fx = p.check(x)
                rec.update(info, success=ok, grad_norm=_float(gn), f=_float(fx))
            except Exception as e:
                msg, tb = _exception_text(e)
                rec.update(success=False, exception=msg, traceback=tb)
            _emit({"event": "record", **rec})
    _emit({"event": "finished"})


# --------------------------------------------------------------------------- parent side


def _reader(stream, q):
    for line in stream:
        q.put(line)
    q.put(None)


def run_all(cfg, out_path, timeout, import_timeout):
    """Run the worker, restarting it after a solve exceeds `timeout`; append records."""
    done = set()
    if cfg.get("resume") and out_path.exists():
        for line in out_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["problem"], r["solver"]))
    elif out_path.exists():
        out_path.unlink()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path = out_path.with_suffix(".worker.json")
    tasks = None
    while True:
        wcfg = {**cfg, "tasks": tasks, "skip": sorted(done)}
        cfg_path.write_text(json.dumps(wcfg))
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(cfg_path)],
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        q = queue.Queue()
        threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
        current, plan, finished = None, None, False
        wait = import_timeout
        while True:
            try:
                line = q.get(timeout=wait)
            except queue.Empty:
                line = "TIMEOUT"
            if line is None:
                break
            if line == "TIMEOUT":
                proc.kill()
                proc.wait()
                if current is None:
                    raise SystemExit(f"worker did not start within {import_timeout} s")
                name, solver = current
                print(f"  {name:12s} {solver:18s} TIMEOUT after {timeout} s", flush=True)
                rec = {
                    "problem": name,
                    "solver": solver,
                    "success": False,
                    "timeout": True,
                    "exception": f"timeout: no result within {timeout} s (compile included)",
                }
                with out_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                done.add((name, solver))
                break
            if not line.startswith("{"):
                sys.stderr.write(line)
                continue
            ev = json.loads(line)
            kind = ev.pop("event")
            wait = timeout
            if kind == "plan":
                plan = ev["tasks"]
                if tasks is None:
                    print(
                        f"{len(plan)} problems, {sum(len(s) for _, s in plan)} solves", flush=True
                    )
            elif kind in ("setup", "start"):
                current = (ev["problem"], ev["solver"])
            elif kind == "record":
                if not ev.get("exception"):
                    ev.pop("traceback", None)
                with out_path.open("a") as fh:
                    fh.write(json.dumps(ev) + "\n")
                done.add((ev["problem"], ev["solver"]))
                print(_line(ev), flush=True)
            elif kind == "finished":
                finished = True
            elif kind == "warning":
                print("warning:", ev["text"], flush=True)
        proc.wait()
        if finished or plan is None:
            break
        tasks = [[nm, [s for s in sols if (nm, s) not in done]] for nm, sols in plan]
        tasks = [t for t in tasks if t[1]]
        if not tasks:
            break
    cfg_path.unlink(missing_ok=True)


def _line(r):
    def fmt(v, spec):
        return format(v, spec) if isinstance(v, int | float) else "-"

    exc = f"  EXC {r['exception'][:60]}" if r.get("exception") else ""
    return (
        f"  {r['problem']:12s} n={fmt(r.get('n'), '<5d')} {r['solver']:18s} "
        f"ok={int(bool(r.get('success')))} it={fmt(r.get('iterations'), '4d')} "
        f"|g|={fmt(r.get('grad_norm'), '.1e')} run={fmt(r.get('run_s'), '.4f')}s "
        f"compile={fmt(r.get('compile_s'), '.1f')}s{exc}"
    )


# --------------------------------------------------------------------------- summary, plot


def _records(path):
    recs = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        recs[(r["problem"], r["solver"])] = r
    return list(recs.values())


def _geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _kind(recs):
    """(every solver, the baseline, jaxopt2's methods, same-kind peers) of the run's set."""
    if any(r["solver"] in LS_SOLVERS for r in recs):
        return LS_SOLVERS, LS_BASELINE, LS_METHODS, LS_SAME_KIND
    return ALL_SOLVERS, BASELINE, JAXOPT2_METHODS, SAME_KIND


def summarize(path):
    recs = _records(path)
    every, baseline, ours_all, same_kind = _kind(recs)
    solvers = [s for s in every if any(r["solver"] == s for r in recs)]
    if baseline not in solvers and "scipy_trust_ncg" in solvers:
        baseline = "scipy_trust_ncg"  # --large runs no optimistix
    by = {(r["problem"], r["solver"]): r for r in recs}
    # A problem counts once every solver of the run has a record for it (an interrupted run
    # leaves its last problem incomplete).
    seen = sorted({r["problem"] for r in recs})
    problems = [p for p in seen if all((p, s) in by for s in solvers)]
    incomplete = [p for p in seen if p not in problems]
    n_of = {}
    for r in recs:
        if r.get("n") is not None:
            n_of[r["problem"]] = r["n"]
    ok = lambda p, s: bool(by.get((p, s), {}).get("success"))
    counts = {}
    for s in solvers:
        row = {}
        for band, lo, hi in BANDS:
            ps = [p for p in problems if lo <= n_of.get(p, -1) <= hi]
            row[band] = [sum(ok(p, s) for p in ps), len(ps)]
        row["all"] = [sum(ok(p, s) for p in problems), len(problems)]
        counts[s] = row
    all_solved = [p for p in problems if all(ok(p, s) for s in solvers)]
    ratios, pairwise = {}, {}
    if baseline in solvers:
        for s in solvers:
            t = lambda p, s=s: (
                max(by[(p, s)]["run_s"], 1e-7) / max(by[(p, baseline)]["run_s"], 1e-7)
            )
            ratios[s] = _geomean([t(p) for p in all_solved])
            both = [p for p in problems if ok(p, s) and ok(p, baseline)]
            pairwise[s] = {"geomean_ratio": _geomean([t(p) for p in both]), "problems": len(both)}
    jaxopt2_issues = {
        "claims_success_but_fails_gradient_test": [
            (r["problem"], r["solver"], r.get("grad_norm"), r.get("gtol"))
            for r in recs
            if r["solver"] in ours_all and r.get("solver_success") and not r["success"]
        ],
        "exceptions": [
            (r["problem"], r["solver"], r["exception"])
            for r in recs
            if r["solver"] in ours_all and r.get("exception")
        ],
    }

    def brief(p, s):
        r = by.get((p, s), {})
        keys = ("status", "iterations", "grad_norm", "gtol", "exception")
        return {"solver": s, **{k: r.get(k) for k in keys}, "message": r.get("message")}

    gaps = {}
    for mine, peers in same_kind.items():
        if mine not in solvers:
            continue
        for peer in [q for q in peers if q in solvers]:
            ps = [p for p in problems if ok(p, peer) and not ok(p, mine)]
            gaps[f"{peer} solves, {mine} does not"] = {p: brief(p, mine) for p in ps}
    ours = [s for s in ours_all if s in solvers]
    peers = [s for s in solvers if s not in ours_all]
    if ours and peers:
        ps = [
            p for p in problems if any(ok(p, q) for q in peers) and not any(ok(p, s) for s in ours)
        ]
        gaps["a peer solves, no jaxopt2 method does"] = {
            p: {"solved_by": [q for q in peers if ok(p, q)], "jaxopt2": [brief(p, s) for s in ours]}
            for p in ps
        }
    summary = {
        "results": str(path.name),
        "protocol": {
            "gtol": f"{GTOL_REL} * max(1, |grad f(x0)|)",
            "max_iter": MAX_ITER,
            "run_s": f"fastest of up to {REPEATS} timed runs ({REPEAT_BUDGET} s budget)",
        },
        "solvers": solvers,
        "problems": len(problems),
        "incomplete_problems_left_out": incomplete,
        "solved": counts,
        "baseline": baseline,
        "problems_solved_by_all": len(all_solved),
        "geomean_run_time_ratio_vs_baseline_on_solved_by_all": ratios,
        "geomean_run_time_ratio_vs_baseline_pairwise": pairwise,
        "jaxopt2_checks": jaxopt2_issues,
        "to_investigate": gaps,
    }
    return summary, recs, solvers, problems


def print_table(summary):
    solvers = summary["solvers"]
    bands = [b for b, _, _ in BANDS] + ["all"]
    print(
        f"\n{'solver':18s} "
        + " ".join(f"{b:>11s}" for b in bands)
        + "  time ratio (all / pairwise)"
    )
    for s in solvers:
        c = summary["solved"][s]
        r = summary["geomean_run_time_ratio_vs_baseline_on_solved_by_all"].get(s)
        pw = summary["geomean_run_time_ratio_vs_baseline_pairwise"].get(s, {})
        rs = "-" if r is None else f"{r:.3g}"
        pws = (
            "-"
            if pw.get("geomean_ratio") is None
            else f"{pw['geomean_ratio']:.3g} ({pw['problems']})"
        )
        print(
            f"{s:18s} "
            + " ".join(f"{c[b][0]:>5d}/{c[b][1]:<5d}" for b in bands)
            + f"  {rs} / {pws}"
        )
    print(
        f"(ratios: geometric mean of run time / {summary['baseline']}'s; 'all' on the "
        f"{summary['problems_solved_by_all']} problems every solver solved)"
    )
    chk = summary["jaxopt2_checks"]
    bad = chk["claims_success_but_fails_gradient_test"]
    print("jaxopt2 success claimed but gradient test failed:", bad or "none")
    print("jaxopt2 exceptions:", chk["exceptions"] or "none")
    for title, cases in summary["to_investigate"].items():
        print(f"{title}: {len(cases)}")
        for p, c in cases.items():
            rows = c["jaxopt2"] if "jaxopt2" in c else [c]
            extra = f" (solved by {', '.join(c['solved_by'])})" if "solved_by" in c else ""
            print(f"  {p}{extra}")
            for b in rows:
                gn = "-" if b["grad_norm"] is None else f"{b['grad_norm']:.2e}"
                gt = "-" if b["gtol"] is None else f"{b['gtol']:.1e}"
                what = b["exception"] or f"status {b['status']} ({b['message']})"
                print(f"    {b['solver']:12s} it={b['iterations']} |g|={gn} gtol={gt} {what}")


def plot_profiles(recs, solvers, problems, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by = {(r["problem"], r["solver"]): r for r in recs}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "run_s", "run time"), (axes[1], "iterations", "iterations")):
        cost = np.full((len(problems), len(solvers)), np.inf)
        for i, p in enumerate(problems):
            for j, s in enumerate(solvers):
                r = by.get((p, s))
                if r and r.get("success") and r.get(key) is not None:
                    cost[i, j] = max(float(r[key]), 1e-7 if key == "run_s" else 1.0)
        best = cost.min(axis=1)
        keep = np.isfinite(best)
        ratio = cost[keep] / best[keep, None]
        finite = ratio[np.isfinite(ratio)]
        top = max(2.0, float(finite.max()) * 1.5) if finite.size else 2.0
        taus = np.logspace(0, np.log10(top), 400)
        for j, s in enumerate(solvers):
            rho = [(ratio[:, j] <= t).sum() / len(problems) for t in taus]
            mine = s in JAXOPT2_METHODS or s in LS_METHODS
            ax.step(taus, rho, where="post", label=s, ls="-" if mine else "--")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(f"τ ({label} / best {label})")
        ax.set_ylabel("fraction of problems within τ of the best")
        ax.set_title(f"performance profile: {label} ({len(problems)} problems)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- several starts


def run_starts(cfg, out_path):
    """Every problem with several of CUTEst's starting points: each jaxopt2 method solves
    all starts at once under ``jax.vmap`` (one compiled program, one loop that runs until
    every start is done) and one start at a time with the same compiled single solve;
    both give the same points, and the batch's run time is compared with the sum of the
    single ones (each the fastest of up to REPEATS runs)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import sif2jax

    import jaxopt2

    chosen = {}
    for prob in sif2jax.unconstrained_minimisation_problems:
        if prob.name in chosen or len(prob.provided_y0s) < 2:
            continue
        if cfg["problems"] and prob.name not in cfg["problems"]:
            continue
        if int(prob.num_variables()) <= cfg["max_n"]:
            chosen[prob.name] = prob
    methods = [s for s in cfg["solvers"] if s in JAXOPT2_METHODS]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w") as fh:
        for name in sorted(chosen):
            prob = chosen[name]
            starts = [type(prob)(y0_iD=i) for i in sorted(prob.provided_y0s)]
            ps = [_Problem(q) for q in starts]
            p = ps[0]
            z0s = jnp.stack([q.z0 for q in ps])
            # one tolerance for the batch: each start's own gtol (a traced argument)
            gtols = jnp.asarray([q.gtol for q in ps])
            for method in methods:

                def solve(z0, a, tol, method=method):
                    m, options = JAXOPT2_VARIANTS.get(method, (method, {}))
                    return jaxopt2.minimize(
                        p.fun, z0, a, method=m, tol=tol, max_steps=MAX_ITER, **options
                    )

                single = jax.jit(solve).lower(p.z0, p.args, gtols[0]).compile()
                batch = (
                    jax.jit(jax.vmap(solve, in_axes=(0, None, 0)))
                    .lower(z0s, p.args, gtols)
                    .compile()
                )
                jax.block_until_ready(batch(z0s, p.args, gtols))
                sb, t_batch = p.repeat_timed(batch, z0s, p.args, gtols)
                t_single, agree, rows = 0.0, 0.0, []
                for i, q in enumerate(ps):
                    jax.block_until_ready(single(q.z0, p.args, gtols[i]))
                    si, dt = p.repeat_timed(single, q.z0, p.args, gtols[i])
                    t_single += dt
                    xb, xs = np.asarray(sb.x[i]), np.asarray(si.x)
                    agree = max(agree, float(np.max(np.abs(xb - xs)) / (1 + np.max(np.abs(xs)))))
                    ok, gn, fx = q.check(xb)
                    rows.append(
                        {
                            "start": i,
                            "success": ok,
                            "grad_norm": _float(gn),
                            "f": _float(fx),
                            "iterations": int(sb.num_steps[i]),
                            "iterations_single": int(si.num_steps),
                        }
                    )
                rec = {
                    "problem": name,
                    "n": p.n,
                    "solver": method,
                    "starts": rows,
                    "solved": sum(r["success"] for r in rows),
                    "batch_run_s": t_batch,
                    "single_run_s_total": t_single,
                    "max_rel_difference_batch_vs_single": agree,
                }
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                print(
                    f"  {name:12s} n={p.n:<4d} {method:13s} solved {rec['solved']}/{len(rows)} "
                    f"batch {t_batch * 1e3:8.3f} ms  one at a time {t_single * 1e3:8.3f} ms  "
                    f"|x_batch - x_single| {agree:.1e}",
                    flush=True,
                )


def summarize_starts(path):
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    out = {"results": path.name, "problems": len({r["problem"] for r in recs}), "solvers": {}}
    for s in JAXOPT2_METHODS:
        rs = [r for r in recs if r["solver"] == s]
        if not rs:
            continue
        out["solvers"][s] = {
            "starts_solved": [sum(r["solved"] for r in rs), sum(len(r["starts"]) for r in rs)],
            "geomean_batch_over_one_at_a_time": _geomean(
                [max(r["batch_run_s"], 1e-7) / max(r["single_run_s_total"], 1e-7) for r in rs]
            ),
            "max_rel_difference_batch_vs_single": max(
                r["max_rel_difference_batch_vs_single"] for r in rs
            ),
        }
    return out


# --------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", help="comma-separated problem names (default: by size)")
    ap.add_argument("--solvers", help=f"comma-separated, from {','.join(ALL_SOLVERS)}")
    ap.add_argument("--max-n", type=int, default=100, help="largest n (default 100)")
    ap.add_argument("--large", action="store_true", help="1,000 <= n <= 100,000, matrix-free")
    ap.add_argument(
        "--max-m", type=int, default=1000, help="--least-squares: most residuals (default 1000)"
    )
    ap.add_argument("--quick", action="store_true", help="10 small problems")
    ap.add_argument(
        "--least-squares",
        action="store_true",
        help="the nonlinear-equations set as least squares (least_squares vs optimistix, scipy)",
    )
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per solve")
    ap.add_argument("--import-timeout", type=float, default=900.0)
    ap.add_argument(
        "--out", help="results (default experiments/results/bench_cutest[_ls|_large].jsonl)"
    )
    ap.add_argument("--resume", action="store_true", help="keep the solves already in --out")
    ap.add_argument("--summarize", action="store_true", help="only summarize --out")
    ap.add_argument(
        "--starts",
        action="store_true",
        help="the problems with several starting points: all starts at once under vmap",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.starts:
        out = Path(a.out) if a.out else RESULTS / "bench_cutest_starts.jsonl"
        if not a.summarize:
            cfg = {
                "problems": a.problems.split(",") if a.problems else None,
                "solvers": a.solvers.split(",") if a.solvers else list(JAXOPT2_METHODS[:3]),
                "max_n": a.max_n,
            }
            run_starts(cfg, out)
        summary = summarize_starts(out)
        out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary, indent=1))
        return None
    suffix = "_ls" if a.least_squares else ("_large" if a.large else "")
    out = Path(a.out) if a.out else RESULTS / f"bench_cutest{suffix}.jsonl"
    if not a.summarize:
        known = LS_SOLVERS if a.least_squares else ALL_SOLVERS
        default = MATRIX_FREE if a.large else known
        solvers = a.solvers.split(",") if a.solvers else list(default)
        bad = [s for s in solvers if s not in known]
        if bad:
            ap.error(f"unknown solvers {bad}; known: {', '.join(known)}")
        problems = a.problems.split(",") if a.problems else (list(QUICK) if a.quick else None)
        cfg = {
            "problems": problems,
            "solvers": solvers,
            "max_n": a.max_n,
            "large": a.large,
            "least_squares": a.least_squares,
            "max_m": a.max_m,
            "resume": a.resume,
        }
        t = time.perf_counter()
        run_all(cfg, out, a.timeout, a.import_timeout)
        print(f"wall time {time.perf_counter() - t:.0f} s")
    summary, recs, solvers, problems = summarize(out)
    out.with_name(out.stem + "_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_profiles(recs, solvers, problems, out.with_suffix(".png"))
    print_table(summary)


if __name__ == "__main__":
    main()
