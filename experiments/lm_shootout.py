"""Optimizer shoot-out on the byte-level LM (``configs/lm_tiny.yaml``; ``--config`` another).

Eight optimizers (AdamW, Muon, schedule-free AdamW, Shampoo, SOAP, K-FAC, Sophia,
AdaHessian), each at the same number of learning rates (a grid of 3, spaced by about 3x
around a value usual for that method; K-FAC in four rows — with a learning rate, the same
with ``stats_every=5``, and its adaptive mode, whose grid is the initial damping, with and
without ``stats_every=5``), every trial with the same steps, seed (so the same
initial parameters and the same batches) and the same schedule shape (warmup then cosine
decay to 0.1x; schedule-free gets its warmup and then a constant rate, see below). Every
trial is an ordinary ``jaxopt2 run`` of the config with overrides, evaluated every
``log_every`` steps on the task's fixed validation windows.

Per optimizer it records: the best validation bits per byte at the step budget (the final
evaluation of its best learning rate), the steps and training seconds that trial needed to
first reach AdamW's best final validation loss (null if it never did), and its mean step
time relative to AdamW's best trial (the runner's training time: compiled chunks only, no
compile, no evaluation). Step times compare only on an otherwise idle machine: with other
work on the cores, the ratios of the quick check ranged from 0.7 to 3.8 for methods of
similar cost.

Why not ``jaxopt2 sweep``: a sweep vmaps its members in one program, and the optimizers
that refresh a preconditioner every k steps (Shampoo, SOAP, K-FAC, Sophia) branch with
``lax.cond`` on each member's own step count; under ``vmap`` that predicate is batched, so
the branch becomes a select and every member runs the expensive refresh at every step. The
grid's numbers would be right but its step times would not, and step time is half of what
this compares. So each trial is its own run (its own compile, each refresh at its own steps).

Notes on the settings (``OPTIMIZERS`` below):

* The grids' centers are the usual values of each method, moved where 60-step probes on the
  ``--quick`` model said a method needs a larger rate than AdamW (validation bits per byte
  after 60 steps; AdamW: 4.10 at 3e-3, 3.63 at 1e-2; Shampoo 3.59 at 1e-2): AdaHessian to
  0.1 (3.90; 5.29 at 0.03), SOAP to 1e-2 (3.83; 6.43 at 3e-3), Sophia (Gauss-Newton-
  Bartlett) to 3e-3 (4.19; 1e-3 far behind). So short a horizon favours large rates, so
  these are hints only: ``best_at_grid_edge`` in the summary flags an optimizer whose best
  rate is an end of its grid, whose numbers then need a wider grid.

* ``optimizer.weight_decay`` (0.01 in the config) goes to each factory's own weight decay
  argument where it has one, else it is decoupled (the runner's rule); K-FAC runs with a
  learning rate (its adaptive mode takes no weight decay).
* Muon orthogonalizes every matrix leaf, the byte and position embeddings and the head
  included (``muon_weight_dimension_numbers`` cannot be given from a config); the vectors
  (LayerNorm, biases) get Adam at a fixed ``adam_learning_rate``.
* Schedule-free AdamW: the factory's own ``warmup_steps`` argument has the name of the
  runner's schedule field, so a config cannot reach it; the same warmup is the runner's
  ``warmup_cosine`` schedule with ``min_lr_ratio: 1`` (warmup, then constant). The runner
  evaluates it at its averaged parameters (``optax.contrib.schedule_free_eval_params``).

Outputs (in ``--out``, default ``experiments/results/lm_shootout/``): ``trials.jsonl``
(one line per trial), ``summary.jsonl`` (one line per optimizer), ``lm_shootout.png``
(validation bits per byte of each optimizer's best trial against steps and against
training seconds). The run directories go to ``--runs-dir`` (default
``runs/lm_shootout/``); a finished trial is not run again, an interrupted one resumes.

    python experiments/lm_shootout.py [--optimizers adamw,soap] [--quick]
        [--config configs/lm_tiny.yaml] [--retime STEPS]

``--retime STEPS`` reruns each optimizer's best trial for STEPS steps, twice, the optimizers
in turn, without evaluations, and adds those median step times to the summary
(``retimed_step_time_vs_adamw``): for a clean timing on an idle machine when the trials
themselves shared the cores with other work (finished trials are not run again).

``--quick`` checks the script end to end in a few minutes: ``configs/lm_tiny.yaml`` cut to
a smaller model and 20 steps, one learning rate per optimizer (the grid's middle), outputs
in ``--out``/quick.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from jaxopt2.cpu import apply_cpu_deadlock_workaround, limit_lapack_threads

apply_cpu_deadlock_workaround()
# one OpenBLAS thread for every contender: spinning LAPACK workers after an eigh would take a
# core from the steps that follow a refresh (Shampoo, SOAP, K-FAC) and bias their step times
limit_lapack_threads()

import jax  # noqa: E402

from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.errors import NonFiniteError  # noqa: E402
from jaxopt2.experiment.plots import pyplot  # noqa: E402
from jaxopt2.experiment.rundir import read_metrics  # noqa: E402
from jaxopt2.experiment.trainer import run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The tiny model by default: its 24 trials take about 35 minutes on one CPU core; lm_small's
# (d=128, 128-byte context, 600 steps) about 13 times as long.
CONFIG = ROOT / "configs" / "lm_tiny.yaml"
QUICK_CONFIG = ROOT / "configs" / "lm_tiny.yaml"

ADAPTIVE = [
    "optimizer.learning_rate=null",
    "optimizer.weight_decay=null",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
]

# name -> (learning-rate grid, overrides of the config's optimizer section). Same grid size
# for all.
OPTIMIZERS: dict[str, tuple[list[float], list[str]]] = {
    "adamw": ([1e-3, 3e-3, 1e-2], []),
    "muon": ([1e-2, 3e-2, 1e-1], ["optimizer.adam_learning_rate=3.0e-3"]),
    "schedule_free_adamw": ([1e-3, 3e-3, 1e-2], ["optimizer.min_lr_ratio=1.0"]),
    "shampoo": ([1e-3, 3e-3, 1e-2], []),
    "soap": ([3e-3, 1e-2, 3e-2], []),
    "kfac": (
        [1e-3, 3e-3, 1e-2],
        ["optimizer.momentum=0.9", "optimizer.damping=1.0e-3", "optimizer.norm_constraint=1.0e-3"],
    ),
    # K-FAC with its statistics (the extra forward/backward pass with sampled targets) every
    # 5 steps, aligned with its inverse refreshes (invert_every 5): the same optimizer at a
    # cost setting, its own row with the same grid
    "kfac_stats5": (
        [1e-3, 3e-3, 1e-2],
        [
            "optimizer.momentum=0.9",
            "optimizer.damping=1.0e-3",
            "optimizer.norm_constraint=1.0e-3",
            "optimizer.stats_every=5",
        ],
    ),
    # K-FAC's recommended mode: no learning rate (the step size α and momentum μ from its
    # quadratic model, λ by the Levenberg-Marquardt rule); its grid is the initial damping λ₀
    # (GRID_KEY), no schedule and no weight decay (the adaptive step takes neither)
    "kfac_adaptive": ([0.1, 1.0, 10.0], ADAPTIVE),
    "kfac_adaptive_stats5": ([0.1, 1.0, 10.0], [*ADAPTIVE, "optimizer.stats_every=5"]),
    # eps as when the table was recorded (sophia's default is now optax.contrib.sophia's 1e-8)
    "sophia": ([1e-3, 3e-3, 1e-2], ["optimizer.estimator=gnb", "optimizer.eps=1.0e-12"]),
    "adahessian": ([3e-2, 1e-1, 3e-1], []),
}

QUICK_OVERRIDES = [
    "steps=20",
    "log_every=5",
    "checkpoint.every=20",
    "task.context_length=32",
    "task.train_bytes=100000",
    "task.eval_bytes=20000",
    "task.eval_windows=16",
    "model.d_model=32",
    "model.d_mlp=64",
    "optimizer.warmup_steps=4",
]


# rows that are another optimizer at a setting: row name -> the registry name it runs
BASE = {"kfac_stats5": "kfac", "kfac_adaptive": "kfac", "kfac_adaptive_stats5": "kfac"}
# the config key a row's grid sets, where it is not the learning rate
GRID_KEY = {"kfac_adaptive": "optimizer.damping", "kfac_adaptive_stats5": "optimizer.damping"}


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def trial_overrides(name: str, lr: float, extra: list[str], quick: bool) -> list[str]:
    """The config overrides of one trial (evaluation at every metrics row)."""
    out = [f"optimizer.name={BASE.get(name, name)}"]
    out += extra  # before the grid's value: an adaptive row's extra nulls the learning rate
    out.append(f"{GRID_KEY.get(name, 'optimizer.learning_rate')}={lr}")
    out += QUICK_OVERRIDES if quick else []
    out.append("eval_every=5" if quick else "eval_every=25")
    return out


def run_trial(
    name: str, lr: float, extra: list[str], runs_dir: Path, quick: bool, config: Path = CONFIG
) -> dict:
    """Train one trial (or reuse its finished run dir); returns its record and eval curve."""
    config = QUICK_CONFIG if quick else config
    rc, _ = load_config(str(config), trial_overrides(name, lr, extra, quick))
    run_dir = runs_dir / f"{name}-lr{_fmt_lr(lr)}"
    summary_path = run_dir / "summary.json"
    done = False
    if summary_path.is_file() and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        same = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) == rc.data
        status = json.loads(summary_path.read_text()).get("status")
        done = same and status in ("complete", "nonfinite")
    if not done:
        print(f"[lm_shootout] {name} lr={lr:g} -> {run_dir}", file=sys.stderr, flush=True)
        try:
            run_config(rc, run_dir, progress=None, stream=None)
        except NonFiniteError:
            pass  # recorded as diverged (its summary.json says nonfinite)
    summary = json.loads(summary_path.read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    curve = [
        {
            "step": r["step"],
            "time": r["time"],
            "bpb": r["eval_bits_per_byte"],
            "loss": r["eval_loss"],
        }
        for r in rows
        if r.get("eval_bits_per_byte") is not None
    ]
    complete = summary["status"] == "complete"
    return {
        "optimizer": name,
        "learning_rate": lr,  # the grid's value (GRID_KEY's, for the adaptive rows)
        "grid_key": GRID_KEY.get(name, "optimizer.learning_rate"),
        "status": summary["status"],
        "steps": summary["steps"],
        "final_eval_bits_per_byte": summary.get("final_eval_bits_per_byte") if complete else None,
        "final_eval_loss": summary.get("final_eval_loss") if complete else None,
        "best_eval_bits_per_byte": min((c["bpb"] for c in curve), default=None),
        "mean_step_time_s": summary.get("mean_step_time_s"),
        "train_time_s": summary.get("train_time_s"),
        "compile_time_s": summary.get("compile_time_s"),
        "run_dir": str(run_dir),
        "curve": curve,
    }


def best_trial(trials: list[dict]) -> dict | None:
    """The trial with the lowest final validation loss among those that completed."""
    ok = [t for t in trials if t["final_eval_loss"] is not None]
    return min(ok, key=lambda t: t["final_eval_loss"]) if ok else None


def reach(curve: list[dict], target: float) -> tuple[int | None, float | None]:
    """The first evaluation at or below `target` (validation loss): its step and seconds."""
    for c in curve:
        if c["loss"] is not None and c["loss"] <= target:
            return c["step"], c["time"]
    return None, None


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """One record per optimizer, against AdamW's best trial."""
    ref = best_trial(results.get("adamw", []))
    target = ref["final_eval_loss"] if ref else None
    ref_time = ref["mean_step_time_s"] if ref else None
    out = []
    for name, trials in results.items():
        best = best_trial(trials)
        rec: dict[str, Any] = {
            "optimizer": name,
            "learning_rates": [t["learning_rate"] for t in trials],
            "diverged": sum(t["status"] == "nonfinite" for t in trials),
            "best_learning_rate": best["learning_rate"] if best else None,
            # the best rate is an end of a grid of 3 or more: the grid may miss the optimum
            "best_at_grid_edge": bool(
                best
                and len(trials) > 2
                and best["learning_rate"]
                in (trials[0]["learning_rate"], trials[-1]["learning_rate"])
            ),
            "best_eval_bits_per_byte": best["final_eval_bits_per_byte"] if best else None,
            "adamw_target_eval_loss": target,
            "steps_to_adamw_best": None,
            "seconds_to_adamw_best": None,
            "mean_step_time_s": best["mean_step_time_s"] if best else None,
            "step_time_vs_adamw": None,
        }
        if best and target is not None:
            rec["steps_to_adamw_best"], rec["seconds_to_adamw_best"] = reach(best["curve"], target)
        if best and ref_time:
            rec["step_time_vs_adamw"] = best["mean_step_time_s"] / ref_time
        out.append(rec)
    return out


