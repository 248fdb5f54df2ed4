"""A small DDPM noise-prediction UNet (Ho et al. 2020 layout, scaled down for 2 CPU cores).

``SmallUNet(x_t, t)`` predicts the noise ``eps`` that :meth:`sophon_fast.diffusion.NoiseSchedule.q_sample`
mixed into ``x_t`` at timestep ``t``. The layout, at the defaults (28x28 grey, ``base_channels=32``,
``channel_mults=(1, 2)``)::

    t  -> sinusoidal(32) -> Linear(32, 128) - SiLU - Linear(128, 128)     = time embedding
    x  -> conv3x3 (1 -> 32)                                        28x28
       -> ResBlock(32 -> 32)                                       28x28  = skip s0
       -> conv3x3 stride 2 (32 -> 32)                              14x14
       -> ResBlock(32 -> 64)                                       14x14  = skip s1
       -> ResBlock(64 -> 64)                                       14x14  (middle)
       -> ResBlock(64 + s1 -> 32), nearest x2 upsample             28x28
       -> ResBlock(32 + s0 -> 32)                                  28x28
       -> GroupNorm - SiLU - conv3x3 (32 -> 1)                     28x28

Each ResBlock is pre-activation: ``GroupNorm - SiLU - conv3x3``, plus ``Linear(SiLU(time))`` added per
channel, ``GroupNorm - SiLU - conv3x3``, plus a 1x1-conv (or identity) skip. No BatchNorm, no attention and
no dropout: the FTS of :func:`sophon_fast.protect` fine-tunes the model functionally, and GroupNorm keeps
it free of running statistics that would have to be saved and restored.

Why this shape: the generation demo pre-trains, protects and attacks the model on 2 CPU cores, where
the 3x3 convolutions are ~80 % of the time. So there is one ResBlock per level each way, the upsampling
has no conv of its own, and each up block narrows to the next level's width *before* upsampling: the
full-resolution up block reads 64 channels instead of 96. 75.6 M multiply-adds per 28x28 image forward
(a two-ResBlock-per-level layout with a conv after each upsampling costs ~140 M).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SmallUNet", "timestep_embedding"]


def timestep_embedding(
    t: torch.Tensor, dim: int, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of integer timesteps.

    ``emb[b, i] = sin(t_b * w_i)`` and ``emb[b, half + i] = cos(t_b * w_i)`` with
    ``w_i = 10000 ** (-i / half)``, ``half = dim // 2``; an odd ``dim`` gets one zero column.

    Args:
        t: Timesteps, any real dtype.
        dim: Embedding width (>= 2).
        dtype: Floating dtype of the result. Default float32.

    Returns:
        The embedding.

    Shapes:
        t: (batch,) -> (batch, dim)
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=dtype) * (-math.log(10000.0) / half)
    args = t.to(dtype)[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _ResBlock(nn.Module):
    """Pre-activation residual block with an additive per-channel time conditioning."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(F.silu(time))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class SmallUNet(nn.Module):
    """Small DDPM UNet predicting the noise in ``x_t`` (see the module docstring for the layout).

    Each resolution level ``i`` has ``base_channels * channel_mults[i]`` channels; every level but the
    last halves the resolution (a stride-2 3x3 conv) on the way down and doubles it again (nearest
    neighbour) on the way up, so ``image_size`` must be divisible by ``2 ** (len(channel_mults) - 1)``.

    At the defaults (28x28, 1 channel, base 32, mults (1, 2)): 290,593 parameters in 68 tensors and
    75.6 M multiply-adds per image forward (32x32 RGB: 291,747 and 99.9 M). Forward + backward of a
    batch of 64 took 0.30-0.65 s (4.6-10 ms per image) on 2 AMD EPYC cores shared with other jobs
    (load average 5-10; float32, torch 2.13). ``base_channels=16, groups=4, channel_mults=(1, 2, 4)``
    (254,737 parameters, 24.7 M multiply-adds) ran 2.7x faster in the same process, and
    :func:`sophon_fast.diffusion.train_denoiser` (``batch_size=32, lr=2e-3, ema_decay=0.995``)
    taught it recognisable MNIST digits in 30 epochs of 4000 images (3750 steps).

    Args:
        in_channels: Image channels (1 grey, 3 RGB). Default 1.
        image_size: Side of the square images the model is built for; ``forward`` rejects others.
            Default 28.
        base_channels: Width of the full-resolution level. Default 32.
        channel_mults: Width multiplier of each resolution level, full resolution first. Default (1, 2).
        groups: GroupNorm groups; every level's width must be divisible by it. Default 8.
        time_dim: Width of the time embedding; ``None`` means ``4 * base_channels``. Default None.

    Raises:
        ValueError: A non-positive size or width, an empty ``channel_mults``, an ``image_size`` not
            divisible by the total downsampling, or a level width not divisible by ``groups``.

    Shapes:
        x: (batch, in_channels, image_size, image_size), t: (batch,) integer -> same shape as x.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        groups: int = 8,
        time_dim: int | None = None,
    ) -> None:
        super().__init__()
        mults = [int(m) for m in channel_mults]
        if in_channels < 1 or base_channels < 1 or groups < 1:
            raise ValueError(
                f"SmallUNet needs in_channels, base_channels and groups >= 1; got in_channels="
                f"{in_channels}, base_channels={base_channels}, groups={groups}"
            )
        if not mults or any(m < 1 for m in mults):
            raise ValueError(
                f"channel_mults must be a non-empty sequence of positive integers; got {list(channel_mults)}"
            )
        downsampling = 2 ** (len(mults) - 1)
        if image_size < 1 or image_size % downsampling:
            raise ValueError(
                f"image_size={image_size} is not divisible by the UNet's total downsampling "
                f"{downsampling} (2 ** (len(channel_mults) - 1) with channel_mults={mults}); "
                f"use an image_size that is a multiple of {downsampling} or fewer levels"
            )
        widths = [base_channels * m for m in mults]
        # base_channels is normalised too (the first block's input), even when channel_mults[0] != 1.
        bad = sorted({w for w in (base_channels, *widths) if w % groups})
        if bad:
            raise ValueError(
                f"GroupNorm with groups={groups} needs base_channels={base_channels} and every level "
                f"width (base_channels x channel_mults = {widths}) divisible by {groups}; "
                f"channel counts {bad} are not"
            )
        time_dim = 4 * base_channels if time_dim is None else int(time_dim)
        if time_dim < 2:
            raise ValueError(f"time_dim must be >= 2; got {time_dim}")

        self.in_channels = in_channels
        self.image_size = image_size
        self.base_channels = base_channels
        self.channel_mults = tuple(mults)
        self.groups = groups
        self.time_dim = time_dim
        self.downsampling = downsampling

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path: one ResBlock per level (its output is the level's skip), then a stride-2 conv
        # except after the last level.
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        width = base_channels
        for level, level_width in enumerate(widths):
            self.down_blocks.append(_ResBlock(width, level_width, time_dim, groups))
            width = level_width
            if level < len(widths) - 1:
                self.downsamplers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))

        self.mid_block = _ResBlock(width, width, time_dim, groups)

        # Up path, deepest level first: one ResBlock per level on the concatenation with that level's
        # skip, narrowing to the next level's width *before* the nearest upsampling, so the
        # full-resolution block reads 2 * base_channels channels instead of 3 * base_channels.
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            out_width = widths[max(level - 1, 0)]
            self.up_blocks.append(_ResBlock(width + widths[level], out_width, time_dim, groups))
            width = out_width
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

        self.model_spec: dict[str, Any] = {
            "name": "unet",
            "kwargs": {
                "in_channels": in_channels,
                "image_size": image_size,
                "base_channels": base_channels,
                "channel_mults": list(mults),
                "groups": groups,
                "time_dim": time_dim,
            },
        }

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        """Raise a readable ValueError when ``x`` or ``t`` does not fit the model."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"SmallUNet was built for images of shape (batch, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) (in_channels={self.in_channels}, image_size={self.image_size}); got "
                f"{tuple(x.shape)}. Rebuild it with matching in_channels/image_size."
            )
        if not isinstance(t, torch.Tensor) or t.shape != (x.shape[0],):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"SmallUNet expects t as a tensor of shape (batch,) = ({x.shape[0]},), one timestep per "
                f"image; got {got}"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"SmallUNet expects integer timesteps t; got dtype {t.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the noise in ``x`` at timesteps ``t``.

        Args:
            x: Noisy images.
            t: Integer timesteps, one per image (0-based, see :mod:`sophon_fast.diffusion`); moved to
                ``x``'s device if elsewhere.

        Returns:
            The predicted noise, same shape and dtype as ``x``.

        Raises:
            ValueError: ``x`` is not (batch, in_channels, image_size, image_size), or ``t`` is not an
                integer tensor of shape (batch,).

        Shapes:
            x: (batch, in_channels, image_size, image_size), t: (batch,) -> (batch, in_channels,
            image_size, image_size)
        """
        self._check_inputs(x, t)
        time = self.time_mlp(timestep_embedding(t.to(x.device), self.base_channels, dtype=x.dtype))

        h = self.conv_in(x)
        skips = []
        for level, block in enumerate(self.down_blocks):
            h = block(h, time)
            skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)

        h = self.mid_block(h, time)

        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), time)
            if i < len(self.up_blocks) - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.conv_out(F.silu(self.norm_out(h)))
