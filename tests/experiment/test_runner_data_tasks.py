"""Tasks on files the user has (mnist, fashion_mnist, cifar10, npz), modular arithmetic and
the digits classifier's class subset (``task.classes``).

No data ship with the package, so tiny valid files are written here and trained on for two
steps through the command line; missing or malformed files are short user errors.
"""

from __future__ import annotations

import json
import pickle
import struct

import numpy as np
import pytest

from jaxopt2.cli import main
from jaxopt2.experiment.config import load_config
from jaxopt2.experiment.errors import ConfigError
from jaxopt2.experiment.trainer import Trainer
from tests.experiment.helpers import assert_user_error

pytestmark = pytest.mark.timeout(180)

FAST = ["steps=2", "log_every=2", "eval_every=2", "batch_size=4", "--no-progress"]


def _idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def _mnist_dir(root, n_train=6, n_eval=4):
    rng = np.random.default_rng(0)
    root.mkdir()
    for split, n in (("train", n_train), ("t10k", n_eval)):
        _idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(root / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n))
    return root


def _cifar_dir(root):
    rng = np.random.default_rng(1)
    root.mkdir()
    for name, n in (("data_batch_1", 5), ("test_batch", 3)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def _config(tmp_path, task: dict, model: dict) -> str:
    cfg = {
        "steps": 2,
        "task": task,
        "model": model,
        "optimizer": {"name": "adam", "learning_rate": 1e-3},
    }
    path = tmp_path / f"{task['name']}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return str(path)


def _trained(run_dir, n_train, n_eval):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["steps"] == 2
    assert np.isfinite(summary["final_loss"]) and 0.0 <= summary["final_eval_accuracy"] <= 1.0
    return summary


@pytest.mark.parametrize("task", ["mnist", "fashion_mnist"])
def test_idx_tasks_train_two_steps(task, tmp_path, capsys):
    data = _mnist_dir(tmp_path / "data")
    cfg = _config(tmp_path, {"name": task, "data_dir": str(data)}, {"name": "mlp", "hidden": [8]})
    assert main(["run", cfg, *FAST, "--run-dir", str(tmp_path / "run")]) == 0
    _trained(tmp_path / "run", 6, 4)
    rc, _ = load_config(cfg, ["task.num_train=5", "task.num_eval=3"])
    t = Trainer(rc, tmp_path / "unused", stream=None)
    assert t.train_data[0].shape == (5, 784) and t.eval_data[0].shape == (3, 784)
    assert float(t.train_data[0].max()) <= 1.0


def test_cifar10_trains_two_steps_with_the_cnn(tmp_path):
    data = _cifar_dir(tmp_path / "data")
    cfg = _config(
        tmp_path,
        {"name": "cifar10", "data_dir": str(data)},
        {"name": "cnn", "channels": [4], "kernel_size": 3},
    )
    assert main(["run", cfg, *FAST, "--run-dir", str(tmp_path / "run")]) == 0
    _trained(tmp_path / "run", 5, 3)
    rc, _ = load_config(cfg)
    t = Trainer(rc, tmp_path / "unused", stream=None)
    # channel-major flattening: the first 1024 values of a row are its red plane
    raw = pickle.loads((data / "data_batch_1").read_bytes())[b"data"]
    np.testing.assert_allclose(np.asarray(t.train_data[0][0]), raw[0] / 255.0, rtol=1e-6)


def test_npz_task_flattens_any_shape(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "toy.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (7, 2, 3), dtype=np.uint8),
        y_train=np.array([0, 1, 2, 0, 1, 2, 3]),
        x_test=rng.integers(0, 256, (3, 2, 3), dtype=np.uint8),
        y_test=np.array([1, 2, 0]),
    )
    task = {"name": "npz", "path": str(path), "scale": 1 / 255}
    cfg = _config(tmp_path, task, {"name": "mlp", "hidden": [8]})
    assert main(["run", cfg, *FAST, "--run-dir", str(tmp_path / "run")]) == 0
    _trained(tmp_path / "run", 7, 3)
    rc, _ = load_config(cfg)
    t = Trainer(rc, tmp_path / "unused", stream=None)
    assert t.train_data[0].shape == (7, 6) and float(t.train_data[0].max()) <= 1.0
    assert t.task.model.layers[-1].weight.shape[0] == 4  # classes 0..3


def test_missing_and_malformed_files_are_short_errors(tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "nowhere"
    cfg = _config(tmp_path, {"name": "mnist", "data_dir": str(missing)}, {"name": "mlp"})
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), str(missing))
    assert not run_dir.exists()  # reported before the run dir is made

    data = _mnist_dir(tmp_path / "data")
    bad = data / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-2])
    cfg = _config(tmp_path, {"name": "fashion_mnist", "data_dir": str(data)}, {"name": "mlp"})
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), str(bad), "truncated")

    cfg = _config(tmp_path, {"name": "cifar10", "data_dir": str(data)}, {"name": "mlp"})
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), "data_batch")

    npz = tmp_path / "float_labels.npz"
    x = np.zeros((3, 2), np.float32)
    np.savez(npz, x_train=x, y_train=np.ones(3) / 2, x_test=x, y_test=np.ones(3))
    cfg = _config(tmp_path, {"name": "npz", "path": str(npz)}, {"name": "mlp"})
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), str(npz), "y_train")
    cfg = _config(tmp_path, {"name": "npz", "path": str(tmp_path / "no.npz")}, {"name": "mlp"})
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), "no.npz", "not found")

    cfg = _config(tmp_path, {"name": "mnist"}, {"name": "mlp"})  # data_dir not given
    assert_user_error(capsys, main(["run", cfg, "--run-dir", str(run_dir)]), "task.data_dir")
    assert not run_dir.exists()


