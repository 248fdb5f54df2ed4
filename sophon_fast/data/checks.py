"""Validation of user-supplied classification data, run before any training starts.

A SOPHON run spends minutes to hours in the fine-tuning simulation before it first touches the
labels of a late batch; a label of 10 in a 10-class problem then surfaces as an opaque
``IndexError`` inside cross-entropy (or a device-side assert on CUDA). These checks fail in
milliseconds instead, with a message that says what was wrong and what was expected.

Accepted layouts:

- images: ``(N, C, H, W)`` for image models or ``(N, features)`` for flat inputs, floating point,
  finite;
- labels: ``(N,)`` integer (not bool), each in ``[0, num_classes)``.
"""

from __future__ import annotations

import torch

__all__ = ["check_classification_data", "check_num_classes"]

_IMAGE_NDIMS = (2, 4)


def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}"


def check_classification_data(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    name: str = "data",
) -> None:
    """Raise ``ValueError`` unless ``images``/``labels`` form a usable classification set.

    Args:
        images: ``(N, C, H, W)`` or ``(N, features)`` floating-point tensor with finite values.
        labels: ``(N,)`` integer tensor of class indices.
        num_classes: when given, every label must lie in ``[0, num_classes)``; when ``None``
            labels need only be non-negative.
        name: what the data is called in error messages (``"restricted train"``, ...).

    Returns:
        None.

    Raises:
        TypeError: ``images`` or ``labels`` is not a ``torch.Tensor``.
        ValueError: wrong number of dimensions, non-float images, non-integer or out-of-range
            labels, an empty set, NaN/inf pixels, or a different number of images and labels.
    """
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"{name}: images and labels must be torch.Tensor, got "
            f"{type(images).__name__} and {type(labels).__name__}"
        )
    if images.ndim not in _IMAGE_NDIMS:
        raise ValueError(
            f"{name}: images have {_describe(images)}; expected 4 dimensions (N, C, H, W) "
            "or 2 dimensions (N, features)"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"{name}: images have {_describe(images)}; expected a floating-point dtype "
            "(convert uint8 pixels with images.float() / 255)"
        )
    if labels.ndim != 1:
        raise ValueError(
            f"{name}: labels have {_describe(labels)}; expected 1 dimension (N,) of class indices "
            "(not one-hot)"
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"{name}: labels have {_describe(labels)}; expected an integer dtype "
            "such as torch.int64"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: {images.shape[0]} images but {labels.shape[0]} labels; "
            "expected one label per image"
        )
    if images.shape[0] == 0:
        raise ValueError(f"{name}: the set is empty; expected at least one image")
    if images.numel() == 0:
        raise ValueError(
            f"{name}: images have {_describe(images)} with a zero-sized dimension; "
            "expected non-empty images"
        )
    if not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images)).sum())
        raise ValueError(f"{name}: images contain {bad} NaN or inf values; expected finite values")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"{name}: smallest label is {low}; expected labels >= 0")
    if num_classes is not None:
        if num_classes < 1:
            raise ValueError(f"{name}: num_classes is {num_classes}; expected at least 1")
        if high >= num_classes:
            raise ValueError(
                f"{name}: largest label is {high} but num_classes is {num_classes}; "
                f"expected labels in [0, {num_classes})"
            )


def check_num_classes(
    model_num_classes: int,
    data_num_classes: int,
    name: str = "data",
    *,
    allow_fewer: bool = False,
) -> None:
    """Raise ``ValueError`` unless a model's output count matches a data set's class count.

    Args:
        model_num_classes: number of logits the model produces.
        data_num_classes: number of classes in the data set.
        name: what the data is called in error messages.
        allow_fewer: accept data with fewer classes than the model has outputs (the extra
            logits are then never a target, which changes what KL-to-uniform and inverse
            cross-entropy suppress, so it is off by default).

    Returns:
        None.

    Raises:
        ValueError: the counts differ (or, with ``allow_fewer``, the data has more classes).
    """
    if data_num_classes > model_num_classes:
        raise ValueError(
            f"{name}: {data_num_classes} classes but the model has {model_num_classes} outputs; "
            "expected at most as many classes as outputs (replace the head or relabel the data)"
        )
    if data_num_classes < model_num_classes and not allow_fewer:
        raise ValueError(
            f"{name}: {data_num_classes} classes but the model has {model_num_classes} outputs; "
            "expected equal counts (pass allow_fewer=True to accept unused outputs)"
        )
