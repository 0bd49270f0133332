"""PNG plots of runs and comparisons (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["plot_compare", "plot_run", "plot_sharpness", "pyplot"]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if v is not None and isinstance(v, int | float) and math.isfinite(v):
            xs.append(r[x])
            ys.append(v)
    return xs, ys


def _positive(ys: list[float]) -> bool:
    return bool(ys) and min(ys) > 0


def plot_run(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """loss.png-style figure: losses, accuracy (if any), norms and learning rate vs step."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key, label in (("loss_mean", "train loss (window mean)"), ("eval_loss", "eval loss")):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if key == "eval_loss" else None, ms=3)
            if _positive(ys):
                ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title or "loss")
    ax = axes[1]
    for key in ("grad_norm", "update_norm", "param_norm"):
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    ax.set_title("norms")
    ax = axes[2]
    xs, ys = _series(rows, "eval_accuracy")
    if xs:
        ax.plot(xs, ys, marker="o", ms=3, label="eval accuracy")
        ax.set_ylabel("accuracy")
        ax.set_title("eval accuracy")
    else:
        xs, ys = _series(rows, "lr")
        ax.plot(xs, ys, label="learning rate")
        ax.set_title("learning rate")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sharpness(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """sharpness.png: the top Hessian eigenvalue vs step with the stability line 2/lr(t).

    Full-batch gradient descent with step size lr is stable on a quadratic only while the
    sharpness stays below 2/lr; in practice it rises to that line and hovers there (the edge
    of stability, Cohen et al. 2021). The line uses each row's learning rate, so it follows a
    schedule. Panels for the trace and the gradient's top-k share are added when logged.
    """
    plt = pyplot()
    extra = [k for k in ("trace", "grad_topk_share") if _series(rows, k)[0]]
    fig, axes = plt.subplots(1, 1 + len(extra), figsize=(6.5 * (1 + len(extra)), 4.2))
    axes = list(axes) if extra else [axes]
    ax = axes[0]
    xs, ys = _series(rows, "sharpness")
    ax.plot(xs, ys, marker="o", ms=2.5, lw=1, label="sharpness (top Hessian eigenvalue)")
    lr_rows = [r for r in rows if r.get("sharpness") is not None and r.get("lr")]
    if lr_rows:
        ax.plot(
            [r["step"] for r in lr_rows],
            [2.0 / r["lr"] for r in lr_rows],
            color="gray",
            ls="--",
            lw=1.2,
            label="2 / learning rate",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("sharpness")
    ax.set_title(title or "sharpness")
    ax.legend()
    for ax, key in zip(axes[1:], extra, strict=True):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="o", ms=2.5, lw=1, label=key)
        if key == "trace":
            _, errs = _series(rows, "trace_stderr")
            if len(errs) == len(ys):
                lo = [y - 2 * e for y, e in zip(ys, errs, strict=True)]
                hi = [y + 2 * e for y, e in zip(ys, errs, strict=True)]
                ax.fill_between(xs, lo, hi, alpha=0.25, label="± 2 stderr")
            ax.set_title("Hessian trace (Hutchinson)")
        else:
            ax.set_ylim(0, 1.02)
            ax.set_title("gradient share in the top-k eigenspace")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_compare(
    runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "", target: float | None = None
) -> None:
    """Overlay of several runs: train loss vs step and vs training wall time."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    all_pos = True
    for name, rows in runs.items():
        for ax, x in zip(axes, ("step", "time"), strict=True):
            xs, ys = _series(rows, "loss_mean", x)
            all_pos = all_pos and _positive(ys)
            ax.plot(xs, ys, label=name)
    for ax, xlabel in zip(axes, ("step", "training time [s]"), strict=True):
        if target is not None:
            ax.axhline(target, color="gray", ls="--", lw=1, label="target")
        if all_pos:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("train loss (window mean)")
        ax.legend()
    axes[0].set_title(title or "loss vs step")
    axes[1].set_title("loss vs wall time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
