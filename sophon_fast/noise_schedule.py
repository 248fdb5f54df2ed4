"""The variance schedule of a DDPM (Ho et al. 2020): :class:`NoiseSchedule`.

``beta[0..T-1]`` defines ``alpha[t] = 1 - beta[t]`` and ``alpha_bar[t] = alpha[0] * ... * alpha[t]``;
the forward process jumps straight to step ``t``::

    x_t = sqrt(alpha_bar[t]) * x_0 + sqrt(1 - alpha_bar[t]) * eps,        eps ~ N(0, I)

``t`` is a 0-based index into the schedule arrays (the convention, and how it maps to the paper's
and the official SOPHON code's, is set out in :mod:`sophon_fast.diffusion`, which re-exports this
class beside the loss, the samplers and the training loop that use it).

Schedule arrays are float64 on the CPU, copied to a device once, on first use there; the maps return
tensors in the dtype and on the device of their image input.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NoiseSchedule"]

# Nichol & Dhariwal (2021), "Improved DDPM": offset s of the cosine schedule and the cap on its betas
# (the last steps of the un-capped schedule approach beta = 1, i.e. a singular reverse step).
_COSINE_OFFSET = 0.008
_COSINE_MAX_BETA = 0.999


def _cosine_betas(timesteps: int) -> torch.Tensor:
    """``beta[t] = min(1 - f(t + 1) / f(t), 0.999)`` with ``f(u) = cos((u / T + s) / (1 + s) * pi / 2) ** 2``."""
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * (math.pi / 2)) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=_COSINE_MAX_BETA)


class NoiseSchedule:
    """Variance schedule of a DDPM: ``betas``, ``alphas``, ``alpha_bars`` and the maps between ``x_0``,
    ``x_t`` and the noise.

    Args:
        kind: ``"linear"``: ``betas = linspace(beta_start, beta_end, timesteps)`` (Ho et al. 2020);
            ``"cosine"``: ``alpha_bar`` follows ``cos((t/T + s)/(1 + s) * pi/2) ** 2`` normalised to
            1 at ``t = 0``, with ``s = 0.008`` and betas capped at 0.999 (Nichol & Dhariwal 2021);
            ``beta_start``/``beta_end`` are ignored. Default "linear".
        timesteps: Number of diffusion steps T. Default 1000.
        beta_start: First beta of the linear schedule. Default 1e-4.
        beta_end: Last beta of the linear schedule. Default 2e-2.

    Attributes:
        kind, timesteps, beta_start, beta_end: The arguments.
        betas, alphas, alpha_bars: float64 CPU tensors of shape (timesteps,), indexed by the 0-based
            timestep ``t`` (:mod:`sophon_fast.diffusion`); ``alphas = 1 - betas``,
            ``alpha_bars = cumprod(alphas)``.
        alpha_bars_prev: ``alpha_bar[t - 1]`` with ``alpha_bar[-1] = 1``; shape (timesteps,).
        posterior_variances: ``beta_tilde[t] = beta[t] (1 - alpha_bar[t-1]) / (1 - alpha_bar[t])``,
            the variance of ``q(x_{t-1} | x_t, x_0)``; ``beta_tilde[0] = 0``. Shape (timesteps,).

    Raises:
        ValueError: An unknown ``kind``, ``timesteps < 1``, or linear betas outside
            ``0 < beta_start <= beta_end < 1``.
    """

    KINDS = ("linear", "cosine")

    def __init__(
        self,
        kind: str = "linear",
        timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 2e-2,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown noise schedule kind {kind!r}; expected one of {self.KINDS}")
        if isinstance(timesteps, bool) or int(timesteps) != timesteps or timesteps < 1:
            raise ValueError(f"timesteps must be a positive integer; got {timesteps!r}")
        timesteps = int(timesteps)
        if kind == "linear":
            if not 0.0 < beta_start <= beta_end < 1.0:
                raise ValueError(
                    "a linear schedule needs 0 < beta_start <= beta_end < 1; got "
                    f"beta_start={beta_start}, beta_end={beta_end}"
                )
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            betas = _cosine_betas(timesteps)
        self.kind = kind
        self.timesteps = timesteps
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bars = torch.cumprod(self.alphas, dim=0)
        self.alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bars[:-1]])
        self.posterior_variances = betas * (1.0 - self.alpha_bars_prev) / (1.0 - self.alpha_bars)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        betas = (
            ""
            if self.kind == "cosine"
            else f", beta_start={self.beta_start}, beta_end={self.beta_end}"
        )
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps}{betas})"

    # ------------------------------------------------------------------ helpers

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The float64 coefficient tables on ``device`` (copied there once)."""
        tables = self._device_cache.get(device)
        if tables is None:
            tables = {
                "sqrt_alpha_bars": self.alpha_bars.sqrt().to(device),
                "sqrt_one_minus_alpha_bars": (1.0 - self.alpha_bars).sqrt().to(device),
            }
            self._device_cache[device] = tables
        return tables

    def check_timesteps(self, t: torch.Tensor, batch: int) -> None:
        """Raise a ValueError unless ``t`` is an integer tensor of shape ``(batch,)`` in ``[0, T)``.

        The range is checked only for CPU tensors: on an accelerator it would cost a host sync (and
        break CUDA-graph capture); an out-of-range index then fails inside the gather instead.
        """
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"t must be a tensor of shape ({batch},); got {type(t).__name__}")
        if t.shape != (batch,):
            raise ValueError(
                f"t must have shape (batch,) = ({batch},), one timestep per image; got {tuple(t.shape)}"
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"t must hold integer timesteps; got dtype {t.dtype}")
        if (
            t.device.type == "cpu"
            and batch
            and (int(t.min()) < 0 or int(t.max()) >= self.timesteps)
        ):
            raise ValueError(
                f"timesteps must lie in [0, {self.timesteps}) (0-based, T = {self.timesteps}); got "
                f"values from {int(t.min())} to {int(t.max())}"
            )

    def _coefficient(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at ``t``, shaped (batch, 1, ..., 1) to broadcast over ``like``, in its dtype."""
        values = self._on(like.device)[name][t.to(like.device)]
        return values.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))

    # ------------------------------------------------------------------ maps

    def _check_map_inputs(
        self, name: str, x: torch.Tensor, t: torch.Tensor, other_name: str, other: torch.Tensor
    ) -> None:
        """x (batch, *), t valid timesteps for that batch, other shaped like x."""
        if x.dim() < 1:
            raise ValueError(f"{name} must have a leading batch dimension; got a 0-dim tensor")
        self.check_timesteps(t, x.shape[0])
        if other.shape != x.shape:
            raise ValueError(
                f"{other_name} must have the shape of {name} {tuple(x.shape)}; "
                f"got {tuple(other.shape)}"
            )

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean images to timestep ``t``: ``sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise``.

        The coefficients are taken in float64 and cast to ``x0``'s dtype; the result is differentiable
        in ``x0`` and ``noise``.

        Args:
            x0: Clean images (any trailing shape).
            t: 0-based integer timesteps, one per image.
            noise: Standard normal noise, same shape as ``x0``.

        Returns:
            ``x_t``, same shape, dtype and device as ``x0``.

        Raises:
            ValueError: ``t`` is not an integer tensor of shape (batch,) in [0, T), or ``noise`` does not
                have ``x0``'s shape.

        Shapes:
            x0: (batch, *), t: (batch,), noise: (batch, *) -> (batch, *)
        """
        self._check_map_inputs("x0", x0, t, "noise", noise)
        return (
            self._coefficient("sqrt_alpha_bars", t, x0) * x0
            + self._coefficient("sqrt_one_minus_alpha_bars", t, x0) * noise
        )

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert :meth:`q_sample` for ``x0`` given the noise:
        ``(x_t - sqrt(1 - alpha_bar[t]) eps) / sqrt(alpha_bar[t])``.

        Args:
            x_t: Noisy images.
            t: 0-based integer timesteps, one per image.
            eps: (Predicted) noise, same shape as ``x_t``.

        Returns:
            The implied clean images, same shape, dtype and device as ``x_t``.

        Raises:
            ValueError: As :meth:`q_sample`.

        Shapes:
            x_t: (batch, *), t: (batch,), eps: (batch, *) -> (batch, *)
        """
        self._check_map_inputs("x_t", x_t, t, "eps", eps)
        return (
            x_t - self._coefficient("sqrt_one_minus_alpha_bars", t, x_t) * eps
        ) / self._coefficient("sqrt_alpha_bars", t, x_t)
