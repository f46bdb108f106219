"""Paper parity on a real recorded run (issue: the papers' own definitions as options).

A short SGD training (momentum 0.9, weight decay 5e-4 on the weights, none on the biases:
two optimizer groups) recorded with the Recorder; the denominator="all" sign shift and the
"update" and "gradient+wd" RSI directions must equal a plain numpy computation on the store
read with ``xarray.open_zarr`` (no gradtrace code on the reference side) to 1e-9 relative.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

import analysis as ga
from gradtrace_format.format import FLAG_FINAL  # the one constant of the on-disk layout used here
from capture import Recorder

REL = 1e-9


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc1.bias[:8] = -3.0  # half the hidden units dead on every sample: exact zeros

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))  # ReLU: exact zeros in the gradient


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    model = MLP()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    plain = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": plain, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9)
    path = tmp_path_factory.mktemp("parity") / "sgd.zarr"
    with Recorder(model, path, opt) as rec:
        for step in range(25):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            rec.record(step, loss=loss)
            opt.step()
            opt.zero_grad()
    return path


def close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=REL, atol=0)


def plain(path):
    ds = xr.open_zarr(path)
    final = (ds.flags.values & FLAG_FINAL) != 0  # the final-iterate row (weights only)
    G = ds.grad.values[~final].astype(np.float64)
    W = ds.weight.values.astype(np.float64)  # every row, final iterate last
    return ds, G, W, ds.lr.values[~final].astype(np.float64)


def metrics(D, W, ref):
    diff = W - ref
    d2 = np.einsum("ij,ij->i", diff, diff)
    dd = np.einsum("ij,ij->i", D, diff)
    gg = np.einsum("ij,ij->i", D, D)
    return {"rsi": dd / d2, "eb": np.sqrt(gg / d2), "gamma": dd / np.sqrt(gg * d2), "eta_star": dd / gg,
            "distance": np.sqrt(d2)}


def test_sign_shift_all_matches_numpy(run):
    ds, G, _, _ = plain(run)
    got = ga.sign_shift_lag(run, 1, denominator="all")
    want = 100.0 * (G[:-1] * G[1:] < 0).sum(axis=1) / G.shape[1]
    close(got.sign_shift.values, want)
    assert got.attrs["denominator"] == "all"
    assert (G == 0).mean() > 0.05  # ReLU zeros: the two denominators really differ
    both = 100.0 * (G[:-1] * G[1:] < 0).sum(axis=1) / ((G[:-1] != 0) & (G[1:] != 0)).sum(axis=1)
    close(ga.sign_shift_lag(run, 1).sign_shift.values, both)
    assert want.max() > 0 and (both[want > 0] > 1.5 * want[want > 0]).all()


def test_rsi_update_matches_numpy(run):
    ds, G, W, lr = plain(run)
    D = (W[:-1] - W[1:]) / lr[:, None]
    got = ga.rsi(run, "final", direction="update")
    want = metrics(D, W[:-1], W[-1])
    for m, v in want.items():
        close(got[m].values[:-1], v[:-1])  # the last step: w_t+1 = w*, gamma = 1
    assert got.gamma.values[-1] == pytest.approx(1.0, abs=1e-12)
    # under momentum the update is not the gradient: the two directions really differ
    g = ga.rsi(run, "final")
    assert np.abs(g.gamma.values - got.gamma.values).max() > 0.05


def test_rsi_gradient_plus_wd_matches_numpy(run):
    ds, G, W, _ = plain(run)
    lam = np.zeros(G.shape[1])
    for name, off, size in zip(ds.tensor.values, ds.tensor_offset.values, ds.tensor_size.values):
        lam[off: off + size] = 5e-4 if str(name).endswith("weight") else 0.0
    D = G + lam * W[:-1]
    got = ga.rsi(run, "final", direction="gradient+wd")
    want = metrics(D, W[:-1], W[-1])
    for m, v in want.items():
        close(got[m].values, v)
    assert "fc1.weight=0.0005" in got.attrs["weight_decay"] and "fc1.bias=0" in got.attrs["weight_decay"]


# ---------------------------------------------------------------- clipping: which gradient is stored

def test_recorder_stores_the_pre_clipping_gradient_and_says_so(tmp_path):
    from gradtrace_format.format import read_header

    torch.manual_seed(1)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    out = {}
    for where in ("before_clip", "after_clip"):
        torch.manual_seed(1)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        raw, clipped = [], []
        path = tmp_path / f"{where}.zarr"
        with Recorder(model, path, opt, grad_recorded=where, settings={"grad_clip": 0.05}) as rec:
            for step in range(4):
                nn.functional.cross_entropy(model(x), y).backward()
                raw.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
                if where == "after_clip":
                    nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                rec.record(step)
                if where == "before_clip":
                    nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # in place, after record()
                clipped.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
                opt.step()
                opt.zero_grad()
        G = xr.open_zarr(path).grad.values[:4]
        want = np.array(raw if where == "before_clip" else clipped)
        np.testing.assert_array_equal(G, want)
        assert (np.linalg.norm(np.array(raw), axis=1) > 0.1).all()  # the clip really acted
        s = read_header(path).settings
        assert s["grad_recorded"] == where and s["grad_clip"] == 0.05
        out[where] = ga.rsi(path)
    assert out["before_clip"].attrs["grad_recorded"] == "before_clip"
    with pytest.raises(ValueError, match="grad_recorded='pre'"):
        Recorder(MLP(), tmp_path / "bad.zarr", grad_recorded="pre")


def test_recipe_clips_and_trains_with_mse(tmp_path):
    from gradtrace_format.format import read_header
    from experiments.recipes import RunConfig, run_recipe
    from experiments.train import build

    tiny = dict(name="clip", model="mlp", dataset="digits", n_train=64, optimizer="gd", lr=0.5, steps=4,
                num_threads=1, loss="mse", grad_clip=0.02)
    runs = {}
    for where in ("before_clip", "after_clip"):
        path = run_recipe(RunConfig(**tiny, grad_recorded=where), tmp_path / f"{where}.zarr", progress=False)
        runs[where] = xr.open_zarr(path)
        assert read_header(path).settings["grad_recorded"] == where
        assert read_header(path).settings["grad_clip"] == 0.02
    nb = np.sqrt(runs["before_clip"].grad_sqnorm.values[:4])
    na = np.sqrt(runs["after_clip"].grad_sqnorm.values[:4])
    assert (nb > 0.03).all()  # raw gradient above the threshold ...
    np.testing.assert_allclose(na, 0.02, rtol=1e-5)  # ... the clipped one at it
    # both runs take the same (clipped) steps: identical weights
    np.testing.assert_array_equal(runs["before_clip"].weight.values, runs["after_clip"].weight.values)
    # the MSE loss: step 0 equals mean((f(x) - onehot(y))^2) at w_0, and its gradient is stored
    built = build(RunConfig(**tiny))
    out = built.model(built.X)
    loss = ((out - nn.functional.one_hot(built.y, out.shape[1]).float()) ** 2).mean()
    loss.backward()
    assert float(runs["before_clip"].loss.values[0]) == pytest.approx(float(loss.detach()), rel=1e-6)
    g = torch.cat([p.grad.reshape(-1) for p in built.model.parameters()]).numpy()
    np.testing.assert_allclose(runs["before_clip"].grad.values[0], g, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="loss='hinge'"):
        RunConfig(**{**tiny, "loss": "hinge"})
    with pytest.raises(ValueError, match="grad_clip=-1"):
        RunConfig(**{**tiny, "grad_clip": -1})


def test_balancedness_absolute_form_is_conserved_on_a_deep_linear_network(tmp_path):
    """Seed 002: under (small-step) gradient descent on a deep linear network the absolute
    imbalance ||W_{j+1}^T W_{j+1} - W_j W_j^T||_F is conserved; the relative form falls as the
    norms grow, hiding it."""
    from experiments.recipes import RunConfig, run_recipe

    cfg = RunConfig(name="bal", model="linear_deep", model_kwargs={"depth": 3, "hidden": 16, "init_std": 0.05},
                    dataset="digits", n_train=256, standardize=True, loss="mse", optimizer="gd", lr=0.3, steps=120,
                    num_threads=1)
    path = run_recipe(cfg, tmp_path / "bal.zarr", progress=False)
    ab = ga.balancedness(path, form="absolute").values
    rel = ga.balancedness(path).values
    assert np.abs(ab / ab[0] - 1).max() < 0.01  # conserved to < 1% over the whole run
    assert (rel[-1] / rel[0]).min() < 0.8  # while the relative form fell by more than 20%
