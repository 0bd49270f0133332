"""Study: the Hessian spectrum at the end of training is a bulk near zero plus a few outliers,
as many outliers as classes, and a bulk set by the model rather than the data.

Claim (Sagun, Evci, Güney, Dauphin & Bottou, "Empirical Analysis of the Hessian of
Over-Parametrized Neural Networks", 2017; Papyan, "Measurements of Three-Level Hierarchical
Structure in the Outliers in the Spectrum of Deepnet Hessians", ICML 2019): after training,
the eigenvalues of the training-loss Hessian form a bulk concentrated around zero and a small
number of outliers well above it; the number of outliers is about the number of classes, and
the bulk (its width) depends on the model's size, not on the data.

What runs: ``task_digits_classifier`` (MLP 64-w-w-k tanh, softmax cross-entropy) trained with
SGD (lr 0.1, batch 128, constant lr, ``--steps`` steps) through the runner, in four runs:
(a) k = 10 classes and k = 5 (``task.classes=[0,1,2,3,4]``, the same model otherwise) at
width w = 128, and (b) widths w = 32, 128, 512 at 10 classes (3.5k, 26k and 301k
parameters). At each run's final parameters (``params.npz``), on the whole training set,
in float32: the top 20 eigenvalues by Lanczos
(``top_k_eigenpairs``, 120 steps) and the SLQ spectral measure (``spectral_density``, 16
Rademacher probes x 100 Lanczos steps, key ``PRNGKey(0)`` split into the Lanczos and SLQ keys),
smoothed by ``density_on_grid`` for the plot.

The rules (computed here, written to the JSON):

* number of outliers: the position ``i`` (1..19) of the largest ratio gap
  ``λ_i / λ_{i+1}`` among the top 20 eigenvalues (a non-positive ``λ_{i+1}`` counts as an
  infinite gap); the outliers are ``λ_1..λ_i``;
* bulk width: the length of the interval between the 0.5% and 99.5% quantiles of the SLQ
  measure (the nodes with their weights, not smoothed), i.e. the interval holding the central
  99% of the spectral mass (the k outliers carry about k / #params of it, under 0.5%).

Reproduced, outliers: every run's count is within one of its number of classes (4..6 for
k = 5, 9..11 for k = 10; one less than k is allowed as the softmax's Hessian has rank k - 1
per example). Reproduced, bulk: the bulk width changes with the model (largest / smallest
width over w = 32, 128, 512 at least 1.5) and not with the data (k = 5 over k = 10 at
w = 128 within [0.8, 1.25]).

A secondary comparison, added after the first results (the 5-class run ends with an 8x lower
training loss than the 10-class one after the same 3000 steps, and a cross-entropy Hessian
shrinks with the loss): the 5-class run again, stopped at the first logged step where its
window-mean training loss is at most the 10-class run's final one (the same seed and constant
lr, so the prefix of the same trajectory); its bulk width over the 10-class one is reported
with the same [0.8, 1.25] band, beside the primary verdict, not instead of it.

Result (3000 steps; numbers in the JSON and the README): not reproduced by either rule. The
largest gap gives 6 outliers at 10 classes (every width) and 3 at 5 classes; the bulk width
falls 36x from w = 32 to w = 512, but the 5-class bulk is 0.13x the 10-class one (0.78x at
matched loss, just outside the band).

Run time: 6 min 53 s on 2 CPU cores shared with other work (the spectrum of the 301k-parameter
model is 5 of them); the smoke version about a minute (48 s alone, 60 s in the test suite;
more when the cores are busier).

Outputs in ``--out`` (default ``experiments/results/studies/bulk_and_outliers``):
``bulk_and_outliers.png`` (the smoothed densities, log scale, for (a) and (b); the top 20
eigenvalues of every run with its outlier cut), ``bulk_and_outliers.json`` (per run: the top
20 eigenvalues, the gap ratios, the outlier count, the bulk quantiles and width, the SLQ nodes
and weights, the final loss and accuracy; the verdicts), and the run directories under
``runs/``.

    python experiments/studies/bulk_and_outliers.py            # the study (about 7 minutes)
    python experiments/studies/bulk_and_outliers.py --smoke    # about a minute: 3 tiny runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxopt2.cpu import apply_cpu_deadlock_workaround

apply_cpu_deadlock_workaround()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxopt2.curvature import (  # noqa: E402
    density_on_grid,
    hessian_operator,
    spectral_density,
    top_k_eigenpairs,
)
from jaxopt2.experiment.config import load_config  # noqa: E402
from jaxopt2.experiment.rundir import load_params, read_metrics  # noqa: E402
from jaxopt2.experiment.setup import build_setup  # noqa: E402
from jaxopt2.experiment.trainer import run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "experiments" / "results" / "studies" / "bulk_and_outliers"
CONFIG = "task_digits_classifier"
FIVE = [0, 1, 2, 3, 4]
TOP_K, TOP_ITERS = 20, 120
SLQ_PROBES, SLQ_ITERS = 16, 100
BULK_MASS = 0.99
# (name, classes or None for all 10, hidden width); the smoke run uses tiny widths
CASES = [("c10_w128", None, 128), ("c5_w128", FIVE, 128), ("c10_w32", None, 32),
         ("c10_w512", None, 512)]  # fmt: skip
SMOKE_WIDTH = {128: 4, 32: 2}
CLASS_PAIR, WIDTHS = ("c10_w128", "c5_w128"), ("c10_w32", "c10_w128", "c10_w512")
MODEL_RATIO_MIN, DATA_RATIO = 1.5, (0.8, 1.25)
MATCHED = "c5_w128_matched_loss"  # 5 classes, stopped where its loss reaches the 10-class one


def overrides_for(classes: list[int] | None, width: int, steps: int) -> list[str]:
    out = [
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.1",
        "optimizer.schedule=constant",
        "batch_size=128",
        f"steps={steps}",
        f"log_every={min(50, steps)}",
        "eval_every=0",
        f"checkpoint.every={steps}",
        f"model.hidden=[{width},{width}]",
    ]
    if classes is not None:
        out.append(f"task.classes=[{','.join(map(str, classes))}]")
    return out


def final_params(setup, run_dir: Path):
    """The run's parameters (its ``params.npz``) as device arrays in the setup's pytree."""
    return jax.tree.map(jnp.asarray, load_params(run_dir / "params.npz", setup.params))


def spectrum(setup, params, seed: int = 0) -> dict:
    """Top eigenvalues (Lanczos) and the SLQ measure of the full-batch training-loss Hessian."""
    dim = setup.n_params
    k_top, k_den = jax.random.split(jax.random.PRNGKey(seed))
    top_iters, slq_iters = min(TOP_ITERS, dim), min(SLQ_ITERS, dim)

    @jax.jit
    def program(p, data):
        mv = hessian_operator(lambda q: setup.loss_fn(q, *data), p)
        evals, _ = top_k_eigenpairs(mv, p, k_top, TOP_K, num_iters=top_iters)
        nodes, weights = spectral_density(mv, p, k_den, num_iters=slq_iters, num_probes=SLQ_PROBES)
        return evals, nodes, weights

    evals, nodes, weights = jax.device_get(program(params, setup.train_data))
    return {
        "seed": seed,
        "top_iters": top_iters,
        "slq_iters": slq_iters,
        "slq_probes": SLQ_PROBES,
        "top_eigenvalues": np.asarray(evals, np.float64),
        "nodes": np.asarray(nodes, np.float64),
        "weights": np.asarray(weights, np.float64),
    }


def outlier_count(top: np.ndarray) -> tuple[int, list[float]]:
    """The position of the largest ratio gap λ_i / λ_{i+1} among the sorted top eigenvalues
    (a non-positive λ_{i+1} is an infinite gap), and the ratios."""
    top = np.asarray(top, np.float64)
    below = top[1:]
    ratios = np.where(below > 0, top[:-1] / np.where(below > 0, below, 1.0), np.inf)
    return int(np.argmax(ratios)) + 1, [float(r) for r in ratios]


def mass_quantile(nodes: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest node at which the cumulative SLQ weight reaches `q` (of the total)."""
    order = np.argsort(nodes, axis=None)
    x, w = np.ravel(nodes)[order], np.ravel(weights)[order]
    cum = np.cumsum(w) / np.sum(w)
    return float(x[min(np.searchsorted(cum, q), len(x) - 1)])


