"""experiments.gawu: the online mean correlation, the LR closed form, and GAWU's switch."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from experiments.gawu import GAWU, FixedSwitchWU, OnlineMeanCorrelation, gradients_of


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _dummy_opt(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _run(sched, opt, grads):
    """Feeds one synthetic gradient per step; returns the LR each step used."""
    lrs = []
    for g in grads:
        if g is not None:
            sched.observe(g)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def _mean_corr_slow(G: np.ndarray, h: int) -> np.ndarray:
    """Paper's eq. 3 directly: mu_k = mean_{m=1}^{h-1} cos(G[k+m-1], G[k+m])."""
    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
    return np.array([np.mean([cos(G[k + m - 1], G[k + m]) for m in range(1, h)])
                     for k in range(len(G) - h + 1)])


def _crossing_gradients(T, cross, d=50, seed=0, after=-0.7):
    """Adjacent cosines +0.9 before step `cross`, then `after`: an AR(1) sequence of directions.

    ``after`` is not -0.9 on purpose: with +-0.9 a window holding as many positive as negative
    cosines averages to an exact 0 that rounding decides (+5.6e-17 or -2.8e-17)."""
    rng = np.random.default_rng(seed)
    G = [rng.normal(size=d)]
    for t in range(1, T):
        rho = 0.9 if t < cross else after
        u = G[-1] / np.linalg.norm(G[-1])
        noise = rng.normal(size=d)
        noise -= (noise @ u) * u
        noise /= np.linalg.norm(noise)
        G.append((rho * u + math.sqrt(1 - rho**2) * noise) * rng.uniform(0.5, 2.0))
    return np.stack(G)


def test_online_mean_matches_paper_equation():
    G = np.random.default_rng(1).normal(size=(12, 30))
    tr = OnlineMeanCorrelation(window=4)
    for t, g in enumerate(G):
        tr.update(torch.from_numpy(g).float(), t)
    slow = _mean_corr_slow(G, 4)
    # after observing step t the trailing mean is the paper's mu_{t-h+1}
    np.testing.assert_allclose(tr.means[3:], slow, rtol=1e-6, atol=1e-6)
    assert all(math.isnan(m) for m in tr.means[:3])
    assert math.isnan(tr.cosines[0])


def test_online_mean_from_parameter_lists_in_float64():
    # two parameters; the second is huge, so float32 accumulation would lose the small one
    a = [torch.tensor([1.0, 0.0]), torch.tensor([1e4, 0.0])]
    b = [torch.tensor([0.0, 1.0]), torch.tensor([1e4, 1.0])]
    tr = OnlineMeanCorrelation(window=2)
    tr.update(a, 0)
    m = tr.update(b, 1)
    ga = np.array([1.0, 0.0, 1e4, 0.0])
    gb = np.array([0.0, 1.0, 1e4, 1.0])
    assert m == pytest.approx(ga @ gb / np.linalg.norm(ga) / np.linalg.norm(gb), rel=1e-12)


