"""Tests for the diffusion foundation: noise schedules, denoising loss, samplers, SmallUNet, training.

The samplers are checked with ORACLE denoisers: for Gaussian data x0 ~ N(mean, std^2) (std = 0: a single
point) the exact noise predictor is known in closed form,

    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mean) / (ab std^2 + 1 - ab),      ab = alpha_bar[t],

and with it every sampler step is an affine map of x plus Gaussian noise. So a scalar recursion of
(mean, variance), written here from the papers' formulas, predicts each sampler's output distribution
exactly; the sampled statistics must match it within 5 standard errors, and its end point must lie close
to the data distribution.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from sophon_fast.diffusion import (
    OFFICIAL_TIMESTEP,
    NoiseSchedule,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    denoising_loss,
    from_model_range,
    to_model_range,
    train_denoiser,
)
from sophon_fast.models import SmallUNet, build_model
from sophon_fast.models.unet import timestep_embedding


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here is tiny: with two OpenMP threads on two shared cores, each op waits for a
    busy core (the EMA test took 8.1 s with 2 threads vs 0.14 s with 1 at load average 12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("timesteps", "beta_start", "beta_end"), [(1000, 1e-4, 2e-2), (7, 0.01, 0.3)]
)
def test_linear_schedule_closed_form(timesteps, beta_start, beta_end):
    schedule = NoiseSchedule("linear", timesteps, beta_start, beta_end)
    for name in ("betas", "alphas", "alpha_bars", "alpha_bars_prev", "posterior_variances"):
        values = getattr(schedule, name)
        assert values.dtype == torch.float64 and values.shape == (timesteps,), name
    betas = schedule.betas
    assert betas[0].item() == pytest.approx(beta_start, rel=1e-15)
    assert betas[-1].item() == pytest.approx(beta_end, rel=1e-15)
    spacing = (beta_end - beta_start) / (timesteps - 1)
    torch.testing.assert_close(
        betas.diff(),
        torch.full((timesteps - 1,), spacing, dtype=torch.float64),
        rtol=1e-9,
        atol=1e-15,
    )
    assert torch.equal(schedule.alphas, 1 - betas)
    for t in (0, 1, timesteps // 2, timesteps - 1):
        product = math.prod(1 - (beta_start + s * spacing) for s in range(t + 1))
        assert schedule.alpha_bars[t].item() == pytest.approx(product, rel=1e-12)


def test_cosine_schedule_closed_form():
    timesteps, offset = 1000, 0.008

    def f(u: float) -> float:
        return math.cos((u / timesteps + offset) / (1 + offset) * math.pi / 2) ** 2

    schedule = NoiseSchedule("cosine", timesteps)
    assert torch.allclose(
        schedule.alpha_bars, torch.cumprod(1 - schedule.betas, 0), rtol=1e-14, atol=0
    )
    capped = schedule.betas >= 0.999
    # Only the very last steps hit the 0.999 cap; before it alpha_bar is the closed form f(t+1)/f(0).
    first_capped = int(capped.nonzero()[0]) if capped.any() else timesteps
    assert timesteps - 3 <= first_capped <= timesteps - 1
    assert schedule.betas.max().item() == 0.999
    for t in (0, 1, 10, 500, 900, first_capped - 1):
        assert schedule.alpha_bars[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-12)
    assert bool((schedule.betas.diff() > 0).all())  # increasing noise
    assert schedule.betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)


def test_posterior_variance_and_official_timestep():
    schedule = NoiseSchedule()
    assert schedule.alpha_bars_prev[0].item() == 1.0
    assert schedule.posterior_variances[0].item() == 0.0
    t = 500
    ab, ab_prev, beta = (schedule.alpha_bars[t], schedule.alpha_bars[t - 1], schedule.betas[t])
    assert schedule.posterior_variances[t].item() == pytest.approx(
        (beta * (1 - ab_prev) / (1 - ab)).item(), rel=1e-14
    )
    # The official code's t = 1 has a noise std of ~0.015 (index 1), not 0.010 (index 0).
    std = math.sqrt(1 - (1 - 1e-4) * (1 - (1e-4 + (2e-2 - 1e-4) / 999)))
    assert OFFICIAL_TIMESTEP == 1
    assert (1 - schedule.alpha_bars[OFFICIAL_TIMESTEP]).sqrt().item() == pytest.approx(
        std, rel=1e-12
    )
    assert round(std, 3) == 0.015


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("sigmoid",), "unknown noise schedule kind 'sigmoid'"),
        (("linear", 0), "timesteps must be a positive integer; got 0"),
        (("linear", 10, 0.02, 0.01), "beta_start <= beta_end.*beta_start=0.02, beta_end=0.01"),
        (("linear", 10, 1e-4, 1.0), "beta_end < 1"),
        (("linear", 10, 0.0, 0.1), "0 < beta_start"),
    ],
)
def test_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule(*args)


# ----------------------------------------------------------------------------- q_sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_q_sample_and_predict_x0_by_hand(dtype):
    schedule = NoiseSchedule("cosine", 50)
    x0 = torch.randn(3, 2, 5, 7, dtype=dtype)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 17, 49])
    x_t = schedule.q_sample(x0, t, noise)
    assert x_t.dtype == dtype and x_t.shape == x0.shape
    for b in range(3):
        ab = schedule.alpha_bars[t[b]].item()
        expected = math.sqrt(ab) * x0[b].double() + math.sqrt(1 - ab) * noise[b].double()
        torch.testing.assert_close(x_t[b].double(), expected, **_close(dtype))
    torch.testing.assert_close(schedule.predict_x0(x_t, t, noise), x0, **_close(dtype, scale=1e4))
    # Linear in x0 and noise: gradients flow to both.
    x0.requires_grad_(True)
    noise.requires_grad_(True)
    schedule.q_sample(x0, t, noise).sum().backward()
    assert x0.grad is not None and noise.grad is not None


def _close(dtype: torch.dtype, scale: float = 1.0) -> dict:
    eps = torch.finfo(dtype).eps
    return {"rtol": 8 * eps * scale, "atol": 8 * eps * scale}


def test_q_sample_statistics():
    # x_t given x0 is N(sqrt(ab) x0, 1 - ab): check the first two moments on 200k draws per timestep,
    # within 5 standard errors (mean: sqrt(var / n); variance: var * sqrt(2 / (n - 1))).
    schedule = NoiseSchedule()
    timesteps = torch.tensor([0, 1, 250, 999])
    n = 200_000
    x0 = torch.tensor([0.9, -0.5, 0.3, 0.7], dtype=torch.float64)[:, None].expand(4, n)
    noise = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_t = schedule.q_sample(x0, timesteps, noise)
    for row, t in enumerate(timesteps.tolist()):
        ab = schedule.alpha_bars[t].item()
        mean, var = math.sqrt(ab) * x0[row, 0].item(), 1 - ab
        assert abs(x_t[row].mean().item() - mean) <= 5 * math.sqrt(var / n)
        assert abs(x_t[row].var().item() - var) <= 5 * var * math.sqrt(2 / (n - 1))


def test_q_sample_rejects_bad_inputs():
    schedule = NoiseSchedule(timesteps=10)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\).*got \(3,\)"):
        schedule.q_sample(x0, torch.zeros(3, dtype=torch.long), x0)
    with pytest.raises(ValueError, match="integer timesteps; got dtype torch.float32"):
        schedule.q_sample(x0, torch.zeros(2), x0)
    with pytest.raises(ValueError, match=r"\[0, 10\).*from 0 to 10"):
        schedule.q_sample(x0, torch.tensor([0, 10]), x0)
    with pytest.raises(ValueError, match=r"from -1 to 3"):
        schedule.q_sample(x0, torch.tensor([-1, 3]), x0)
    with pytest.raises(ValueError, match=r"noise must have the shape of x0 \(2, 1, 4, 4\)"):
        schedule.q_sample(x0, torch.zeros(2, dtype=torch.long), torch.zeros(2, 1, 4, 3))


# ----------------------------------------------------------------------------- loss


class _AffineDenoiser(nn.Module):
    """eps_hat = weight * x_t + 0.01 * t: simple enough to compute the loss and its gradient by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.weight * x + 0.01 * t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def test_denoising_loss_value_and_gradient_by_hand():
    schedule = NoiseSchedule()
    model = _AffineDenoiser()
    x0 = torch.rand(3, 1, 4, 5, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([OFFICIAL_TIMESTEP, 400, 999])
    loss = denoising_loss(model, schedule, x0, t=t, noise=noise)
    assert loss.shape == ()
    total, grad = 0.0, 0.0
    for b in range(3):
        ab = schedule.alpha_bars[t[b]].item()
        x_t = math.sqrt(ab) * x0[b] + math.sqrt(1 - ab) * noise[b]
        residual = 0.7 * x_t + 0.01 * t[b].item() - noise[b]
        total += residual.square().sum().item()
        grad += (2 * residual * x_t).sum().item()
    assert loss.item() == pytest.approx(total / x0.numel(), rel=1e-12)
    loss.backward()
    assert model.weight.grad.item() == pytest.approx(grad / x0.numel(), rel=1e-12)


def test_denoising_loss_random_draws_reproducible():
    schedule = NoiseSchedule(timesteps=20)
    model = _AffineDenoiser()
    x0 = torch.zeros(4, 1, 2, 2, dtype=torch.float64)
    first = denoising_loss(model, schedule, x0, generator=torch.Generator().manual_seed(3))
    second = denoising_loss(model, schedule, x0, generator=torch.Generator().manual_seed(3))
    third = denoising_loss(model, schedule, x0, generator=torch.Generator().manual_seed(4))
    assert first.item() == second.item() != third.item()

    class WrongShape(nn.Module):
        def forward(self, x, t):
            return x[:, :, :1]

    with pytest.raises(ValueError, match=r"predicted noise of the input's shape \(4, 1, 2, 2\)"):
        denoising_loss(WrongShape(), schedule, x0)


# ----------------------------------------------------------------------------- samplers


class _GaussianOracle(nn.Module):
    """Exact noise predictor for data x0 ~ N(mean, std^2) per element (std = 0: the point ``mean``).

    Records the timesteps it is called at. The float64 buffer makes the samplers work in float64.
    """

    def __init__(self, schedule: NoiseSchedule, mean: float, std: float) -> None:
        super().__init__()
        self.schedule, self.mean, self.std = schedule, mean, std
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))
        self.calls: list[int] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and bool((t == t[0]).all())
        self.calls.append(int(t[0]))
        self.modes.append(self.training)
        ab = self.schedule.alpha_bars[t].to(x).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mean) / (ab * self.std**2 + 1 - ab)


