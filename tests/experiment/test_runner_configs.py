"""The runner in-process: every shipped config trains 2 steps; compile-once; float32; policies."""

from __future__ import annotations

import json
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.errors import NonFiniteError
from jaxopt2.experiment.rundir import prepare_run_dir, read_metrics
from jaxopt2.experiment.trainer import Trainer

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _train(config, overrides, run_dir, **kw):
    rc, _ = load_config(str(config), overrides)
    prepare_run_dir(run_dir, rc)
    trainer = Trainer(rc, run_dir, progress=False, stream=None, plots=kw.pop("plots", False))
    return trainer, trainer.train(**kw)


def test_configs_exist_for_every_task_and_optimizer():
    from jaxopt2.experiment.tasks import TASKS
    from jaxopt2.optimizers import registry

    texts = {p.stem: p.read_text() for p in CONFIGS}
    assert "quickstart" in texts
    for opt in registry.names():
        assert f"opt_{opt}" in texts, f"configs/opt_{opt}.yaml is missing"
    for task, spec in TASKS.items():
        if spec.needs_files:  # user data files: tested in test_runner_data_tasks.py instead
            assert not any(f"name: {task}" in t for t in texts.values()), task
            continue
        assert any(f"name: {task}" in t for t in texts.values()), f"no config for task {task}"


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_runs_two_steps(config, tmp_path):
    trainer, result = _train(
        config, ["steps=2", "log_every=2", "eval_every=2", "checkpoint.every=2"], tmp_path
    )
    assert result.status == "complete" and result.step == 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2]
    assert rows[0]["loss"] is not None and np.isfinite(rows[0]["loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "complete"
    # float32 parameters although the test suite enables jax_enable_x64
    for leaf in jax.tree.leaves(trainer.final_carry["params"]):
        assert leaf.dtype == np.float32
    assert trainer.trace_count == 1


def test_train_step_compiles_once_and_takes_the_data_as_arguments(tmp_path):
    trainer, result = _train(
        "quickstart",
        ["steps=23", "log_every=5", "eval_every=10", "checkpoint.every=10", "model.hidden=[16]"],
        tmp_path,
        plots=True,
    )
    assert result.status == "complete"
    # chunks of 5, 5, 5, 5 and a masked 3: one trace, one compile; evaluation traced once
    assert trainer.trace_count == 1
    assert trainer.eval_trace_count == 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 23]
    assert [("eval_loss" in r) for r in rows] == [False, True, False, True, True]
    for key in ("loss", "grad_norm", "update_norm", "param_norm", "lr", "step_time", "time"):
        assert all(r[key] is not None for r in rows), key
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "params.npz").is_file()
    # the training set is an argument of the program, not a baked-in constant
    eng = trainer.engine
    args = (eng.init(), eng.hyper, eng.k_data, eng.k_opt, trainer.train_data, np.int32(5))
    jaxpr = jax.make_jaxpr(eng.chunk_fn)(*args)
    n = trainer.task.n_train
    big = [c for c in jaxpr.consts if getattr(c, "ndim", 0) and c.shape[0] == n]
    assert not big


def test_batches_are_deterministic_per_step(tmp_path):
    rc, _ = load_config("quickstart", ["model.hidden=[8]"])
    t = Trainer(rc, tmp_path, progress=False, stream=None)
    b1 = t.batch(t.train_data, np.int32(13))
    b2 = t.batch(t.train_data, np.int32(13))
    b3 = t.batch(t.train_data, np.int32(14))
    np.testing.assert_array_equal(b1[0], b2[0])
    assert not np.array_equal(b1[0], b3[0])
    assert b1[0].dtype == np.float32 and b1[0].shape == (128, 64)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
    overrides = [
        "steps=50",
        "log_every=1",
        "checkpoint.every=1",
        "optimizer.name=sgd",
        "optimizer.learning_rate=10.0",
    ]
    with pytest.raises(NonFiniteError, match="non-finite"):
        _train(ROOT / "configs/task_rosenbrock.yaml", overrides, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "nonfinite"
    good = summary["last_checkpoint_step"]
    assert good is not None and good < 50
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["loss"] is None  # the non-finite step is recorded (NaN -> null)


def test_nonfinite_skip_counts_and_continues(tmp_path):
    overrides = [
        "steps=20",
        "log_every=5",
        "nonfinite=skip",
        "optimizer.name=sgd",
        "optimizer.learning_rate=10.0",
    ]
    trainer, result = _train(ROOT / "configs/task_rosenbrock.yaml", overrides, tmp_path)
    assert result.status == "complete"
    assert result.summary["nonfinite_steps"] > 0
    x = trainer.final_carry["params"].x
    assert np.all(np.isfinite(np.asarray(x)))


def test_breast_cancer_objective_matches_scikit_learn_c1(tmp_path):
    from sklearn.linear_model import LogisticRegression

    trainer, _ = _train(
        ROOT / "configs/task_breast_cancer.yaml", ["steps=400", "log_every=100"], tmp_path
    )
    xtr, ytr = (np.asarray(a) for a in trainer.task.train)
    clf = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000)
    clf.fit(xtr[:, :-1].astype(np.float64), ytr)
    w_sk = np.concatenate([clf.coef_[0], clf.intercept_]).astype(np.float32)
    params = trainer.final_carry["params"]
    f_ours = float(trainer.loss_fn(params, xtr, ytr))
    sk_params = eqx.tree_at(lambda m: m.weight, params, jnp.asarray(w_sk))
    f_sk = float(trainer.loss_fn(sk_params, xtr, ytr))
    assert params.weight.shape == w_sk.shape
    assert f_ours >= f_sk - 1e-5
    assert f_ours - f_sk < 2e-3, (f_ours, f_sk)
