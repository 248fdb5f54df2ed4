"""The tiny classification problem most reliability tests protect."""

import torch

from sophon_fast.models import build_model


def tiny_cnn():
    """(SmallCNN 8x8 with 3 classes, original (40 images), restricted (30, shifted by 0.5))."""
    torch.manual_seed(0)
    model = build_model(
        "small_cnn", {"num_classes": 3, "in_channels": 1, "image_size": 8, "widths": [3, 4]}
    )
    g = torch.Generator().manual_seed(0)
    original = (torch.randn(40, 1, 8, 8, generator=g), torch.randint(0, 3, (40,), generator=g))
    restricted = (
        torch.randn(30, 1, 8, 8, generator=g) + 0.5,
        torch.randint(0, 3, (30,), generator=g),
    )
    return model, original, restricted
