"""The device path's stored rows equal the CPU path's: rows encoded by ``capture.encode``
(run here on CPU tensors, unchanged on CUDA) and written through
``StoreWriter.append(scalars=, encoded=)`` give the same store as numpy rows written the
usual way: data arrays bit for bit, per-tensor float64 sums to float64 rounding (the device
reduction adds in another order)."""

import numpy as np
import pytest
import torch
import xarray as xr

from gradtrace_format import format as fmt
from capture import encode
from capture.writer import StoreWriter

SHAPES = [("a", (37, 41)), ("b", (41,)), ("c", (300, 9)), ("d", (5,)), ("e", (1,))]


def rows(n, seed):
    rng = np.random.default_rng(seed)
    tensors = fmt.tensor_table(SHAPES)
    d = sum(t.size for t in tensors)
    out = []
    for _ in range(n):
        g = rng.standard_normal(d).astype(np.float32)
        g[rng.random(d) < 0.3] = 0.0  # exact zeros, as ReLU nets have
        g[:3] = [-0.0, 1e-42, -3e38]
        w = rng.standard_normal(d).astype(np.float32)
        out.append((g, w))
    return tensors, out


@pytest.mark.parametrize("tier", ["lossless", "lossless:raw", "rounded:7", "rounded:4", "rounded:12", "sketch:256"])
def test_device_encoded_rows_store_what_the_cpu_path_stores(tmp_path, tier):
    tensors, data = rows(4, 1)
    tiers = {"grad": tier, "weight": tier}
    cpu = StoreWriter(tmp_path / "cpu.zarr", tensors, tiers, param_chunk=512)
    dev = StoreWriter(tmp_path / "dev.zarr", tensors, tiers, param_chunk=512)
    enc = encode.DeviceEncoder(tensors, tiers, "cpu")
    for t, (g, w) in enumerate(data):
        cpu.append(t, g, w, loss=1.0, lr=0.1)
        out = enc.encode(torch.from_numpy(g), torch.from_numpy(w))
        scalars, encoded = encode.writer_rows({k: v.numpy().copy() for k, v in out.items()}, tiers)
        dev.append(t, None, None, loss=1.0, lr=0.1, scalars=scalars, encoded=encoded)
    g, w = data[-1]
    out = enc.encode(None, torch.from_numpy(w))
    scalars, encoded = encode.writer_rows({k: v.numpy().copy() for k, v in out.items()}, tiers)
    cpu.close(w, 4)
    dev.append(4, None, None, scalars=scalars, encoded=encoded)
    dev.close()
    a, b = xr.open_zarr(tmp_path / "cpu.zarr"), xr.open_zarr(tmp_path / "dev.zarr")
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if name.endswith(("sqnorm", "dot_weight", "sqnorm_tensor", "dot_weight_tensor")):
            np.testing.assert_allclose(y, x, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert np.array_equal(x.view(f"u{x.dtype.itemsize}") if x.dtype.kind == "f" else x,
                                  y.view(f"u{y.dtype.itemsize}") if y.dtype.kind == "f" else y), name


def test_encoded_rows_are_checked(tmp_path):
    tensors, data = rows(1, 2)
    sw = StoreWriter(tmp_path / "s.zarr", tensors, {"grad": "sketch:256", "weight": "lossless"})
    g, w = data[0]
    sc = (np.zeros(len(tensors)),) * 3
    with pytest.raises(ValueError, match="needs scalars"):
        sw.append(0, None, w, encoded={"grad": {"grad": g}})
    with pytest.raises(ValueError, match="sketch tier stores"):
        sw.append(0, None, w, scalars=sc, encoded={"grad": {"grad": g}})
    with pytest.raises(ValueError, match="holds float32 rows"):
        sw.append(0, g, None, scalars=sc, encoded={"weight": {"weight": w[:-1]}})
