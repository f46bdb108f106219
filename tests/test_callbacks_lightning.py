"""LightningCallback records the gradient the optimizer steps with.

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

pl = pytest.importorskip("lightning.pytorch")
from capture.callbacks import LightningCallback  # noqa: E402


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def pl_data(n=96):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def pl_fit(tmp_path, *, clipping="after", accumulate=1, clip=None, steps=6, name="pl.zarr"):
    torch.manual_seed(0)
    x, y = pl_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    module = TinyModule()
    cb = LightningCallback(tmp_path / name, clipping=clipping)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulate,
                         gradient_clip_val=clip, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about dataloader workers
        trainer.fit(module, dl)
    assert cb.recorder is None  # closed at on_train_end
    return tmp_path / name, trainer, cb


def test_lightning_plain_sgd_rows_are_the_update(tmp_path):
    path, trainer, cb = pl_fit(tmp_path, steps=14)
    steps, G, W, loss, lr, epoch, _ = rows(path)
    assert list(steps) == list(range(14)) and trainer.global_step == 14 and cb.n_recorded == 14
    assert_sgd_rows(G, W)
    assert np.allclose(lr, LR)
    assert list(epoch) == [0] * 12 + [1] * 2  # 96 / 8 = 12 steps per epoch
    # the loss of step t is the loss of batch t at w_t
    x, y = pl_data()
    m = TinyModule().double()
    for t in (0, 5, 13):
        torch.nn.utils.vector_to_parameters(torch.from_numpy(W[t]), m.parameters())
        b = slice(8 * (t % 12), 8 * (t % 12) + 8)
        ref = nn.functional.cross_entropy(m.net(x[b].double()), y[b]).item()
        assert math.isclose(loss[t], ref, rel_tol=1e-5)


def test_lightning_accumulation_records_once_per_optimizer_step(tmp_path):
    path, trainer, _ = pl_fit(tmp_path, accumulate=2, steps=5)
    steps, G, W, loss, _, _, _ = rows(path)
    assert list(steps) == list(range(5)) and trainer.global_step == 5
    assert_sgd_rows(G, W)
    # the row is the gradient of the mean loss of both micro-batches at w_t, and so is the loss
    x, y = pl_data()
    m = TinyModule().double()
    for t in range(5):
        torch.nn.utils.vector_to_parameters(torch.from_numpy(W[t]), m.parameters())
        m.zero_grad()
        b = slice(16 * t, 16 * t + 16)  # two micro-batches of 8
        ls = [nn.functional.cross_entropy(m.net(x[s].double()), y[s])
              for s in (slice(b.start, b.start + 8), slice(b.start + 8, b.stop))]
        ((ls[0] + ls[1]) / 2).backward()
        g = torch.cat([p.grad.reshape(-1) for p in m.parameters()]).numpy()
        assert np.abs(G[t] - g).max() <= 1e-6 * max(1.0, np.abs(g).max())
        assert math.isclose(loss[t], (ls[0].item() + ls[1].item()) / 2, rel_tol=1e-5)


def test_lightning_clipping_before_and_after(tmp_path):
    clip = 0.05
    pa, _, _ = pl_fit(tmp_path, clipping="after", clip=clip, name="after.zarr")
    pb, _, _ = pl_fit(tmp_path, clipping="before", clip=clip, name="before.zarr")
    _, Ga, Wa, _, _, _, run_a = rows(pa)
    _, Gb, Wb, _, _, _, _ = rows(pb)
    na, nb = np.sqrt((Ga * Ga).sum(1)), np.sqrt((Gb * Gb).sum(1))
    assert (nb > 2 * clip).all()  # clipping bites at every step
    assert (na <= clip * (1 + 1e-5)).all()
    assert_sgd_rows(Ga, Wa)  # after: exactly what the optimizer applied
    assert_sgd_rows(Gb, Wb, scale=clip_coef(Gb, clip))  # before: the optimizer applied c_t G_t
    assert np.abs(Wa - Wb).max() <= TOL  # the same training either way
    assert np.allclose(Ga, Gb * clip_coef(Gb, clip)[:, None], rtol=0, atol=1e-6)
    assert "after clipping" in run_a.header.settings["recorded_gradient"]


def test_lightning_failure_closes_without_final(tmp_path):
    class Boom(TinyModule):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    x, y = pl_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cb = LightningCallback(tmp_path / "boom.zarr")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="boom"):
        warnings.simplefilter("ignore")
        trainer.fit(Boom(), dl)
    assert cb.recorder is None
    run = ga.open_run(tmp_path / "boom.zarr")
    assert list(run.grad_steps) == [0, 1, 2] and run.final_step is None and run.header.closed


def test_callback_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="clipping"):
        LightningCallback(tmp_path / "x.zarr", clipping="during")
    with pytest.raises(TypeError, match="optimizer"):
        LightningCallback(tmp_path / "x.zarr", optimizer=None)




@pytest.mark.parametrize("clipping", ["after", "before"])
def test_lightning_amp_records_the_unscaled_gradient(tmp_path, clipping):
    """A GradScaler with loss scale 1024 (CPU autocast to float16): the rows must still be the
    update the optimizer made, i.e. unscaled, and the loss unscaled too."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        plugin = MixedPrecision(precision="16-mixed", device="cpu", scaler=scaler)
    except (TypeError, RuntimeError, ValueError) as err:  # pragma: no cover - older torch/Lightning
        pytest.skip(f"no CPU GradScaler here: {err}")
    torch.manual_seed(0)
    x, y = pl_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    cb = LightningCallback(tmp_path / "amp.zarr", clipping=clipping)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, callbacks=[cb], plugins=[plugin], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModule(), dl)
    steps, G, W, loss, _, _, _ = rows(tmp_path / "amp.zarr")
    assert list(steps) == list(range(5))
    assert_sgd_rows(G, W)
    assert float(scaler.get_scale()) >= 1024.0  # the scale was in force (no skipped steps)
    assert (loss > 0.5).all() and (loss < 5).all()  # cross-entropy of 3 classes, not 1024x that


@pytest.mark.slow
def test_lightning_ddp_rank0_records_the_averaged_gradient(tmp_path):
    """Two gloo processes, each with its own half of every batch: only rank 0 writes, and what
    it writes is the all-reduced (averaged) gradient the optimizer applied on both ranks."""
    torch.manual_seed(0)
    x, y = pl_data()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    cb = LightningCallback(tmp_path / "ddp.zarr")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, callbacks=[cb],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(TinyModule(), dl)
    steps, G, W, _, _, _, run = rows(tmp_path / "ddp.zarr")
    assert list(steps) == [0, 1, 2, 3]
    assert run.header.settings["world_size"] == 2
    assert_sgd_rows(G, W)  # a rank's own gradient would not be the update
