"""TrainerCallback records the gradient the optimizer steps with.

Plain SGD (no momentum, weight decay or clipping): every recorded row must satisfy
w_{t+1} = w_t - lr G_t (the final iterate closes the last row). Gradient accumulation must give
one row per optimizer step holding the accumulated gradient; clipping="after" records the clipped
gradient, clipping="before" the unclipped one.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import analysis as ga
from tests.helpers_callbacks import LR, TOL, assert_sgd_rows, clip_coef, rows

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from capture.callbacks import TrainerCallback  # noqa: E402


def hf_fit(tmp_path, *, clipping="after", accumulate=1, clip=0.0, steps=6, name="hf.zarr", context=False, setup=None,
           **extra):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 40, (48, 8), generator=g)
    labels = torch.randint(0, 3, (48,), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]}
            for i in range(48)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=clip,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=extra.pop("use_cpu", True),
        disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0, **extra)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cb = TrainerCallback(tmp_path / name, clipping=clipping)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb], optimizers=(opt, None))
    if setup is not None:
        setup(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if context:
            with cb:
                trainer.train()
        else:
            trainer.train()
    assert cb.recorder is None
    assert args.max_grad_norm == clip  # restored after clipping="before" took it over
    return tmp_path / name, trainer, (model, ids, labels)


def hf_loss(model, W_t, ids, labels, rows_):
    import copy

    m = copy.deepcopy(model).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(W_t), [p for p in m.parameters() if p.requires_grad])
    m.eval()
    with torch.no_grad():
        return m(input_ids=ids[rows_], attention_mask=torch.ones_like(ids[rows_]), labels=labels[rows_]).loss.item()


def test_transformers_plain_sgd_rows_are_the_update(tmp_path):
    path, trainer, (model, ids, labels) = hf_fit(tmp_path, steps=14)
    steps, G, W, loss, lr, epoch, _ = rows(path)
    assert list(steps) == list(range(14)) and trainer.state.global_step == 14
    assert_sgd_rows(G, W)
    assert np.allclose(lr, LR)
    assert list(epoch) == [0] * 12 + [1] * 2  # 48 / 4 = 12 steps per epoch
    for t in (0, 7):
        assert math.isclose(loss[t], hf_loss(model, W[t], ids, labels, slice(4 * t, 4 * t + 4)), rel_tol=1e-5)


def test_transformers_accumulation_records_once_per_optimizer_step(tmp_path):
    path, trainer, (model, ids, labels) = hf_fit(tmp_path, accumulate=2, steps=5, context=True)
    steps, G, W, loss, _, _, _ = rows(path)
    assert list(steps) == list(range(5)) and trainer.state.global_step == 5
    assert_sgd_rows(G, W)
    # The Trainer hands BERT (whose forward takes **kwargs) num_items_in_batch and then does not
    # divide by the accumulation steps; BERT's classification loss ignores it, so the optimizer
    # steps with the gradient of the SUM of the micro-batch losses. The stored loss is the
    # objective whose gradient is recorded: that sum (else the mean).
    factor = 1.0 if trainer.model_accepts_loss_kwargs else 0.5
    import copy

    m = copy.deepcopy(model).double()
    params = [p for p in m.parameters() if p.requires_grad]
    for t in (0, 3):
        torch.nn.utils.vector_to_parameters(torch.from_numpy(W[t]), params)
        m.zero_grad()
        parts = [m(input_ids=ids[b], attention_mask=torch.ones_like(ids[b]), labels=labels[b]).loss
                 for b in (slice(8 * t, 8 * t + 4), slice(8 * t + 4, 8 * t + 8))]
        objective = factor * (parts[0] + parts[1])
        objective.backward()
        g = torch.cat([p.grad.reshape(-1) for p in params]).numpy()
        assert math.isclose(loss[t], objective.item(), rel_tol=1e-5)
        assert np.abs(G[t] - g).max() <= 1e-5 * max(1.0, np.abs(g).max())


def test_transformers_clipping_before_and_after(tmp_path):
    clip = 0.05
    pa, _, _ = hf_fit(tmp_path, clipping="after", clip=clip, name="after.zarr")
    pb, _, _ = hf_fit(tmp_path, clipping="before", clip=clip, name="before.zarr")
    _, Ga, Wa, *_ = rows(pa)
    _, Gb, Wb, *_ = rows(pb)
    na, nb = np.sqrt((Ga * Ga).sum(1)), np.sqrt((Gb * Gb).sum(1))
    assert (nb > 2 * clip).all() and (na <= clip * (1 + 1e-5)).all()
    assert_sgd_rows(Ga, Wa)
    assert_sgd_rows(Gb, Wb, scale=clip_coef(Gb, clip))
    assert np.abs(Wa - Wb).max() <= TOL  # taking the clipping over changes nothing in the training
    assert np.allclose(Ga, Gb * clip_coef(Gb, clip)[:, None], rtol=0, atol=1e-6)


def test_transformers_failure_in_context_closes_without_final(tmp_path):
    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise RuntimeError("boom")

    torch.manual_seed(0)
    model = nn.Linear(4, 2)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = model

        def forward(self, x, labels):
            out = self.lin(x)
            return {"loss": nn.functional.cross_entropy(out, labels), "logits": out}

    data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(16)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=4,
                                          report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          remove_unused_columns=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        with TrainerCallback(tmp_path / "f.zarr") as cb:
            transformers.Trainer(model=Wrap(), args=args, train_dataset=data, callbacks=[cb, Stop()]).train()
    run = ga.open_run(tmp_path / "f.zarr")
    assert list(run.grad_steps) == [0, 1] and run.final_step is None and run.header.closed
    assert np.isfinite(run.ds["loss"].values).all()  # the loss came from the dict output


@pytest.mark.cuda
@pytest.mark.parametrize("clipping", ["after", "before"])
def test_transformers_fp16_records_the_unscaled_gradient(tmp_path, clipping):
    """fp16 (accelerate's GradScaler, on a GPU): each finite row is the update the optimizer
    made, so it was unscaled; a row the scaler skipped (Inf/NaN) left the weights unchanged."""
    clip = 0.05
    path, trainer, _ = hf_fit(tmp_path, clipping=clipping, clip=clip, steps=10, fp16=True, use_cpu=False)
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        pytest.skip("fp16 runs without a GradScaler here (accelerate uses one only on a GPU)")
    steps, G, W, loss, *_ = rows(path)
    assert list(steps) == list(range(10))
    ok = np.isfinite(G).all(axis=1)
    assert ok.sum() >= 3
    assert np.array_equal(W[1:][~ok], W[:-1][~ok])  # skipped: no update
    Gf, c = G[ok], (np.ones(ok.sum()) if clipping == "after" else clip_coef(G[ok], clip))
    err = np.abs(W[1:][ok] - (W[:-1][ok] - LR * c[:, None] * Gf)).max()
    assert err <= TOL


def test_transformers_loss_with_num_items_in_batch(tmp_path):
    """A model that takes loss kwargs gets num_items_in_batch and returns its micro-batch's share
    of the step's mean loss: the stored loss is the step's mean over both micro-batches."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, labels=None, **kwargs):
            out = self.lin(x)
            n = kwargs.get("num_items_in_batch")
            loss = nn.functional.cross_entropy(out, labels, reduction="sum") / n
            return {"loss": loss, "logits": out}

    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    data = [{"x": x[i], "labels": y[i]} for i in range(32)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential", remove_unused_columns=False)
    cb = TrainerCallback(tmp_path / "n.zarr")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[cb],
                                   optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert trainer.model_accepts_loss_kwargs
    steps, G, W, loss, *_ = rows(tmp_path / "n.zarr")
    assert list(steps) == [0, 1, 2]
    assert_sgd_rows(G, W)
    lin = nn.Linear(4, 3).double()
    for t in range(3):
        torch.nn.utils.vector_to_parameters(torch.from_numpy(W[t]), lin.parameters())
        b = slice(8 * t, 8 * t + 8)
        with torch.no_grad():
            want = nn.functional.cross_entropy(lin(x[b].double()), y[b]).item()
        assert math.isclose(loss[t], want, rel_tol=1e-5), (t, loss[t], want)


@pytest.mark.parametrize("native_amp,clip", [(True, 0.0), (True, 10.0), (False, 0.0)])
def test_transformers_fp16_records_the_unscaled_gradient(tmp_path, native_amp, clip):
    """fp16 with a GradScaler: the stored gradient is the one the optimizer steps with, not the
    scaled one (a loss scale of 2**8 would make w_(t+1) - w_t 256 times lr G_t), nor one
    divided by the scale twice.

    On CPU accelerate takes ``fp16=True`` but creates no GradScaler and leaves ``native_amp``
    off (both are on under CUDA), so the test installs a CPU ``torch.amp.GradScaler``: accelerate
    then scales the loss and its optimizer wrapper steps through ``scaler.step``.
    native_amp=True is accelerate on a GPU: the Trainer (5.x) has the scaler unscale before the
    callback's hook, with or without clipping (clip=10 is a norm these gradients never reach),
    and the Recorder must not divide again. native_amp=False: nothing unscales before the hook
    (as transformers 4.x without clipping), and the Recorder divides by the scale.
    """
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)

    def install(trainer):
        assert trainer.accelerator.mixed_precision == "fp16"
        trainer.accelerator.scaler = scaler
        trainer.accelerator.native_amp = native_amp

    path, trainer, _ = hf_fit(tmp_path, steps=5, clip=clip, fp16=True, setup=install)
    assert trainer.optimizer.scaler is scaler and scaler.get_scale() == 2.0**8  # used, no step skipped
    steps, G, W, *_ = rows(path)
    assert list(steps) == list(range(5))
    assert_sgd_rows(G, W)


def test_transformers_bf16_on_cpu(tmp_path):
    """bf16 autocast on CPU (no loss scaling exists for bf16): rows are still the SGD update."""
    path, trainer, _ = hf_fit(tmp_path, steps=4, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    _, G, W, *_ = rows(path)
    assert_sgd_rows(G, W)
