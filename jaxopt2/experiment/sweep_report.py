"""The outputs of ``jaxopt2 sweep``: per-point aggregates over seeds, ``results.md``,
``results.json``, ``sweep.png`` and the printed summary (see :mod:`.sweep`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from jaxopt2.experiment.rundir import atomic_write
from jaxopt2.experiment.sweep_grid import SweepPlan, fmt_values

__all__ = [
    "SweepResult",
    "aggregate",
    "best_point",
    "format_sweep_summary",
    "grid_data",
    "plot_sweep",
    "plot_sweep_sharpness",
    "results_markdown",
    "write_outputs",
]


@dataclasses.dataclass
class SweepResult:
    """How a sweep ended. `exit_code` 0: complete; 128 + signum: interrupted (a checkpoint
    holds the state; members, points and best are then empty)."""

    exit_code: int
    members: list[dict[str, Any]]
    points: list[dict[str, Any]]
    best: dict[str, Any] | None
    train_time_s: float
    compile_time_s: float
    wall_time_s: float
    traces: int  # how often the training program was traced (1: one program)
    num_params: int = 0  # of one member
    steps: int = 0  # the steps done (the shared step counter)
    resumed_from: int | None = None  # the checkpoint step it resumed from


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    a = np.asarray(xs, np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(plan: SweepPlan, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    points = []
    for p_idx, values in enumerate(plan.points):
        recs = [r for r, m in zip(members, plan.members, strict=True) if m.point == p_idx]
        ok = [r for r in recs if not r["diverged"]]
        agg: dict[str, Any] = {"point": p_idx, **values, "seeds": len(recs)}
        agg["diverged"] = len(recs) - len(ok)
        for key in ("final_loss", "final_loss_mean"):
            mean, std = _mean_std([r[key] for r in ok if r[key] is not None])
            agg[f"{key}_seed_mean"], agg[f"{key}_seed_std"] = mean, std
        eval_keys = sorted({k for r in ok for k in r if k.startswith(("eval_", "final_sh"))})
        for k in eval_keys:
            agg[f"{k}_seed_mean"] = _mean_std([r[k] for r in ok if r.get(k) is not None])[0]
        points.append(agg)
    return points


def best_point(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    ranked = [p for p in points if p["final_loss_mean_seed_mean"] is not None]
    if not ranked:
        return None
    return min(ranked, key=lambda p: (p["diverged"] > 0, p["final_loss_mean_seed_mean"]))


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    cols = [(h, k) for h, k in cols if any(r.get(k) is not None for r in rows)]
    lines = [
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for _, k in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _title(plan: SweepPlan) -> str:
    b = plan.base
    return f"{b.task_spec.name} / {b.model_name} / {b.optimizer.name}"


def results_markdown(plan: SweepPlan, result: SweepResult) -> str:
    keys = [(k.rpartition(".")[2], k) for k in plan.grid.axes]
    evals = sorted({k for r in result.members for k in r if k.startswith("eval_")})
    point_cols = [
        *keys,
        ("seeds", "seeds"),
        ("diverged", "diverged"),
        ("final loss mean", "final_loss_mean_seed_mean"),
        ("final loss std", "final_loss_mean_seed_std"),
        ("last-step loss mean", "final_loss_seed_mean"),
        ("last-step loss std", "final_loss_seed_std"),
        *[(f"eval {k[5:]} mean", f"{k}_seed_mean") for k in evals],
        ("final sharpness mean", "final_sharpness_seed_mean"),
    ]
    member_cols = [
        ("member", "member"),
        *keys,
        ("seed", "seed"),
        ("status", "status"),
        ("diverged at step", "diverged_step"),
        ("final loss", "final_loss_mean"),
        ("last-step loss", "final_loss"),
        ("best loss", "best_loss"),
        *[(f"eval {k[5:]}", k) for k in evals],
        ("final sharpness", "final_sharpness"),
        ("final trace", "final_trace"),
        ("non-finite steps", "nonfinite_steps"),
    ]
    b = plan.base
    head = (
        f"# sweep: {_title(plan)}\n\n"
        f"{len(plan.members)} members ({_shape(plan)}), {b.run.steps} steps, batch "
        f"{b.run.batch_size}, schedule {b.optimizer.schedule}. Losses are train losses: "
        f"*final loss* is the mean over the last {b.run.log_every} steps, *last-step loss* the "
        "loss of the last step's batch (what `jaxopt2 run` reports as final_loss).\n\n"
    )
    best = result.best
    if best is not None:
        head += (
            f"Best point: {fmt_values({k: best[k] for k in plan.grid.axes})} — final loss "
            f"{_fmt(best['final_loss_mean_seed_mean'])} "
            f"± {_fmt(best['final_loss_mean_seed_std'])}.\n\n"
        )
    return (
        head
        + "## Points (mean/std over seeds; diverged seeds left out)\n\n"
        + _md_table(result.points, point_cols)
        + "\n## Members\n\n"
        + _md_table(result.members, member_cols)
    )


def _shape(plan: SweepPlan) -> str:
    parts = [f"{len(v)} {k.rpartition('.')[2]}" for k, v in plan.grid.axes.items()]
    parts.append(f"{len(plan.seeds)} seed{'s' if len(plan.seeds) != 1 else ''}")
    return " x ".join(parts)


def write_outputs(
    plan: SweepPlan, result: SweepResult, rows: list[dict[str, Any]], run_dir: Path, plots: bool
) -> None:
    """``results.json``, ``results.md`` and (if `plots`) ``sweep.png`` in `run_dir`."""
    data = {
        "task": plan.base.task_spec.name,
        "model": plan.base.model_name,
        "optimizer": plan.base.optimizer.name,
        "steps": plan.base.run.steps,
        "grid": grid_data(plan),
        "num_members": len(plan.members),
        "num_params": result.num_params,
        "compile_time_s": result.compile_time_s,
        "train_time_s": result.train_time_s,
        "wall_time_s": result.wall_time_s,
        "resumed_from_step": result.resumed_from,
        "best": result.best,
        "points": result.points,
        "members": result.members,
    }
    atomic_write(run_dir / "results.json", json.dumps(data, indent=2) + "\n")
    atomic_write(run_dir / "results.md", results_markdown(plan, result))
    if plots:
        plot_sweep(plan, result, rows, run_dir / "sweep.png")
        if any(r.get("sharpness") is not None for r in rows):
            plot_sweep_sharpness(plan, rows, run_dir / "sharpness.png")


def plot_sweep_sharpness(plan: SweepPlan, rows: list[dict[str, Any]], path: Path) -> None:
    """Every member's sharpness (top Hessian eigenvalue) against the step, with the
    stability line 2/lr of each learning rate (dashed, same colour) under a constant schedule:
    the edge-of-stability picture across a learning-rate sweep."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    base = plan.base
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("viridis")
    n_pts = max(1, len(plan.points) - 1)
    lines_drawn: set[float] = set()
    for j, mem in enumerate(plan.members):
        pts = [(r["step"], r["sharpness"][j]) for r in rows if r.get("sharpness") is not None]
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        color = cmap(mem.point / n_pts) if len(plan.points) > 1 else "C0"
        first_seed = mem.seed == plan.seeds[0]
        label = fmt_values(mem.values) if first_seed and len(plan.points) <= 12 else None
        ax.plot(*zip(*pts, strict=True), marker="o", ms=2, lw=1, color=color, label=label)
        # None: the optimizer's own default learning rate (no stability line is drawn).
        lr_value = mem.values.get("optimizer.learning_rate", base.optimizer.learning_rate)
        lr = None if lr_value is None else float(lr_value)
        if (
            base.optimizer.schedule == "constant"
            and lr is not None
            and lr > 0
            and lr not in lines_drawn
        ):
            lines_drawn.add(lr)
            ax.axhline(2.0 / lr, color=color, ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness (top Hessian eigenvalue)")
    note = "; dashed: 2 / learning rate" if lines_drawn else ""
    ax.set_title(f"{_title(plan)}{note}", fontsize=9)
    if len(plan.points) <= 12 and plan.points[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(
    plan: SweepPlan, result: SweepResult, rows: list[dict[str, Any]], path: Path
) -> None:
    """Final loss vs the learning rate (or the first axis), one line per value of the other
    axes, error bars over seeds; and every member's loss curve."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    axes_keys = list(plan.grid.axes)
    lr_key = "optimizer.learning_rate"
    x_key = lr_key if lr_key in axes_keys else (axes_keys[0] if axes_keys else None)
    others = [k for k in axes_keys if k != x_key]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.8))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for p in result.points:
        groups.setdefault(tuple(p[k] for k in others), []).append(p)
    cmap = plt.get_cmap("viridis")
    for g_idx, (gkey, pts) in enumerate(groups.items()):
        label = fmt_values(dict(zip(others, gkey, strict=True))) if others else "mean ± std"
        color = f"C{g_idx}" if len(groups) <= 10 else cmap(g_idx / (len(groups) - 1))
        ok = [p for p in pts if p["final_loss_mean_seed_mean"] is not None]
        if x_key is None:
            xs = [float(s) for s in plan.seeds]
            ys = [r["final_loss_mean"] for r in result.members]
            ax0.plot(xs, ys, "o", color=color, label="per seed")
            continue
        xs = [p[x_key] for p in ok]
        ys = [p["final_loss_mean_seed_mean"] for p in ok]
        es = [p["final_loss_mean_seed_std"] or 0.0 for p in ok]
        ax0.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=color, label=label)
        bad = [p[x_key] for p in pts if p["diverged"]]
        if bad:
            ax0.plot(bad, [max(ys) if ys else 1.0] * len(bad), "x", color=color, ms=8)
    xs_all = [p[x_key] for p in result.points] if x_key else [1.0]
    if x_key and min(xs_all) > 0:
        ax0.set_xscale("log")
    finals = [p["final_loss_mean_seed_mean"] for p in result.points]
    finals = [v for v in finals if v is not None]
    if finals and min(finals) > 0:
        ax0.set_yscale("log")
    ax0.set_xlabel(x_key or "seed")
    ax0.set_ylabel(f"final train loss (mean of last {plan.base.run.log_every} steps)")
    diverged = any(p["diverged"] for p in result.points)
    ax0.set_title(_title(plan) + ("  (x: diverged)" if diverged else ""))
    ax0.legend(fontsize=8)
    n_pts = max(1, len(plan.points) - 1)
    all_pos = True
    for j, mem in enumerate(plan.members):
        xs, ys = [], []
        for r in rows:
            v = r["loss_mean"][j]
            if v is not None:
                xs.append(r["step"])
                ys.append(v)
        all_pos = all_pos and (not ys or min(ys) > 0)
        first_seed = mem.seed == plan.seeds[0]
        ax1.plot(
            xs,
            ys,
            color=cmap(mem.point / n_pts) if len(plan.points) > 1 else "C0",
            lw=1,
            alpha=0.8,
            label=fmt_values(mem.values) if first_seed and len(plan.points) <= 12 else None,
        )
    if all_pos:
        ax1.set_yscale("log")
    first = [v for v in rows[0]["loss_mean"] if v is not None] if rows else []
    if first and all_pos:  # keep blow-ups from flattening the other curves
        ax1.set_ylim(top=min(ax1.get_ylim()[1], 10 * max(first)))
    ax1.set_xlabel("step")
    ax1.set_ylabel("train loss (window mean)")
    ax1.set_title(f"loss curves ({len(plan.members)} members)")
    if len(plan.points) <= 12 and plan.points[0]:
        ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def grid_data(plan: SweepPlan) -> dict[str, Any]:
    """What ``grid.yaml`` holds: the axes and the seeds."""
    return {"axes": {k: list(v) for k, v in plan.grid.axes.items()}, "seeds": plan.seeds}


def format_sweep_summary(plan: SweepPlan, result: SweepResult, run_dir: Path | None) -> str:
    b = plan.base
    lines = [
        f"jaxopt2 sweep: {_title(plan)} — {len(plan.members)} members ({_shape(plan)}), "
        f"{b.run.steps} steps, one program"
    ]
    best = result.best
    if best is None:
        lines.append("  best        none: every member diverged")
    else:
        vals = fmt_values({k: best[k] for k in plan.grid.axes})
        ev = [
            f"{k[5 : -len('_seed_mean')]} {_fmt(v)}"
            for k, v in best.items()
            if k.startswith("eval_") and k.endswith("_seed_mean")
        ]
        lines.append(
            f"  best        {vals}: final loss {_fmt(best['final_loss_mean_seed_mean'])} ± "
            f"{_fmt(best['final_loss_mean_seed_std'])} over {best['seeds'] - best['diverged']} "
            f"seed(s)" + (f"; eval {', '.join(ev)}" if ev else "")
        )
    div = [r for r in result.members if r["diverged"]]
    if div:
        where = ", ".join(
            f"{fmt_values({k: r[k] for k in plan.grid.axes}, r['seed'])} @ {r['diverged_step']}"
            for r in div[:3]
        )
        more = f" (+{len(div) - 3} more)" if len(div) > 3 else ""
        lines.append(f"  diverged    {len(div)}/{len(plan.members)}: {where}{more}")
    if result.resumed_from is not None:
        lines.append(f"  resumed     from step {result.resumed_from} (checkpoint)")
    per = result.train_time_s / max(1, b.run.steps)
    lines.append(
        f"  time        {result.train_time_s:.2f} s training + {result.compile_time_s:.2f} s "
        f"compile; {per * 1e3:.2f} ms per step for all members"
    )
    lines.append("")
    lines.append(_points_text(plan, result))
    if run_dir is not None:
        lines.append(
            f"  run dir     {run_dir}  (results.md, results.json, metrics.jsonl, sweep.png"
            + (", sharpness.png)" if b.run.diagnostics.every else ")")
        )
    return "\n".join(lines)


def _points_text(plan: SweepPlan, result: SweepResult) -> str:
    keys = list(plan.grid.axes)
    base = plan.base
    sharp = any(p.get("final_sharpness_seed_mean") is not None for p in result.points)
    two_over_lr = sharp and base.optimizer.schedule == "constant"
    head = [k.rpartition(".")[2] for k in keys] + ["final loss", "± std", "diverged"]
    head += ["sharpness"] * sharp + ["2/lr"] * two_over_lr
    rows = []
    for p in result.points:
        mark = " *" if result.best is not None and p["point"] == result.best["point"] else ""
        row = (
            [f"{p[k]:g}" for k in keys]
            + [_fmt(p["final_loss_mean_seed_mean"]) + mark, _fmt(p["final_loss_mean_seed_std"])]
            + [f"{p['diverged']}/{p['seeds']}"]
        )
        if sharp:
            row.append(_fmt(p.get("final_sharpness_seed_mean")))
        if two_over_lr:
            lr_value = p.get("optimizer.learning_rate", base.optimizer.learning_rate)
            lr = None if lr_value is None else float(lr_value)  # None: the optimizer's default
            row.append(_fmt(2.0 / lr) if lr is not None and lr > 0 else "—")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  " + "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))
    return "\n".join([fmt(head), *(fmt(r) for r in rows)])
