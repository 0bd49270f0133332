"""Two processes on localhost form one data-parallel job (``jax.distributed`` over gloo, CPU
collectives): ``jaxopt2 run`` started once per process trains the same run as one process on
the same number of devices, each process building only its own rows of every batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxopt2.cli import main
from tests.distributed.common import needs_devices
from tests.experiment.helpers import cli_env

pytestmark = [needs_devices, pytest.mark.timeout(300)]

CONFIG = """\
steps: 30
seed: 4
batch_size: 64
log_every: 10
eval_every: 30
task: {name: digits_classifier}
model: {name: mlp, hidden: [24]}
optimizer: {name: shampoo, learning_rate: 0.01, block_size: 8, precondition_every: 5}
checkpoint: {every: 10, keep: 2}
mesh: {data: -1}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    cfg = tmp_path / "mp.yaml"
    cfg.write_text(CONFIG)
    job = tmp_path / "job"
    env = cli_env()
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # 2 x 2 = 4 devices
    port = _free_port()
    args = [sys.executable, "-m", "jaxopt2", "run", str(cfg), "--run-dir", str(job)]
    args += ["--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [
        subprocess.Popen([*args, "--process-id", str(i)], cwd=tmp_path, env=env, **pipes)
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    # process 0 reports, process 1 trains along (gloo's own connection lines aside)
    assert "complete" in outs[0][0] and "run dir" not in outs[1][0]
    # the same run in this process, on 4 of its devices
    single = tmp_path / "single"
    assert main(["run", str(cfg), "mesh.data=4", "--run-dir", str(single), "--no-progress"]) == 0
    with np.load(job / "params.npz") as a, np.load(single / "params.npz") as b:
        assert a.files == b.files
        for k in a.files:
            # float32 sums reduced in another order, over 30 steps: measured 1.5e-4 relative
            # with XLA's optimizations off (the suite's setting), under 1e-4 with them on
            assert np.max(np.abs(a[k] - b[k])) <= 5e-4 * np.max(np.abs(b[k])), k
    # the job fed its batches from the processes' own slices (the default of a job)
    summary = json.loads((job / "summary.json").read_text())
    assert summary["mesh"] == {"data": 4, "model": 1, "processes": 2, "feed": "host"}
    assert json.loads((single / "summary.json").read_text())["mesh"]["feed"] == "device"
    rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]  # one writer: no duplicated rows
    assert sorted(int(p.name) for p in (job / "checkpoints").iterdir()) == [20, 30]
