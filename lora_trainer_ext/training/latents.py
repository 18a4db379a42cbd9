"""Latents encoded once per image and orientation before the loop, kept in RAM or in files on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LoraMakerError, Stopped
from ..hosts.host import Host
from ..progress import Progress
from .data import TrainData


def cache_each(keys: list[tuple[int, bool]], encode, progress: Progress, what: str, disk: Path | None) -> dict:
    """{(image index, flip): encode(key)} for every key, without gradients, kept on the CPU (RAM) or in a
    file in `disk` for big datasets (the value is then its path); stoppable between keys."""
    cache: dict = {}
    with torch.no_grad(), progress.task(f"caching {what}", len(keys)) as task:
        for key in keys:
            if progress.should_stop():
                raise Stopped(f"stopped while caching {what}: nothing was trained yet")
            value = encode(key)
            if disk is not None:
                path = disk / f"{key[0]:06d}{'-flip' if key[1] else ''}.pt"
                torch.save(value, path)
                value = path
            cache[key] = value
            task.advance()
    return cache


def cache_latents(host: Host, data: TrainData, progress: Progress, disk: Path | None = None) -> dict:
    """Latents of every (image, flip) the run can ask for, encoded once (`cache_each`)."""

    def encode(key: tuple[int, bool]) -> torch.Tensor:
        pixels, _ = data.pixels(*key)
        latent = host.encode_images(pixels.unsqueeze(0).to(host.device, host.dtype))[0].float().cpu()
        if not torch.isfinite(latent).all():  # found now, not as a NaN loss steps later
            raise LoraMakerError(
                f"the VAE gave NaN or infinite latents for {data.items[key[0]].image.name}: it overflows in half "
                "precision. In the WebUI, start it with --no-half-vae or pick a VAE made for fp16 (for SDXL "
                "sdxl-vae-fp16-fix) in Settings > VAE; headless, train in fp32")
        return latent

    return cache_each(data.cache_keys(), encode, progress, "latents", disk)


def cached(cache: dict, key) -> torch.Tensor:
    value = cache[key]
    return torch.serialization.load(value) if isinstance(value, Path) else value  # see state.read_state
