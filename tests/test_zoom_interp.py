"""Zoom branches (experiments.zoom) and linear interpolation between iterates (experiments.interpolate)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import zarr

import analysis
from gradtrace_format.format import StoreMismatchError, read_header
from experiments.interpolate import barrier_height, flat_parameters, interpolate, set_flat_parameters
from experiments.recipes import RunConfig, load_config, run_recipe
from experiments.train import build
from experiments.zoom import branch

warnings.filterwarnings("ignore", message="Consolidated metadata")

PARENT = RunConfig(name="parent", model="cnn3", model_kwargs={"width": 4}, dataset="digits", n_train=128,
                   standardize=True, optimizer="gd", lr=0.1, steps=12, num_threads=1)


def _rows(path, array: str) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(str(path), mode="r")
    n = read_header(path).n_steps
    return np.asarray(g["step"][:n]), np.asarray(g[array][:n])


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    path = tmp_path_factory.mktemp("zoom") / "parent.zarr"
    return run_recipe(PARENT, path, progress=False)


# --------------------------------------------------------------------------- zoom
def test_branch_names_its_parent_and_continues_its_step_numbers(parent, tmp_path):
    child = branch(parent, 5, None, tmp_path / "child.zarr", steps=4)
    header = read_header(child)
    assert header.parent == {"store": str(parent), "step": 5}
    info = header.settings["branch"]
    assert info["parent_step"] == 5 and info["parent_lr"] == 0.1
    assert info["lr"] == pytest.approx(0.001) and info["lr_factor"] == pytest.approx(0.01)  # default: 100x smaller
    run = analysis.open_run(child)
    assert list(run.grad_steps) == [5, 6, 7, 8] and run.final_step == 9
    np.testing.assert_allclose(run.ds["lr"].values[:4], 0.001)
    assert header.settings["recipe"]["lr"] == pytest.approx(0.001)


def test_branch_starts_exactly_at_the_parents_iterate(parent, tmp_path):
    child = branch(parent, 5, None, tmp_path / "c.zarr", lr=0.01, steps=2)
    ps, pw = _rows(parent, "weight")
    cs, cw = _rows(child, "weight")
    np.testing.assert_array_equal(cw[0], pw[list(ps).index(5)])  # w_5 restored bit for bit
    _, pg = _rows(parent, "grad")
    _, cg = _rows(child, "grad")
    np.testing.assert_allclose(cg[0], pg[5], rtol=1e-6, atol=1e-9)  # same weights, same full batch
    # and the branch really moved with its own lr: w_6 - w_5 = -0.01 G_5
    np.testing.assert_allclose(cw[1] - cw[0], -0.01 * cg[0], rtol=1e-3, atol=1e-7)


def test_branch_at_the_same_lr_reproduces_the_parent(parent, tmp_path):
    child = branch(parent, 4, None, tmp_path / "same.zarr", lr_factor=1.0, steps=8)
    _, pg = _rows(parent, "grad")
    cs, cg = _rows(child, "grad")
    np.testing.assert_allclose(cg[:8], pg[4:12], rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(cs, np.arange(4, 13))


def test_branch_a_plain_module(parent, tmp_path):
    built = build(PARENT)
    child = branch(parent, 5, built.model, tmp_path / "module.zarr", lr=0.05, steps=3,
                   data=(built.X, built.y))
    assert read_header(child).parent == {"store": str(parent), "step": 5}
    _, pg = _rows(parent, "grad")
    cs, cg = _rows(child, "grad")
    assert list(cs) == [5, 6, 7, 8]
    np.testing.assert_allclose(cg[0], pg[5], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(analysis.open_run(child).ds["lr"].values[:3], 0.05)


def test_branch_from_a_minibatch_run_sees_the_same_batches(tmp_path):
    cfg = PARENT.replace(name="sgd", optimizer="sgd", batch_size=32, steps=8)
    par = run_recipe(cfg, tmp_path / "sgdp.zarr", progress=False)
    child = branch(par, 3, None, tmp_path / "sgdc.zarr", lr_factor=1.0, steps=5)
    _, pg = _rows(par, "grad")
    _, cg = _rows(child, "grad")
    np.testing.assert_allclose(cg[:5], pg[3:8], rtol=1e-4, atol=1e-7)


def test_branch_bad_input(parent, tmp_path):
    with pytest.raises(analysis.StepNotFoundError, match="Nearest recorded steps"):
        branch(parent, 50, None, tmp_path / "x.zarr")
    with pytest.raises(ValueError, match="parent store itself"):
        branch(parent, 5, None, parent)
    with pytest.raises(ValueError, match="not both"):
        branch(parent, 5, None, tmp_path / "x.zarr", lr=0.1, lr_factor=0.1)
    with pytest.raises(ValueError, match="steps=0"):
        branch(parent, 5, None, tmp_path / "x.zarr", steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        branch(parent, 5, None, tmp_path / "x.zarr", lr=-1)
    with pytest.raises(ValueError, match="out_path is required"):
        branch(parent, 5)
    with pytest.raises(ValueError, match=r"data=\(X, y\)"):
        branch(parent, 5, build(PARENT).model, tmp_path / "x.zarr")
    with pytest.raises(StoreMismatchError):
        branch(parent, 5, PARENT.replace(model_kwargs={"width": 8}), tmp_path / "x.zarr")
    with pytest.raises(FileExistsError):
        branch(parent, 5, None, parent.with_name("other.zarr"), steps=1)  # first time fine
        branch(parent, 5, None, parent.with_name("other.zarr"), steps=1)


def test_branch_needs_restorable_weights(tmp_path):
    sketched = run_recipe(PARENT.replace(steps=3, weight_tier="sketch:64", grad_tier="sketch:64"),
                          tmp_path / "sk.zarr", progress=False)
    with pytest.raises(StoreMismatchError, match="sketch"):
        branch(sketched, 1, None, tmp_path / "b.zarr")


# --------------------------------------------------------------------------- interpolation
def test_barrier_height_definition():
    assert barrier_height([1.0, 1.5, 0.5]) == pytest.approx(0.5)
    assert barrier_height([2.0, 1.0, 0.5]) == 0.0  # monotone path: no barrier
    assert barrier_height([0.5, 3.0, 2.0]) == pytest.approx(1.0)  # measured from the higher end
    assert np.isnan(barrier_height([1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="both endpoints"):
        barrier_height([1.0])


def test_interpolation_endpoints_match_the_recorded_losses(parent):
    ds = interpolate(parent, 3, 10, n_points=5)
    assert ds.sizes == {"alpha": 5} and list(ds.alpha.values) == [0.0, 0.25, 0.5, 0.75, 1.0]
    loss = analysis.open_run(parent).ds["loss"]
    # the recorded loss of step t is the full-batch loss at w_t: the same number
    assert ds.attrs["loss_a"] == pytest.approx(float(loss.sel(step=3)), rel=1e-5)
    assert ds.attrs["loss_b"] == pytest.approx(float(loss.sel(step=10)), rel=1e-5)
    assert ds.attrs["steps"] == [3, 10] and ds.attrs["n_examples"] == 128
    assert ds.attrs["barrier"] == pytest.approx(barrier_height(ds["loss"])) and ds.attrs["barrier"] >= 0
    assert ((ds["accuracy"] >= 0) & (ds["accuracy"] <= 1)).all()


def test_interpolated_loss_against_a_direct_computation(parent):
    """alpha = 0.3 by hand: build w = 0.7 w_2 + 0.3 w_final from the stored rows, evaluate."""
    ds = interpolate(parent, 2, "final", alphas=[0.0, 0.3, 1.0])
    steps, w = _rows(parent, "weight")
    wa, wb = w[list(steps).index(2)].astype(np.float64), w[-1].astype(np.float64)
    built = build(PARENT)
    set_flat_parameters(built.model, torch.from_numpy(0.7 * wa + 0.3 * wb))
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(built.model(built.X), built.y).item()
    assert float(ds["loss"].sel(alpha=0.3)) == pytest.approx(want, rel=1e-5)
    assert ds.attrs["steps"] == [2, 12] and ds.attrs["b"] == "step 12"
    assert ds.attrs["distance"] == pytest.approx(np.linalg.norm(wb - wa), rel=1e-6)


def test_interpolation_endpoints_as_state_dict_checkpoint_and_vector(parent, tmp_path):
    built = build(PARENT)
    from capture.recorder import restore_weights

    restore_weights(built.model, parent, 12)
    sd = {k: v.clone() for k, v in built.model.state_dict().items()}
    ckpt = tmp_path / "final.pt"
    torch.save({"model": sd}, ckpt)
    vec = flat_parameters(built.model).numpy()
    ref = interpolate(parent, 0, "final", n_points=3)
    for b in (sd, str(ckpt), vec):
        ds = interpolate(parent, 0, b, n_points=3)
        np.testing.assert_allclose(ds["loss"].values, ref["loss"].values, rtol=1e-6)
    # no store at all: two vectors, explicit model and data
    restore_weights(built.model, parent, 0)
    v0 = flat_parameters(built.model).numpy()
    ds = interpolate(None, v0, vec, model=built.model, data=(built.X, built.y), n_points=3)
    np.testing.assert_allclose(ds["loss"].values, ref["loss"].values, rtol=1e-6)


def test_interpolation_on_the_test_split(parent):
    ds = interpolate(parent, 0, "final", n_points=2, data="test")
    assert ds.attrs["n_examples"] == 360  # digits' test split, standardized with train statistics
    assert ds["loss"].values[1] < ds["loss"].values[0]


def test_interpolation_bad_input(parent):
    with pytest.raises(ValueError, match="n_points"):
        interpolate(parent, 0, 1, n_points=1)
    with pytest.raises(ValueError, match="checkpoint"):
        interpolate(parent, 0, "nowhere.pt")
    with pytest.raises(ValueError, match="trainable parameters"):
        interpolate(parent, 0, np.zeros(7))
    with pytest.raises(ValueError, match="give a recorded step"):
        interpolate(parent, 0, 1.5)
    with pytest.raises(analysis.StepNotFoundError):
        interpolate(parent, 0, 99)
    with pytest.raises(ValueError, match="without a store"):
        interpolate(None, np.zeros(3), np.zeros(3))


def test_convex_objective_has_no_barrier(tmp_path):
    """ALM is convex (RMSE of a non-negative convex residual): the loss along any segment
    stays below the higher endpoint, so the barrier is 0 up to rounding."""
    alm = run_recipe(load_config("alm", epochs=2, num_threads=1), tmp_path / "alm.zarr", progress=False)
    ds = interpolate(alm, 0, "final", n_points=41)
    assert ds.attrs["barrier"] <= 1e-6 and ds.attrs["loss_a"] > ds.attrs["loss_b"]
    assert "accuracy" not in ds


def test_sm_barrier_against_the_closed_form():
    """SM from its global minimum w = 0 to w_b = pi / a (every coordinate in its next basin):
    L(alpha w_b) = alpha^2 ||w_b||^2 + 100 * d * sin(alpha pi)^2 in closed form."""
    from experiments.objectives import SM

    sm = SM(dim=5, seed=0, dtype=torch.float64)
    wb = (np.pi / sm.a.numpy()).astype(np.float64)
    ds = interpolate(None, np.zeros(5), wb, model=sm, data=None, n_points=21)
    al = ds.alpha.values
    want = al ** 2 * (wb ** 2).sum() + 100 * 5 * np.sin(al * np.pi) ** 2
    np.testing.assert_allclose(ds["loss"].values, want, rtol=1e-9, atol=1e-9)
    assert ds.attrs["barrier"] == pytest.approx(want.max() - max(want[0], want[-1]), rel=1e-9)
    assert ds.attrs["barrier"] > 100


def test_batchnorm_models_use_batch_statistics_and_keep_their_buffers(tmp_path):
    cfg = RunConfig(name="bn", model="resnet_small", dataset="digits", n_train=64, optimizer="sgd",
                    lr=0.05, batch_size=32, steps=3, num_threads=1)
    store = run_recipe(cfg, tmp_path / "bn.zarr", progress=False)
    built = build(cfg)
    before = {k: v.clone() for k, v in built.model.named_buffers()}
    ds = interpolate(store, 0, "final", model=built.model, data=(built.X, built.y), n_points=3)
    assert ds.attrs["batch_norm"] == "batch statistics"
    for k, v in built.model.named_buffers():
        assert torch.equal(v, before[k]), k


def test_branch_lr_factor_applies_to_the_rate_in_use_at_that_step(tmp_path):
    cfg = load_config("gawu-resnet_small-digits", n_train=128, batch_size=64, steps=6, num_threads=1)
    par = run_recipe(cfg, tmp_path / "warm.zarr", progress=False)
    child = branch(par, 4, None, tmp_path / "warm-branch.zarr", lr_factor=0.5, steps=2)
    info = read_header(child).settings["branch"]
    assert info["parent_lr"] == pytest.approx(0.001 * np.exp(0.4), rel=1e-6)  # the warm-up's rate at step 4
    np.testing.assert_allclose(analysis.open_run(child).ds["lr"].values[:2], 0.0005 * np.exp(0.4), rtol=1e-6)
    assert read_header(child).settings["recipe"]["lr_schedule"] == "constant"
