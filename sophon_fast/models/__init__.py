"""Model zoo for demos, tests and benchmarks, plus the classifier-head helpers.

Zoo models (all rebuildable from ``model.model_spec`` through :func:`build_model`):

======================  ==================  =========  ============================
registry name           class               head       notes
======================  ==================  =========  ============================
``"small_cnn"``         :class:`SmallCNN`   ``fc``     BN, ~50 k params at 28x28
``"resnet18_cifar"``    ResNet18CIFAR       ``fc``     BN, 11.17 M params, 62 tensors
``"vgg_small"``         :class:`VGGSmall`   ``head``   no BN
``"mlp"``               :class:`MLP`        ``fc``     flattens its input
``"unet"``              :class:`SmallUNet`  none       DDPM noise predictor, GroupNorm
======================  ==================  =========  ============================
"""

from sophon_fast.models.classifiers import (
    MLP,
    MODELS,
    ResNet18CIFAR,
    SmallCNN,
    VGGSmall,
    build_model,
)
from sophon_fast.models.head import (
    find_head,
    num_classes_of,
    reinit_head_,
    xavier_head_values,
)
from sophon_fast.models.unet import SmallUNet

MODELS["unet"] = SmallUNet

__all__ = [
    "MLP",
    "MODELS",
    "ResNet18CIFAR",
    "SmallCNN",
    "SmallUNet",
    "VGGSmall",
    "build_model",
    "find_head",
    "num_classes_of",
    "reinit_head_",
    "xavier_head_values",
]
