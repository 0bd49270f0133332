"""Exact resume of real processes: SIGKILL mid-run, then rerun -> bitwise the same parameters
as an uninterrupted run; SIGTERM -> checkpoint, exit 143, resumable."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.experiment.helpers import last_step, start_cli, wait_for_step

pytestmark = pytest.mark.timeout(300)

CONFIG = """\
steps: 6000
seed: 3
batch_size: 64
log_every: 10
eval_every: 2000
task: {name: digits_classifier}
model: {name: mlp, hidden: [32, 32]}
optimizer: {name: adam, learning_rate: 3.0e-3, schedule: cosine}
checkpoint: {every: 200, keep: 2}
"""


def _start(cfg: Path, run_dir: Path):
    return start_cli("run", str(cfg), "--run-dir", str(run_dir), "--no-progress", cwd=cfg.parent)


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "params.npz") as z:
        return {k: z[k] for k in z.files}


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32
        assert np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)), k


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    cfg = base / "resume.yaml"
    cfg.write_text(CONFIG)
    ref_dir = base / "reference"
    ref = _start(cfg, ref_dir)  # the uninterrupted run, alongside the interrupted ones
    yield cfg, base, ref, ref_dir
    if ref.poll() is None:
        ref.kill()


def _reference(setup) -> dict[str, np.ndarray]:
    _, _, ref, ref_dir = setup
    _, err = ref.communicate(timeout=240)
    assert ref.returncode == 0, err
    return _params(ref_dir)


def _check_metrics(run_dir: Path) -> None:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 6001, 10))  # no gaps, no duplicates


def test_sigkill_then_rerun_is_bitwise_identical(setup):
    cfg, base, _, _ = setup
    run_dir = base / "killed"
    proc = _start(cfg, run_dir)
    wait_for_step(proc, run_dir, 450)  # past the checkpoints at 200 and 400
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = last_step(run_dir)
    assert 450 <= killed_at < 6000
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 400
    # a half-written checkpoint (what orbax leaves when killed mid-write) is never picked up
    (run_dir / "checkpoints" / "6000.orbax-checkpoint-tmp-1234").mkdir()
    rerun = _start(cfg, run_dir)
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    assert "resumed from step" in out
    _check_metrics(run_dir)
    _assert_bitwise_equal(_params(run_dir), _reference(setup))


def test_sigterm_saves_a_checkpoint_and_exits_143(setup):
    from jaxopt2.experiment.checkpoint import Checkpointer
    from jaxopt2.experiment.config import load_config
    from jaxopt2.experiment.trainer import Trainer

    cfg, base, _, _ = setup
    run_dir = base / "terminated"
    proc = _start(cfg, run_dir)
    wait_for_step(proc, run_dir, 250)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "resume" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    stopped = summary["steps"]
    assert 250 <= stopped < 6000 and summary["last_checkpoint_step"] == stopped
    assert last_step(run_dir) == stopped
    # the checkpoint loads into a fresh state of the same config
    rc, _ = load_config(str(cfg))
    like = Trainer(rc, run_dir, progress=False, stream=None).init_carry
    ck = Checkpointer(run_dir / "checkpoints", keep=2)
    state, meta = ck.restore(like)
    ck.close()
    assert meta["step"] == stopped and int(state["step"]) == stopped
    # and the same command finishes the run, bitwise equal to the uninterrupted one
    rerun = _start(cfg, run_dir)
    _, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    _check_metrics(run_dir)
    _assert_bitwise_equal(_params(run_dir), _reference(setup))


@pytest.mark.timeout(60)
def test_a_checkpoint_of_another_state_layout_is_an_error_not_a_restart(tmp_path):
    import jax.numpy as jnp

    from jaxopt2.experiment.checkpoint import Checkpointer

    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    old = {"params": jnp.ones((3, 4)), "roots": jnp.zeros((28, 8, 8))}  # one stacked leaf
    ck.save(5, old, {"step": 5, "train_time": 1.0})
    ck.close()
    # the same config's state today: the stack split into two leaves (another layout)
    like = {"params": jnp.ones((3, 4)), "roots": (jnp.zeros((14, 8, 8)), jnp.zeros((14, 8, 8)))}
    ck = Checkpointer(tmp_path / "checkpoints", keep=2)
    with pytest.raises(ValueError, match="another optimizer-state layout") as err:
        ck.restore(like)
    assert "holds 2 state leaves, the current config's state has 3" in str(err.value)
    # a state of the same layout still restores (one axis differing: the padded rows)
    padded = {"params": jnp.ones((3, 4)), "roots": jnp.zeros((32, 8, 8))}
    state, meta = ck.restore(padded)
    ck.close()
    assert meta["step"] == 5 and state["roots"].shape == (32, 8, 8)
