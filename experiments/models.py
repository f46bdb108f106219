"""Model factories for recipes: the source papers' networks and small CPU stand-ins.

Every model is built through one registry::

    model = build_model("cnn3", num_classes=10, in_channels=3, image_size=32)

``image_size`` is the spatial shape of one input: an ``int`` means a square 2-D image
(``image_size x image_size``), a tuple gives the shape exactly, e.g. ``(40,)`` for the 1-D
MNIST-1D signals. Inputs are always ``(N, in_channels, *spatial)`` float tensors. The
``DatasetSpec`` of :mod:`experiments.data` carries matching ``num_classes``, ``in_channels`` and
``image_size``, so ``build_model(name, **spec.model_kwargs())`` fits a data set.

Registry names (:data:`MODELS`):

- ``"cnn3"``: the zigzag paper's (seed 000) "simple feed-forward CNN with three convolution
  blocks and one fully-connected block". The paper gives no widths; see :func:`cnn3`.
- ``"vgg16"``, ``"resnet18"``, ``"resnet34"``: torchvision's models, adapted to 32x32 inputs,
  always randomly initialised (``weights=None``: nothing is downloaded).
- ``"mlp"``, ``"cnn1d"`` (MNIST-1D), ``"resnet_small"`` (tiny residual net for CPU tests),
  ``"linear_deep"`` (bias-free deep linear network, for balancedness, seed 002).

No factory seeds the global RNG: call ``torch.manual_seed`` before ``build_model`` for a
reproducible initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "count_parameters"]

ImageSize = int | Sequence[int]


def _spatial(image_size: ImageSize, name: str, ndim: int | None = None) -> tuple[int, ...]:
    """Normalises ``image_size`` to a tuple of positive ints (int -> square, or ndim-D)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int | Sequence):
        raise ValueError(
            f"{name}: image_size={image_size!r} is neither an int nor a tuple of ints; "
            "pass e.g. 32 for 32x32 images or (40,) for 1-D signals of length 40"
        )
    if isinstance(image_size, int):
        shape = (image_size,) * (ndim or 2)
    else:
        shape = tuple(image_size)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"{name}: image_size={image_size!r} must hold positive ints")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(
            f"{name} takes {ndim}-D inputs but image_size={image_size!r} has {len(shape)} "
            f"dimensions; pass an int or a tuple of {ndim} ints"
        )
    return shape


