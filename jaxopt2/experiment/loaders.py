"""Readers for data files a user already has on disk: MNIST-style idx, CIFAR-10, .npz.

Nothing is downloaded. Each reader validates what it reads and raises :class:`DataError`
(a ValueError) with a message naming the file and the problem: a missing file, a bad magic
number, a truncated payload, inconsistent sizes.

Formats:

* idx (MNIST, Fashion-MNIST): a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
  big-endian uint32 sizes, then the big-endian payload. ``.gz`` files are read transparently.
* CIFAR-10 "python version": pickled dicts with ``data`` ``[N, 3072]`` uint8 (channel-major
  32x32 images) and ``labels``. They are unpickled with a restricted unpickler that only
  builds plain containers and NumPy arrays, never arbitrary objects.
* ``.npz``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (names configurable),
  loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pathlib
import pickle
from typing import Any

import numpy as np

__all__ = ["DataError", "Dataset", "load_cifar10", "load_idx_dataset", "load_npz", "read_idx"]


class DataError(ValueError):
    """A data file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and evaluation arrays (NumPy, host memory)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: pathlib.Path) -> bytes:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # a truncated .gz stream lands here
        raise DataError(f"cannot read {path}: {e}") from None


def read_idx(path: str | pathlib.Path) -> np.ndarray:
    """Read one idx file (optionally gzipped) into a NumPy array in native byte order."""
    path = pathlib.Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, not even an idx header")
    zero1, zero2, code, ndim = raw[:4]
    if zero1 != 0 or zero2 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        what = "truncated" if payload < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: shape {shape} needs {expected} bytes of data, found {payload}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _find(data_dir: pathlib.Path, stem: str) -> pathlib.Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"data file not found: {data_dir / stem} (or {stem}.gz) in data_dir {data_dir}")


def load_idx_dataset(data_dir: str | pathlib.Path) -> Dataset:
    """MNIST or Fashion-MNIST from the four standard idx files in `data_dir`.

    Images are returned as float32 in [0, 1] with shape ``[N, 28, 28]``; labels as int32.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir does not exist or is not a directory: {data_dir}")
    parts = []
    for split in ("train", "t10k"):
        x = read_idx(_find(data_dir, f"{split}-images-idx3-ubyte"))
        y = read_idx(_find(data_dir, f"{split}-labels-idx1-ubyte"))
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{split} images {x.shape} and labels {y.shape} in {data_dir} do not match"
            )
        parts += [(x.astype(np.float32) / 255.0), y.astype(np.int32)]
    return Dataset(*parts)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            # protocol-2 pickles written by Python 3 encode bytes through this; harmless.
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar_batch(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    raw = _read_bytes(path)
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(
            f"{path} is not a readable CIFAR batch (truncated or corrupt): {e}"
        ) from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR batch: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path} is not a CIFAR batch: it lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: data {data.shape} / labels {labels.shape} are not [N, 3072] / [N]"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def load_cifar10(data_dir: str | pathlib.Path) -> Dataset:
    """CIFAR-10 from ``data_batch_1..5`` and ``test_batch`` (the python version) in `data_dir`.

    Images are float32 in [0, 1], ``[N, 32, 32, 3]``; labels int32. A directory holding
    only some training batches is accepted (the batches present are used, in order).
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir does not exist or is not a directory: {data_dir}")
    train = [
        data_dir / f"data_batch_{i}"
        for i in range(1, 6)
        if (data_dir / f"data_batch_{i}").is_file()
    ]
    if not train:
        raise DataError(f"no CIFAR-10 training batches (data_batch_1..5) in {data_dir}")
    xs, ys = zip(*(_read_cifar_batch(p) for p in train), strict=True)
    x_eval, y_eval = _read_cifar_batch(data_dir / "test_batch")
    return Dataset(np.concatenate(xs), np.concatenate(ys), x_eval, y_eval)


def load_npz(
    path: str | pathlib.Path,
    *,
    keys: tuple[str, str, str, str] = ("x_train", "y_train", "x_test", "y_test"),
) -> Dataset:
    """A dataset from one ``.npz`` file holding train and evaluation arrays under `keys`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks arrays {missing}; it has {sorted(z.files)}")
            arrays = [np.asarray(z[k]) for k in keys]
    except DataError:
        raise
    except Exception as e:  # zipfile.BadZipFile, ValueError, EOFError on truncated files
        raise DataError(f"{path} is not a readable .npz file (truncated or corrupt): {e}") from None
    for (xk, yk), (x, y) in zip(
        ((keys[0], keys[1]), (keys[2], keys[3])),
        ((arrays[0], arrays[1]), (arrays[2], arrays[3])),
        strict=True,
    ):
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: {xk} has {x.shape[0]} rows but {yk} has {y.shape[0]}")
    return Dataset(*arrays)
