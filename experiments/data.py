"""Data sets for recipes, as whole in-memory tensors (full-batch GD wants them that way).

One registry::

    X, y = load_dataset("cifar10", root="~/data", train=True, n=5000, seed=0)

returns ``X`` float32 of shape ``(N, C, *spatial)`` and ``y`` int64 of shape ``(N,)``; wrap
them in ``torch.utils.data.TensorDataset(X, y)`` for minibatches. :data:`DATASETS` holds a
:class:`DatasetSpec` per name, whose :meth:`DatasetSpec.model_kwargs` fit
:func:`experiments.models.build_model`.

- ``"cifar10"``, ``"mnist"``, ``"svhn"``: read through the real torchvision classes with
  ``download=False``. gradtrace never downloads: when the files are missing, or fail
  torchvision's integrity check, :class:`DatasetMissingError` names the directory and files
  expected and the command that fetches them on a machine with internet. Pixels are scaled
  to [0, 1], then normalised with the usual per-channel training-set mean and std.
- ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], shape
  ``(N, 1, 8, 8)``, a fixed stratified 80/20 train/test split (1,437 / 360).
- ``"mnist1d"``: generated procedurally by the ``mnist1d`` package's own generator (its
  default arguments, so 4,000 train / 1,000 test signals of length 40; nothing is downloaded),
  shape ``(N, 1, 40)``.

``n`` takes the first n examples after a shuffle seeded by ``seed``; with ``n=None`` the whole
split is returned in file order. ``root`` (torchvision sets only) defaults to the environment
variable ``GRADTRACE_DATA``, else ``./data``.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["DATASETS", "DatasetMissingError", "DatasetSpec", "load_dataset", "default_root"]


class DatasetMissingError(FileNotFoundError):
    """The files of a data set are not on disk (or are corrupted); the message says how to
    get them."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set looks like.

    Attributes:
        name: registry name.
        num_classes: number of labels (labels are ``0..num_classes-1``).
        in_channels: C of ``X``.
        image_size: spatial shape of one example: int for square images, ``(L,)`` for 1-D.
        n_train: size of the full train split.
        n_test: size of the full test split.
        mean: per-channel mean subtracted (after scaling to [0, 1]), or None.
        std: per-channel std divided by, or None.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int | tuple[int, ...]
    n_train: int
    n_test: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def model_kwargs(self) -> dict:
        """``{"num_classes", "in_channels", "image_size"}`` for ``build_model``."""
        return {
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
        }


DATASETS: dict[str, DatasetSpec] = {
    # Per-channel statistics of the training sets (the widely used values; CIFAR-10's std is
    # the true pixel std 0.247/0.243/0.261, not the often-copied 0.2023/0.1994/0.2010).
    "cifar10": DatasetSpec("cifar10", 10, 3, 32, 50_000, 10_000,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "mnist": DatasetSpec("mnist", 10, 1, 28, 60_000, 10_000, (0.1307,), (0.3081,)),
    "svhn": DatasetSpec("svhn", 10, 3, 32, 73_257, 26_032,
                        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "digits": DatasetSpec("digits", 10, 1, 8, 1_437, 360),
    "mnist1d": DatasetSpec("mnist1d", 10, 1, (40,), 4_000, 1_000),
}


def default_root() -> Path:
    """``$GRADTRACE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("GRADTRACE_DATA", "data")).expanduser()


def _subset_index(total: int, n: int | None, seed: int, name: str) -> np.ndarray | None:
    """Indices of the first n after a seeded shuffle, or None for "all, in order"."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{name}: n={n!r} must be a positive int or None (the whole split)")
    if n > total:
        raise ValueError(
            f"{name}: n={n} is larger than the split ({total} examples); pass n <= {total} "
            "or n=None"
        )
    return np.random.default_rng(seed).permutation(total)[:n]


def _to_float(images_u8: np.ndarray, spec: DatasetSpec) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 scaled to [0, 1] and normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).to(torch.float32).div_(255.0)
    if spec.mean is not None:
        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        x.sub_(mean).div_(std)
    return x


# --------------------------------------------------------------------------- torchvision sets
_FETCH = {
    "cifar10": "torchvision.datasets.CIFAR10('ROOT', train=True, download=True)",
    "mnist": "torchvision.datasets.MNIST('ROOT', train=True, download=True)",
    "svhn": "torchvision.datasets.SVHN('ROOT', split='{split}', download=True)",
}


def _expected_files(name: str, root: Path, train: bool) -> tuple[Path, list[str]]:
    """(directory, file names) that torchvision's class checks for this data set."""
    from torchvision import datasets as tvd

    if name == "cifar10":
        c = tvd.CIFAR10
        files = [f for f, _ in c.train_list + c.test_list] + [c.meta["filename"]]
        return root / c.base_folder, files
    if name == "mnist":
        return root / "MNIST" / "raw", [os.path.splitext(f)[0] for f, _ in tvd.MNIST.resources]
    split = "train" if train else "test"
    return root, [tvd.SVHN.split_list[split][1]]


