"""experiments.objectives: ALM and SM against direct numpy formulas (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.objectives import ALM, SM, alm_minibatches


def _np(t):
    return t.detach().numpy().astype(np.float64)


@pytest.mark.parametrize("reduction", ["rmse", "mean", "sum"])
def test_alm_value_and_gradient_match_numpy(reduction):
    alm = ALM(dim=7, n_samples=40, seed=3, reduction=reduction, dtype=torch.float64)
    x, y, w = _np(alm.x), _np(alm.y), _np(alm.w)
    idx = np.array([0, 5, 9, 11, 30])
    r = np.maximum(0.0, x[idx] @ w - y[idx])
    want = {"sum": np.sum(r**2), "mean": np.mean(r**2), "rmse": np.sqrt(np.mean(r**2))}
    grad_sum = 2 * (r[:, None] * x[idx]).sum(0)  # d/dw sum r_i^2
    want_grad = {
        "sum": grad_sum,
        "mean": grad_sum / len(idx),
        "rmse": grad_sum / len(idx) / (2 * np.sqrt(np.mean(r**2))),
    }
    assert 0 < (r > 0).sum() < len(idx)  # the batch has both active and inactive terms
    loss = alm.loss((alm.x[idx], alm.y[idx]))
    assert loss.item() == pytest.approx(want[reduction], rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(_np(alm.w.grad), want_grad[reduction], rtol=1e-10)


def test_alm_full_data_and_paper_formula():
    alm = ALM(dim=5, n_samples=30, seed=0, reduction="sum", dtype=torch.float64)
    x, y, w = _np(alm.x), _np(alm.y), _np(alm.w)
    # eq. 9: sum_i max(0, w^T x_i - y_i)^2 over all data
    want = sum(max(0.0, float(w @ x[i] - y[i])) ** 2 for i in range(30))
    assert alm.loss().item() == pytest.approx(want, rel=1e-12)


def test_alm_rmse_has_zero_gradient_when_no_term_is_active():
    alm = ALM(dim=3, n_samples=8, seed=0, init_scale=0.0)
    batch = (alm.x[:2], torch.full((2,), 5.0))  # w = 0, targets above: all residuals 0
    loss = alm.loss(batch)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(alm.w.grad, torch.zeros(3))


def test_alm_is_seeded_and_data_are_standard_normal():
    a, b, c = ALM(dim=50, n_samples=400, seed=1), ALM(dim=50, n_samples=400, seed=1), ALM(50, 400, 2)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.w, b.w)
    assert not torch.equal(a.x, c.x)
    assert abs(float(a.x.mean())) < 0.02 and abs(float(a.x.std()) - 1) < 0.02


def test_alm_minibatches_cover_each_epoch_once_and_are_seeded():
    alm = ALM(dim=4, n_samples=10, seed=0)
    batches = list(alm_minibatches(alm, 4, seed=5, epochs=2))
    assert [len(b[1]) for b in batches] == [4, 4, 2, 4, 4, 2]
    for epoch in (batches[:3], batches[3:]):
        ys = torch.cat([b[1] for b in epoch])
        assert torch.equal(ys.sort().values, alm.y.sort().values)
    again = list(alm_minibatches(alm, 4, seed=5, epochs=2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(batches, again))
    other = next(alm_minibatches(alm, 4, seed=6))
    assert not torch.equal(other[0], batches[0][0])
    assert [len(b[1]) for b in alm_minibatches(alm, 4, epochs=1, drop_last=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size=11 exceeds n_samples=10"):
        next(alm_minibatches(alm, 11))


def test_sm_value_and_gradient_match_numpy():
    sm = SM(dim=9, seed=4, dtype=torch.float64)
    a, w = _np(sm.a), _np(sm.w)
    want = np.sum(w**2) + 100 * np.sum(np.sin(a * w) ** 2)
    loss = sm.loss()
    assert loss.item() == pytest.approx(want, rel=1e-12)
    loss.backward()
    # d/dw_i [w_i^2 + 100 sin^2(a_i w_i)] = 2 w_i + 100 a_i sin(2 a_i w_i)
    np.testing.assert_allclose(_np(sm.w.grad), 2 * w + 100 * a * np.sin(2 * a * w), rtol=1e-10)
    assert sm(None).item() == loss.item()  # deterministic: the batch is ignored


def test_sm_is_seeded():
    assert torch.equal(SM(5, seed=1).a, SM(5, seed=1).a)
    assert not torch.equal(SM(5, seed=1).a, SM(5, seed=2).a)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ALM(dim=0), "dim=0"),
        (lambda: ALM(reduction="l1"), "reduction='l1'"),
        (lambda: ALM(init_scale=-1), "init_scale=-1"),
        (lambda: SM(dim=2.5), "dim=2.5"),
        (lambda: ALM(dim=3, n_samples=4).loss((torch.zeros(2, 4), torch.zeros(2))), "(B, 3)"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        call()
