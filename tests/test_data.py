"""experiments.data: the torchvision sets read from small files in their real on-disk formats.

No network here, so each test writes a few images in the exact format torchvision reads
(CIFAR-10 python pickles, MNIST idx-ubyte, SVHN .mat) and loads them through the real
torchvision classes. torchvision checks md5 sums of CIFAR-10 and SVHN files against constants
of the real downloads (``CIFAR10.train_list``/``test_list``/``meta``, ``SVHN.split_list``),
which our small files cannot match. We monkeypatch only those constants, with the md5 sums of
the files we wrote, so that torchvision's own ``check_integrity`` still runs and still hashes
the files. MNIST's raw files are checked for existence only (``check_integrity(path)`` without
md5 in ``MNIST._check_exists``), so nothing is patched for MNIST.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import struct

import numpy as np
import pytest
import torch
import torchvision

from experiments.data import DATASETS, DatasetMissingError, load_dataset

CIFAR_N = 4  # images per batch file


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _cifar_images(rng, n):
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A CIFAR-10 directory with 5 train batches and a test batch of CIFAR_N images each."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, fname in enumerate(names):
        x = _cifar_images(rng, CIFAR_N)
        lab = [(3 * i + j) % 10 for j in range(CIFAR_N)]
        entry = {  # the keys of the real files (python-2 pickles read with latin1)
            "batch_label": f"batch {i}",
            "labels": lab,
            "data": x.reshape(CIFAR_N, 3072),  # row = 1024 red, 1024 green, 1024 blue
            "filenames": [f"img_{i}_{j}.png" for j in range(CIFAR_N)],
        }
        with open(folder / fname, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        images[fname], labels[fname] = x, lab
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"], "num_cases_per_batch": CIFAR_N,
            "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    C = torchvision.datasets.CIFAR10
    monkeypatch.setattr(C, "train_list", [[f, _md5(folder / f)] for f in names[:5]])
    monkeypatch.setattr(C, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(C, "meta", {**C.meta, "md5": _md5(folder / "batches.meta")})
    return tmp_path, names, images, labels


def _normalized(x_u8, name):
    spec = DATASETS[name]
    mean = np.array(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (x_u8.astype(np.float32) / 255.0 - mean) / std


def test_cifar10_reads_real_pickle_format(cifar_root):
    root, names, images, labels = cifar_root
    X, y = load_dataset("cifar10", root=root, train=True)
    assert X.shape == (5 * CIFAR_N, 3, 32, 32) and X.dtype == torch.float32
    assert y.dtype == torch.int64
    want_x = np.concatenate([images[f] for f in names[:5]])
    want_y = np.concatenate([labels[f] for f in names[:5]])
    np.testing.assert_allclose(X.numpy(), _normalized(want_x, "cifar10"), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), want_y)

    Xt, yt = load_dataset("cifar10", root=root, train=False)
    np.testing.assert_allclose(Xt.numpy(), _normalized(images["test_batch"], "cifar10"),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(yt.numpy(), labels["test_batch"])


def test_cifar10_subset_is_seeded(cifar_root):
    root, *_ = cifar_root
    X_all, y_all = load_dataset("cifar10", root=root)
    X1, y1 = load_dataset("cifar10", root=root, n=7, seed=3)
    X2, y2 = load_dataset("cifar10", root=root, n=7, seed=3)
    X3, _ = load_dataset("cifar10", root=root, n=7, seed=4)
    assert X1.shape == (7, 3, 32, 32)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    assert not torch.equal(X1, X3)
    idx = np.random.default_rng(3).permutation(len(y_all))[:7]
    assert torch.equal(X1, X_all[idx]) and torch.equal(y1, y_all[idx])


def test_cifar10_missing_files_error(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("cifar10", root=tmp_path)
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path / "cifar-10-batches-py") in msg
    for f in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert f in msg
    assert "torchvision.datasets.CIFAR10('ROOT'" in msg and "download=True" in msg


def test_cifar10_corrupted_file_error(cifar_root):
    root, *_ = cifar_root
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"truncated")
    with pytest.raises(DatasetMissingError, match="integrity check"):
        load_dataset("cifar10", root=root)


def _write_idx(path, array: np.ndarray):
    """idx-ubyte: magic 0x0000 08 <ndim>, big-endian uint32 dims, then the uint8 data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    data = {}
    for prefix, n in (("train", 6), ("t10k", 3)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        data[prefix] = (x, y)
    return tmp_path, data


def test_mnist_reads_real_idx_format(mnist_root):
    root, data = mnist_root
    for train, prefix in ((True, "train"), (False, "t10k")):
        X, y = load_dataset("mnist", root=root, train=train)
        x_u8, y_u8 = data[prefix]
        assert X.shape == (len(y_u8), 1, 28, 28) and X.dtype == torch.float32
        assert y.dtype == torch.int64
        np.testing.assert_allclose(X.numpy(), _normalized(x_u8[:, None], "mnist"),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(y.numpy(), y_u8)


def test_mnist_missing_file_error(mnist_root):
    root, _ = mnist_root
    (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("mnist", root=root)
    msg = str(info.value)
    assert str(root / "MNIST" / "raw") in msg
    assert "missing: t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg
    assert "torchvision.datasets.MNIST('ROOT'" in msg


@pytest.fixture
def svhn_root(tmp_path, monkeypatch):
    import scipy.io

    rng = np.random.default_rng(2)
    S = torchvision.datasets.SVHN
    split_list = {k: list(v) for k, v in S.split_list.items()}
    data = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # the .mat layout HWCN
        y = np.array([10, 1, 2, 9, 10][:n], dtype=np.uint8).reshape(n, 1)  # digit 0 is "10"
        fname = split_list[split][1]
        scipy.io.savemat(tmp_path / fname, {"X": x, "y": y})
        split_list[split][2] = _md5(tmp_path / fname)
        data[split] = (x, y)
    monkeypatch.setattr(S, "split_list", split_list)
    return tmp_path, data


def test_svhn_reads_real_mat_format(svhn_root):
    root, data = svhn_root
    X, y = load_dataset("svhn", root=root, train=True)
    x, lab = data["train"]
    assert X.shape == (5, 3, 32, 32) and X.dtype == torch.float32 and y.dtype == torch.int64
    want = x.transpose(3, 2, 0, 1)  # HWCN -> NCHW
    np.testing.assert_allclose(X.numpy(), _normalized(want, "svhn"), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), [0, 1, 2, 9, 0])
    Xt, yt = load_dataset("svhn", root=root, train=False)
    assert Xt.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(yt.numpy(), [0, 1, 2])


def test_svhn_missing_file_error(tmp_path):
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("svhn", root=tmp_path, train=False)
    msg = str(info.value)
    assert "test_32x32.mat" in msg and str(tmp_path) in msg
    assert "split='test'" in msg


def test_digits_shapes_split_and_range():
    X, y = load_dataset("digits")
    Xt, yt = load_dataset("digits", train=False)
    assert X.shape == (1437, 1, 8, 8) and Xt.shape == (360, 1, 8, 8)
    assert X.dtype == torch.float32 and y.dtype == torch.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert set(y.tolist()) == set(range(10)) == set(yt.tolist())
    # the split is a partition of sklearn's 1797 images
    from sklearn.datasets import load_digits

    ref = np.sort((load_digits().data / 16.0).astype(np.float32).round(4), axis=0)
    both = np.sort(torch.cat([X, Xt]).reshape(-1, 64).numpy().round(4), axis=0)
    np.testing.assert_array_equal(both, ref)


def test_digits_subset_determinism():
    a = load_dataset("digits", n=50, seed=1)
    b = load_dataset("digits", n=50, seed=1)
    c = load_dataset("digits", n=50, seed=2)
    assert a[0].shape == (50, 1, 8, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="n=2000 is larger than the split"):
        load_dataset("digits", n=2000)
    with pytest.raises(ValueError, match="n=0"):
        load_dataset("digits", n=0)


def test_mnist1d_generated_deterministic_and_leaves_global_rng_alone():
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    X, y = load_dataset("mnist1d", n=200, seed=0)
    assert np.array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py
    assert X.shape == (200, 1, 40) and X.dtype == torch.float32 and y.dtype == torch.int64
    X2, y2 = load_dataset("mnist1d", n=200, seed=0)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    Xf, yf = load_dataset("mnist1d")
    Xt, _ = load_dataset("mnist1d", train=False)
    assert Xf.shape == (4000, 1, 40) and Xt.shape == (1000, 1, 40)
    assert set(yf.tolist()) == set(range(10))
    # a different generator seed gives a different data set
    Xo, _ = load_dataset("mnist1d", n=200, seed=0, num_samples=500, data_seed=7)
    assert Xo.shape == (200, 1, 40) and not torch.equal(Xo, X)


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown data set 'cifar100'"):
        load_dataset("cifar100")
    with pytest.raises(ValueError, match="takes no options"):
        load_dataset("digits", num_samples=10)
    with pytest.raises(ValueError, match="unknown options"):
        load_dataset("mnist1d", foo=1)
