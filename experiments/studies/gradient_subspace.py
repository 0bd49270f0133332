"""Study: the gradient lives in the top-k Hessian eigenspace, k = the number of classes.

Claim (Gur-Ari, Roberts & Dyer, "Gradient Descent Happens in a Tiny Subspace", 2018): after a
short warm-up, most of the gradient's squared norm lies in the span of the Hessian's top-k
eigenvectors with k equal to the number of classes, and that subspace is not much improved by
taking more eigenvectors (the share at k = 10 of 10 classes is close to the share at 20,
and clearly above the share at 5).

What runs: ``task_digits_classifier`` (10 classes, MLP 64-128-128-10 tanh, batch 128) trained
with SGD (lr 0.1) and with Adam (lr 1e-3) through the runner, with its curvature diagnostics
every ``--every`` steps: the top 20 Hessian eigenpairs by Lanczos (120 steps: fewer leave the
lower ones of the 20 unconverged) on the whole training set and
``grad_share_by_k`` (the gradient's share in the top 1..20 eigenvectors; the full-batch
gradient). The share at k = 5, 10 and 20 is read from that one list.

Outputs in ``--out`` (default ``experiments/results/studies/gradient_subspace``):
``gradient_subspace.png`` (the share at k = 5, 10, 20 against step, one panel per optimizer),
``gradient_subspace.json`` (per optimizer: the median share over the steps after the warm-up
for k = 1..20 and the median top-20 eigenvalues; reproduced if the k = 10 share is at least
0.5, at least 0.05 above the k = 5 share and at most 0.05 below the k = 20 share: the share
is cumulative in k, so only those differences test "k = the number of classes"), and the run
directories under ``runs/``.

    python experiments/studies/gradient_subspace.py            # the study (a few minutes)
    python experiments/studies/gradient_subspace.py --smoke    # seconds: tiny model, few steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import numpy as np  # noqa: E402

from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.rundir import read_metrics  # noqa: E402
from jaxopt2.experiment.trainer import run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "experiments" / "results" / "studies" / "gradient_subspace"
CONFIG = "task_digits_classifier"
OPTIMIZERS = {"sgd": ["optimizer.name=sgd", "optimizer.learning_rate=0.1"],
              "adam": ["optimizer.name=adam", "optimizer.learning_rate=1e-3"]}  # fmt: skip
KS = (5, 10, 20)


def run_one(name: str, steps: int, every: int, warmup: int, out: Path, smoke: bool) -> dict:
    overrides = [
        *OPTIMIZERS[name],
        f"steps={steps}",
        f"log_every={every}",
        "eval_every=0",
        f"checkpoint.every={steps}",
        "optimizer.schedule=constant",
        f"diagnostics.every={every}",
        f"diagnostics.top_k={max(KS)}",
        "diagnostics.num_iters=120",
        "diagnostics.grad_share=true",
        "diagnostics.batch=full",
    ]
    if smoke:
        overrides.append("model.hidden=[8]")
    rc, _ = load_config(CONFIG, overrides)
    run_dir = out / "runs" / name
    result = run_config(rc, run_dir, progress=False, stream=None, overwrite=True)
    if result.exit_code != 0:
        raise SystemExit(f"the {name} run ended with exit code {result.exit_code}")
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "grad_share_by_k" in r]
    steps_r = [r["step"] for r in rows]
    shares = {k: [r["grad_share_by_k"][k - 1] for r in rows] for k in KS}
    late = np.array([r["grad_share_by_k"] for r in rows if r["step"] > warmup])
    by_k = np.median(late, axis=0)  # median share in the top 1..20 after the warm-up
    medians = {k: float(by_k[k - 1]) for k in KS}
    # k = 10 (the classes) holds most of the gradient, 5 eigenvectors are clearly not enough
    # and 20 add little: the share is cumulative, so only these differences can tell.
    reproduced = (
        medians[10] >= 0.5
        and medians[10] - medians[5] >= 0.05
        and medians[20] - medians[10] <= 0.05
    )
    return {
        "overrides": overrides,
        "warmup_steps": warmup,
        "median_share_after_warmup": {str(k): v for k, v in medians.items()},
        "median_share_by_k": by_k.tolist(),
        "median_top_eigenvalues": np.median(
            np.array([r["top_eigenvalues"] for r in rows if r["step"] > warmup]), axis=0
        ).tolist(),
        "final_loss": result.summary["final_loss"],
        "reproduced": bool(reproduced),
        "curve": {"step": steps_r, **{f"k{k}": shares[k] for k in KS}},
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        curve = res["curve"]
        for k in KS:
            ax.plot(curve["step"], curve[f"k{k}"], label=f"top {k}")
        ax.axvline(res["warmup_steps"], color="gray", ls=":", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{name}: gradient share in the top-k Hessian eigenspace")
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=100, help="steps left out of the medians")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 20 steps")
    args = ap.parse_args(argv)
    steps, every, warmup = (20, 10, 0) if args.smoke else (args.steps, args.every, args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        name: run_one(name, steps, every, warmup, args.out, args.smoke) for name in OPTIMIZERS
    }
    summary = {
        "study": "gradient in a tiny subspace (Gur-Ari, Roberts & Dyer 2018)",
        "steps": steps,
        "reproduced": {name: res["reproduced"] for name, res in results.items()},
        "optimizers": results,
    }
    (args.out / "gradient_subspace.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "gradient_subspace.png")
    for name, res in results.items():
        print(json.dumps({"optimizer": name, **{k: v for k, v in res.items() if k != "curve"}}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
