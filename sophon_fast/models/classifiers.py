"""Small image classifiers for demos, tests and benchmarks.

Four architectures cover the cases the SOPHON engine must handle:

- :class:`SmallCNN` - two conv-BN-ReLU-pool stages; BatchNorm running statistics that the
  fine-tuning simulation must save and restore; ~50 k parameters (launch-bound).
- :class:`ResNet18CIFAR` - the CIFAR ResNet-18 used by the official SOPHON experiments;
  11.17 M parameters in 62 tensors (compute-bound).
- :class:`VGGSmall` - a VGG without BatchNorm: no running statistics at all, and a head
  that sits at the end of a multi-layer classifier rather than at the top level.
- :class:`MLP` - fully connected only; the cheapest model for second-order tests.

Every model carries two pieces of metadata:

- ``head_name`` (class attribute): dotted path of the classifier ``nn.Linear`` that the
  fine-tuning simulation re-initialises (see :mod:`sophon_fast.models.head`).
- ``model_spec`` (instance attribute): ``{"name": <registry name>, "kwargs": {...}}``, all
  JSON-serialisable, such that ``build_model(**model.model_spec)`` rebuilds the same
  architecture. Checkpoints store this dict next to the weights instead of a pickled class.

Initialisation draws only from the global torch RNG, so ``torch.manual_seed(s)`` before
construction makes two builds bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "MODELS", "ResNet18CIFAR", "SmallCNN", "VGGSmall", "build_model"]


def _init_conv_bn_(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convolutions, zero conv biases, BN at identity.

    Linear layers keep PyTorch's default init. Every draw comes from the global RNG.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_image(x: torch.Tensor, channels: int, size: int | None, model: str) -> None:
    """Raise a readable error when ``x`` does not match the configured input geometry.

    Only the trailing three dims are checked, so the check also holds under ``torch.vmap``.
    """
    if x.dim() < 3:
        raise ValueError(
            f"{model} expects images of shape (batch, channels, height, width); got {tuple(x.shape)}"
        )
    c, h, w = x.shape[-3:]
    if c != channels or (size is not None and (h != size or w != size)):
        want = f"({channels}, {size}, {size})" if size is not None else f"({channels}, H, W)"
        raise ValueError(
            f"{model} was built for inputs {want} (channels, height, width); got "
            f"({c}, {h}, {w}). Rebuild it with matching in_channels/image_size."
        )


class SmallCNN(nn.Module):
    """Two-stage CNN: [conv3x3(pad 1) - BatchNorm2d - ReLU - MaxPool2] x 2, flatten, Linear ``fc``.

    At the defaults (28x28 grey images, 10 classes) it has 50,282 parameters. Convolutions
    carry no bias because the BatchNorm that follows absorbs it.

    Args:
        num_classes: Output logits. Default 10.
        in_channels: Input image channels. Default 1.
        image_size: Side of the square input images; the flatten size depends on it.
            Any size >= 4 works (two 2x2 poolings, floor division). Default 28.
        widths: Channels of the two conv stages. Default (32, 64).

    Raises:
        ValueError: On a non-positive argument, ``image_size < 4`` or ``len(widths) != 2``.

    Shapes:
        x: (batch, in_channels, image_size, image_size) -> logits: (batch, num_classes)
    """

    head_name = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        widths: Sequence[int] = (32, 64),
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"SmallCNN needs two positive stage widths; got widths={widths}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"SmallCNN needs num_classes >= 1 and in_channels >= 1; "
                f"got num_classes={num_classes}, in_channels={in_channels}"
            )
        if image_size < 4:
            raise ValueError(
                f"SmallCNN halves the image twice, so image_size must be >= 4; got {image_size}"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in widths:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = image_size // 4
        self.fc = nn.Linear(widths[-1] * side * side, num_classes)
        _init_conv_bn_(self)
        self.model_spec: dict[str, Any] = {
            "name": "small_cnn",
            "kwargs": {
                "num_classes": num_classes,
                "in_channels": in_channels,
                "image_size": image_size,
                "widths": widths,
            },
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, image_size, image_size) -> logits: (batch, num_classes)."""
        _check_image(x, self.in_channels, self.image_size, "SmallCNN")
        return self.fc(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity or 1x1 conv-BN shortcut, ReLU after the sum.

    Shapes:
        x: (batch, in_planes, H, W) -> (batch, planes, H / stride, W / stride)
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_planes, H, W) -> (batch, planes, H / stride, W / stride)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18CIFAR(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2].

    Stages have 64-128-256-512 channels (stride 1, 2, 2, 2), followed by adaptive average
    pooling and the Linear head ``fc``. For 10 classes: 11,173,962 parameters in 62 tensors.
    Any input side >= 8 works thanks to the adaptive pooling; 32x32 is the intended size.

    Args:
        num_classes: Output logits. Default 10.
        in_channels: Input image channels. Default 3.

    Raises:
        ValueError: On ``num_classes < 1`` or ``in_channels < 1``.

    Shapes:
        x: (batch, in_channels, H, W) -> logits: (batch, num_classes)
    """

    head_name = "fc"

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"ResNet18CIFAR needs num_classes >= 1 and in_channels >= 1; "
                f"got num_classes={num_classes}, in_channels={in_channels}"
            )
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, 64, stride=1)
        self.layer2 = self._make_layer(64, 128, stride=2)
        self.layer3 = self._make_layer(128, 256, stride=2)
        self.layer4 = self._make_layer(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_conv_bn_(self)
        self.model_spec: dict[str, Any] = {
            "name": "resnet18_cifar",
            "kwargs": {"num_classes": num_classes, "in_channels": in_channels},
        }

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        """Two BasicBlocks; only the first one changes resolution and width."""
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, H, W) -> logits: (batch, num_classes)."""
        _check_image(x, self.in_channels, None, "ResNet18CIFAR")
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