def _affine_ddpm(schedule: NoiseSchedule, mean: float, std: float) -> tuple[float, float, float]:
    """(slope, offset, noise variance) of the whole oracle-driven DDPM chain: output = slope x_T +
    offset + N(0, noise variance), from Ho et al.'s posterior mean and beta_tilde."""
    slope, offset, noise_var = 1.0, 0.0, 0.0
    for t in range(schedule.timesteps - 1, -1, -1):
        ab, beta = schedule.alpha_bars[t].item(), schedule.betas[t].item()
        ab_prev = schedule.alpha_bars[t - 1].item() if t > 0 else 1.0
        # x0_hat = mean + gain (x - sqrt(ab) mean)
        gain = math.sqrt(ab) * std**2 / (ab * std**2 + 1 - ab)
        c_x0 = math.sqrt(ab_prev) * beta / (1 - ab)
        c_xt = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
        a, b = c_x0 * gain + c_xt, c_x0 * mean * (1 - math.sqrt(ab) * gain)
        slope, offset = a * slope, a * offset + b
        noise_var = a * a * noise_var + beta * (1 - ab_prev) / (1 - ab)
    return slope, offset, noise_var


def _affine_ddim(schedule, mean, std, steps, eta):
    """As :func:`_affine_ddpm` for DDIM (Song et al. eq. 12) over ``ddim_timesteps``."""
    sequence = ddim_timesteps(schedule.timesteps, steps)
    slope, offset, noise_var = 1.0, 0.0, 0.0
    for t, s in zip(sequence, sequence[1:] + [-1]):
        ab = schedule.alpha_bars[t].item()
        ab_s = schedule.alpha_bars[s].item() if s >= 0 else 1.0
        sigma2 = eta**2 * (1 - ab_s) / (1 - ab) * (1 - ab / ab_s)
        denom = ab * std**2 + 1 - ab
        gain = math.sqrt(ab) * std**2 / denom
        eps_gain = math.sqrt(1 - ab) / denom  # eps = eps_gain (x - sqrt(ab) mean)
        c_eps = math.sqrt(1 - ab_s - sigma2)
        a = math.sqrt(ab_s) * gain + c_eps * eps_gain
        b = (
            math.sqrt(ab_s) * mean * (1 - math.sqrt(ab) * gain)
            - c_eps * eps_gain * math.sqrt(ab) * mean
        )
        slope, offset = a * slope, a * offset + b
        noise_var = a * a * noise_var + sigma2
    return slope, offset, noise_var


