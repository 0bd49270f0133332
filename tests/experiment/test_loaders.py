"""The on-disk loaders read exact idx / CIFAR / npz files written here and reject bad ones."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from jaxopt2.experiment.loaders import (
    DataError,
    load_cifar10,
    load_idx_dataset,
    load_npz,
    read_idx,
)

pytestmark = pytest.mark.timeout(60)


def _write_idx(path, arr, code=0x08):
    """The idx format written by hand: magic, big-endian sizes, big-endian payload."""
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    data = header + arr.astype(dtype).tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture()
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    xs = {"train": rng.integers(0, 256, (6, 28, 28)), "t10k": rng.integers(0, 256, (4, 28, 28))}
    ys = {"train": rng.integers(0, 10, 6), "t10k": rng.integers(0, 10, 4)}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte", xs[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", ys[split])  # gzipped too
    return tmp_path, xs, ys


def test_idx_roundtrip(mnist_dir):
    d, xs, ys = mnist_dir
    ds = load_idx_dataset(d)
    np.testing.assert_array_equal(ds.x_train, (xs["train"] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(ds.y_eval, ys["t10k"])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32


def test_idx_other_dtypes(tmp_path):
    a = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    _write_idx(tmp_path / "a.idx", a, code=0x0B)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), a)
    f = np.linspace(0, 1, 5, dtype=np.float32)
    _write_idx(tmp_path / "f.idx", f, code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), f)


def test_idx_truncated_and_bad_files(mnist_dir, tmp_path):
    d, _, _ = mnist_dir
    p = d / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_idx_dataset(d)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    with pytest.raises(DataError, match="data_dir does not exist"):
        load_idx_dataset(tmp_path / "empty_nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images"):
        load_idx_dataset(tmp_path / "empty")


@pytest.fixture()
def cifar_dir(tmp_path):
    rng = np.random.default_rng(1)
    batches = {}
    for name, n in (("data_batch_1", 5), ("data_batch_2", 3), ("test_batch", 4)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f, protocol=2)
        batches[name] = (data, labels)
    return tmp_path, batches


def test_cifar_reads_python_batches(cifar_dir):
    d, batches = cifar_dir
    ds = load_cifar10(d)
    assert ds.x_train.shape == (8, 32, 32, 3)
    data, labels = batches["data_batch_2"]
    # Channel-major rows: the red plane of the first image of batch 2 is its first 1024 bytes.
    np.testing.assert_array_equal(
        ds.x_train[5, :, :, 0], (data[0, :1024].reshape(32, 32) / 255.0).astype(np.float32)
    )
    np.testing.assert_array_equal(ds.y_train[5:], labels)
    np.testing.assert_array_equal(ds.y_eval, batches["test_batch"][1])


def test_cifar_rejects_truncated_and_hostile(cifar_dir):
    d, _ = cifar_dir
    p = d / "test_batch"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10(d)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        load_cifar10(d)


def test_npz(tmp_path):
    x = np.ones((5, 3), np.float32)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    ds = load_npz(p)
    np.testing.assert_array_equal(ds.x_eval, x[:2])
    np.savez(tmp_path / "m.npz", x_train=x, y_train=np.arange(4), x_test=x, y_test=np.arange(5))
    with pytest.raises(DataError, match="y_train has 4"):
        load_npz(tmp_path / "m.npz")
    np.savez(tmp_path / "k.npz", x_train=x)
    with pytest.raises(DataError, match="lacks"):
        load_npz(tmp_path / "k.npz")
    t = tmp_path / "t.npz"
    t.write_bytes(p.read_bytes()[:50])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_npz(t)
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "missing.npz")
