"""`jaxopt2 sweep`: one vmapped program equals the runner member by member; divergence is
reported per member; bad grids are short user errors."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from jaxopt2.cli import main
from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.errors import NonFiniteError
from jaxopt2.experiment.sweep import parse_sweep_args, sweep
from jaxopt2.experiment.trainer import run_config
from tests.experiment.helpers import assert_user_error

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "configs" / "task_digits_classifier.yaml")
QUADRATIC = str(ROOT / "configs" / "task_quadratic.yaml")
LEAST_SQUARES = str(ROOT / "configs" / "task_least_squares.yaml")
SMALL = ["steps=30", "log_every=10", "batch_size=64", "model.hidden=[16]"]
# Up to 0.05: above that, Adam on this net is chaotic within 30 steps and float32 rounding
# differences (a batched matmul sums in another order than a single one) grow past 1e-5.
LRS = [1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2]


def _grid_args(member: dict) -> list[str]:
    out = [f"{k}={member[k]!r}" for k in member if k.startswith("optimizer.")]
    return [*out, f"seed={member['seed']}"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-30)


# Members rerun one by one with the runner: both seeds, the smallest and largest learning rates
# and one between (a sequential run compiles its own program: all 16 took ~45 s on 2 cores).
CHECKED_MEMBERS = (0, 5, 10, 15)


def test_sweep_matches_sequential_runs(tmp_path, record_property):
    grid = ["optimizer.learning_rate=" + ",".join(map(str, LRS)), "seed=0,1"]
    t0 = time.perf_counter()
    res = sweep(DIGITS, SMALL + grid, tmp_path / "sweep", progress=False, stream=None)
    sweep_wall = time.perf_counter() - t0
    assert res.traces == 1 and len(res.members) == 16
    assert [m["optimizer.learning_rate"] for m in res.members[::2]] == LRS
    assert [m["seed"] for m in res.members[:4]] == [0, 1, 0, 1]

    t0 = time.perf_counter()
    worst = 0.0
    for m in (res.members[i] for i in CHECKED_MEMBERS):
        rc, _ = load_config(DIGITS, SMALL + _grid_args(m))
        run = run_config(rc, tmp_path / f"run{m['member']}", progress=False, stream=None)
        s = run.summary
        assert run.status == "complete" and not m["diverged"]
        for key, run_key in (("final_loss", "final_loss"), ("final_loss_mean", "final_loss_mean")):
            worst = max(worst, _rel(s[run_key], m[key]))
            assert _rel(s[run_key], m[key]) < 1e-5, (m, key, s[run_key])
        assert _rel(s["final_eval_loss"], m["eval_loss"]) < 1e-5, (m, s)
    seq_wall = time.perf_counter() - t0
    record_property("sweep_wall_s", sweep_wall)
    record_property("sequential_wall_s", seq_wall)
    record_property("worst_relative_difference", worst)
    print(
        f"\nsweep {sweep_wall:.2f} s vs {len(CHECKED_MEMBERS)} sequential runs {seq_wall:.2f} s; "
        f"worst rel {worst:.2e}"
    )

    # outputs
    d = tmp_path / "sweep"
    for name in ("config.yaml", "grid.yaml", "results.json", "results.md", "metrics.jsonl"):
        assert (d / name).is_file(), name
    assert (d / "sweep.png").stat().st_size > 10_000
    data = json.loads((d / "results.json").read_text())
    assert len(data["members"]) == 16 and len(data["points"]) == 8
    p0 = data["points"][0]
    finals = [m["final_loss"] for m in data["members"][:2]]
    assert p0["final_loss_seed_mean"] == pytest.approx(np.mean(finals))
    assert p0["final_loss_seed_std"] == pytest.approx(np.std(finals, ddof=1))
    assert data["best"]["point"] in range(8)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(len(r["loss_mean"]) == 16 for r in rows)
    assert "learning_rate" in (d / "results.md").read_text()
    # the saved config trains the first member with `jaxopt2 run`
    rc0, _ = load_config(str(d / "config.yaml"))
    assert rc0.optimizer.learning_rate == LRS[0] and rc0.run.seed == 0


def test_diverging_member_is_reported_and_the_others_finish(tmp_path, capsys):
    args = ["optimizer.name=sgd", "optimizer.learning_rate=0.1,1,100", "steps=30", "log_every=10"]
    rc = main(["sweep", QUADRATIC, *args, "--run-dir", str(tmp_path / "s"), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "diverged    1/3" in out and "learning_rate=100" in out
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    ok, bad = data["members"][:2], data["members"][2]
    assert bad["diverged"] and bad["status"] == "diverged" and bad["final_loss"] is None
    assert all(not m["diverged"] and np.isfinite(m["final_loss"]) for m in ok)
    assert data["points"][2]["diverged"] == 1 and data["best"]["point"] in (0, 1)
    # the runner stops that config at the same step
    cfg, _ = load_config(
        QUADRATIC, ["optimizer.name=sgd", "optimizer.learning_rate=100", *args[2:]]
    )
    with pytest.raises(NonFiniteError, match=f"at step {bad['diverged_step']} "):
        run_config(cfg, tmp_path / "r", progress=False, stream=None)
    # non-finite values never reach the outputs
    assert "NaN" not in (tmp_path / "s" / "results.json").read_text()
    assert "NaN" not in (tmp_path / "s" / "metrics.jsonl").read_text()


def test_adahessian_sweep_matches_runs(tmp_path):
    """An optimizer that needs value_fn and key, with a cosine schedule's traced peak."""
    cfg = str(ROOT / "configs" / "opt_adahessian.yaml")
    small = ["steps=8", "log_every=4", "batch_size=32", "model.hidden=[16]", "optimizer.seed=3"]
    over = [*small, "optimizer.schedule=cosine", "optimizer.b2=0.99"]
    res = sweep(
        cfg,
        [*over, "optimizer.learning_rate=0.05,0.15"],
        tmp_path / "s",
        progress=False,
        stream=None,
    )
    assert len(res.members) == 2
    for m in res.members:
        rc, _ = load_config(cfg, over + _grid_args(m))
        s = run_config(rc, tmp_path / f"r{m['member']}", progress=False, stream=None).summary
        assert _rel(s["final_loss"], m["final_loss"]) < 1e-5, (m, s)