def retime(
    results: dict[str, list[dict]],
    runs_dir: Path,
    config: Path,
    steps: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Step times of each optimizer's best trial (one per round), rerun for `steps` steps
    `repeats` times, the optimizers taken in turn in every round (so a slow drift of the
    machine hits all alike); no evaluation on the way. For step times on an idle machine after a
    shoot-out whose trials shared the cores with other work."""
    times: dict[str, list[float]] = {name: [] for name in results}
    for rep in range(repeats):
        for name, trials in results.items():
            best = best_trial(trials)
            if best is None:
                continue
            over = trial_overrides(name, best["learning_rate"], OPTIMIZERS[name][1], False)
            over += [f"steps={steps}", f"eval_every={steps}", f"checkpoint.every={steps}"]
            rc, _ = load_config(str(config), over)
            run_dir = runs_dir / "retime" / f"{name}-{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"[lm_shootout] retime {name} ({rep + 1}/{repeats})", file=sys.stderr, flush=True)
            run_config(rc, run_dir, progress=None, stream=None)
            summary = json.loads((run_dir / "summary.json").read_text())
            times[name].append(summary["mean_step_time_s"])
    return times


def plot(results: dict[str, list[dict]], target: float | None, path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors  # more rows than the default cycle's 10 colors
    for i, (name, trials) in enumerate(results.items()):
        best = best_trial(trials)
        if best is None or not best["curve"]:
            continue
        what = "λ₀" if GRID_KEY.get(name) == "optimizer.damping" else "lr"
        label = f"{name} ({what} {best['learning_rate']:g})"
        style = {"color": colors[(2 * i) % 20 + (2 * i) // 20], "ls": "--" if i >= 10 else "-"}
        for ax, x in zip(axes, ("step", "time"), strict=True):
            xs, ys = [c[x] for c in best["curve"]], [c["bpb"] for c in best["curve"]]
            ax.plot(xs, ys, label=label, **style)
    for ax, xlabel in zip(axes, ("step", "training seconds"), strict=True):
        if target is not None:
            ax.axhline(target / math.log(2), color="k", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation bits per byte")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset")
    ap.add_argument("--quick", action="store_true", help="tiny end-to-end check")
    ap.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="the LM config every trial starts from (default configs/lm_tiny.yaml)",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results/lm_shootout")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/lm_shootout"))
    ap.add_argument(
        "--retime",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the trials, rerun each optimizer's best trial for STEPS steps "
        "(--retime-repeats times, in turn) and report those step times too",
    )
    ap.add_argument("--retime-repeats", type=int, default=2)
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="take the trials of the optimizers not in --optimizers from --out's trials.jsonl "
        "(same config), so a new row joins an earlier shoot-out's table; --retime then "
        "retimes every row",
    )
    args = ap.parse_args()
    names = [n for n in args.optimizers.split(",") if n]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        ap.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(OPTIMIZERS)}")
    sub = "quick" if args.quick else args.config.stem
    out_dir = args.out / sub
    runs_dir = args.runs_dir / sub
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name in names:
        grid, extra = OPTIMIZERS[name]
        lrs = [grid[len(grid) // 2]] if args.quick else grid
        results[name] = [
            run_trial(name, lr, extra, runs_dir, args.quick, args.config) for lr in lrs
        ]
    if args.reuse and (out_dir / "trials.jsonl").is_file():
        old: dict[str, list[dict]] = {}
        for line in (out_dir / "trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if rec["optimizer"] not in results and rec["config"] == args.config.name:
                old.setdefault(rec["optimizer"], []).append(rec)
        # the table's order: OPTIMIZERS'
        results = {n: results.get(n) or old[n] for n in OPTIMIZERS if n in results or n in old}
    summary = summarize(results)
    if args.retime and not args.quick:
        rounds = retime(results, runs_dir, args.config, args.retime, args.retime_repeats)
        timed = {name: statistics.median(t) for name, t in rounds.items() if t}
        ref = timed.get("adamw")
        for rec in summary:
            rec["retime_rounds_s"] = rounds.get(rec["optimizer"])
            t = timed.get(rec["optimizer"])
            rec["retimed_step_time_s"] = t
            rec["retimed_step_time_vs_adamw"] = t / ref if t and ref else None
            rec["retime_steps"] = args.retime
    env = {
        "config": (QUICK_CONFIG if args.quick else args.config).name,
        "quick": args.quick,
        "python": platform.python_version(),  # the task's text is this interpreter's stdlib
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
    }
    with open(out_dir / "trials.jsonl", "w", encoding="utf-8") as f:
        for trials in results.values():
            for t in trials:
                f.write(json.dumps({**t, **env}) + "\n")
    with open(out_dir / "summary.jsonl", "w", encoding="utf-8") as f:
        for rec in summary:
            f.write(json.dumps({**rec, **env}) + "\n")
    target = summary[0]["adamw_target_eval_loss"] if summary else None
    title = f"byte LM shoot-out ({env['config']}, best learning rate of each)"
    plot(results, target, out_dir / "lm_shootout.png", title)
    for rec in summary:
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