def _check_common(name: str, num_classes: int, in_channels: int) -> None:
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {arg}={value!r} must be a positive int")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars, i.e. the length d of the recorded vectors ``G_t``, ``w_t``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- cnn3
def cnn3(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    width: int = 32,
    batch_norm: bool = False,
) -> nn.Sequential:
    """The zigzag paper's 3-conv-block CNN (seed 000, section 3.1).

    The paper says only "three convolution blocks and one fully-connected block". We use the
    usual reading of that phrase (choices, not the paper's words):

    - block i (i = 1, 2, 3): ``Conv2d(c_{i-1}, c_i, 3, padding=1)`` -> [``BatchNorm2d``] ->
      ``ReLU`` -> ``MaxPool2d(2)``, with ``c = (width, 2*width, 4*width)``;
    - fully-connected block: ``Flatten`` -> ``Linear(4*width * (H//8) * (W//8), num_classes)``.

    No batch norm by default (the paper does not mention any, and full-batch GD is its
    setting). At ``width=32``: 113,738 parameters for CIFAR-10 shapes (3x32x32, 10 classes),
    93,962 for 8x8 digits (1x8x8, 10 classes).

    Args:
        num_classes: output logits.
        in_channels: input channels (3 for CIFAR-10/SVHN, 1 for MNIST/digits).
        image_size: int (square) or ``(H, W)``; both sides must be >= 8 (three 2x2 pools).
        width: channels of the first block; use 4-8 for fast CPU runs.
        batch_norm: put a ``BatchNorm2d`` after every convolution.

    Returns:
        ``nn.Sequential`` mapping ``(N, in_channels, H, W)`` to ``(N, num_classes)``.
    """
    _check_common("cnn3", num_classes, in_channels)
    h, w = _spatial(image_size, "cnn3", ndim=2)
    if h < 8 or w < 8:
        raise ValueError(
            f"cnn3 halves the image three times, so image_size={image_size!r} must be at "
            "least 8x8"
        )
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"cnn3: width={width!r} must be a positive int (paper-sized: 32)")
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in (width, 2 * width, 4 * width):
        layers.append(nn.Conv2d(c_in, c, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c
        h, w = h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c_in * h * w, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- vgg16
def vgg16(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    batch_norm: bool = False,
) -> nn.Module:
    """torchvision's VGG-16 (configuration "D") adapted to 32x32 inputs.

    The 13 convolutions and 5 max-pools are torchvision's (``vgg16`` or ``vgg16_bn``); a 32x32
    image leaves a 512x1x1 feature map, so the ImageNet head (7x7 average pool and a 3-layer
    4096-wide classifier with dropout) is replaced by a global average pool and
    ``Linear(512, num_classes)``, the usual CIFAR VGG head. No dropout: full-batch gradients
    stay deterministic. 14,719,818 parameters for CIFAR-10 (14,728,266 with batch norm).

    Args:
        num_classes: output logits.
        in_channels: input channels; the first convolution is replaced when not 3.
        image_size: int or ``(H, W)``, both >= 32 (five 2x2 pools).
        batch_norm: use ``vgg16_bn`` (a BatchNorm2d after every convolution).

    Returns:
        Module mapping ``(N, in_channels, H, W)`` to ``(N, num_classes)``.
    """
    from torchvision import models as tvm

    _check_common("vgg16", num_classes, in_channels)
    h, w = _spatial(image_size, "vgg16", ndim=2)
    if h < 32 or w < 32:
        raise ValueError(
            f"vgg16 halves the image five times, so image_size={image_size!r} must be at "
            "least 32x32; use cnn3 or resnet_small for smaller images"
        )
    model = (tvm.vgg16_bn if batch_norm else tvm.vgg16)(weights=None)
    if in_channels != 3:
        first = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
        nn.init.kaiming_normal_(model.features[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(model.features[0].bias)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    head = nn.Linear(512, num_classes)
    nn.init.normal_(head.weight, 0, 0.01)  # torchvision's init of VGG's linear layers
    nn.init.zeros_(head.bias)
    model.classifier = head
    return model


# --------------------------------------------------------------------------- resnets
def _cifar_resnet(arch: str, num_classes: int, in_channels: int, image_size: ImageSize):
    from torchvision import models as tvm

    _check_common(arch, num_classes, in_channels)
    h, w = _spatial(image_size, arch, ndim=2)
    if h < 8 or w < 8:
        raise ValueError(f"{arch}: image_size={image_size!r} must be at least 8x8")
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    # CIFAR stem (He et al. 2016, section 4.2): 3x3 conv stride 1 and no max-pool, instead of
    # ImageNet's 7x7 stride-2 conv + max-pool that would shrink a 32x32 image to 8x8 at once.
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int, in_channels: int, image_size: ImageSize) -> nn.Module:
    """torchvision's ResNet-18 with a CIFAR stem (3x3 stride-1 conv, no max-pool).

    11,173,962 parameters for CIFAR-10. Args as :func:`cnn3`; input ``(N, C, H, W)``,
    output ``(N, num_classes)``.
    """
    return _cifar_resnet("resnet18", num_classes, in_channels, image_size)


def resnet34(num_classes: int, in_channels: int, image_size: ImageSize) -> nn.Module:
    """torchvision's ResNet-34 with a CIFAR stem (3x3 stride-1 conv, no max-pool).

    21,282,122 parameters for CIFAR-10. Args as :func:`cnn3`.
    """
    return _cifar_resnet("resnet34", num_classes, in_channels, image_size)


# --------------------------------------------------------------------------- mlp
def mlp(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
) -> nn.Sequential:
    """Fully-connected network on flattened inputs.

    Args:
        num_classes: output logits.
        in_channels: input channels.
        image_size: spatial shape (int -> square 2-D; ``(40,)`` for MNIST-1D).
        hidden: widths of the hidden layers, e.g. ``(256, 128)``; ``()`` is logistic
            regression.
        activation: ``"relu"`` or ``"tanh"``.

    Returns:
        ``nn.Sequential`` mapping ``(N, in_channels, *spatial)`` to ``(N, num_classes)``.
    """
    _check_common("mlp", num_classes, in_channels)
    d_in = in_channels * math.prod(_spatial(image_size, "mlp"))
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    if activation not in acts:
        raise ValueError(f"mlp: activation={activation!r} is not one of {sorted(acts)}")
    widths = _positive_ints(hidden, "mlp", "hidden")
    layers: list[nn.Module] = [nn.Flatten()]
    for h in widths:
        layers += [nn.Linear(d_in, h), acts[activation]()]
        d_in = h
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def _positive_ints(values, model: str, arg: str) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    out = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in out):
        raise ValueError(f"{model}: {arg}={values!r} must be positive ints, e.g. (128, 64)")
    return out


# --------------------------------------------------------------------------- cnn1d
def cnn1d(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    channels: int = 25,
) -> nn.Sequential:
    """Small 1-D CNN for MNIST-1D (the package's reference ConvBase, Greydanus 2020).

    Three ``Conv1d(kernel 5, stride 2, padding 1)`` + ReLU layers of ``channels`` channels,
    then ``Linear``. For length-40 signals the lengths go 40 -> 19 -> 9 -> 4, and there are
    7,460 parameters at ``channels=25``, 10 classes.

    Args:
        num_classes: output logits.
        in_channels: input channels (1 for MNIST-1D).
        image_size: signal length, int or ``(L,)``, >= 12.
        channels: channels of every convolution.

    Returns:
        ``nn.Sequential`` mapping ``(N, in_channels, L)`` to ``(N, num_classes)``.
    """
    _check_common("cnn1d", num_classes, in_channels)
    (length,) = _spatial(image_size, "cnn1d", ndim=1)
    (channels,) = _positive_ints(channels, "cnn1d", "channels")
    layers: list[nn.Module] = []
    c_in = in_channels
    for _ in range(3):
        layers += [nn.Conv1d(c_in, channels, 5, stride=2, padding=1), nn.ReLU()]
        c_in = channels
        length = (length + 2 - 5) // 2 + 1
        if length < 1:
            raise ValueError(
                f"cnn1d: image_size={image_size!r} is too short for three stride-2 "
                "convolutions; use signals of length >= 12"
            )
    layers += [nn.Flatten(), nn.Linear(channels * length, num_classes)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- resnet_small
class _BasicBlock(nn.Module):
    """conv3x3-[BN]-ReLU-conv3x3-[BN] plus identity (or 1x1 projection) shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, batch_norm: bool):
        super().__init__()
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=not batch_norm)
        self.bn2 = norm(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm), norm(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """Tiny 2-D residual network for CPU tests: stem, stages of basic blocks, pool, linear."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        blocks_per_stage: int,
        batch_norm: bool,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=not batch_norm),
            nn.BatchNorm2d(widths[0]) if batch_norm else nn.Identity(),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for i, c in enumerate(widths):
            for b in range(blocks_per_stage):
                blocks.append(_BasicBlock(c_in, c, 2 if (i > 0 and b == 0) else 1, batch_norm))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_small(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    widths: Sequence[int] = (8, 16),
    blocks_per_stage: int = 1,
    batch_norm: bool = True,
) -> ResNetSmall:
    """Tiny residual network (a few thousand to ~100k parameters) for CPU GAWU tests.

    Stem ``conv3x3 -> [BN] -> ReLU`` to ``widths[0]`` channels; then one stage per entry of
    ``widths``, each of ``blocks_per_stage`` basic blocks (two 3x3 convs and a shortcut; the
    first block of every stage after the first has stride 2 and a 1x1 projection); global
    average pool; ``Linear(widths[-1], num_classes)``. Works on 8x8 digits. Defaults: 5,122
    parameters for digits (1x8x8, 10 classes); ``widths=(16, 32, 64)`` gives 78,042 on CIFAR-10.

    Args:
        num_classes: output logits.
        in_channels: input channels.
        image_size: int or ``(H, W)``; at least ``2 ** (len(widths) - 1)`` per side.
        widths: channels of each stage.
        blocks_per_stage: basic blocks per stage.
        batch_norm: BatchNorm2d after each convolution (convs then have no bias).

    Returns:
        :class:`ResNetSmall` mapping ``(N, in_channels, H, W)`` to ``(N, num_classes)``.
    """
    _check_common("resnet_small", num_classes, in_channels)
    h, w = _spatial(image_size, "resnet_small", ndim=2)
    widths = _positive_ints(widths, "resnet_small", "widths")
    if not widths:
        raise ValueError("resnet_small: widths=() is empty; pass e.g. (8, 16)")
    (blocks_per_stage,) = _positive_ints(blocks_per_stage, "resnet_small", "blocks_per_stage")
    need = 2 ** (len(widths) - 1)
    if h < need or w < need:
        raise ValueError(
            f"resnet_small: {len(widths)} stages halve the image {len(widths) - 1} times, so "
            f"image_size={image_size!r} must be at least {need}x{need}; use fewer widths"
        )
    return ResNetSmall(num_classes, in_channels, widths, blocks_per_stage, batch_norm)


# --------------------------------------------------------------------------- linear_deep
def linear_deep(
    num_classes: int,
    in_channels: int,
    image_size: ImageSize,
    *,
    depth: int = 3,
    hidden: int | Sequence[int] = 32,
    init_std: float | None = None,
) -> nn.Sequential:
    """Deep linear network ``x -> W_N ... W_1 x`` (seed 002): bias-free ``nn.Linear`` layers.

    After a ``Flatten``, the model holds exactly ``depth`` ``nn.Linear(bias=False)`` layers and
    nothing else, so its parameters in ``named_parameters()`` order are ``W_1, ..., W_N`` with
    ``W_j`` of shape ``(d_j, d_{j-1})``, which is what balancedness
    ``||W_{j+1}^T W_{j+1} - W_j W_j^T||_F`` needs.

    Args:
        num_classes: output dimension ``d_N``.
        in_channels: input channels; ``d_0 = in_channels * prod(spatial)``.
        image_size: spatial shape (int -> square 2-D).
        depth: number of layers N >= 1.
        hidden: width of every hidden layer (int) or the ``depth - 1`` widths ``d_1..d_{N-1}``.
        init_std: None keeps PyTorch's default init; a float draws every entry from
            ``N(0, init_std^2)`` ("small random perturbations centered at zero", which are
            approximately balanced).

    Returns:
        ``nn.Sequential(Flatten, Linear, ..., Linear)`` mapping ``(N, C, *spatial)`` to
        ``(N, num_classes)``.
    """
    _check_common("linear_deep", num_classes, in_channels)
    d0 = in_channels * math.prod(_spatial(image_size, "linear_deep"))
    (depth,) = _positive_ints(depth, "linear_deep", "depth")
    widths = (hidden,) * (depth - 1) if isinstance(hidden, int) else tuple(hidden)
    widths = _positive_ints(widths, "linear_deep", "hidden") if widths else ()
    if len(widths) != depth - 1:
        raise ValueError(
            f"linear_deep: hidden={hidden!r} gives {len(widths)} hidden widths but depth={depth} "
            f"needs {depth - 1}; pass one int or {depth - 1} widths"
        )
    if init_std is not None and not (isinstance(init_std, int | float) and init_std > 0):
        raise ValueError(f"linear_deep: init_std={init_std!r} must be a positive float or None")
    dims = (d0, *widths, num_classes)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b, bias=False)
        if init_std is not None:
            nn.init.normal_(lin.weight, 0.0, float(init_std))
        layers.append(lin)
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- registry
MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn3": cnn3,
    "vgg16": vgg16,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mlp": mlp,
    "cnn1d": cnn1d,
    "resnet_small": resnet_small,
    "linear_deep": linear_deep,
}


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: ImageSize, **kw
) -> nn.Module:
    """Builds a registered model.

    Args:
        name: a key of :data:`MODELS`.
        num_classes: number of output logits.
        in_channels: channels of the input.
        image_size: spatial shape of one input: int (square 2-D) or tuple (e.g. ``(40,)``).
        **kw: model-specific options (``width`` for cnn3, ``hidden`` for mlp, ...); see the
            factory's docstring.

    Returns:
        A freshly initialised ``nn.Module`` mapping ``(N, in_channels, *spatial)`` to
        ``(N, num_classes)``.

    Example:
        >>> m = build_model("cnn3", 10, 1, 8, width=4)
        >>> m(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    try:
        return MODELS[name](num_classes, in_channels, image_size, **kw)
    except TypeError as err:
        if "unexpected keyword" in str(err):
            raise ValueError(
                f"model {name!r} got an option it does not take ({err}); see "
                f"help(experiments.models.{MODELS[name].__name__}) for its options"
            ) from err
        raise