def test_sweep_logs_each_members_evaluations_and_diagnostics_like_runs(tmp_path):
    """eval_every and the diagnostics section work in a sweep as in a run: every member gets
    the runner's numbers (its own batches and diagnostics keys), and sharpness.png is drawn."""
    over = [
        "steps=20",
        "log_every=10",
        "eval_every=10",
        "batch_size=64",
        "model.hidden=[8]",
        "diagnostics.every=10",
        "diagnostics.top_k=2",
        "diagnostics.num_iters=12",
        "diagnostics.trace_probes=4",
        "diagnostics.grad_share=true",
    ]
    out = io.StringIO()
    res = sweep(
        DIGITS, [*over, "optimizer.learning_rate=1e-3,3e-2", "seed=0,1"], tmp_path / "s",
        progress=False, stream=out,
    )  # fmt: skip
    table = out.getvalue().split("learning_rate  final loss")[1].splitlines()
    assert table[0].split()[-2:] == ["sharpness", "2/lr"]
    assert table[1].split()[-1] == "2000" and table[2].split()[-1] == "66.67"  # 2/lr
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20]
    assert (tmp_path / "s" / "sharpness.png").stat().st_size > 10_000
    keys = ("sharpness", "trace", "trace_stderr", "grad_topk_share", "eval_loss", "eval_accuracy")
    for m in res.members[1:3]:  # two runs cover both seeds and both learning rates
        j = m["member"]
        rc, _ = load_config(DIGITS, over + _grid_args(m))
        run_dir = tmp_path / f"r{j}"
        run_config(rc, run_dir, progress=False, stream=None)
        run_rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        for row, run_row in zip(rows, run_rows, strict=True):
            for key in keys:
                assert _rel(run_row[key], row[key][j]) < 1e-4, (j, row["step"], key)
            for a, b in zip(run_row["top_eigenvalues"], row["top_eigenvalues"][j], strict=True):
                assert _rel(a, b) < 1e-4
        assert m["final_sharpness"] == rows[-1]["sharpness"][j]
        with (
            np.load(tmp_path / "s" / "params.npz") as stacked,
            np.load(run_dir / "params.npz") as one,
        ):
            assert stacked.files == one.files
            for name in one.files:
                assert stacked[name].shape == (4, *one[name].shape)
                np.testing.assert_allclose(stacked[name][j], one[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["optimizer.learning_rate=1e-3,,1e-2"], ["empty value"]),
        (["optimizer.learning_rate=fast,slow"], ["optimizer.learning_rate", "numbers", "fast"]),
        (["optimizer.learning_rate=nan,1"], ["finite"]),
        (["seed=0,x"], ["seed", "integers"]),
        (["seed=0,0"], ["repeats"]),
        (["optimizer.bogus=1,2"], ["optimizer.bogus", "adam"]),
        (["bogus=1,2"], ["bogus"]),
        ([".lr=1,2"], ["bad grid"]),
        (["steps=10,20"], ["steps", "static"]),
        (["batch_size=32,64"], ["batch_size", "static"]),
        (["model.hidden=8,16"], ["model.hidden", "static"]),
        (["task.name=a,b"], ["task.name", "static"]),
        (["checkpoint.every=1,2"], ["checkpoint.every", "static"]),
        (["optimizer.schedule=cosine,linear"], ["optimizer.schedule"]),
        (["optimizer.nesterov=0,1"], ["optimizer.nesterov", "static"]),
        (["optimizer.name=adahessian", "optimizer.update_every=1,2"], ["update_every", "static"]),
        (["optimizer.learning_rate=1,2", "optimizer.learning_rate=3,4"], ["twice"]),
        (["optimizer.learning_rate=1,2", "optimizer.learning_rate=3"], ["override"]),
        (["optimizer.min_lr_ratio=0.5,2"], ["min_lr_ratio=2", "min_lr_ratio"]),
        (["optimizer.name=adahessian", "optimizer.b1=0.9,1.5"], ["b1=1.5", "b1"]),
        (["steps=many", "optimizer.learning_rate=1,2"], ["steps"]),
    ],
)
def test_bad_grids_are_short_user_errors(args, needles, capsys, tmp_path):
    rc = main(["sweep", DIGITS, *args, "--run-dir", str(tmp_path / "s"), "--no-progress"])
    assert_user_error(capsys, rc, *needles)
    assert not (tmp_path / "s").exists()


