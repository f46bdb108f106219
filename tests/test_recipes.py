"""Recipes: RunConfig validation, presets, config files and overrides, run_recipe end to end."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

import analysis
from gradtrace_format.format import read_header
from experiments.recipes import (
    PRESETS,
    RunConfig,
    apply_overrides,
    config_from_store,
    describe_presets,
    load_config,
    parse_overrides,
    preset_names,
    run_recipe,
)

warnings.filterwarnings("ignore", message="Consolidated metadata")

# a tiny classifier run: 64 digits, cnn3 width 4, a handful of steps (well under a second)
TINY = dict(name="tiny", model="cnn3", model_kwargs={"width": 4}, dataset="digits", n_train=64,
            optimizer="gd", lr=0.1, steps=6, num_threads=1)


def _grads(path) -> np.ndarray:
    g = zarr.open_group(str(path), mode="r")
    n = read_header(path).n_steps
    return np.asarray(g["grad"][: n - 1])  # every row but the final iterate


# --------------------------------------------------------------------------- presets
def test_every_preset_is_a_valid_config_with_a_description():
    docs = describe_presets()
    assert preset_names() == list(PRESETS)
    for name in PRESETS:
        cfg = PRESETS[name]
        assert cfg.name == name
        assert cfg.total_steps() >= 1
        assert docs[name], f"preset {name} has no description"


def test_paper_presets_hold_the_papers_settings():
    z = PRESETS["zigzag-cnn3-cifar10"]
    assert (z.model, z.dataset, z.optimizer, z.lr, z.epochs, z.batch_size) == ("cnn3", "cifar10", "gd", 0.1, 1500, None)
    assert z.total_steps() == 1500  # full batch: one step per epoch
    g = PRESETS["gawu-resnet18-cifar10"]
    assert (g.batch_size, g.lr_schedule, g.lr_schedule_kwargs) == (5000, "gawu", {"omega": 0.1, "eta_0": 0.001})
    assert g.steps_per_epoch() == 10
    n = PRESETS["nwt-resnet18-cifar10"]
    assert (n.optimizer, n.momentum, n.batch_size, n.weight_decay, n.epochs) == ("sgd", 0.9, 256, 1e-6, 190)


def test_demo_preset_is_plain_full_batch_gd_on_offline_data():
    d = PRESETS["demo"]
    assert d.dataset in ("digits", "mnist1d")
    assert d.optimizer == "gd" and d.batch_size is None and d.momentum == 0 and d.weight_decay == 0
    assert d.record == "every" and 200 <= d.total_steps() <= 400
    assert PRESETS["demo-quick"].total_steps() <= 200


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"optimizer": "gd", "batch_size": 32}, "full-batch"),
        ({"optimizer": "gd", "momentum": 0.9}, "momentum"),
        ({"steps": 10, "epochs": 2}, "exactly one of steps and epochs"),
        ({"steps": None, "epochs": None}, "exactly one of steps and epochs"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"lr": float("nan")}, "lr=nan"),
        ({"model": "resnet9000"}, "model='resnet9000' is unknown"),
        ({"dataset": "imagenet"}, "dataset='imagenet' is unknown"),
        ({"record": "sometimes"}, "record='sometimes'"),
        ({"grad_tier": "zip"}, "grad_tier='zip'"),
        ({"lr_schedule": "cosine", "lr_schedule_kwargs": {"warmup_steps": 3}}, "does not take ['warmup_steps']"),
        ({"lr_schedule": "wu"}, "switch_step"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"optimizer": "sgd", "batch_size": 10_000}, "larger than the training set"),
        ({"model": "alm"}, "set dataset=None"),
        ({"model_kwargs": [1, 2]}, "model_kwargs"),
    ],
)
def test_bad_configs_raise_value_errors_that_name_the_field(changes, fragment):
    with pytest.raises(ValueError, match=None) as err:
        RunConfig(**{**TINY, **changes})
    assert fragment in str(err.value)


def test_loss_defaults_to_the_models_own():
    assert RunConfig(**TINY).loss == "cross_entropy"
    assert RunConfig(name="s", model="sm", dataset=None, steps=3).loss == "objective"


def test_config_round_trips_through_a_dict_and_hashes():
    cfg = load_config("nwt-cnn3-digits")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert hash(cfg) == hash(RunConfig.from_dict(cfg.to_dict()))
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


# --------------------------------------------------------------------------- loading
def test_load_config_overrides_and_dotted_keys():
    cfg = load_config("demo", lr=0.001, **{"model_kwargs.width": 8})
    assert cfg.lr == 0.001 and cfg.model_kwargs == {"width": 8} and cfg.name == "demo"
    # steps <-> epochs switch: setting one clears the other
    assert load_config("demo", epochs=3).total_steps() == 3
    assert load_config("nwt-cnn3-digits", steps=5).epochs is None


def test_unknown_key_names_it_and_lists_the_valid_keys():
    with pytest.raises(ValueError) as err:
        load_config("demo", learning_rate=0.1)
    msg = str(err.value)
    assert "'learning_rate'" in msg and "valid keys" in msg and "lr" in msg and "batch_size" in msg


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'demoo'.*demo-quick"):
        load_config("demoo")


def test_load_config_from_json_and_toml(tmp_path):
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"preset": "demo", "lr": 0.05, "model_kwargs": {"width": 4}}))
    cfg = load_config(j, steps=7)
    assert (cfg.name, cfg.lr, cfg.model_kwargs, cfg.steps) == ("demo", 0.05, {"width": 4}, 7)

    t = tmp_path / "mine.toml"
    t.write_text('model = "mlp"\ndataset = "mnist1d"\noptimizer = "sgd"\nlr = 0.1\n'
                 'batch_size = 100\nepochs = 2\n[model_kwargs]\nhidden = [32]\n')
    cfg = load_config(t)
    assert (cfg.name, cfg.model, cfg.model_kwargs, cfg.batch_size) == ("mine", "mlp", {"hidden": [32]}, 100)
    assert cfg.total_steps() == 2 * 40  # 4000 examples / 100

    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "demo"\nlearnrate = 1\n')
    with pytest.raises(ValueError, match="unknown key 'learnrate'"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "x.yaml").write_text("lr: 1")
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(tmp_path / "x.yaml")


def test_parse_overrides_reads_json_values():
    got = parse_overrides(["lr=0.01", "batch_size=none", "standardize=true", "model_kwargs.hidden=[64, 32]",
                           "record=every:10", "name=my run"])
    assert got == {"lr": 0.01, "batch_size": None, "standardize": True, "model_kwargs.hidden": [64, 32],
                   "record": "every:10", "name": "my run"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["lr"])
    cfg = apply_overrides(PRESETS["demo"], parse_overrides(["steps=5", "model_kwargs.width=4"]))
    assert cfg.steps == 5 and cfg.model_kwargs["width"] == 4


# --------------------------------------------------------------------------- run_recipe
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "tiny.zarr"
    run_recipe(RunConfig(**TINY), path, progress=False)
    return path


def test_run_recipe_records_every_step_with_loss_lr_epoch(tiny_store):
    run = analysis.open_run(tiny_store)
    assert list(run.grad_steps) == list(range(6)) and run.final_step == 6
    loss = run.ds["loss"].values[:6]
    assert np.isfinite(loss).all() and loss[0] > loss[-1] and 2.0 < loss[0] < 2.6
    assert np.allclose(run.ds["lr"].values[:6], 0.1)
    assert list(run.ds["epoch"].values[:6]) == list(range(6))  # full batch: one step = one epoch
    header = read_header(tiny_store)
    assert header.settings["recipe"] == RunConfig(**TINY).to_dict()
    assert header.settings["data"]["n"] == 64
    assert header.settings["training"]["steps_run"] == 6
    assert config_from_store(tiny_store) == RunConfig(**TINY)


def test_recorded_gradient_is_the_exact_full_batch_gradient(tiny_store):
    """G_0 in the store equals autograd's gradient of the mean loss over all 64 examples."""
    import torch

    from experiments.train import build

    built = build(RunConfig(**TINY))
    loss = torch.nn.functional.cross_entropy(built.model(built.X), built.y)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in built.model.parameters()]).numpy()
    np.testing.assert_allclose(_grads(tiny_store)[0], g, rtol=1e-5, atol=1e-7)