def _assert_moments(samples: torch.Tensor, mean: float, var: float) -> None:
    """Sample mean and variance within 5 standard errors of (mean, var)."""
    n = samples.numel()
    sample_mean, sample_var = samples.mean().item(), samples.var().item()
    assert abs(sample_mean - mean) <= 5 * math.sqrt(var / n), (sample_mean, mean)
    assert abs(sample_var - var) <= 5 * var * math.sqrt(2 / (n - 1)), (sample_var, var)


SHAPE = (2000, 1, 4, 4)  # 32,000 i.i.d. elements


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_ddpm_oracle_lands_on_a_point(kind):
    schedule = NoiseSchedule(kind, 200) if kind == "cosine" else NoiseSchedule(kind, 200, 1e-4, 0.1)
    oracle = _GaussianOracle(schedule, mean=0.37, std=0.0).train()
    samples = ddpm_sample(
        oracle,
        schedule,
        (64, 1, 3, 3),
        generator=torch.Generator().manual_seed(0),
        clip_denoised=False,
    )
    assert samples.dtype == torch.float64
    torch.testing.assert_close(samples, torch.full_like(samples, 0.37), rtol=0, atol=1e-9)
    assert oracle.calls == list(range(199, -1, -1))
    assert not any(oracle.modes) and oracle.training  # eval while sampling, train mode restored


