"""experiments.models: shapes, the documented parameter counts, and the architecture choices."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiments.data import DATASETS
from experiments.models import MODELS, build_model, count_parameters


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _input(spec_kwargs, batch=2):
    size = spec_kwargs["image_size"]
    spatial = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(batch, spec_kwargs["in_channels"], *spatial)


@pytest.mark.parametrize(
    "name, dataset, kw",
    [
        ("cnn3", "digits", {}),
        ("cnn3", "cifar10", {"width": 4}),
        ("cnn3", "mnist", {"width": 4, "batch_norm": True}),
        ("mlp", "digits", {"hidden": (16, 8)}),
        ("mlp", "mnist1d", {}),
        ("resnet_small", "digits", {}),
        ("resnet_small", "svhn", {"widths": (4, 8, 16)}),
        ("cnn1d", "mnist1d", {}),
        ("linear_deep", "digits", {"depth": 4, "hidden": 16}),
        ("resnet18", "cifar10", {}),
    ],
)
def test_forward_shapes(name, dataset, kw):
    spec = DATASETS[dataset].model_kwargs()
    torch.manual_seed(0)
    model = build_model(name, **spec, **kw)
    out = model(_input(spec))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    if (name, dataset) in DOCUMENTED_COUNTS and name == "resnet18":
        assert count_parameters(model) == DOCUMENTED_COUNTS[name, dataset]


# the counts the docstrings (and the integrator's notes) state, at default options
DOCUMENTED_COUNTS = {
    ("cnn3", "cifar10"): 113_738,
    ("cnn3", "digits"): 93_962,
    ("resnet_small", "digits"): 5_122,
    ("cnn1d", "mnist1d"): 7_460,
    ("resnet18", "cifar10"): 11_173_962,  # checked in test_forward_shapes (slow to build)
    ("vgg16", "cifar10"): 14_719_818,  # checked in test_vgg16_head_and_grey_input
}


def test_documented_parameter_counts():
    for (name, dataset), count in DOCUMENTED_COUNTS.items():
        if name not in ("resnet18", "vgg16"):
            assert count_parameters(build_model(name, **DATASETS[dataset].model_kwargs())) == count


def test_cnn3_is_three_conv_blocks_and_one_linear():
    m = build_model("cnn3", 10, 3, 32, width=8)
    kinds = [type(x).__name__ for x in m]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d"] * 3 + ["Flatten", "Linear"]
    assert [x.out_channels for x in m if isinstance(x, nn.Conv2d)] == [8, 16, 32]
    assert m[-1].in_features == 32 * 4 * 4
    with_bn = build_model("cnn3", 10, 3, 32, width=8, batch_norm=True)
    assert sum(isinstance(x, nn.BatchNorm2d) for x in with_bn) == 3


def test_cifar_resnet_stem():
    r = build_model("resnet34", 10, 3, 32)
    assert r.conv1.kernel_size == (3, 3) and r.conv1.stride == (1, 1)
    assert isinstance(r.maxpool, nn.Identity)
    assert count_parameters(r) == 21_282_122


def test_vgg16_head_and_grey_input():
    v = build_model("vgg16", 7, 1, 32)
    # 3 -> 1 input channel removes 2*64*9 weights, 10 -> 7 classes removes 3*513
    assert count_parameters(v) == DOCUMENTED_COUNTS["vgg16", "cifar10"] - 2 * 64 * 9 - 3 * 513
    assert v.features[0].in_channels == 1
    assert isinstance(v.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(v.classifier, nn.Linear) and v.classifier.out_features == 7
    assert v(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_linear_deep_is_bias_free_linear_stack():
    m = build_model("linear_deep", 3, 1, (5,), depth=3, hidden=(6, 4), init_std=0.01)
    shapes = [tuple(p.shape) for _, p in m.named_parameters()]
    assert shapes == [(6, 5), (4, 6), (3, 4)]
    x = torch.randn(2, 1, 5)
    w1, w2, w3 = (p.detach() for p in m.parameters())
    torch.testing.assert_close(m(x), x.reshape(2, 5) @ (w3 @ w2 @ w1).T)


def test_factories_do_not_touch_global_rng_seeding():
    torch.manual_seed(5)
    a = build_model("resnet_small", 10, 1, 8)
    torch.manual_seed(5)
    b = build_model("resnet_small", 10, 1, 8)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_model("cnn4", 10, 3, 32), "unknown model 'cnn4'"),
        (lambda: build_model("cnn3", 10, 3, 4), "at least 8x8"),
        (lambda: build_model("vgg16", 10, 1, 8), "at least 32x32"),
        (lambda: build_model("cnn3", 10, 3, 32, widht=4), "does not take"),
        (lambda: build_model("cnn3", 0, 3, 32), "num_classes=0"),
        (lambda: build_model("cnn1d", 10, 1, 8), "length >= 12"),
        (lambda: build_model("cnn1d", 10, 1, (8, 8)), "takes 1-D inputs"),
        (lambda: build_model("mlp", 10, 1, 8, hidden=(0,)), "hidden=\\(0,\\)"),
        (lambda: build_model("linear_deep", 10, 1, 8, depth=3, hidden=(4,)), "needs 2"),
        (lambda: build_model("resnet_small", 10, 1, 2, widths=(4, 8, 16)), "at least 4x4"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_registry_names():
    assert set(MODELS) == {"cnn3", "vgg16", "resnet18", "resnet34", "mlp", "cnn1d",
                           "resnet_small", "linear_deep"}