def test_micro_batches_give_the_same_gradient(tmp_path, tiny_store):
    path = run_recipe(RunConfig(**{**TINY, "micro_batch": 10}), tmp_path / "mb.zarr", progress=False)
    np.testing.assert_allclose(_grads(path), _grads(tiny_store), rtol=1e-4, atol=1e-6)


def test_run_recipe_is_deterministic_for_a_seed(tmp_path, tiny_store):
    again = run_recipe(RunConfig(**TINY), tmp_path / "again.zarr", progress=False)
    np.testing.assert_array_equal(_grads(again), _grads(tiny_store))
    other = run_recipe(RunConfig(**{**TINY, "seed": 1}), tmp_path / "other.zarr", progress=False)
    assert not np.allclose(_grads(other)[0], _grads(tiny_store)[0])


def test_existing_store_needs_overwrite(tiny_store):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        run_recipe(RunConfig(**TINY), tiny_store, progress=False)
    with pytest.raises(ValueError, match="RunConfig"):
        run_recipe(TINY, tiny_store, overwrite=True)


def test_minibatch_sgd_epochs_and_batches(tmp_path):
    cfg = RunConfig(**{**TINY, "optimizer": "sgd", "momentum": 0.9, "batch_size": 16, "steps": None,
                       "epochs": 2, "record": "every", "standardize": True})
    assert cfg.steps_per_epoch() == 4 and cfg.total_steps() == 8
    path = run_recipe(cfg, tmp_path / "sgd.zarr", progress=False)
    run = analysis.open_run(path)
    assert list(run.ds["epoch"].values[:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert "standardization" in read_header(path).settings["data"]
    # minibatch gradients differ from step to step far more than full-batch ones would
    assert len(run.grad_steps) == 8


def test_record_epoch_schedule_and_sparse_recording(tmp_path):
    cfg = RunConfig(**{**TINY, "optimizer": "sgd", "batch_size": 16, "steps": None, "epochs": 3,
                       "record": "epoch"})
    run = analysis.open_run(run_recipe(cfg, tmp_path / "ep.zarr", progress=False))
    assert list(run.grad_steps) == [0, 4, 8] and run.final_step == 12


def test_objectives_run_as_recipes(tmp_path):
    sm = run_recipe(load_config("sm", steps=20), tmp_path / "sm.zarr", progress=False)
    run = analysis.open_run(sm)
    assert run.n_params == 100 and len(run.grad_steps) == 20
    alm = run_recipe(load_config("alm", epochs=1, **{"model_kwargs.n_samples": 64}), tmp_path / "alm.zarr",
                     progress=False)
    run = analysis.open_run(alm)
    assert len(run.grad_steps) == 4  # 64 samples / batch 16


def test_gawu_switch_step_is_stored(tmp_path):
    cfg = load_config("gawu-resnet_small-digits", n_train=128, batch_size=64, steps=6, num_threads=1)
    path = run_recipe(cfg, tmp_path / "g.zarr", progress=False)
    training = read_header(path).settings["training"]
    assert "switch_step" in training  # None here: 6 steps are too few to switch
    lr = analysis.open_run(path).ds["lr"].values[:6]
    np.testing.assert_allclose(lr, 0.001 * np.exp(0.1 * np.arange(6)), rtol=1e-6)  # exponential warm-up


def test_progress_lines(tmp_path, capsys):
    run_recipe(RunConfig(**TINY), tmp_path / "p.zarr", progress=2)
    err = capsys.readouterr().err
    assert "[tiny] cnn3 on digits (64 examples)" in err
    assert "step 2/6" in err and "step 6/6" in err and "s/step" in err and "done: 6 steps" in err
    run_recipe(RunConfig(**TINY), tmp_path / "p.zarr", overwrite=True, progress=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="progress"):
        run_recipe(RunConfig(**TINY), tmp_path / "p.zarr", overwrite=True, progress="loud")


# --------------------------------------------------------------------------- resume
def test_resume_after_a_crash_gives_the_uninterrupted_run(tmp_path, monkeypatch):
    """Momentum SGD (stateful): crash at step 7, resume from the checkpoint of step 5 (the
    rows of steps 5 and 6 are dropped and recorded again)."""
    from experiments import train

    cfg = RunConfig(**{**TINY, "optimizer": "sgd", "momentum": 0.9, "batch_size": 16, "steps": 10})
    ref = run_recipe(cfg, tmp_path / "ref.zarr", progress=False)
    assert not train.checkpoint_path(ref).exists()  # removed once the run finished

    real = train.Built.step_loss_and_grad
    calls = {"n": 0}

    def crashing(self, batch, micro_batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise RuntimeError("simulated crash")
        return real(self, batch, micro_batch)

    monkeypatch.setattr(train.Built, "step_loss_and_grad", crashing)
    path = tmp_path / "crash.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train.train_config(cfg, path, progress=False, checkpoint_every=5)
    monkeypatch.setattr(train.Built, "step_loss_and_grad", real)
    assert train.checkpoint_path(path).exists()
    assert list(analysis.open_run(path).steps) == list(range(7))  # 0..6 committed, not closed

    with pytest.raises(ValueError, match="different config"):
        run_recipe(cfg.replace(lr=0.2), path, resume=True, progress=False)
    run_recipe(cfg, path, resume=True, progress=False)
    a, b = analysis.open_run(path), analysis.open_run(ref)
    assert list(a.steps) == list(b.steps) == list(range(11))
    np.testing.assert_allclose(_grads(path), _grads(ref), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="finished run"):
        run_recipe(cfg, path, resume=True, progress=False)


def test_batchnorm_with_micro_batches_warns(tmp_path):
    cfg = RunConfig(name="bn", model="resnet_small", dataset="digits", n_train=64, optimizer="gd", lr=0.01,
                    steps=1, micro_batch=16, num_threads=1)
    with pytest.warns(UserWarning, match="BatchNorm"):
        run_recipe(cfg, tmp_path / "bn.zarr", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        run_recipe(cfg.replace(micro_batch=64), tmp_path / "bn2.zarr", progress=False)
