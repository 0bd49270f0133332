"""Smoke versions of the studies under experiments/studies/: they run, write their outputs,
and the quantity each one plots agrees with a dense reference on a model small enough for it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxopt2._tree import random_probes
from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.rundir import load_params
from jaxopt2.experiment.setup import build_setup

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(240)


def _study(name: str):
    path = ROOT / "experiments" / "studies" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"study_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dense_top(setup, params_row):
    """Top eigenvalue of the dense float64 Hessian of the full-batch loss at `params_row`."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params_row)
    flat, unravel = ravel_pytree(params)
    data = tuple(
        jnp.asarray(a) if a.dtype.kind in "iub" else jnp.asarray(a, jnp.float64)
        for a in setup.train_data
    )
    hess = jax.jit(jax.hessian(lambda v: setup.loss_fn(unravel(v), *data)))(flat)
    return float(np.linalg.eigvalsh(np.asarray(hess))[-1])


def test_edge_of_stability_smoke(tmp_path):
    study = _study("edge_of_stability")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "edge_of_stability.json").read_text())
    assert set(saved["cases"]) == {"squared", "cross_entropy"}
    for loss, case in summary["cases"].items():
        rc, _ = load_config(case["config"], case["overrides"][:-1])  # without the lr grid
        setup = build_setup(rc)
        for j, m in enumerate(case["members"]):
            assert m["threshold_2_over_lr"] == pytest.approx(2.0 / m["learning_rate"])
            final = load_params(tmp_path / "sweeps" / loss / "params.npz", setup.params, j)
            # the plotted quantity: the last logged sharpness is at the final parameters
            top = _dense_top(setup, final)
            np.testing.assert_allclose(m["curve"]["sharpness"][-1], top, rtol=1e-3)


def test_gradient_subspace_smoke(tmp_path):
    """The plotted share of the full-batch gradient in the top-k Hessian eigenvectors, at the
    last logged step (the final parameters), against a dense float64 eigendecomposition."""
    study = _study("gradient_subspace")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "gradient_subspace.png").stat().st_size > 10_000
    for name, res in summary["optimizers"].items():
        rc, _ = load_config(study.CONFIG, res["overrides"])
        setup = build_setup(rc)
        flat = jax.tree_util.tree_flatten_with_path(setup.params)[0]
        with np.load(tmp_path / "runs" / name / "params.npz") as z:
            leaves = [jnp.asarray(z[jax.tree_util.keystr(p).lstrip(".")]) for p, _ in flat]
        params = jax.tree.map(
            lambda a: jnp.asarray(a, jnp.float64),
            jax.tree.unflatten(jax.tree.structure(setup.params), leaves),
        )
        vec, unravel = ravel_pytree(params)
        data = tuple(
            jnp.asarray(a) if a.dtype.kind in "iub" else jnp.asarray(a, jnp.float64)
            for a in setup.train_data
        )
        loss = lambda v: setup.loss_fn(unravel(v), *data)
        g = np.asarray(jax.grad(loss)(vec))
        _, vecs = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(loss))(vec)))
        coeffs = vecs[:, ::-1][:, :20].T @ g
        dense = np.cumsum(coeffs**2) / np.sum(g**2)
        logged = res["curve"]
        for k in study.KS:
            np.testing.assert_allclose(logged[f"k{k}"][-1], dense[k - 1], rtol=0.02, atol=1e-3)


def _dense_hessian(setup, params, rows=None):
    """Dense float64 Hessian of the training loss (on `rows` of the training set, or all)."""
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    vec, unravel = ravel_pytree(params)
    data = tuple(
        jnp.asarray(a) if a.dtype.kind in "iub" else jnp.asarray(a, jnp.float64)
        for a in setup.train_data
    )
    if rows is not None:
        data = tuple(a[np.asarray(rows)] for a in data)
    return np.asarray(jax.jit(jax.hessian(lambda v: setup.loss_fn(unravel(v), *data)))(vec))


