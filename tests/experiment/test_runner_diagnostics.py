"""Curvature diagnostics during training: config semantics, logged fields, edge of stability."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla

from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.rundir import prepare_run_dir, read_metrics
from jaxopt2.experiment.trainer import Trainer

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]


def _train(config, overrides, run_dir, plots=False):
    rc, _ = load_config(str(config), overrides)
    prepare_run_dir(run_dir, rc)
    trainer = Trainer(rc, run_dir, progress=False, stream=None, plots=plots)
    return trainer, trainer.train()


def test_disabled_by_default_and_left_out_of_the_resolved_config():
    rc, _ = load_config("quickstart")
    assert rc.run.diagnostics.every == 0 and "diagnostics" not in rc.data
    rc, _ = load_config("quickstart", ["diagnostics.top_k=3"])  # still off: still left out
    assert "diagnostics" not in rc.data
    rc, _ = load_config("quickstart", ["diagnostics.every=10"])
    assert rc.data["diagnostics"]["every"] == 10 and rc.data["diagnostics"]["batch"] == (
        "train_batch"
    )
    for bad, key in [
        ("diagnostics.every=-1", "diagnostics.every"),
        ("diagnostics.batch=half", "diagnostics.batch"),
        ("diagnostics.trace_probes=1", "diagnostics.trace_probes"),
        ("diagnostics.bogus=1", "diagnostics.bogus"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config("quickstart", ["diagnostics.every=5", bad])


def test_logged_fields_on_the_quadratic(tmp_path):
    # Exact quadratic: the Hessian is A with eigenvalues logspace(0, -2, 24) whatever x is.
    overrides = [
        "task.dim=24",
        "task.condition_number=100",
        "task.noise_std=0",
        "task.num_samples=64",
        "batch_size=16",
        "steps=12",
        "log_every=4",
        "optimizer.momentum=0.0",
        "diagnostics.every=8",
        "diagnostics.top_k=2",
        "diagnostics.trace_probes=16",
        "diagnostics.grad_share=true",
    ]
    trainer, result = _train(ROOT / "configs/task_quadratic.yaml", overrides, tmp_path, True)
    assert result.status == "complete"
    assert trainer.trace_count == 1 and trainer.diag_trace_count == 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # boundaries past each multiple of 8, and the end
    assert [("sharpness" in r) for r in rows] == [False, True, True]
    expected = np.logspace(0, -2, 24)
    for r in rows[1:]:
        np.testing.assert_allclose(r["sharpness"], 1.0, rtol=1e-4)
        np.testing.assert_allclose(r["top_eigenvalues"], expected[:2], rtol=1e-4)
        assert abs(r["trace"] - expected.sum()) < 5 * r["trace_stderr"] + 1e-4
        assert 0.0 <= r["grad_topk_share"] <= 1.0 + 1e-6
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_sharpness"] == rows[-1]["sharpness"]
    assert (tmp_path / "sharpness.png").stat().st_size > 0


def test_full_batch_gd_trains_at_the_edge_of_stability(tmp_path):
    """Cohen et al. (2021): with step size lr, full-batch GD drives the sharpness to 2/lr.

    200 digits, MLP 64-64-64-10 tanh (weights N(0, 1/fan_in)), squared loss, GD lr 0.08: the
    sharpness starts above 2/lr = 25, falls below it, rises back and then hovers at 25.
    """
    lr = 0.08
    overrides = ["steps=600", "log_every=10", "eval_every=0", "checkpoint.every=1000"]
    config = ROOT / "configs/task_digits_regression.yaml"
    trainer, result = _train(config, overrides, tmp_path)
    assert result.status == "complete" and trainer.rc.optimizer.learning_rate == lr
    assert trainer.batch_size == trainer.task.n_train == 200  # full batch
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "sharpness" in r]
    assert len(rows) == 60
    sharp = {r["step"]: r["sharpness"] for r in rows}
    threshold = 2.0 / lr
    assert sharp[10] > threshold  # it starts above the stability threshold
    late = np.array([v for s, v in sharp.items() if s >= 400])
    assert np.all(np.abs(late / threshold - 1) < 0.12), late
    assert abs(np.median(late) / threshold - 1) < 0.06, late

    # The logged value is the true top eigenvalue: check the last one (final parameters)
    # against ARPACK on float64 Hessian-vector products written here.
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), trainer.final_carry["params"])
    data64 = tuple(jnp.asarray(a, jnp.float64) for a in trainer.task.train)
    flat, unravel = jax.flatten_util.ravel_pytree(params64)

    def loss(v):
        return trainer.loss_fn(unravel(v), *data64)

    hvp = jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])
    op = sla.LinearOperator(
        (flat.size, flat.size), matvec=lambda v: np.asarray(hvp(jnp.asarray(v))), dtype=np.float64
    )
    top = sla.eigsh(op, k=1, which="LA", tol=1e-8, return_eigenvectors=False)[0]
    np.testing.assert_allclose(rows[-1]["sharpness"], top, rtol=1e-4)
    assert abs(top / threshold - 1) < 0.12


def test_resumed_run_logs_the_same_diagnostics(tmp_path):
    import shutil

    overrides = [
        "steps=40",
        "log_every=10",
        "eval_every=0",
        "checkpoint.every=20",
        "diagnostics.every=10",
        "diagnostics.batch=train_batch",
        "diagnostics.trace_probes=4",
        "batch_size=50",
        "model.hidden=[16]",
    ]
    config = ROOT / "configs/task_digits_regression.yaml"
    _train(config, overrides, tmp_path / "a")
    full = read_metrics(tmp_path / "a/metrics.jsonl")
    # Lose the last checkpoint: the rerun resumes from step 20 and recomputes the rest.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b/checkpoints/40")
    trainer, result = _train(config, overrides, tmp_path / "b")
    assert trainer.resumed_from == 20 and result.step == 40
    resumed = read_metrics(tmp_path / "b/metrics.jsonl")
    keys = ("step", "loss", "sharpness", "trace", "trace_stderr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]
