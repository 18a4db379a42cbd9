"""The diffusion training objective, as sd-scripts computes it: noise (with optional offset), the
noisy latents at random timesteps, the eps or v target, and the per-sample loss with min-SNR weights.

Noise and timesteps come from a CPU generator, so a seed gives the same run on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample(latents: torch.Tensor, generator: torch.Generator, timesteps_total: int, noise_offset: float = 0.0):
    """(noise, timesteps) for a batch: eps ~ N(0, 1) plus `noise_offset` x N(0, 1) per sample and
    channel (helps very dark and bright images), timesteps uniform in [0, T)."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator)
    timesteps = torch.randint(0, timesteps_total, (b,), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def _at(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[timesteps].float().view(-1, *([1] * (like.dim() - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = _at(alphas_cumprod, timesteps, latents)
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
           parameterization: str) -> torch.Tensor:
    """What the UNet should predict: the noise (eps) or the velocity v = sqrt(a) eps - sqrt(1 - a) x0."""
    if parameterization == "eps":
        return noise.float()
    a = _at(alphas_cumprod, timesteps, latents)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv 2303.09556): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if parameterization == "v" else clipped / snr


def loss(prediction: torch.Tensor, wanted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (over C, H, W), weighted, then averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), wanted, reduction="none").mean(dim=tuple(range(1, prediction.dim())))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
