"""Tasks on data files the user already has (nothing is downloaded): ``mnist`` and
``fashion_mnist`` (idx files), ``cifar10`` (python batches), ``npz``. The readers are in
:mod:`.loaders`; a missing or malformed file is a user error naming the file. Registered in
:data:`jaxopt2.experiment.tasks.TASKS`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxopt2.experiment import models as M
from jaxopt2.experiment.errors import ConfigError, DataFileError
from jaxopt2.experiment.loaders import DataError, load_cifar10, load_idx_dataset, load_npz
from jaxopt2.experiment.task_base import F32, Task, softmax_classifier

__all__ = ["ImageDirConfig", "NpzConfig", "build_cifar10", "build_idx", "build_npz"]


@dataclasses.dataclass
class ImageDirConfig:
    data_dir: str = ""  # the directory holding the dataset's files (required)
    num_train: int = 0  # use the first N training rows (0: all)
    num_eval: int = 0  # use the first N evaluation rows (0: all)


@dataclasses.dataclass
class NpzConfig:
    path: str = ""  # the .npz file with x_train, y_train, x_test, y_test (required)
    scale: float = 1.0  # multiply x by this (e.g. 0.00392156862745098 = 1/255 for pixels)
    num_train: int = 0  # use the first N training rows (0: all)
    num_eval: int = 0  # use the first N evaluation rows (0: all)


def _load(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a loader; its DataError (missing/malformed file) becomes the runner's UserError."""
    try:
        return fn(*args)
    except DataError as e:
        raise DataFileError(f"task {what}: {e}") from None


def _required_path(key: str, value: str, what: str) -> str:
    if not value:
        raise ConfigError(f"{key} is required for task {what}: {_DATA_HELP[what]}")
    return os.path.expanduser(value)


_DATA_HELP = {
    "mnist": "the directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (or .gz)",
    "fashion_mnist": "the directory holding the four Fashion-MNIST idx files (as for mnist)",
    "cifar10": "the directory holding data_batch_1..5 and test_batch (CIFAR-10 python version)",
    "npz": "a .npz file with arrays x_train, y_train, x_test, y_test",
}


def _subset(key: str, n: int, total: int) -> int:
    if n < 0:
        raise ConfigError(f"{key} must be >= 0 (0: all), got {n}")
    return min(n, total) if n else total


def _image_classifier(
    cfg: ImageDirConfig, ds: Any, side: int, channels: int, model_name, model_cfg, key
) -> Task:
    """Flattened channel-major images (HWC -> CHW), a softmax classifier over 10 classes."""
    n_tr = _subset("task.num_train", cfg.num_train, len(ds.x_train))
    n_ev = _subset("task.num_eval", cfg.num_eval, len(ds.x_eval))

    def flat(x: np.ndarray) -> np.ndarray:
        if x.ndim == 4:  # [N, H, W, C] -> [N, C*H*W]
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x.reshape(len(x), -1), dtype=F32)

    xtr, ytr = flat(ds.x_train[:n_tr]), ds.y_train[:n_tr].astype(np.int32)
    xev, yev = flat(ds.x_eval[:n_ev]), ds.y_eval[:n_ev].astype(np.int32)
    model: M.CNN | M.MLP
    if model_name == "cnn":
        model = M.build_cnn(model_cfg, side, 10, key, in_channels=channels)
    else:
        model = M.build_mlp(model_cfg, xtr.shape[1], 10, key)
    return softmax_classifier(model, (xtr, ytr), (xev, yev))


def build_idx(what: str):
    def build(cfg: ImageDirConfig, model_name: str, model_cfg: Any, key: jax.Array):
        data_dir = _required_path("task.data_dir", cfg.data_dir, what)
        ds = _load(what, load_idx_dataset, data_dir)
        return _image_classifier(cfg, ds, 28, 1, model_name, model_cfg, key)

    return build


def build_cifar10(cfg: ImageDirConfig, model_name: str, model_cfg: Any, key: jax.Array):
    data_dir = _required_path("task.data_dir", cfg.data_dir, "cifar10")
    ds = _load("cifar10", load_cifar10, data_dir)
    return _image_classifier(cfg, ds, 32, 3, model_name, model_cfg, key)


def build_npz(cfg: NpzConfig, model_name: str, model_cfg: Any, key: jax.Array):
    path = _required_path("task.path", cfg.path, "npz")
    ds = _load("npz", load_npz, path)
    arrays = {}
    for name, x, y, n in (
        ("train", ds.x_train, ds.y_train, cfg.num_train),
        ("test", ds.x_eval, ds.y_eval, cfg.num_eval),
    ):
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataFileError(
                f"task npz: {path}: y_{name} must be a 1-D array of integer class labels, got "
                f"dtype {y.dtype} shape {y.shape}"
            )
        if len(y) == 0 or x.ndim < 1:
            raise DataFileError(f"task npz: {path}: x_{name} / y_{name} are empty")
        if y.min() < 0:
            raise DataFileError(f"task npz: {path}: y_{name} has negative labels")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
            raise DataFileError(f"task npz: {path}: x_{name} has non-numeric dtype {x.dtype}")
        k = _subset(f"task.num_{'train' if name == 'train' else 'eval'}", n, len(y))
        xf = (x[:k].reshape(k, -1).astype(np.float64) * cfg.scale).astype(F32)
        arrays[name] = (xf, y[:k].astype(np.int32))
    if arrays["train"][0].shape[1] != arrays["test"][0].shape[1]:
        raise DataFileError(
            f"task npz: {path}: x_train and x_test rows differ in size "
            f"({arrays['train'][0].shape[1]} vs {arrays['test'][0].shape[1]} values)"
        )
    n_classes = int(max(arrays["train"][1].max(), arrays["test"][1].max())) + 1
    model = M.build_mlp(model_cfg, arrays["train"][0].shape[1], max(n_classes, 2), key)
    return softmax_classifier(model, arrays["train"], arrays["test"])