def test_ddpm_oracle_gaussian_distribution():
    schedule, mean, std = NoiseSchedule("cosine", 400), 0.2, 0.2
    oracle = _GaussianOracle(schedule, mean, std)
    samples = ddpm_sample(
        oracle, schedule, SHAPE, generator=torch.Generator().manual_seed(1), clip_denoised=False
    )
    slope, offset, noise_var = _affine_ddpm(schedule, mean, std)
    _assert_moments(samples, offset, slope**2 + noise_var)
    # The exact chain lands within 3 % of the data std (2.2 % low: beta_tilde slightly under-estimates
    # the true reverse variance) and on the data mean.
    assert math.sqrt(slope**2 + noise_var) == pytest.approx(std, rel=0.03)
    assert offset == pytest.approx(mean, abs=1e-5)


def test_ddim_eta0_is_the_exact_deterministic_map():
    schedule, mean, std = NoiseSchedule("cosine", 100), 0.1, 0.3
    oracle = _GaussianOracle(schedule, mean, std)
    shape = (3, 1, 5, 5)
    samples = ddim_sample(
        oracle,
        schedule,
        shape,
        steps=20,
        generator=torch.Generator().manual_seed(5),
        clip_denoised=False,
    )
    again = ddim_sample(
        oracle,
        schedule,
        shape,
        steps=20,
        generator=torch.Generator().manual_seed(5),
        clip_denoised=False,
    )
    assert torch.equal(samples, again)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    slope, offset, noise_var = _affine_ddim(schedule, mean, std, 20, 0.0)
    assert noise_var == 0.0
    torch.testing.assert_close(samples, (slope * x_T + offset).clamp(-1, 1), rtol=1e-12, atol=1e-12)
    assert oracle.calls[:20] == ddim_timesteps(100, 20)
    # With enough steps the deterministic map carries N(0, 1) onto the data distribution.
    slope, offset, _ = _affine_ddim(schedule, mean, std, 100, 0.0)
    assert slope == pytest.approx(std, rel=0.05) and offset == pytest.approx(mean, abs=1e-3)


