"""`jaxopt2 compare`: same task under several optimizers -> overlay plot and tables."""

from __future__ import annotations

import json

import pytest

from jaxopt2.cli import main
from jaxopt2.experiment.compare import parse_optimizers
from jaxopt2.experiment.errors import ConfigError

pytestmark = pytest.mark.timeout(180)


def test_parse_optimizers():
    assert parse_optimizers("adam, sgd:0.1") == [("adam", None), ("sgd", 0.1)]
    with pytest.raises(ConfigError):
        parse_optimizers("sgd:fast")


def test_compare_writes_plot_and_tables(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "quickstart",
            "--optimizers",
            "adam,sgd:0.1",
            "steps=20",
            "log_every=5",
            "model.hidden=[16]",
            "--run-dir",
            str(out_dir),
            "--no-progress",
        ]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| optimizer |" in stdout
    assert (out_dir / "compare.png").stat().st_size > 0
    assert "| adam |" in (out_dir / "compare.md").read_text()
    data = json.loads((out_dir / "compare.json").read_text())
    rows = {r["optimizer"]: r for r in data["results"]}
    assert set(rows) == {"adam", "sgd:0.1"}
    # the default target is the worst final loss: everyone reaches it, the worst at the end
    assert data["target_loss"] == max(r["final_loss"] for r in rows.values())
    for r in rows.values():
        assert r["status"] == "complete" and r["steps"] == 20
        assert r["steps_to_target"] is not None and r["seconds_to_target"] is not None
        assert r["mean_step_time_ms"] > 0
    assert rows["sgd:0.1"]["learning_rate"] == 0.1
    # same initialization and batches: the sub-runs differ only in the optimizer section
    a = (out_dir / "adam" / "config.yaml").read_text().split("optimizer:")[0]
    b = (out_dir / "sgd_lr0.1" / "config.yaml").read_text().split("optimizer:")[0]
    assert a == b


def test_compare_rejects_unknown_optimizer(tmp_path, capsys):
    rc = main(
        ["compare", "quickstart", "--optimizers", "adam,nope", "--run-dir", str(tmp_path / "c")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "nope" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_compare_kronecker_family_from_the_shampoo_config(tmp_path, capsys):
    """adam, muon, shampoo and soap on the digits autoencoder of configs/opt_shampoo.yaml
    (a narrower model and few steps; roots every 2 steps so preconditioning is exercised)."""
    out_dir = tmp_path / "kron"
    rc = main(
        [
            "compare",
            "opt_shampoo",
            "--optimizers",
            "adam,muon:0.01,shampoo,soap:3e-3",
            "steps=8",
            "log_every=4",
            "eval_every=8",
            "model.hidden=[32,16,32]",
            "optimizer.precondition_every=2",
            "--run-dir",
            str(out_dir),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = {
        r["optimizer"]: r for r in json.loads((out_dir / "compare.json").read_text())["results"]
    }
    assert set(rows) == {"adam", "muon:0.01", "shampoo", "soap:0.003"}
    losses = {name: r["final_loss"] for name, r in rows.items()}
    for name, r in rows.items():
        assert r["status"] == "complete" and r["steps"] == 8, (name, r)
    assert len(set(losses.values())) == 4, losses  # four different optimizers ran


def test_compare_kfac_keeps_its_adaptive_step(tmp_path, capsys):
    """kfac beside adam on the digits classifier (the task tags its loss): kfac keeps its
    adaptive step (learning rate None) instead of adam's rate; `kfac:lr` sets one."""
    out_dir = tmp_path / "kfac"
    rc = main(
        [
            "compare",
            "quickstart",
            "--optimizers",
            "adam,kfac,kfac:0.5",
            "steps=30",
            "log_every=10",
            "eval_every=30",
            "model.hidden=[16]",
            "--run-dir",
            str(out_dir),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rows = {
        r["optimizer"]: r for r in json.loads((out_dir / "compare.json").read_text())["results"]
    }
    assert rows["kfac"]["learning_rate"] is None
    assert rows["kfac:0.5"]["learning_rate"] == 0.5
    assert "learning_rate: null" in (out_dir / "kfac" / "config.yaml").read_text()
    for r in rows.values():
        assert r["status"] == "complete" and r["steps"] == 30
    # 30 steps of adaptive K-FAC fit the digits better than 30 of Adam at 1e-3 (cosine)
    assert rows["kfac"]["final_loss"] < rows["adam"]["final_loss"]
