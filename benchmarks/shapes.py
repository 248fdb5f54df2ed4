"""Parameter-list shapes the op benchmarks run on.

resnet18: the CIFAR-style ResNet-18 of sophon_fast.models (62 tensors, 11,173,962 params).
small_cnn: the 4-conv MAML ConvNet (64 channels, BN, 28x28 input, 10 classes): 18 tensors,
112,586 params, the few-shot meta-learning workhorse.
"""

from __future__ import annotations


def resnet18_shapes() -> list[tuple[int, ...]]:
    from sophon_fast.models import ResNet18CIFAR

    return [tuple(p.shape) for p in ResNet18CIFAR(num_classes=10).parameters()]


def small_cnn_shapes() -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    in_channels = 1
    for _ in range(4):
        shapes += [
            (64, in_channels, 3, 3),
            (64,),
            (64,),
            (64,),
        ]  # conv weight, bias; BN weight, bias
        in_channels = 64
    return shapes + [(10, 64), (10,)]


PARAM_LISTS = {"resnet18": resnet18_shapes, "small_cnn": small_cnn_shapes}
