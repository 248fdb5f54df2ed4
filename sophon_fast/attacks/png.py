"""Sample grids as PNG files, without an imaging library: :func:`image_grid` tiles images into one
uint8 array, :func:`write_png` writes it as an 8-bit PNG with :mod:`zlib` alone.

Used for the generation evaluation's sample grids (:mod:`sophon_fast.attacks.generation`, which
re-exports both names) and the generation demo.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["image_grid", "write_png"]


def write_png(path: str | Path, pixels: np.ndarray) -> Path:
    """Write a uint8 (H, W) grey or (H, W, 3) RGB array as an 8-bit PNG (zlib only)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        colour = 0
    elif pixels.ndim == 3 and pixels.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"write_png: expected (H, W) or (H, W, 3) uint8, got {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    return path


def image_grid(images: torch.Tensor, columns: int = 8, pad: int = 2, scale: int = 2) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] -> one uint8 grid (rows of ``columns``), upscaled ``scale``x.

    Returns:
        (rows * (H + pad) + pad, columns * (W + pad) + pad) grey or (..., 3) RGB uint8.
    """
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + pad) + pad, columns * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    array = (grid * 255).round().to(torch.uint8).numpy()
    return array[0] if c == 1 else array[:3].transpose(1, 2, 0)