# Conv widths per stage; "M" is a 2x2 max-pool. Three pools: 32 -> 4, 28 -> 3.
_VGG_SMALL_LAYOUT: tuple[int | str, ...] = (32, 32, "M", 64, 64, "M", 128, "M")


class VGGSmall(nn.Module):
    """VGG-style CNN without BatchNorm, so it has no running statistics at all.

    Layout: ``features`` = conv3x3(32)-ReLU x2, pool, conv3x3(64)-ReLU x2, pool,
    conv3x3(128)-ReLU, pool; then ``classifier`` = Linear(128 * s * s, 256)-ReLU with
    s = image_size // 8, and the head Linear ``head`` (256 -> num_classes). The head is the
    last Linear of a two-layer classifier, unlike the single-Linear heads of the other models.
    At 32x32, 3 channels, 10 classes: 666,538 parameters.

    Args:
        num_classes: Output logits. Default 10.
        in_channels: Input image channels. Default 3.
        image_size: Side of the square input images (>= 8, three 2x2 poolings). Default 32.

    Raises:
        ValueError: On a non-positive argument or ``image_size < 8``.

    Shapes:
        x: (batch, in_channels, image_size, image_size) -> logits: (batch, num_classes)
    """

    head_name = "head"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(
                f"VGGSmall needs num_classes >= 1 and in_channels >= 1; "
                f"got num_classes={num_classes}, in_channels={in_channels}"
            )
        if image_size < 8:
            raise ValueError(
                f"VGGSmall halves the image three times, so image_size must be >= 8; "
                f"got {image_size}"
            )
        self.in_channels = in_channels
        self.image_size = image_size
        layers: list[nn.Module] = []
        c_in = in_channels
        for item in _VGG_SMALL_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, int(item), 3, padding=1), nn.ReLU(inplace=True)]
                c_in = int(item)
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(nn.Linear(c_in * side * side, 256), nn.ReLU(inplace=True))
        self.head = nn.Linear(256, num_classes)
        _init_conv_bn_(self)
        self.model_spec: dict[str, Any] = {
            "name": "vgg_small",
            "kwargs": {
                "num_classes": num_classes,
                "in_channels": in_channels,
                "image_size": image_size,
            },
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, in_channels, image_size, image_size) -> logits: (batch, num_classes)."""
        _check_image(x, self.in_channels, self.image_size, "VGGSmall")
        return self.head(self.classifier(torch.flatten(self.features(x), 1)))


class MLP(nn.Module):
    """Multi-layer perceptron: flatten, [Linear - ReLU] per hidden width, Linear head ``fc``.

    At the defaults (784 -> 256 -> 256 -> 10) it has 269,322 parameters. ``hidden=()`` gives
    plain multinomial logistic regression.

    Args:
        in_features: Features per sample after flattening (784 = 1 x 28 x 28). Default 784.
        hidden: Widths of the hidden layers. Default (256, 256).
        num_classes: Output logits. Default 10.

    Raises:
        ValueError: On a non-positive size.

    Shapes:
        x: (batch, *) with prod(*) == in_features -> logits: (batch, num_classes)
    """

    head_name = "fc"

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (256, 256),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        hidden = [int(h) for h in hidden]
        if in_features < 1 or num_classes < 1 or (hidden and min(hidden) < 1):
            raise ValueError(
                f"MLP sizes must be positive; got in_features={in_features}, "
                f"hidden={hidden}, num_classes={num_classes}"
            )
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)
        self.model_spec: dict[str, Any] = {
            "name": "mlp",
            "kwargs": {"in_features": in_features, "hidden": hidden, "num_classes": num_classes},
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, *) with prod(*) == in_features -> logits: (batch, num_classes)."""
        x = torch.flatten(x, 1)
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"MLP was built for {self.in_features} input features per sample; "
                f"got {x.shape[-1]} after flattening"
            )
        return self.fc(self.body(x))


MODELS: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN,
    "resnet18_cifar": ResNet18CIFAR,
    "vgg_small": VGGSmall,
    "mlp": MLP,
}


def build_model(name: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a zoo model by registry name.

    ``build_model(**model.model_spec)`` rebuilds the architecture of ``model`` (weights are
    fresh; load a state_dict on top to restore a checkpoint).

    Args:
        name: One of ``MODELS``: ``"small_cnn"``, ``"resnet18_cifar"``, ``"vgg_small"``, ``"mlp"``.
        kwargs: Constructor keyword arguments; ``None`` means the defaults. Default None.

    Returns:
        The freshly initialised ``nn.Module`` (draws from the global torch RNG).

    Raises:
        ValueError: ``name`` is not registered (the message lists the valid names), or
            ``kwargs`` holds an argument the constructor does not take or rejects.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    cls = MODELS[name]
    try:
        return cls(**dict(kwargs or {}))
    except TypeError as err:
        raise ValueError(f"bad kwargs for model {name!r} ({cls.__name__}): {err}") from err
