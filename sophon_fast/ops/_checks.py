"""Input checks shared by the public ops: each error names the argument and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_flat_buffer(tensor, name: str) -> None:
    """A 1-D contiguous floating tensor of shape (n_params,)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D flat buffer of shape (n_params,), got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def check_like(reference: torch.Tensor, ref_name: str, tensor, name: str) -> None:
    """``tensor`` is a flat buffer with the numel, dtype and device of ``reference``."""
    check_flat_buffer(tensor, name)
    if tensor.numel() != reference.numel():
        raise ValueError(
            f"{name} has {tensor.numel()} elements but {ref_name} has {reference.numel()}; "
            "they must match"
        )
    if tensor.dtype != reference.dtype:
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but {ref_name} has dtype {reference.dtype}; "
            "they must match"
        )
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on {tensor.device} but {ref_name} is on {reference.device}; "
            "they must be on the same device"
        )


def check_real(value, name: str, *, minimum: float | None = None) -> float:
    """A finite Python real number (not a tensor, not bool), optionally >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