def bulk_interval(nodes: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    tail = (1 - BULK_MASS) / 2
    return mass_quantile(nodes, weights, tail), mass_quantile(nodes, weights, 1 - tail)


def smoothed(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float):
    return np.asarray(density_on_grid(nodes, weights, grid, sigma=sigma), np.float64)


def run_case(name: str, classes, width: int, steps: int, out: Path) -> dict:
    overrides = overrides_for(classes, width, steps)
    rc, _ = load_config(CONFIG, overrides)
    run_dir = out / "runs" / name
    t0 = time.perf_counter()
    result = run_config(rc, run_dir, progress=False, stream=None, overwrite=True)
    if result.exit_code != 0:
        raise SystemExit(f"the {name} run ended with exit code {result.exit_code}")
    t_train = time.perf_counter() - t0
    setup = build_setup(rc)
    t0 = time.perf_counter()
    params = final_params(setup, run_dir)
    spec = spectrum(setup, params)
    t_spec = time.perf_counter() - t0
    full_loss = float(jax.jit(setup.loss_fn)(params, *setup.train_data))
    top = spec["top_eigenvalues"]
    n_out, ratios = outlier_count(top)
    lo, hi = bulk_interval(spec["nodes"], spec["weights"])
    k = len(classes) if classes is not None else 10
    return {
        "classes": classes if classes is not None else list(range(10)),
        "num_classes": k,
        "width": width,
        "num_params": setup.n_params,
        "num_train": setup.task.n_train,
        "overrides": overrides,
        "steps": steps,
        "final_loss": result.summary["final_loss"],
        "final_loss_mean": result.summary["final_loss_mean"],
        "final_train_loss_full_batch": full_loss,
        "final_eval_accuracy": result.summary.get("final_eval_accuracy"),
        "top_eigenvalues": top.tolist(),
        "gap_ratios": ratios,
        "num_outliers": n_out,
        "outlier_gap_ratio": ratios[n_out - 1],
        "outliers_within_one_of_classes": abs(n_out - k) <= 1,
        "bulk_interval": [lo, hi],
        "bulk_width": hi - lo,
        "lambda_1_over_bulk_width": float(top[0] / (hi - lo)),
        "slq": {
            "seed": spec["seed"],
            "top_iters": spec["top_iters"],
            "slq_iters": spec["slq_iters"],
            "slq_probes": spec["slq_probes"],
            "nodes": spec["nodes"].tolist(),
            "weights": spec["weights"].tolist(),
        },
        "time_train_s": t_train,
        "time_spectrum_s": t_spec,
    }


def matched_steps(run_dir: Path, target: float) -> int:
    """The first logged step whose window-mean training loss is at most `target`."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    hits = [r["step"] for r in rows if r["loss_mean"] <= target]
    return hits[0] if hits else rows[-1]["step"]


def verdicts(runs: dict) -> dict:
    primary = [n for n, _, _ in CASES if n in runs]  # the four runs of (a) and (b)
    outliers = all(runs[n]["outliers_within_one_of_classes"] for n in primary)
    widths = [runs[n]["bulk_width"] for n in WIDTHS if n in runs]
    model_ratio = max(widths) / min(widths)
    a, b = (runs[n]["bulk_width"] for n in CLASS_PAIR)
    data_ratio = b / a
    matched = {}
    if MATCHED in runs:  # the secondary comparison: 5 classes stopped at the 10-class loss
        m = runs[MATCHED]
        matched = {
            "bulk_width_data_ratio_5_over_10_classes_at_matched_loss": m["bulk_width"] / a,
            "bulk_set_by_model_not_data_at_matched_loss": bool(
                model_ratio >= MODEL_RATIO_MIN
                and DATA_RATIO[0] <= m["bulk_width"] / a <= DATA_RATIO[1]
            ),
        }
    return {
        "outliers_track_classes": bool(outliers),
        "bulk_width_model_ratio_max_over_min": model_ratio,
        "bulk_width_data_ratio_5_over_10_classes": data_ratio,
        "bulk_set_by_model_not_data": bool(
            model_ratio >= MODEL_RATIO_MIN and DATA_RATIO[0] <= data_ratio <= DATA_RATIO[1]
        ),
        **matched,
    }


def color_of(name: str) -> str:
    """One color per run in every panel."""
    return f"C{[n for n, _, _ in CASES].index(name) if name != MATCHED else len(CASES)}"


def label_of(r: dict) -> str:
    return f"{r['num_classes']} classes, w {r['width']}, {r['steps']} steps"


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, names, title in [
        (axes[0, 0], (*CLASS_PAIR, MATCHED), "(a) 10 vs 5 classes, same model"),
        (axes[0, 1], WIDTHS, "(b) widths at 10 classes"),
    ]:
        names = [n for n in names if n in runs]
        nodes = [np.asarray(runs[n]["slq"]["nodes"]) for n in names]
        lo = min(float(x.min()) for x in nodes)
        hi = max(
            max(float(x.max()) for x in nodes), *(runs[n]["top_eigenvalues"][0] for n in names)
        )
        sigma = 0.005 * (hi - lo)
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, 2000)
        for n, x in zip(names, nodes, strict=True):
            r = runs[n]
            d = smoothed(x, np.asarray(r["slq"]["weights"]), grid, sigma)
            label = f"{label_of(r)} ({r['num_outliers']} outliers)"
            ax.plot(grid, np.maximum(d, 1e-8), lw=1.1, label=label, color=color_of(n))
            for v in r["top_eigenvalues"][: r["num_outliers"]]:
                ax.axvline(v, color=color_of(n), ls=":", lw=0.7)
        ax.set_yscale("log")
        ax.set_ylim(1e-6, None)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("SLQ density (smoothed)")
        ax.set_title(title + "; dotted: the outliers")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    for n, r in runs.items():
        top = np.asarray(r["top_eigenvalues"])
        ax.semilogy(np.arange(1, len(top) + 1), np.maximum(top, 1e-6), "o-", ms=3,
                    label=label_of(r), color=color_of(n))  # fmt: skip
        ax.axvline(r["num_outliers"] + 0.5, color=color_of(n), ls="--", lw=0.8)
    ax.set_xticks(range(1, TOP_K + 1, 2))
    ax.set_xlabel("index i")
    ax.set_ylabel("λ_i (Lanczos)")
    ax.set_title("top 20 eigenvalues; dashed: the largest gap λ_i/λ_{i+1}")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    names = list(runs)
    x = np.arange(len(names))
    ax.bar(x, [runs[n]["bulk_width"] for n in names], color=[color_of(n) for n in names])
    ax.set_xticks(
        x, [f"{runs[n]['num_classes']}c w{runs[n]['width']}\n{runs[n]['steps']} st" for n in names]
    )
    ax.set_yscale("log")
    ax.set_ylabel("bulk width (central 99% of the SLQ mass)")
    ax.set_title("bulk width (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--smoke", action="store_true", help="tiny models, 20 steps")
    args = ap.parse_args(argv)
    steps = 20 if args.smoke else args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {}
    for name, classes, width in CASES[:3] if args.smoke else CASES:  # smoke: 2 widths
        width = SMOKE_WIDTH[width] if args.smoke else width
        runs[name] = run_case(name, classes, width, steps, args.out)
        r = runs[name]
        shown = ("num_params", "final_loss", "num_outliers", "outlier_gap_ratio", "bulk_interval",
                 "bulk_width", "time_train_s", "time_spectrum_s")  # fmt: skip
        top = [round(v, 4) for v in r["top_eigenvalues"]]
        print(json.dumps({"run": name, **{k: r[k] for k in shown}, "top_eigenvalues": top}))
    if not args.smoke:  # 5 classes again, stopped once its loss is down to the 10-class one
        target = runs["c10_w128"]["final_loss_mean"]
        m = matched_steps(args.out / "runs" / "c5_w128", target)
        runs[MATCHED] = run_case(MATCHED, FIVE, 128, m, args.out)
        print(json.dumps({"run": MATCHED, "steps": m, "bulk_width": runs[MATCHED]["bulk_width"],
                          "num_outliers": runs[MATCHED]["num_outliers"]}))  # fmt: skip
    summary = {
        "study": "bulk and outliers (Sagun et al. 2017; Papyan 2019)",
        "steps": steps,
        "smoke": args.smoke,
        "rules": {
            "num_outliers": "position i (1..19) of the largest ratio gap lambda_i/lambda_{i+1} "
            "among the top 20 Lanczos eigenvalues",
            "bulk_width": "length of the interval between the 0.5% and 99.5% quantiles of the "
            "SLQ measure (nodes and weights, unsmoothed)",
            "outliers_track_classes": "every run's count within one of its number of classes",
            "bulk_set_by_model_not_data": f"max/min bulk width over the widths >= "
            f"{MODEL_RATIO_MIN} and the 5-class over 10-class width in {list(DATA_RATIO)}",
        },
        "reproduced": verdicts(runs),
        "runs": runs,
        "time_s": time.perf_counter() - t0,
    }
    (args.out / "bulk_and_outliers.json").write_text(json.dumps(summary, indent=1))
    plot(runs, args.out / "bulk_and_outliers.png")
    print(json.dumps({"reproduced": summary["reproduced"], "time_s": summary["time_s"]}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