def test_gaps_and_zero_gradients_are_nan_not_adjacent():
    tr = OnlineMeanCorrelation(window=2)
    tr.update(torch.ones(3), 0)
    assert math.isnan(tr.update(torch.ones(3), 2))  # step 1 missing: lag 2 is not lag 1
    assert tr.update(torch.ones(3), 3) == pytest.approx(1.0)
    assert math.isnan(tr.update(torch.zeros(3), 4))  # zero gradient has no direction
    assert math.isnan(tr.cosines[-1])
    tr.update(torch.ones(3), 5)
    tr.update(torch.tensor([1.0, math.inf, 1.0]), 6)  # e.g. an AMP overflow step
    assert math.isnan(tr.cosines[-1])
    tr.update(torch.ones(3), 7)  # adjacent to the non-finite step 6: NaN
    tr.update(torch.ones(3), 8)
    assert math.isnan(tr.cosines[-2]) and tr.cosines[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step=4 is not after the last observed step 8"):
        tr.update(torch.ones(3), 4)


def test_gawu_switches_where_correlation_crosses():
    T, cross, h = 60, 25, 5
    G = _crossing_gradients(T, cross)
    opt = _dummy_opt()
    sched = GAWU(opt, T, window=h)
    _run(sched, opt, [torch.from_numpy(g) for g in G])
    # the trailing window ending at t holds cosines mu(t-3,t-2)..mu(t-1,t); it turns negative
    # once 3 of its h-1 = 4 cosines are -0.7 (2 of 4 give +0.1, far from a tie)
    slow = _mean_corr_slow(G, h)
    first_negative = next(k for k, m in enumerate(slow) if m < 0) + h - 1
    assert sched.switch_step == first_negative
    assert cross <= sched.switch_step <= cross + h - 2
    np.testing.assert_allclose(sched.history[h - 1:], slow, atol=1e-9)
    assert sched.history_steps == list(range(T))


def test_gawu_needs_positive_before_negative():
    # starts in zigzag (negative), turns smooth, then zigzag again: only the second turn counts
    T = 60
    rng = np.random.default_rng(3)
    signs = [-1] * 15 + [1] * 20 + [-1] * 25
    G, g = [], rng.normal(size=20)
    for s in signs:
        g = s * g + 0.05 * rng.normal(size=20)
        G.append(g.copy())
    opt = _dummy_opt()
    sched = GAWU(opt, T, window=3)
    _run(sched, opt, [torch.from_numpy(x) for x in G])
    assert 35 <= sched.switch_step <= 37


def test_lr_sequence_closed_form_and_cosine_end():
    T, s, eta0, omega, eta_min = 40, 12, 1e-3, 0.1, 1e-5
    opt = _dummy_opt()
    sched = FixedSwitchWU(opt, T, s, eta_0=eta0, omega=omega, eta_min=eta_min)
    lrs = _run(sched, opt, [None] * (T + 5))
    # warm-up by the recursion eta_k = exp(omega) * eta_{k-1}
    rec = [eta0]
    for _ in range(s):
        rec.append(math.exp(omega) * rec[-1])
    np.testing.assert_allclose(lrs[: s + 1], rec, rtol=1e-12)
    peak = eta0 * math.exp(omega * s)
    for k in range(s + 1, T):
        want = eta_min + (peak - eta_min) * (1 + math.cos(math.pi * (k - s) / (T - s))) / 2
        assert lrs[k] == pytest.approx(want, rel=1e-12)
    assert all(a > b for a, b in zip(lrs[s:T], lrs[s + 1:T]))  # strictly decreasing
    assert lrs[T:] == [eta_min] * 5  # at and past total_steps
    assert sched.get_last_lr() == [eta_min]


def test_max_lr_caps_the_warmup_and_the_cosine_starts_there():
    opt = _dummy_opt()
    sched = FixedSwitchWU(opt, 30, 20, eta_0=0.01, omega=0.5, max_lr=0.2)
    lrs = _run(sched, opt, [None] * 30)
    k_cap = math.ceil(math.log(0.2 / 0.01) / 0.5)
    np.testing.assert_allclose(lrs[:k_cap], 0.01 * np.exp(0.5 * np.arange(k_cap)), rtol=1e-12)
    assert lrs[k_cap:21] == [0.2] * (21 - k_cap)
    assert lrs[21] < 0.2 and lrs[21] == pytest.approx(0.1 * (1 + math.cos(math.pi / 10)))


def test_all_param_groups_get_the_schedule_and_state_dict_round_trips():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 5.0}], lr=1.0)
    G = _crossing_gradients(40, 15, d=5)
    sched = GAWU(opt, 40, eta_0=0.01, omega=0.1)
    for t in range(20):
        p1.grad, p2.grad = torch.from_numpy(G[t, :2]).float(), torch.from_numpy(G[t, 2:]).float()
        sched.observe(opt)
        opt.step()
        sched.step()
    assert sched.switch_step is not None
    assert [g["lr"] for g in opt.param_groups] == [sched.lr_at(20)] * 2
    # resume: a fresh scheduler loaded from the state continues identically
    opt2 = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=1.0)
    sched2 = GAWU(opt2, 40, eta_0=0.01, omega=0.1)
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    sched2.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(20, 25):
        p1.grad, p2.grad = torch.from_numpy(G[t, :2]).float(), torch.from_numpy(G[t, 2:]).float()
        assert sched.observe(opt) == sched2.observe(opt2)
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
        assert sched.get_last_lr() == sched2.get_last_lr()