def test_modular_arithmetic_config_errors():
    for override, key in [
        ("task.operation=pow", "task.operation"),
        ("task.train_fraction=1.5", "task.train_fraction"),
        ("model.num_heads=3", "model.num_heads"),
    ]:
        rc, _ = load_config("task_modular_arithmetic", ["task.p=5", override])
        with pytest.raises(ConfigError, match=key):
            Trainer(rc, "unused", stream=None)


def test_digits_classifier_class_subset(tmp_path, capsys):
    """task.classes keeps only those digits in both splits, relabelled in the order given, and
    the model's output width follows; the default (all 10) resolves without the key."""
    from sklearn.datasets import load_digits

    classes = [7, 0, 3, 4, 9]
    full, _ = load_config("task_digits_classifier")
    assert "classes" not in full.data["task"]  # null is left out: older run dirs resume
    t_full = Trainer(full, tmp_path / "unused", stream=None)
    rc, _ = load_config("task_digits_classifier", [f"task.classes={classes}"])
    assert rc.data["task"]["classes"] == classes
    t = Trainer(rc, tmp_path / "unused", stream=None)
    assert t.task.model.layers[-1].weight.shape[0] == 5
    assert t_full.task.model.layers[-1].weight.shape[0] == 10
    digits = load_digits()
    for (x, y), (x_all, y_all) in [
        (t.train_data, t_full.train_data),
        (t.eval_data, t_full.eval_data),
    ]:
        x, y, x_all, y_all = map(np.asarray, (x, y, x_all, y_all))
        keep = np.isin(y_all, classes)
        assert x.shape == (keep.sum(), 64) and y.shape == (keep.sum(),) and y.dtype == np.int32
        assert sorted(np.unique(y).tolist()) == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(x, x_all[keep])  # same rows, same order
        np.testing.assert_array_equal(np.asarray(classes)[y], y_all[keep])  # i is classes[i]
        for xi, yi in zip(x[:20], y[:20], strict=True):  # each row is an image of its digit
            row = np.flatnonzero((digits.data / 16.0 == xi).all(axis=1))[0]
            assert digits.target[row] == classes[yi]
    cfg = _config(tmp_path, {"name": "digits_classifier", "classes": [2, 5]}, {"hidden": [4]})
    assert main(["run", cfg, *FAST, "--run-dir", str(tmp_path / "run")]) == 0
    _trained(tmp_path / "run", 0, 0)


@pytest.mark.parametrize(
    ("classes", "words"),
    [
        ("[3]", "at least 2"),
        ("[]", "at least 2"),
        ("[1,2,1]", "more than once"),
        ("[0,10]", "out of range"),
        ("[-1,2]", "out of range"),
        ("3", "expected a list"),
    ],
)
def test_digits_classifier_class_subset_errors(classes, words, tmp_path, capsys):
    with pytest.raises(ConfigError, match=rf"task\.classes.*{words}"):
        rc, _ = load_config("task_digits_classifier", [f"task.classes={classes}"])
        Trainer(rc, tmp_path / "unused", stream=None)
    run_dir = tmp_path / "run"
    code = main(
        ["run", "task_digits_classifier", f"task.classes={classes}", "--run-dir", str(run_dir)]
    )
    assert_user_error(capsys, code, "task.classes", words)
