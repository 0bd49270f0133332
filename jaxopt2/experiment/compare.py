"""``jaxopt2 compare``: one config under several optimizers, overlaid.

Every optimizer trains the same task from the same initialization on the same batches (all
derive from the config's seed) in its own sub-run directory ``<run dir>/<name>`` (so a rerun
resumes or reuses finished sub-runs). Each uses its registry defaults plus the config's
learning rate, schedule, weight decay and clipping; the optimizer arguments written in the
config apply only to the optimizer the config names. ``name:lr`` sets one optimizer's rate.
An optimizer whose step size is adaptive by default (its factory's ``learning_rate`` defaults
to None, as K-FAC's: :func:`~jaxopt2.experiment.optim.uses_own_step_size`) keeps that default
unless ``name:lr`` or the config itself names it.

Outputs in the run directory: ``compare.png`` (train loss vs step and vs training wall time),
``compare.md`` and ``compare.json`` (final loss, steps and seconds to reach the target loss,
mean step time). The target is ``--target-loss``, else the config's ``target_loss``, else the
worst final loss among the optimizers (so every finished run reaches it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Literal, TextIO

from jaxopt2.experiment.config import ResolvedConfig, from_dict
from jaxopt2.experiment.errors import ConfigError, NonFiniteError
from jaxopt2.experiment.optim import uses_own_step_size
from jaxopt2.experiment.plots import plot_compare
from jaxopt2.experiment.rundir import read_metrics
from jaxopt2.experiment.trainer import run_config

__all__ = ["CompareResult", "compare", "parse_optimizers"]


def parse_optimizers(spec: str) -> list[tuple[str, float | None]]:
    """``"adam,sgd:0.1"`` -> ``[("adam", None), ("sgd", 0.1)]``."""
    out: list[tuple[str, float | None]] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, lr = item.partition(":")
        if sep:
            try:
                out.append((name.strip(), float(lr)))
            except ValueError:
                raise ConfigError(
                    f"bad --optimizers entry {item!r}: expected name or name:learning_rate"
                ) from None
        else:
            out.append((name, None))
    if not out:
        raise ConfigError("--optimizers is empty; give comma-separated optimizer names")
    return out


@dataclasses.dataclass
class CompareResult:
    exit_code: int
    target_loss: float | None
    table: list[dict[str, Any]]


def _sub_config(rc: ResolvedConfig, name: str, lr: float | None) -> ResolvedConfig:
    data = copy.deepcopy(rc.data)
    base = data["optimizer"]
    runner = (
        "learning_rate",
        "schedule",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "clip_grad_norm",
    )
    opt = {"name": name, **{k: base[k] for k in runner}}
    if name != base["name"] and uses_own_step_size(name):
        # keep its adaptive step (a schedule would have nothing to scale)
        opt.update(learning_rate=None, schedule="constant", warmup_steps=0, min_lr_ratio=0.0)
    if name == base["name"]:
        opt.update({k: v for k, v in base.items() if k not in opt})
    if lr is not None:
        opt["learning_rate"] = lr
    data["optimizer"] = opt
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"optimizer {name}: {e}") from None


def _reach(rows: list[dict[str, Any]], target: float) -> tuple[int | None, float | None]:
    for r in rows:
        v = r.get("loss_mean")
        if v is not None and v <= target:
            return r["step"], r["time"]
    return None, None


def _md_table(table: list[dict[str, Any]], target: float | None) -> str:
    cols = [
        ("optimizer", "optimizer"),
        ("lr", "learning_rate"),
        ("status", "status"),
        ("final loss", "final_loss"),
        ("final eval loss", "final_eval_loss"),
        ("eval acc", "final_eval_accuracy"),
        ("steps to target", "steps_to_target"),
        ("s to target", "seconds_to_target"),
        ("ms/step", "mean_step_time_ms"),
    ]
    cols = [(h, k) for h, k in cols if any(row.get(k) is not None for row in table)]

    def fmt(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = [
        f"target loss: {fmt(target)}",
        "",
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += ["| " + " | ".join(fmt(row.get(k)) for _, k in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"


def compare(
    rc: ResolvedConfig,
    optimizers: list[tuple[str, float | None]],
    run_dir: Path,
    *,
    target_loss: float | None = None,
    overwrite: bool = False,
    handle_signals: bool = False,
    progress: bool | None = None,
    stream: TextIO | Literal["stdout"] | None = "stdout",
) -> CompareResult:
    """Train `rc` under each optimizer and write the comparison into `run_dir`."""
    if stream == "stdout":
        stream = sys.stdout

    subs = []
    seen: set[str] = set()
    for name, lr in optimizers:
        sub = _sub_config(rc, name, lr)  # validate them all before training any
        label = name if lr is None else f"{name}:{lr:g}"
        dirname = label.replace(":", "_lr")
        if dirname in seen:
            raise ConfigError(f"--optimizers lists {label} twice")
        seen.add(dirname)
        subs.append((label, dirname, sub))
    run_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[dict[str, Any]]] = {}
    exit_code = 0
    for i, (label, dirname, sub) in enumerate(subs):
        sub_dir = run_dir / dirname
        try:
            res = run_config(
                sub,
                sub_dir,
                overwrite=overwrite,
                handle_signals=handle_signals,
                progress=progress,
                stream=None,
                label=label,
            )
            summary, status = res.summary, res.status
        except NonFiniteError:
            summary = json.loads((sub_dir / "summary.json").read_text())
            status = "nonfinite"
        results[label] = {**summary, "status": status}
        curves[label] = read_metrics(sub_dir / "metrics.jsonl")
        if stream is not None:
            fl = summary.get("final_loss_mean")
            print(
                f"[{i + 1}/{len(subs)}] {label:<16} {status:<11} final loss "
                f"{'n/a' if fl is None else format(fl, '.4g')}, "
                f"{summary.get('train_time_s', 0.0):.2f} s",
                file=stream,
            )
        if status == "interrupted":
            exit_code = res.exit_code
            break

    target = target_loss if target_loss is not None else rc.run.target_loss
    finals = [
        r["final_loss_mean"]
        for r in results.values()
        if r["status"] == "complete"
        and r.get("final_loss_mean") is not None
        and math.isfinite(r["final_loss_mean"])
    ]
    if target is None and finals:
        target = max(finals)
    table = []
    for label, s in results.items():
        steps, secs = _reach(curves[label], target) if target is not None else (None, None)
        mst = s.get("mean_step_time_s")
        table.append(
            {
                "optimizer": label,
                "learning_rate": s.get("learning_rate"),
                "status": s["status"],
                "final_loss": s.get("final_loss_mean"),
                "final_eval_loss": s.get("final_eval_loss"),
                "final_eval_accuracy": s.get("final_eval_accuracy"),
                "steps_to_target": steps,
                "seconds_to_target": secs,
                "mean_step_time_ms": None if mst is None else mst * 1e3,
                "steps": s.get("steps"),
                "train_time_s": s.get("train_time_s"),
            }
        )
    title = f"{rc.task_spec.name} / {rc.model_name}"
    (run_dir / "compare.json").write_text(
        json.dumps(
            {
                "task": rc.task_spec.name,
                "model": rc.model_name,
                "target_loss": target,
                "results": table,
            },
            indent=2,
        )
        + "\n"
    )
    md = f"# {title}\n\n" + _md_table(table, target)
    (run_dir / "compare.md").write_text(md)
    plot_compare(curves, run_dir / "compare.png", title, target)
    if stream is not None:
        print("\n" + md + f"\nwrote {run_dir}/compare.png, compare.md, compare.json", file=stream)
    return CompareResult(exit_code, target, table)
