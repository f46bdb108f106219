"""Full-batch gradients by micro-batches, and the GD identity read back with plain xarray."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

from capture import Recorder
from experiments.fullbatch import full_batch_gradient


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.Tanh(), nn.Linear(16, 3)
    )


def dataset(n=203, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("micro_batch", [1, 17, 64, None])
def test_equals_one_big_batch(micro_batch):
    torch.manual_seed(0)
    model = small_cnn()
    X, Y = dataset()
    loss = full_batch_gradient(model, nn.CrossEntropyLoss(), (X, Y), micro_batch=micro_batch)
    mine = grads(model)
    model.zero_grad()
    big = nn.functional.cross_entropy(model(X), Y)
    big.backward()
    ref = grads(model)
    assert torch.linalg.norm(mine - ref) / torch.linalg.norm(ref) < 1e-5
    assert loss == pytest.approx(float(big.detach()), rel=1e-6)


def test_data_loader_and_sum_reduction():
    torch.manual_seed(1)
    model = small_cnn()
    X, Y = dataset(100)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=30)
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # overwritten, not accumulated
    loss = full_batch_gradient(model, nn.CrossEntropyLoss(reduction="sum"), loader, micro_batch=7, reduction="sum")
    mine = grads(model)
    model.zero_grad()
    ref_loss = nn.functional.cross_entropy(model(X), Y)
    ref_loss.backward()
    assert torch.linalg.norm(mine - grads(model)) / torch.linalg.norm(grads(model)) < 1e-5
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-6)


def test_bad_input_is_named():
    model = small_cnn()
    with pytest.raises(ValueError, match="micro_batch"):
        full_batch_gradient(model, nn.CrossEntropyLoss(), dataset(), micro_batch=0)
    with pytest.raises(ValueError, match="no samples"):
        full_batch_gradient(model, nn.CrossEntropyLoss(), [])
    with pytest.raises(ValueError, match="scalar"):
        full_batch_gradient(model, nn.CrossEntropyLoss(reduction="none"), dataset(10))
    with pytest.raises(TypeError, match="pair of tensors"):
        full_batch_gradient(model, nn.CrossEntropyLoss(), [torch.zeros(3)])


def test_full_batch_gd_identity_read_back_with_plain_xarray(tmp_path):
    """w[t+1] - w[t] + lr[t] * G[t] = 0 to float32 precision on a full-batch plain-SGD run."""
    torch.manual_seed(2)
    model = small_cnn()
    X, Y = dataset(150)
    lrs = [0.5, 0.5, 0.25, 0.25, 0.1, 0.1, 0.05, 0.05]
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0])
    with Recorder(model, tmp_path / "gd.zarr", opt) as rec:
        for step, lr in enumerate(lrs):
            for group in opt.param_groups:
                group["lr"] = lr
            loss = full_batch_gradient(model, nn.CrossEntropyLoss(), (X, Y), micro_batch=40)
            rec.record(step, loss=loss, epoch=step)
            opt.step()
    ds = xr.open_zarr(tmp_path / "gd.zarr")  # plain xarray, nothing from gradtrace
    w = ds.weight.values.astype(np.float64)
    g = ds.grad.values[:-1].astype(np.float64)
    lr = ds.lr.values[:-1]
    np.testing.assert_array_equal(lr, lrs)
    np.testing.assert_array_equal(ds.epoch.values[:-1], np.arange(len(lrs)))
    step_vec = lr[:, None] * g
    residual = w[1:] - w[:-1] + step_vec
    bound = 2.0**-23 * (np.abs(w[1:]) + np.abs(step_vec))  # one float32 rounding of the update
    assert (np.abs(residual) <= bound).all()
    assert np.abs(step_vec).max() > 1e3 * np.abs(residual).max()  # the identity is not vacuous
    assert (np.diff(ds.loss.values[:-1]) < 0).sum() >= len(lrs) // 2