def test_run_dir_rules(tmp_path, capsys):
    base = [QUADRATIC, "steps=4", "log_every=2", "task.dim=4", "--no-progress"]
    d = ["--run-dir", str(tmp_path / "s")]
    assert main(["sweep", *base, "optimizer.learning_rate=0.1,0.2", *d]) == 0
    assert main(["sweep", *base, "optimizer.learning_rate=0.1,0.2", *d]) == 0  # same: redone
    capsys.readouterr()
    rc = main(["sweep", *base, "optimizer.learning_rate=0.1,0.3", *d])
    assert_user_error(capsys, rc, "different sweep", "--overwrite")
    assert main(["sweep", *base, "optimizer.learning_rate=0.1,0.3", *d, "--overwrite"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    rc = main(
        ["sweep", *base, "optimizer.learning_rate=0.1,0.3", "--run-dir", str(tmp_path / "other")]
    )
    assert_user_error(capsys, rc, "no sweep")


def test_sharpness_without_a_learning_rate(tmp_path):
    """An optimizer left at its own default learning rate (learning_rate: null, constant
    schedule): the sweep reports sharpness with no 2/lr value and draws no stability line."""
    over = [
        "optimizer.name=adafactor",
        "optimizer.learning_rate=null",
        "optimizer.schedule=constant",
        "steps=20",
        "log_every=10",
        "eval_every=0",
        "diagnostics.every=10",
    ]
    out = io.StringIO()
    sweep(
        LEAST_SQUARES, [*over, "optimizer.decay_rate=0.7,0.8"], tmp_path / "s",
        progress=False, stream=out,
    )  # fmt: skip
    table = out.getvalue().split("decay_rate  final loss")[1].splitlines()
    assert table[0].split()[-2:] == ["sharpness", "2/lr"]
    assert [row.split()[-1] for row in table[1:3]] == ["—", "—"]
    assert (tmp_path / "s" / "sharpness.png").stat().st_size > 0


def test_grid_parsing():
    g = parse_sweep_args(
        ["optimizer.learning_rate=1e-3,3e-3", "model.hidden=[64,64]", "seed=0,2", "steps=5"]
    )
    assert g.axes == {"optimizer.learning_rate": [1e-3, 3e-3]}
    assert g.seeds == [0, 2]
    assert g.overrides == ["model.hidden=[64,64]", "steps=5"]
    assert len(g.points()) == 2
