"""experiments.optim: optimizers by name, and every schedule's LR sequence against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.gawu import GAWU, FixedSwitchWU
from experiments.optim import SCHEDULES, build_lr_schedule, build_optimizer


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def _lrs(sched, opt, steps):
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(
    "name, kw, cls, check",
    [
        ("gd", {}, torch.optim.SGD, {"momentum": 0, "nesterov": False}),
        ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9}),
        ("adam", {"betas": (0.8, 0.99)}, torch.optim.Adam, {"betas": (0.8, 0.99)}),
        ("adamw", {"weight_decay": 0.05}, torch.optim.AdamW, {"weight_decay": 0.05}),
    ],
)
def test_build_optimizer(name, kw, cls, check):
    opt = build_optimizer(name, _params(), lr=0.1, **kw)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert group["lr"] == 0.1
    for k, v in check.items():
        assert group[k] == v


def test_gd_step_is_plain_gradient_descent():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer("gd", [p], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        (p.square().sum() / 2).backward()  # gradient = p
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.25, -0.5]))  # (1 - lr)^2 * p0


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("rmsprop", {}, "unknown optimizer 'rmsprop'"),
        ("gd", {"momentum": 0.9}, "use name='sgd'"),
        ("sgd", {"betas": (0.9, 0.99)}, "betas="),
        ("adam", {"momentum": 0.9}, "betas=\\(beta1, beta2\\) instead"),
        ("sgd", {"lr": -1.0}, "lr=-1.0"),
        ("sgd", {"momentum": 1.0}, "momentum=1.0"),
        ("sgd", {"nesterov": True}, "nesterov=True needs momentum"),
        ("adamw", {"betas": (0.9, 1.5)}, "betas="),
    ],
)
def test_build_optimizer_rejects(name, kw, match):
    args = {"lr": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        build_optimizer(name, _params(), **args)


def test_constant_and_step_schedules():
    opt = build_optimizer("sgd", _params(), lr=0.2)
    assert _lrs(build_lr_schedule("constant", opt, 5), opt, 5) == [0.2] * 5
    opt = build_optimizer("sgd", _params(), lr=1.0)
    lrs = _lrs(build_lr_schedule("step", opt, 10, milestones=[3, 7], gamma=0.5), opt, 10)
    assert lrs == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    opt = build_optimizer("sgd", _params(), lr=1.0)
    lrs = _lrs(build_lr_schedule("step", opt, 6, step_size=2), opt, 6)
    assert lrs == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_cosine_ends_at_eta_min_without_restart():
    T, base, eta_min = 20, 0.4, 0.01
    opt = build_optimizer("sgd", _params(), lr=base)
    lrs = _lrs(build_lr_schedule("cosine", opt, T, eta_min=eta_min), opt, T + 10)
    want = [eta_min + (base - eta_min) * (1 + math.cos(math.pi * k / T)) / 2 for k in range(T)]
    assert lrs[:T] == pytest.approx(want, rel=1e-12)
    assert lrs[T:] == pytest.approx([eta_min] * 10, rel=1e-12)


def test_warmup_cosine_formula_with_two_groups():
    T, W = 30, 5
    p1, p2 = _params(), _params()
    opt = torch.optim.SGD([{"params": p1, "lr": 1.0}, {"params": p2, "lr": 0.1}])
    sched = build_lr_schedule("warmup_cosine", opt, T, warmup_steps=W)
    seen = []
    for _ in range(T + 1):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for k, (a, b) in enumerate(seen):
        f = (k + 1) / W if k < W else (1 + math.cos(math.pi * (k - W) / (T - W))) / 2
        f = 0.0 if k >= T else f
        assert a == pytest.approx(f, abs=1e-12) and b == pytest.approx(0.1 * f, abs=1e-12)
    assert max(s[0] for s in seen) == pytest.approx(1.0)


def test_gawu_and_wu_take_eta0_from_the_optimizer():
    opt = build_optimizer("sgd", _params(), lr=0.003)
    g = build_lr_schedule("gawu", opt, 50, omega=0.2, max_lr=1.0)
    assert isinstance(g, GAWU) and g.eta_0 == 0.003 and g.omega == 0.2 and g.max_lr == 1.0
    assert g.observes_gradients
    opt = build_optimizer("sgd", _params(), lr=0.5)
    w = build_lr_schedule("wu", opt, 20, switch_step=4, eta_0=0.001, eta_min=1e-4)
    assert type(w) is FixedSwitchWU and w.switch_step == 4
    lrs = _lrs(w, opt, 21)
    assert lrs[:5] == pytest.approx([0.001 * math.exp(0.1 * k) for k in range(5)], rel=1e-12)
    assert lrs[20] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("linear", {}, "unknown schedule 'linear'"),
        ("cosine", {"warmup_steps": 3}, "does not use \\['warmup_steps'\\]"),
        ("step", {}, "exactly one of milestones"),
        ("step", {"milestones": [5, 2]}, "increasing"),
        ("warmup_cosine", {"warmup_steps": 10}, "warmup_steps=10"),
        ("wu", {}, "needs switch_step"),
        ("gawu", {"switch_step": 3}, "does not use \\['switch_step'\\]"),
        ("cosine", {"eta_min": 5.0}, "above the optimizer's lr"),
    ],
)
def test_build_lr_schedule_rejects(name, kw, match):
    opt = build_optimizer("sgd", _params(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        build_lr_schedule(name, opt, 10, **kw)


def test_every_schedule_name_builds():
    for name in SCHEDULES:
        opt = build_optimizer("sgd", _params(), lr=0.1)
        kw = {"milestones": [2]} if name == "step" else {}
        kw = {"switch_step": 2} if name == "wu" else kw
        sched = build_lr_schedule(name, opt, 10, **kw)
        assert len(_lrs(sched, opt, 10)) == 10
