"""The command line: user errors are short and traceback-free; list; help; run-dir rules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxopt2.cli import main
from tests.experiment.helpers import assert_user_error

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
FAST = ["steps=2", "log_every=2", "model.hidden=[8]", "--no-progress"]


def _assert_cli_error(capsys, rc, *needles):
    return assert_user_error(capsys, rc, *needles, code=None)


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors exit directly
        return e.code


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["quickstart", "bogus_key=1"], ["bogus_key"]),
        (["quickstart", "optimizer.bogus_arg=1"], ["optimizer.bogus_arg", "adam"]),
        (["quickstart", "model.bogus=1"], ["model.bogus"]),
        (["quickstart", "checkpoint.bogus=1"], ["checkpoint.bogus"]),
        (["quickstart", "steps=many"], ["steps", "many"]),
        (["quickstart", "optimizer.learning_rate=fast"], ["optimizer.learning_rate"]),
        (["quickstart", "optimizer.nesterov=3"], ["optimizer.nesterov"]),
        (["quickstart", "model.hidden=[8,x]"], ["model.hidden"]),
        (["quickstart", "optimizer.name=no_such_opt"], ["no_such_opt", "adam"]),
        (["quickstart", "task.name=no_such_task"], ["no_such_task", "digits_classifier"]),
        (["quickstart", "model.name=cnnn"], ["cnnn"]),
        (["quickstart", "nonfinite=ignore"], ["nonfinite"]),
        (["quickstart", "optimizer.schedule=step"], ["optimizer.schedule"]),
        (["does/not/exist.yaml"], ["does/not/exist.yaml", "not found"]),
        (["quickstart", "novalue"], ["novalue"]),
        (["quickstart", "=3"], ["=3"]),
        (["quickstart", "--no-such-flag"], ["--no-such-flag"]),
    ],
)
def test_user_errors_are_short(args, needles, capsys, tmp_path):
    rc = _main(["run", *args, "--run-dir", str(tmp_path / "r")])
    _assert_cli_error(capsys, rc, *needles)


def test_argparse_errors_are_short(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run"])
    _assert_cli_error(capsys, e.value.code, "CONFIG")
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    _assert_cli_error(capsys, e.value.code, "frobnicate")


def test_bad_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n  task: {")
    rc = main(["run", str(bad), "--run-dir", str(tmp_path / "r")])
    _assert_cli_error(capsys, rc, "bad.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    rc = main(["run", str(listy), "--run-dir", str(tmp_path / "r")])
    _assert_cli_error(capsys, rc, "mapping")


def test_run_dir_conflict_resume_and_overwrite(tmp_path, capsys):
    run_dir = str(tmp_path / "r")
    assert main(["run", "quickstart", *FAST, "--run-dir", run_dir]) == 0
    out = capsys.readouterr().out
    assert "jaxopt2 run:" in out and "train loss" in out
    # same config again: resumes (already complete), no retraining
    assert main(["run", "quickstart", *FAST, "--run-dir", run_dir]) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    # a different config is refused ...
    rc = main(["run", "quickstart", *FAST, "seed=1", "--run-dir", run_dir])
    _assert_cli_error(capsys, rc, "different config", "seed", "--overwrite")
    # ... unless --overwrite
    assert main(["run", "quickstart", *FAST, "seed=1", "--run-dir", run_dir, "--overwrite"]) == 0
    # a non-empty directory that is not a run is never touched
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    rc = main(["run", "quickstart", *FAST, "--run-dir", str(other), "--overwrite"])
    _assert_cli_error(capsys, rc, "precious")
    assert (other / "thesis.tex").exists()


def test_default_run_dir_is_under_cwd(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "my_exp.yaml"
    cfg.write_text((ROOT / "configs/quickstart.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["run", "my_exp.yaml", *FAST]) == 0
    assert (tmp_path / "runs/my_exp/summary.json").is_file()
    assert (tmp_path / "runs/my_exp/config.yaml").is_file()


def test_list(capsys):
    from jaxopt2.experiment.tasks import TASKS
    from jaxopt2.optimizers import registry

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in [*registry.names(), *TASKS, "mlp", "cnn", "quickstart", "learning_rate"]:
        assert name in out, name


@pytest.mark.parametrize("sub", [[], ["run"], ["compare"], ["list"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([*sub, "--help"])
    assert e.value.code == 0
    assert "usage: jaxopt2" in capsys.readouterr().out


def test_real_process_missing_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxopt2", "run", "missing.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3 and "Traceback" not in proc.stderr
    assert "missing.yaml" in proc.stderr
