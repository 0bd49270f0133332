"""A sweep survives SIGTERM and SIGKILL: the same command resumes from its checkpoint and the
results equal those of an uninterrupted sweep."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from tests.experiment.helpers import last_step, start_cli, wait_for_step

pytestmark = pytest.mark.timeout(300)

CONFIG = """\
steps: 4000
seed: 0
batch_size: 64
log_every: 10
task: {name: digits_classifier}
model: {name: mlp, hidden: [16]}
optimizer: {name: adam, learning_rate: 1.0e-3}
checkpoint: {every: 100, keep: 2}
"""
GRID = ["optimizer.learning_rate=1e-3,1e-2", "seed=0,1"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _numbers(results: dict) -> list[dict]:
    """What must not depend on an interruption: every member's losses and eval metrics."""
    skip = {"member"}
    return [{k: v for k, v in m.items() if k not in skip} for m in results["members"]]


def _finish(proc) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    return out


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
    # Every sweep runs as its own process (the test process runs jax with float64 enabled).
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(CONFIG)
    run_dir, ref_dir = tmp_path / "interrupted", tmp_path / "reference"
    args = ("sweep", str(cfg), *GRID, "--run-dir", str(run_dir), "--no-progress")
    ref = start_cli(
        "sweep", str(cfg), *GRID, "--run-dir", str(ref_dir), "--no-progress", cwd=tmp_path
    )
    try:
        proc = start_cli(*args, cwd=tmp_path)
        wait_for_step(proc, run_dir, 250)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert "Traceback" not in err and "resume" in err
        stopped = last_step(run_dir)
        assert 250 <= stopped < 4000
        names = (run_dir / "checkpoints").iterdir()
        ckpts = sorted(int(p.name) for p in names if p.name.isdigit())
        assert ckpts[-1] == stopped  # saved where it stopped, not at the last multiple of 100
        assert not (run_dir / "results.json").exists()

        proc = start_cli(*args, cwd=tmp_path)
        wait_for_step(proc, run_dir, stopped + 350)  # past at least one more checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert last_step(run_dir) < 4000

        out = _finish(start_cli(*args, cwd=tmp_path))
        resumed = int(out.split("resumed     from step ")[1].split()[0])
        assert stopped + 300 <= resumed < 4000
        _finish(ref)
    finally:
        if ref.poll() is None:
            ref.kill()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 4001, 10))  # no gaps, no duplicates
    ref_rows = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]  # bitwise, every chunk
    assert _numbers(_results(run_dir)) == _numbers(_results(ref_dir))
    assert _results(run_dir)["points"] == _results(ref_dir)["points"]

    # a finished sweep rerun on its directory restores the final state: nothing retrains
    out = _finish(start_cli(*args, cwd=tmp_path))
    assert "resumed     from step 4000" in out
    assert _numbers(_results(run_dir)) == _numbers(_results(ref_dir))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_resume_from_an_earlier_checkpoint_keeps_diverged_members(tmp_path, mode):
    """Diverged members (frozen under stop, counted under skip) survive a resume exactly."""
    from jaxopt2.experiment.sweep import sweep

    quadratic = str(Path(__file__).resolve().parents[2] / "configs" / "task_quadratic.yaml")
    args = [
        "optimizer.name=sgd",
        "optimizer.learning_rate=0.1,100",
        "seed=0,1",
        "steps=60",
        "log_every=10",
        "checkpoint.every=20",
        "checkpoint.keep=5",
        f"nonfinite={mode}",
    ]
    ref = sweep(quadratic, args, tmp_path / "a", progress=False, stream=None)
    sweep(quadratic, args, tmp_path / "b", progress=False, stream=None)
    for step in (40, 60):  # back to the checkpoint at step 20, as if killed at step 39
        shutil.rmtree(tmp_path / "b" / "checkpoints" / str(step))
    res = sweep(quadratic, args, tmp_path / "b", progress=False, stream=None)
    assert res.resumed_from == 20
    assert res.members == ref.members and res.points == ref.points
    if mode == "stop":
        assert [m["status"] for m in res.members] == ["complete"] * 2 + ["diverged"] * 2
    else:
        assert [m["nonfinite_steps"] > 0 for m in res.members] == [False] * 2 + [True] * 2

    def rows(d):
        lines = (tmp_path / d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in lines]

    assert rows("b") == rows("a")