def test_ddim_oracle_lands_on_a_point():
    schedule = NoiseSchedule()
    oracle = _GaussianOracle(schedule, mean=-0.6, std=0.0)
    for eta in (0.0, 1.0):
        samples = ddim_sample(
            oracle, schedule, (16, 1, 2, 2), steps=10, eta=eta, clip_denoised=False
        )
        torch.testing.assert_close(samples, torch.full_like(samples, -0.6), rtol=0, atol=1e-9)


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_over_all_steps_is_ddpm(clip):
    # With clipping, DDIM re-derives eps from the clamped x0 estimate, so the identity still holds;
    # mean 0.9, std 0.5 puts much of the x0 estimate above 1, so the clamp is active.
    schedule = NoiseSchedule("linear", 60, 1e-3, 0.2)
    oracle = _GaussianOracle(schedule, mean=0.9 if clip else 0.3, std=0.5 if clip else 0.4)
    ddpm = ddpm_sample(
        oracle,
        schedule,
        (8, 1, 3, 3),
        generator=torch.Generator().manual_seed(2),
        clip_denoised=clip,
    )
    ddim = ddim_sample(
        oracle,
        schedule,
        (8, 1, 3, 3),
        steps=60,
        eta=1.0,
        clip_denoised=clip,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(ddim, ddpm, rtol=1e-10, atol=1e-10)


def test_ddim_stochastic_distribution():
    schedule, mean, std = NoiseSchedule("cosine", 200), -0.1, 0.25
    oracle = _GaussianOracle(schedule, mean, std)
    samples = ddim_sample(
        oracle,
        schedule,
        SHAPE,
        steps=25,
        eta=0.5,
        generator=torch.Generator().manual_seed(7),
        clip_denoised=False,
    )
    slope, offset, noise_var = _affine_ddim(schedule, mean, std, 25, 0.5)
    assert noise_var > 0.01 * slope**2  # the eta noise matters, so a wrong sigma would show
    _assert_moments(samples, offset, slope**2 + noise_var)


@pytest.mark.parametrize("clip", [False, True])
def test_samplers_clamp_to_model_range(clip):
    schedule = NoiseSchedule("cosine", 50)
    oracle = _GaussianOracle(schedule, mean=0.9, std=0.5)  # a third of the mass lies above 1
    for samples in (
        ddpm_sample(oracle, schedule, (256, 1, 2, 2), clip_denoised=clip),
        ddim_sample(oracle, schedule, (256, 1, 2, 2), steps=10, clip_denoised=clip),
    ):
        assert samples.max().item() == 1.0 and samples.min().item() >= -1.0


class _RecordingPoint(_GaussianOracle):
    """Point-mass oracle that also records the mean of every input it sees."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.input_means = getattr(self, "input_means", []) + [x.mean().item()]
        return super().forward(x, t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_denoised_clamps_the_x0_estimate(sampler):
    # Data at the point 1.5, outside the model range: the clipped x0 estimate is 1, so the last
    # model input x_0 ~ sqrt(alpha_bar[0]) * 1 (noise std 0.01), against ~1.5 without clipping.
    schedule = NoiseSchedule(timesteps=100, beta_end=0.1)
    last_inputs = {}
    for clip in (False, True):
        oracle = _RecordingPoint(schedule, mean=1.5, std=0.0)
        if sampler == "ddpm":
            ddpm_sample(oracle, schedule, (64, 1, 4, 4), clip_denoised=clip)
        else:
            ddim_sample(oracle, schedule, (64, 1, 4, 4), steps=100, clip_denoised=clip)
        last_inputs[clip] = oracle.input_means[-1]
    assert last_inputs[False] == pytest.approx(1.5, abs=0.01)
    assert last_inputs[True] == pytest.approx(1.0, abs=0.01)


def test_ddim_timesteps_and_sampler_arguments():
    assert ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert ddim_timesteps(1000, 1) == [999]
    sequence = ddim_timesteps(1000, 50)
    assert len(sequence) == 50 and sequence[0] == 999 and sequence[-1] == 0
    assert all(a > b for a, b in zip(sequence, sequence[1:]))
    schedule = NoiseSchedule(timesteps=10)
    oracle = _GaussianOracle(schedule, 0.0, 1.0)
    for steps in (0, 11):
        with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 10\]"):
            ddim_sample(oracle, schedule, (1, 1, 2, 2), steps=steps)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(oracle, schedule, (1, 1, 2, 2), steps=5, eta=-0.1)
    with pytest.raises(ValueError, match="positive sizes"):
        ddpm_sample(oracle, schedule, (0, 1, 2, 2))


# ----------------------------------------------------------------------------- SmallUNet


@pytest.mark.parametrize(
    ("kwargs", "shape"),
    [
        ({}, (2, 1, 28, 28)),
        ({"in_channels": 3, "image_size": 32}, (2, 3, 32, 32)),
        ({"in_channels": 3, "image_size": 32, "channel_mults": (1, 2, 2)}, (2, 3, 32, 32)),
        (
            {"image_size": 28, "channel_mults": (1, 2, 2), "base_channels": 16, "groups": 4},
            (3, 1, 28, 28),
        ),
    ],
)
def test_unet_shapes(kwargs, shape):
    model = SmallUNet(**kwargs)
    t = torch.tensor([0, 999, 5][: shape[0]])
    out = model(torch.randn(shape), t)
    assert out.shape == shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_unet_registry_and_default_size():
    model = build_model("unet")
    assert isinstance(model, SmallUNet)
    assert model.model_spec == {
        "name": "unet",
        "kwargs": {
            "in_channels": 1,
            "image_size": 28,
            "base_channels": 32,
            "channel_mults": [1, 2],
            "groups": 8,
            "time_dim": 128,
        },
    }
    assert sum(p.numel() for p in model.parameters()) == 290_593


def test_unet_uses_the_timestep():
    torch.manual_seed(0)
    model = SmallUNet(base_channels=8, groups=4, image_size=8)
    x = torch.randn(2, 1, 8, 8)
    same_x = x[:1].expand(2, 1, 8, 8)
    out = model(same_x, torch.tensor([3, 700]))
    assert not torch.allclose(out[0], out[1])
    torch.testing.assert_close(model(same_x, torch.tensor([3, 3]))[1], out[0])


def test_timestep_embedding_closed_form():
    t = torch.tensor([0, 1, 37])
    emb = timestep_embedding(t, 6, dtype=torch.float64)
    freqs = [10000 ** (-i / 3) for i in range(3)]
    expected = [
        [math.sin(v * f) for f in freqs] + [math.cos(v * f) for f in freqs] for v in (0, 1, 37)
    ]
    torch.testing.assert_close(
        emb, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"image_size": 30, "channel_mults": (1, 2, 2)},
            "image_size=30 is not divisible by the UNet's total downsampling 4",
        ),
        ({"image_size": 28, "channel_mults": (1, 2, 2, 2)}, "image_size=28 .* downsampling 8"),
        ({"base_channels": 12}, r"groups=8 .*\[12, 24\].* channel counts \[12\] are not"),
        ({"base_channels": 32, "groups": 3}, r"groups=3 .* channel counts \[32, 64\] are not"),
        ({"base_channels": 12, "channel_mults": (2, 4)}, r"base_channels=12 .* counts \[12\] are"),
        ({"channel_mults": ()}, "non-empty"),
    ],
)
def test_unet_rejects_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmallUNet(**kwargs)


def test_unet_rejects_bad_inputs():
    model = SmallUNet(base_channels=8, groups=4)
    t = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 28, 28\).*got \(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28), t)
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32), t)
    with pytest.raises(ValueError, match=r"got \(1, 28, 28\)"):
        model(torch.randn(1, 28, 28), t[:1])
    with pytest.raises(
        ValueError, match=r"t as a tensor of shape \(batch,\) = \(2,\).*got \(2, 1\)"
    ):
        model(torch.randn(2, 1, 28, 28), t[:, None])
    with pytest.raises(ValueError, match="got int"):
        model(torch.randn(2, 1, 28, 28), 5)
    with pytest.raises(ValueError, match="integer timesteps t; got dtype torch.float32"):
        model(torch.randn(2, 1, 28, 28), t.float())


def test_unet_gradient_reaches_every_parameter_float64():
    torch.manual_seed(0)
    model = SmallUNet(base_channels=8, groups=4, image_size=8, channel_mults=(1, 2, 2)).double()
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    loss = denoising_loss(model, NoiseSchedule(), x0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float64, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_unet_second_order_gradient():
    # The protect() engines' order=2 mode differentiates through inner gradient steps: every op of
    # the UNet (GroupNorm, SiLU, convolutions, interpolation) must support double backward.
    torch.manual_seed(0)
    model = SmallUNet(base_channels=4, groups=2, image_size=4, time_dim=8).double()
    params = list(model.parameters())
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    loss = denoising_loss(model, NoiseSchedule(), x0, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(loss, params, create_graph=True)
    hessian_grad = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
    assert all(torch.isfinite(h).all() for h in hessian_grad)
    assert sum(int(h.abs().sum() > 0) for h in hessian_grad) == len(params)


# ----------------------------------------------------------------------------- training


def _tiny_set() -> torch.Tensor:
    """32 8x8 images of two shapes (a bar and a square), in [-1, 1]."""
    images = torch.zeros(32, 1, 8, 8)
    images[:16, :, 3:5, :] = 1.0
    images[16:, :, 2:6, 2:6] = 1.0
    return to_model_range(images)


def test_train_denoiser_loss_decreases_and_is_reproducible():
    schedule = NoiseSchedule("linear", 100, 1e-4, 0.1)
    images = _tiny_set()
    torch.manual_seed(0)
    model = SmallUNet(base_channels=8, groups=4, image_size=8).eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train_denoiser(
        model, schedule, images, epochs=6, batch_size=16, lr=3e-3, progress=False
    )
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    # Untrained, the prediction is nearly independent of the noise: loss ~1. Twelve Adam steps bring
    # it to ~0.5 (0.51-0.56 over seeds 0-5 on the mean of the last two epochs).
    assert losses[0] > 0.8 and sum(losses[-2:]) / 2 < 0.65 * losses[0]
    assert not model.training  # previous mode restored

    twin = SmallUNet(base_channels=8, groups=4, image_size=8)
    twin.load_state_dict(start)
    again = train_denoiser(twin, schedule, images, epochs=2, batch_size=16, lr=3e-3, progress=False)
    assert again == pytest.approx(losses[:2], rel=1e-5)
    assert train_denoiser(twin, schedule, images, epochs=0, progress=False) == []


def test_train_denoiser_ema_by_hand():
    # Record the raw weights after every Adam step, then rebuild the average by hand.
    schedule = NoiseSchedule(timesteps=50)
    images = _tiny_set()[::4]
    torch.manual_seed(0)
    model = SmallUNet(base_channels=4, groups=2, image_size=8, time_dim=8)
    average = [p.detach().clone() for p in model.parameters()]
    raw_steps = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: raw_steps.append(
            [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
        )
    )
    try:
        train_denoiser(
            model, schedule, images, epochs=2, batch_size=3, lr=1e-2, ema_decay=0.7, progress=False
        )
    finally:
        handle.remove()
    assert len(raw_steps) == 6
    for n, raw in enumerate(raw_steps, start=1):
        decay = min(0.7, (1 + n) / (10 + n))
        average = [decay * a + (1 - decay) * r for a, r in zip(average, raw)]
    for got, want in zip(model.parameters(), average):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(a, r) for a, r in zip(average, raw_steps[-1]))
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\) or None; got 1.0"):
        train_denoiser(model, schedule, images, epochs=1, ema_decay=1.0, progress=False)


def test_train_denoiser_rejects_bad_inputs():
    schedule = NoiseSchedule(timesteps=10)
    model = SmallUNet(base_channels=8, groups=4, image_size=8)
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"must lie in \[-1, 1\].*to_model_range.*from 0 to 255"):
        train_denoiser(
            model, schedule, images + 255 * (torch.arange(4) == 1).view(-1, 1, 1, 1), epochs=1
        )
    with pytest.raises(ValueError, match=r"non-empty \(N, C, H, W\)"):
        train_denoiser(model, schedule, images[0], epochs=1)
    with pytest.raises(ValueError, match="floating point"):
        train_denoiser(model, schedule, images.long(), epochs=1)
    with pytest.raises(ValueError, match="epochs must be an integer >= 0"):
        train_denoiser(model, schedule, images, epochs=-1)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        train_denoiser(model, schedule, images, epochs=1, batch_size=0)


def test_model_range_round_trip():
    pixels = torch.rand(2, 3, 4, 4)
    x = to_model_range(pixels)
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(from_model_range(x), pixels)
    assert from_model_range(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]