def test_observe_twice_in_one_step_is_an_error():
    opt = _dummy_opt()
    sched = GAWU(opt, 10)
    sched.observe(torch.ones(3))
    with pytest.raises(RuntimeError, match="twice for step 0"):
        sched.observe(torch.ones(3))


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"total_steps": 0}, "total_steps=0"),
        ({"omega": -0.1}, "omega=-0.1"),
        ({"eta_0": 0}, "eta_0=0"),
        ({"max_lr": 1e-4}, "max_lr=0.0001"),
        ({"window": 1}, "window=1"),
        ({"eta_min": -1.0}, "eta_min=-1.0"),
    ],
)
def test_bad_arguments(kw, match):
    args = {"total_steps": 10, **kw}
    with pytest.raises(ValueError, match=match):
        GAWU(_dummy_opt(), **args)


def test_gradients_of_model_uses_zeros_for_missing_grads():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    m(torch.ones(1, 2)).sum().backward()
    m[1].bias.grad = None
    gs = gradients_of(m)
    assert [tuple(g.shape) for g in gs] == [(2, 2), (2,), (1, 2), (1,)]
    assert torch.equal(gs[3], torch.zeros(1))
    with pytest.raises(ValueError, match="cannot read gradients from a str"):
        gradients_of("model")


def _train_digits_gawu(seed=0, T=40):
    from experiments.data import load_dataset
    from experiments.models import build_model

    X, y = load_dataset("digits", n=500, seed=0)
    torch.manual_seed(seed)
    model = build_model("resnet_small", 10, 1, 8)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = GAWU(opt, T, eta_0=0.01, omega=0.15, eta_min=0.0)
    losses, lrs = [], []
    for _ in range(T):  # full-batch gradient descent
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        loss.backward()
        sched.observe(model)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        losses.append(loss.item())
    return sched, losses, lrs


def test_real_full_batch_training_finds_a_reproducible_switch():
    a, losses, lrs = _train_digits_gawu()
    b, losses_b, _ = _train_digits_gawu()
    assert a.switch_step is not None
    s = a.switch_step
    assert 5 < s < 38
    assert b.switch_step == s and losses_b == losses
    assert a.history[s] < 0 < a.history[s - 1]  # detected at the crossing
    assert lrs[s] == pytest.approx(0.01 * math.exp(0.15 * s)) and lrs[s + 1] < lrs[s]
    assert losses[-1] < losses[0]


def test_literal_warmup_form_is_the_papers_printed_recursion():
    """warmup_form='literal': eta_k = exp(omega k) eta_{k-1} (the paper's text), step by step."""
    from experiments.optim import build_lr_schedule

    T, s, eta0, omega = 30, 11, 1e-3, 0.1
    opt = _dummy_opt()
    sched = FixedSwitchWU(opt, T, s, eta_0=eta0, omega=omega, warmup_form="literal")
    lrs = _run(sched, opt, [None] * T)
    rec = [eta0]
    for k in range(1, s + 1):
        rec.append(math.exp(omega * k) * rec[-1])
    np.testing.assert_allclose(lrs[: s + 1], rec, rtol=1e-12)
    assert lrs[11] == pytest.approx(0.735, abs=1e-3)  # against 0.003 in the geometric form
    geo = FixedSwitchWU(_dummy_opt(), T, s, eta_0=eta0, omega=omega)
    assert geo.lr_at(11) == pytest.approx(eta0 * math.exp(1.1), rel=1e-12)
    peak = rec[-1]
    assert lrs[s + 1] == pytest.approx(peak * (1 + math.cos(math.pi / (T - s))) / 2, rel=1e-12)
    opt = _dummy_opt()
    built = build_lr_schedule("gawu", opt, 20, omega=0.1, eta_0=1e-3, warmup_form="literal")
    assert isinstance(built, GAWU) and built.warmup_form == "literal"
    assert built.lr_at(3) == pytest.approx(1e-3 * math.exp(0.6), rel=1e-12)
    with pytest.raises(ValueError, match="warmup_form='printed'"):
        FixedSwitchWU(_dummy_opt(), T, s, warmup_form="printed")