def test_sgd_trace_smoke(tmp_path):
    """The plotted tr(H) (Hutchinson) and lambda_max (Lanczos) at the final parameters of every
    sweep member, against the trace and top eigenvalue of a dense float64 Hessian."""
    study = _study("sgd_trace")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "sgd_trace.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "sgd_trace.json").read_text())
    assert set(saved["reproduced"]) >= {"sgd_trace_le_2_over_lr", "gd_lambda_max_le_2_over_lr"}
    for res in summary["batch_sizes"]:
        setup = build_setup(load_config(study.CONFIG, res["overrides"])[0])
        for j, m in enumerate(res["members"]):
            npz = tmp_path / "sweeps" / f"b{res['batch_size']}" / "params.npz"
            final = load_params(npz, setup.params, j)
            hess = _dense_hessian(setup, final)
            evals = np.linalg.eigvalsh(hess)
            np.testing.assert_allclose(m["lambda_max"], evals[-1], rtol=1e-3)
            # Hutchinson, 200 probes: within 4 standard errors, and the error bar is tight
            assert abs(m["trace"] - np.trace(hess)) <= 4 * m["trace_stderr"]
            assert m["trace_stderr"] < 0.1 * np.trace(hess)
            assert m["two_over_lr"] == pytest.approx(2 / m["learning_rate"])
            assert m["trace_le_2_over_lr"] == (m["trace"] <= 2 / m["learning_rate"])
            loss = float(setup.loss_fn(final, *setup.train_data))
            assert m["final_loss"] == pytest.approx(loss, rel=1e-5)


def test_batch_size_curvature_smoke(tmp_path):
    """The plotted minibatch top eigenvalues (each draw, on the rows the study recorded) and
    the full-batch one, at the parameters the study used (the initial ones), against dense
    float64 Hessians; and the lr_max table's bookkeeping."""
    study = _study("batch_size_curvature")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "batch_size_curvature.png").stat().st_size > 10_000
    spec = summary["a_minibatch_spectrum"]
    setup = build_setup(load_config(study.CONFIG, spec["overrides"])[0])
    for t in spec["table"]:
        rows = t["rows"]
        assert all(len(set(r)) == t["batch_size"] for r in rows)
        dense = [np.linalg.eigvalsh(_dense_hessian(setup, setup.params, r))[-1] for r in rows]
        np.testing.assert_allclose(t["eigenvalues"], dense, rtol=2e-3)
        assert t["mean"] == pytest.approx(np.mean(dense), rel=2e-3)
    full = np.linalg.eigvalsh(_dense_hessian(setup, setup.params))[-1]
    assert spec["full_batch"] == pytest.approx(full, rel=2e-3)
    assert spec["above_full_at_every_B"] == all(
        t["mean"] > spec["full_batch"] for t in spec["table"] if t["batch_size"] < setup.n_train
    )
    for res in summary["b_lr_max"].values():
        for t in res["table"]:
            ok = [r["learning_rate"] for r in t["runs"] if r["succeeded"]]
            assert t["lr_max"] == (max(ok) if ok else None)
            assert all(
                r["succeeded"] == (r["final_loss"] is not None and r["final_loss"] <= 0.5)
                for r in t["runs"]
            )


def test_bulk_and_outliers_smoke(tmp_path):
    """What the study plots, at each run's final parameters, against the dense float64 Hessian
    of the full-batch loss: the top 20 eigenvalues (and the outlier count read from them), and
    the SLQ measure: its weights and nodes reproduce, probe by probe, the moments
    vᵀ Hʲ v (j = 0, 1, 2) of the same Rademacher start vectors, and its central-99% bulk
    interval holds most of the dense eigenvalues."""
    study = _study("bulk_and_outliers")
    summary = study.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "bulk_and_outliers.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "bulk_and_outliers.json").read_text())
    assert set(saved["reproduced"]) >= {"outliers_track_classes", "bulk_set_by_model_not_data"}
    assert summary["runs"]["c5_w128"]["num_classes"] == 5
    for name, res in summary["runs"].items():
        rc, _ = load_config(study.CONFIG, res["overrides"])
        setup = build_setup(rc)
        params32 = study.final_params(setup, tmp_path / "runs" / name)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params32)
        vec, unravel = ravel_pytree(params)
        data = tuple(
            jnp.asarray(a) if a.dtype.kind in "iub" else jnp.asarray(a, jnp.float64)
            for a in setup.train_data
        )
        assert int(jnp.max(data[1])) + 1 == res["num_classes"]
        hess = np.asarray(jax.jit(jax.hessian(lambda v: setup.loss_fn(unravel(v), *data)))(vec))
        dense = np.linalg.eigvalsh(hess)[::-1]
        scale = dense[0]
        np.testing.assert_allclose(res["top_eigenvalues"], dense[:20], rtol=2e-3, atol=1e-4 * scale)
        assert res["num_outliers"] == study.outlier_count(dense[:20])[0]

        slq = res["slq"]
        nodes, weights = np.asarray(slq["nodes"]), np.asarray(slq["weights"])
        _, k_den = jax.random.split(jax.random.PRNGKey(slq["seed"]))
        probes = jax.vmap(lambda t: ravel_pytree(t)[0])(
            random_probes(k_den, params32, slq["slq_probes"], "rademacher")
        )
        v = np.asarray(probes, np.float64)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        hv = v @ hess
        per_probe = weights * slq["slq_probes"]  # each probe's weights sum to 1
        for j, exact in enumerate([np.ones(len(v)), np.sum(v * hv, 1), np.sum(hv * hv, 1)]):
            np.testing.assert_allclose(
                np.sum(per_probe * nodes**j, axis=1), exact, rtol=1e-3, atol=1e-4 * scale**j
            )
        lo, hi = res["bulk_interval"]
        assert res["bulk_width"] == pytest.approx(hi - lo)
        assert np.mean((dense >= lo - 1e-6) & (dense <= hi + 1e-6)) >= 0.9


