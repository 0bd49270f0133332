"""The runner on a mesh (the config's ``mesh`` section): a run on 8 simulated devices matches
the same run on one device, whether its batches are drawn on the devices or built by the host
(``mesh.feed``), and its checkpoints restore onto 4 devices and onto one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxopt2.cli import main
from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.engine import Engine
from jaxopt2.experiment.setup import build_setup
from tests.distributed.common import needs_devices

pytestmark = [needs_devices, pytest.mark.timeout(300)]

CONFIG = """\
steps: 40
seed: 2
batch_size: 64
log_every: 10
eval_every: 40
task: {name: digits_classifier}
model: {name: mlp, hidden: [24]}
optimizer: {name: shampoo, learning_rate: 0.01, block_size: 8, precondition_every: 5}
checkpoint: {every: 20, keep: 3}
"""


def _run(tmp: Path, name: str, *overrides: str) -> Path:
    cfg = tmp / "mesh.yaml"
    if not cfg.exists():
        cfg.write_text(CONFIG)
    run_dir = tmp / name
    assert main(["run", str(cfg), *overrides, "--run-dir", str(run_dir), "--no-progress"]) == 0
    return run_dir


def _params(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(run_dir / "params.npz") as z:
        return {k: z[k] for k in z.files}


def _assert_close(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = np.max(np.abs(a[k]))
        assert np.max(np.abs(a[k] - b[k])) <= rtol * scale, k


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mesh")
    return tmp, _run(tmp, "one_device"), _run(tmp, "eight", "mesh.data=-1")


@pytest.fixture(scope="module")
def host_fed(runs):
    tmp = runs[0]
    return _run(tmp, "eight_host_fed", "mesh.data=-1", "mesh.feed=host")


def test_mesh_run_matches_one_device(runs):
    _, one, eight = runs
    _assert_close(_params(one), _params(eight))
    saved = (eight / "config.yaml").read_text()
    assert "mesh:" in saved and "data: -1" in saved
    assert "mesh:" not in (one / "config.yaml").read_text()  # off: left out, as before
    l1 = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    l8 = [json.loads(x)["loss"] for x in (eight / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(l8, l1, rtol=1e-4)


def test_host_fed_run_is_the_same_run(runs, host_fed):
    _, one, eight = runs
    _assert_close(_params(one), _params(host_fed))
    _assert_close(_params(eight), _params(host_fed), rtol=1e-6)  # the same rows, fed otherwise
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows(host_fed)] == pytest.approx(
        [r["loss"] for r in rows(eight)], rel=1e-6
    )
    assert "feed: host" in (host_fed / "config.yaml").read_text()


def test_host_feed_builds_the_programs_batches_split_over_the_devices():
    rc, _ = load_config("quickstart", ["model.hidden=[8]", "mesh.data=-1", "mesh.feed=host"])
    rc_dev, _ = load_config("quickstart", ["model.hidden=[8]"])
    setup = build_setup(rc_dev)
    eng = Engine(rc, [build_setup(rc)])
    assert eng.host_feed and eng.fed and eng.train_data is None  # no device holds the set
    assert "train_data" not in vars(eng.setup)  # not even a default-device copy
    spe, bs, T = setup.steps_per_epoch, setup.batch_size, eng.chunk_len
    start = spe - 3  # the chunk crosses into the next epoch (a new order)
    fed = eng.chunk_data(start)
    for a, full in zip(fed, setup.train_data, strict=True):
        assert a.shape == (T, 1, bs, *full.shape[1:])
        assert tuple(a.sharding.spec)[:3] == (None, None, "data")
        assert {s.data.shape[2] for s in a.addressable_shards} == {bs // 8}
        drawn = [np.asarray(setup.batch((full,), np.int32(start + t))[0]) for t in range(T)]
        np.testing.assert_array_equal(np.asarray(a)[:, 0], np.stack(drawn))
    # a chunk donates the parameters and optimizer state it is given (no second copy)
    eng.compile()
    carry = eng.init()
    old = [x for x in jax.tree.leaves(carry) if isinstance(x, jax.Array)]
    new, _ = eng.chunk(carry, T, 0)
    assert old and all(x.is_deleted() for x in old)
    assert "train_data" not in vars(eng.setup) and "eval_data" not in vars(eng.setup)
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_sweep_on_the_mesh_matches_one_device(tmp_path):
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG)
    grid = ["optimizer.learning_rate=0.003,0.01", "seed=2,3", "steps=20", "checkpoint.every=20"]
    out = {}
    for name, mesh in {"one": [], "eight": ["mesh.data=-1", "mesh.feed=host"]}.items():
        run_dir = tmp_path / name
        assert (
            main(["sweep", str(cfg), *grid, *mesh, "--run-dir", str(run_dir), "--no-progress"]) == 0
        )
        out[name] = _params(run_dir)
    assert next(iter(out["one"].values())).shape[0] == 4  # every member, stacked
    _assert_close(out["one"], out["eight"])


@pytest.mark.parametrize("layout", [["mesh.data=4"], []], ids=["on_4_devices", "on_1_device"])
def test_checkpoint_from_8_devices_restores_elsewhere(runs, layout, capsys):
    tmp, _, eight = runs
    moved = tmp / f"moved_{len(layout)}"
    shutil.copytree(eight, moved)
    shutil.rmtree(moved / "checkpoints" / "40")  # as if killed after the step-20 checkpoint
    (moved / "params.npz").unlink()
    capsys.readouterr()
    _run(tmp, moved.name, *layout)
    assert "resumed from step 20" in capsys.readouterr().out
    _assert_close(_params(eight), _params(moved))


def test_mesh_errors_name_the_problem(tmp_path, capsys):
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(CONFIG)
    base = ["run", str(cfg), "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main([*base, "mesh.data=16"]) == 2
    err = capsys.readouterr().err
    assert "mesh.data x mesh.model = 16 x 1 = 16 devices, but there are 8" in err
    assert main([*base, "mesh.data=8", "batch_size=60"]) == 2
    assert "batch_size = 60 does not split over mesh.data = 8 devices" in capsys.readouterr().err
