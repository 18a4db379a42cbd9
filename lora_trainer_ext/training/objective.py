"""The diffusion training objective, as sd-scripts computes it: noise (with optional offset and
multi-resolution layers), the noisy latents at random timesteps (optionally perturbed), the eps or v
target, the per-sample loss with min-SNR weights, and the zero-terminal-SNR schedule of v-prediction
models trained that way (NoobAI V-Pred).

Noise and timesteps come from a CPU generator, so a seed gives the same run on any device."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample(latents: torch.Tensor, generator: torch.Generator, timesteps_total: int, noise_offset: float = 0.0,
           multires_iterations: int = 0, multires_discount: float = 0.3, ip_noise_gamma: float = 0.0):
    """(noise, timesteps, the noise put into the latents) for a batch: eps ~ N(0, 1) plus `noise_offset` x
    N(0, 1) per channel (helps very dark and bright images), then multi-resolution layers; a timestep
    uniform in [0, T); eps perturbed by `ip_noise_gamma`. Drawn one sample after the other, so a batch
    draws what its samples would draw as smaller batches in a row (gradient accumulation trains the same)."""
    c = latents.shape[1]
    drawn = []
    for _ in range(latents.shape[0]):
        noise = torch.randn((1, *latents.shape[1:]), generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((1, c, 1, 1), generator=generator)
        if multires_iterations:
            noise = multires_noise(noise, generator, multires_iterations, multires_discount)
        timestep = torch.randint(0, timesteps_total, (1,), generator=generator)
        drawn.append((noise, timestep, perturbed(noise, generator, ip_noise_gamma)))
    noise, timesteps, put_in = (torch.cat(parts) for parts in zip(*drawn))
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device), put_in.to(latents.device, latents.dtype)


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """sd-scripts' multires ("pyramid") noise: for i < `iterations`, noise drawn at the size divided by
    r^i (r uniform in [2, 4)) and upsampled bilinearly, weighted discount^i, is added (stopping once a side
    is 1 pixel), then the sum is scaled to unit standard deviation. Coarse noise lets the LoRA change
    the picture's overall brightness and colour, which per-pixel noise hides."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        size = (max(1, int(h / r**i)), max(1, int(w / r**i)))
        layer = torch.randn((b, c, *size), generator=generator)
        out += F.interpolate(layer, size=(h, w), mode="bilinear") * discount**i
        if 1 in size:
            break
    return out / out.std()


def perturbed(noise: torch.Tensor, generator: torch.Generator, gamma: float) -> torch.Tensor:
    """The noise put into the noisy latents with input perturbation (arXiv 2301.11706): eps + gamma x N(0, 1);
    the target stays eps."""
    if not gamma:
        return noise
    extra = torch.randn(noise.shape, generator=generator).to(noise.device, noise.dtype)
    return noise + gamma * extra


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so its last step is pure noise (arXiv 2305.08891, Algorithm 1): sqrt(alpha_bar)
    shifted to end at 0 and scaled to keep its first value."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return (root**2).float()


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


def _snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1 - a)


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, parameterization: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv 2303.09556): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
    snr = _snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if parameterization == "v" else clipped / snr


def v_pred_like_eps_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sd-scripts' scale_v_pred_loss_like_noise_pred: a v loss weighed SNR / (SNR + 1), SNR capped at 1000."""
    snr = torch.clamp(_snr(timesteps, alphas_cumprod), max=1000)
    return snr / (snr + 1)


def loss(prediction: torch.Tensor, wanted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample (over C, H, W), weighted, then averaged over the batch."""
    per_sample = F.mse_loss(prediction.float(), wanted, reduction="none").mean(dim=tuple(range(1, prediction.dim())))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
