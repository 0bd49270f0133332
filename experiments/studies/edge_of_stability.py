"""Study: full-batch gradient descent trains at the edge of stability.

Claim (Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability", ICLR 2021): with step size ``lr``, full-batch gradient
descent first sharpens (the top Hessian eigenvalue, the *sharpness*, rises) until the
sharpness reaches the stability threshold ``2 / lr``, then hovers at it while the loss keeps
falling (non-monotonically), with a squared loss and with cross-entropy alike.

What runs: for each loss, one ``jaxopt2 sweep`` over the learning rates (one compiled program;
every member a full-batch GD run, momentum 0) with the runner's curvature diagnostics every
``--every`` steps (the sharpness by Lanczos on the full training set):

* squared loss: ``task_digits_regression`` (200 digits, one-hot targets, MLP 64-64-64-10
  tanh, weights N(0, 1/fan_in));
* cross-entropy: ``task_digits_classifier`` (all 1437 training digits, MLP 64-64-64-10 tanh).

Outputs in ``--out`` (default ``experiments/results/studies/edge_of_stability``):
``edge_of_stability.png`` (sharpness against step, the ``2/lr`` lines dashed; the loss below),
``edge_of_stability.json`` (per loss and learning rate: the sharpness at the first
diagnostics step, its maximum, the median over the last half of training relative to
``2/lr``, the share of those late values within 15% of it, the final loss; and whether the
claim reproduced: the sharpness reached ``0.9 · 2/lr`` and its late median lies within 10% of
``2/lr``; per loss, whether that held at every learning rate of its grid), and the sweeps'
run directories under ``sweeps/``.

The grids: for the squared loss the initial sharpness is ~39, so learning rates 0.06–0.1
(``2/lr`` = 33–20) are the ones whose threshold lies in the range that training visits (at
0.02 and 0.04, thresholds 100 and 50, the sharpness stays at ~40 for 1000 steps and GD is
simply stable). With cross-entropy, progressive sharpening here peaks near 5 whatever the
learning rate, so 0.1 (``2/lr`` = 20, never reached) is the stable reference and 0.5 and 1.0
put the threshold below that peak.

    python experiments/studies/edge_of_stability.py            # the study (a few minutes)
    python experiments/studies/edge_of_stability.py --smoke    # seconds: tiny model, few steps
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import numpy as np  # noqa: E402

from jaxopt2.experiment.sweep import sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "experiments" / "results" / "studies" / "edge_of_stability"

# loss -> (config, overrides, learning rates)
CASES = {
    "squared": (
        "task_digits_regression",
        ["model.hidden=[64,64]", "batch_size=200"],
        [0.06, 0.08, 0.1],
    ),
    "cross_entropy": (
        "task_digits_classifier",
        ["model.hidden=[64,64]", "batch_size=1437", "optimizer.name=sgd"],
        [0.1, 0.5, 1.0],
    ),
}
SMOKE = {"model.hidden=[64,64]": "model.hidden=[4]"}


def run_case(loss: str, steps: int, every: int, out: Path, smoke: bool = False) -> dict:
    """One loss's sweep over learning rates; its per-lr sharpness table."""
    config, overrides, lrs = CASES[loss]
    if smoke:
        overrides = [SMOKE.get(o, o) for o in overrides]
        lrs = lrs[:2]
    args = [
        *overrides,
        f"steps={steps}",
        f"log_every={every}",
        "eval_every=0",
        f"checkpoint.every={steps}",
        f"diagnostics.every={every}",
        "diagnostics.top_k=1",
        "diagnostics.num_iters=20",
        "diagnostics.batch=full",
        "optimizer.schedule=constant",
        "optimizer.learning_rate=" + ",".join(map(repr, lrs)),
    ]
    run_dir = out / "sweeps" / loss
    res = sweep(config, args, run_dir, overwrite=True, progress=False, stream=None)
    if res.exit_code != 0:
        raise SystemExit(f"the {loss} sweep ended with exit code {res.exit_code}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "sharpness" in r]
    table = []
    for m in res.members:
        j, lr = m["member"], m["optimizer.learning_rate"]
        steps_j = np.array([r["step"] for r in rows])
        sharp = np.array([np.nan if r["sharpness"][j] is None else r["sharpness"][j] for r in rows])
        loss_j = np.array([np.nan if r["loss"][j] is None else r["loss"][j] for r in rows])
        threshold = 2.0 / lr
        late = sharp[steps_j > steps / 2]
        late = late[np.isfinite(late)]
        late_median = float(np.median(late)) if late.size else float("nan")
        reached = bool(np.nanmax(sharp) >= 0.9 * threshold)
        hovers = bool(late.size and abs(late_median / threshold - 1) <= 0.10)
        table.append(
            {
                "learning_rate": lr,
                "threshold_2_over_lr": threshold,
                "first_sharpness": float(sharp[0]),
                "max_sharpness": float(np.nanmax(sharp)),
                "late_median_sharpness": late_median,
                "late_median_over_threshold": late_median / threshold,
                "late_within_15pct": float(np.mean(np.abs(late / threshold - 1) <= 0.15))
                if late.size
                else float("nan"),
                "final_loss": float(loss_j[-1]),
                "diverged_at": m.get("diverged_at"),
                "reproduced": reached and hovers,
                "curve": {
                    "step": steps_j.tolist(),
                    "sharpness": sharp.tolist(),
                    "loss": loss_j.tolist(),
                },
            }
        )
    return {"config": config, "overrides": args, "members": table}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 6.5), squeeze=False)
    for col, (loss, case) in enumerate(results.items()):
        for k, m in enumerate(case["members"]):
            c = f"C{k}"
            curve = m["curve"]
            axes[0, col].plot(curve["step"], curve["sharpness"], color=c,
                              label=f"lr {m['learning_rate']:g}")  # fmt: skip
            axes[0, col].axhline(m["threshold_2_over_lr"], color=c, ls="--", lw=0.8)
            axes[1, col].semilogy(curve["step"], curve["loss"], color=c)
        axes[0, col].set_title(f"{loss} loss: sharpness (dashed: 2/lr)")
        axes[0, col].legend()
        axes[1, col].set_xlabel("step")
        axes[1, col].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--every", type=int, default=10, help="diagnostics every this many steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 20 steps, 2 lrs")
    ap.add_argument("--losses", default=",".join(CASES), help="comma-separated subset")
    args = ap.parse_args(argv)
    steps, every = (20, 10) if args.smoke else (args.steps, args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        loss: run_case(loss, steps, every, args.out, args.smoke) for loss in args.losses.split(",")
    }
    summary = {
        "study": "edge of stability (Cohen et al., ICLR 2021)",
        "steps": steps,
        # per loss: every learning rate of its grid reached 2/lr and hovered there
        "reproduced": {
            loss: all(m["reproduced"] for m in case["members"]) for loss, case in results.items()
        },
        "cases": results,
    }
    (args.out / "edge_of_stability.json").write_text(json.dumps(summary, indent=1))
    plot(results, args.out / "edge_of_stability.png")
    for loss, case in results.items():
        for m in case["members"]:
            print(json.dumps({"loss": loss, **{k: v for k, v in m.items() if k != "curve"}}))
    print(json.dumps({"reproduced": summary["reproduced"]}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