def _open_torchvision(name: str, root: Path, train: bool):
    from torchvision import datasets as tvd

    folder, files = _expected_files(name, root, train)
    missing = [f for f in files if not (folder / f).is_file()]
    try:
        if name == "cifar10":
            return tvd.CIFAR10(str(root), train=train, download=False)
        if name == "mnist":
            return tvd.MNIST(str(root), train=train, download=False)
        return tvd.SVHN(str(root), split="train" if train else "test", download=False)
    except RuntimeError as err:
        fetch = _FETCH[name].format(split="train" if train else "test")
        what = (
            f"missing: {', '.join(missing)}" if missing else
            f"all of {', '.join(files)} are there but failed torchvision's integrity check "
            "(md5), so they are partial or corrupted: delete them and fetch them again"
        )
        raise DatasetMissingError(
            f"{name}: data set not found under {folder} ({what}). gradtrace never downloads. "
            f"On a machine with internet run\n"
            f"    python -c \"import torchvision; {fetch}\"\n"
            f"then copy ROOT's contents into {root} (so that {folder} holds "
            f"{', '.join(files)}), or pass root= / set GRADTRACE_DATA to where they are."
        ) from err


def _load_torchvision(name: str, root, train: bool, n, seed: int):
    spec = DATASETS[name]
    root = default_root() if root is None else Path(root).expanduser()
    ds = _open_torchvision(name, root, train)
    if name == "cifar10":
        images, labels = np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
        layout = "NHWC"
    elif name == "mnist":
        images, labels = ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)
        layout = "NCHW"
    else:
        images, labels = np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64)
        layout = "NCHW"
    idx = _subset_index(len(labels), n, seed, name)
    if idx is not None:  # subset before converting: 50k CIFAR images are 600 MB as float32
        images, labels = images[idx], labels[idx]
    if layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    return _to_float(images, spec), torch.from_numpy(np.ascontiguousarray(labels))


# --------------------------------------------------------------------------- bundled / generated
def _load_digits(root, train: bool, n, seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    # Fixed split, independent of `seed`, so train and test never overlap.
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DATASETS["digits"].n_test, stratify=y, random_state=0
    )
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    idx = _subset_index(len(y), n, seed, "digits")
    if idx is not None:
        x, y = x[idx], y[idx]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, data_seed: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = data_seed
    # make_dataset seeds and draws from the *global* numpy / random generators; restore them
    # so that loading data does not change the caller's random stream.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return (
        d["x"].astype(np.float32)[:, None], d["y"].astype(np.int64),
        d["x_test"].astype(np.float32)[:, None], d["y_test"].astype(np.int64),
    )


def _load_mnist1d(root, train: bool, n, seed: int, *, num_samples: int = 5000,
                  data_seed: int = 42):
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(f"mnist1d: num_samples={num_samples!r} must be an int >= 10 (default "
                         "5000: 4000 train, 1000 test)")
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays(num_samples, int(data_seed))
    x, y = (x_tr, y_tr) if train else (x_te, y_te)
    idx = _subset_index(len(y), n, seed, "mnist1d")
    x, y = (x.copy(), y.copy()) if idx is None else (x[idx], y[idx])
    return torch.from_numpy(x), torch.from_numpy(y)


_LOADERS: dict[str, Callable] = {
    "cifar10": functools.partial(_load_torchvision, "cifar10"),
    "mnist": functools.partial(_load_torchvision, "mnist"),
    "svhn": functools.partial(_load_torchvision, "svhn"),
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
}


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    train: bool = True,
    n: int | None = None,
    seed: int = 0,
    **kw,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split of a registered data set into memory.

    Args:
        name: a key of :data:`DATASETS`.
        root: directory holding torchvision's files (ignored by digits and mnist1d); default
            :func:`default_root`.
        train: the training split (True) or the test split.
        n: keep the first n examples after a shuffle seeded by ``seed``; None keeps the whole
            split in file order.
        seed: seed of that shuffle.
        **kw: data-set options; mnist1d takes ``num_samples`` (5000, split 80/20) and
            ``data_seed`` (42, the package's default: the canonical MNIST-1D).

    Returns:
        ``(X, y)``: ``X`` float32 ``(N, C, *spatial)`` (e.g. ``(N, 3, 32, 32)`` for CIFAR-10,
        ``(N, 1, 8, 8)`` for digits, ``(N, 1, 40)`` for mnist1d), ``y`` int64 ``(N,)``.

    Raises:
        DatasetMissingError: a torchvision data set's files are missing or corrupted.
        ValueError: unknown name, bad ``n``, or an option the data set does not take.

    Example:
        >>> X, y = load_dataset("digits", n=100, seed=1)
        >>> X.shape, X.dtype, y.dtype
        (torch.Size([100, 1, 8, 8]), torch.float32, torch.int64)
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(_LOADERS)}")
    if kw and name != "mnist1d":
        raise ValueError(f"{name} takes no options, got {sorted(kw)}")
    extra = set(kw) - {"num_samples", "data_seed"}
    if extra:
        raise ValueError(f"mnist1d: unknown options {sorted(extra)}; it takes num_samples, "
                         "data_seed")
    return _LOADERS[name](root, bool(train), n, seed, **kw)