# ------------------------------------------------------------------------------------------
# The verdicts, on hand-built results (both outcomes; no training).
# ------------------------------------------------------------------------------------------


def _member(interpolated: bool, trace_ok: bool, lambda_ok: bool = True) -> dict:
    return {
        "interpolated": interpolated,
        "trace_le_2_over_lr": trace_ok,
        "lambda_max_le_2_over_lr": lambda_ok,
    }


def test_sgd_trace_verdicts_both_ways():
    verdicts = _study("sgd_trace").verdicts
    sgd = {"gd": False, "members": [_member(True, True), _member(False, False, False)]}
    gd = {"gd": True, "members": [_member(True, False), _member(True, True)]}
    held = verdicts([sgd, gd])
    assert held == {
        "sgd_trace_le_2_over_lr": True,  # the run that did not interpolate is not judged
        "gd_lambda_max_le_2_over_lr": True,
        "gd_trace_exceeds_2_over_lr_somewhere": True,
        "interpolated_runs": {"sgd": 1, "gd": 2},
    }
    sgd_bad = {"gd": False, "members": [_member(True, True), _member(True, False)]}
    gd_bad = {"gd": True, "members": [_member(True, True, False), _member(True, True)]}
    failed = verdicts([sgd_bad, gd_bad])
    assert failed["sgd_trace_le_2_over_lr"] is False
    assert failed["gd_lambda_max_le_2_over_lr"] is False
    assert failed["gd_trace_exceeds_2_over_lr_somewhere"] is False
    # nothing interpolated: no claim holds by default
    none = verdicts([{"gd": False, "members": [_member(False, True)]}])
    assert none["sgd_trace_le_2_over_lr"] is False and none["gd_lambda_max_le_2_over_lr"] is False


def _runs(widths: dict, outliers: bool = True) -> dict:
    return {
        name: {"bulk_width": w, "outliers_within_one_of_classes": outliers}
        for name, w in widths.items()
    }


def test_bulk_and_outliers_verdicts_both_ways():
    study = _study("bulk_and_outliers")
    (c10, c5), matched = study.CLASS_PAIR, study.MATCHED
    w32, _, w512 = study.WIDTHS
    lo, hi = study.DATA_RATIO
    # the model sets the bulk (widths 1 -> 4 across the models), the data does not (5 vs 10
    # classes at the band's edges, which count as inside)
    for data in (lo, hi):
        runs = _runs({w32: 1.0, c10: 2.0, w512: 4.0, c5: 2.0 * data, matched: 2.0 * hi})
        out = study.verdicts(runs)
        assert out["outliers_track_classes"] is True
        assert out["bulk_set_by_model_not_data"] is True, data
        assert out["bulk_width_model_ratio_max_over_min"] == pytest.approx(4.0)
        assert out["bulk_width_data_ratio_5_over_10_classes"] == pytest.approx(data)
        assert out["bulk_set_by_model_not_data_at_matched_loss"] is True
    # the data moves the bulk (ratio just outside the band), in either direction
    for data in (0.99 * lo, 1.01 * hi):
        runs = _runs({w32: 1.0, c10: 2.0, w512: 4.0, c5: 2.0 * data, matched: 2.0 * data})
        out = study.verdicts(runs)
        assert out["bulk_set_by_model_not_data"] is False, data
        assert out["bulk_set_by_model_not_data_at_matched_loss"] is False, data
    # the model does not move it enough (max/min just under the minimum ratio)
    r = 0.99 * study.MODEL_RATIO_MIN
    out = study.verdicts(_runs({w32: 2.0, c10: 2.0, w512: 2.0 * r, c5: 2.0}))
    assert out["bulk_set_by_model_not_data"] is False
    assert "bulk_set_by_model_not_data_at_matched_loss" not in out  # no matched run
    # one run whose outliers do not follow its classes
    runs = _runs({w32: 1.0, c10: 2.0, w512: 4.0, c5: 2.0})
    runs[w512]["outliers_within_one_of_classes"] = False
    assert study.verdicts(runs)["outliers_track_classes"] is False
