"""The CLI's exit codes from a real process: 3 for a non-finite stop, 130 for Ctrl-C (SIGINT,
after a checkpoint); and a schedule-free run evaluated at its averaged parameters."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.experiment.helpers import start_cli, wait_for_step

pytestmark = pytest.mark.timeout(240)

DIVERGING = """\
steps: 200
seed: 0
log_every: 5
task: {name: rosenbrock}
optimizer: {name: sgd, learning_rate: 10.0}
checkpoint: {every: 5, keep: 2}
"""

LONG = """\
steps: 100000
seed: 0
batch_size: 32
log_every: 10
task: {name: digits_classifier}
model: {name: mlp, hidden: [8]}
optimizer: {name: adam, learning_rate: 1.0e-3}
checkpoint: {every: 100000, keep: 1}
"""


def _run(tmp_path: Path, text: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    run_dir = tmp_path / "run"
    proc = start_cli("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", cwd=tmp_path)
    return proc, run_dir


def test_nonfinite_stop_exits_3(tmp_path):
    proc, run_dir = _run(tmp_path, DIVERGING)
    _, err = proc.communicate(timeout=200)
    assert proc.returncode == 3, err
    assert "non-finite loss or update at step" in err and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["steps"] < 200


def test_sigint_checkpoints_and_exits_130(tmp_path):
    proc, run_dir = _run(tmp_path, LONG)
    wait_for_step(proc, run_dir, 20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by signal 2" in err and "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["last_checkpoint_step"] == summary["steps"] >= 20


def test_schedule_free_evaluates_its_averaged_parameters(tmp_path):
    import jax
    import optax

    from jaxopt2.experiment.checkpoint import Checkpointer
    from jaxopt2.experiment.config import load_config
    from jaxopt2.experiment.trainer import Trainer

    rc, _ = load_config(
        "opt_schedule_free_adamw",
        ["steps=20", "log_every=10", "eval_every=10", "checkpoint.every=20", "model.hidden=[8]"],
    )
    trainer = Trainer(rc, tmp_path, progress=False, stream=None, plots=False)
    assert trainer.train().status == "complete"
    ck = Checkpointer(tmp_path / "checkpoints", keep=1)
    state, _ = ck.restore(trainer.init_carry)
    ck.close()
    # the checkpoint holds the training iterate y; params.npz and the evaluation hold x
    inner = state["opt_state"][1]
    x = optax.contrib.schedule_free_eval_params(inner, state["params"])
    with np.load(tmp_path / "params.npz") as z:
        saved = {k: z[k] for k in z.files}
    flat = jax.tree_util.tree_flatten_with_path(x)[0]
    y_flat = jax.tree.leaves(state["params"])
    for (path, leaf), y in zip(flat, y_flat, strict=True):
        name = jax.tree_util.keystr(path).lstrip(".")
        np.testing.assert_allclose(saved[name], np.asarray(leaf), rtol=1e-6, atol=1e-7)
        assert not np.allclose(saved[name], np.asarray(y))
    model_x = trainer.setup.eval_metrics(x, trainer.eval_data)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] == pytest.approx(float(model_x["loss"]), rel=1e-5)
