"""Latents encoded once per image and orientation before the loop, kept in RAM or in files on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LoraMakerError, Stopped
from ..hosts.host import Host
from ..progress import Progress
from .data import TrainData


def cache_latents(host: Host, data: TrainData, progress: Progress, disk: Path | None = None) -> dict:
    """Latents of every (image, flip) the run can ask for, encoded once: kept on the CPU (RAM), or
    in `disk` files for big datasets. Returns {key: tensor or path}."""
    keys = data.cache_keys()
    cache: dict = {}
    with torch.no_grad(), progress.task("caching latents", len(keys)) as task:
        for index, flip in keys:
            if progress.should_stop():
                raise Stopped("stopped while caching latents: nothing was trained yet")
            pixels, _ = data.pixels(index, flip)
            latent = host.encode_images(pixels.unsqueeze(0).to(host.device, host.dtype))[0].float().cpu()
            if not torch.isfinite(latent).all():  # found now, not as a NaN loss steps later
                raise LoraMakerError(
                    f"the VAE gave NaN or infinite latents for {data.items[index].image.name}: it overflows in half "
                    "precision. In the WebUI, start it with --no-half-vae or pick a VAE made for fp16 (for SDXL "
                    "sdxl-vae-fp16-fix) in Settings > VAE; headless, train in fp32")
            if disk is None:
                cache[(index, flip)] = latent
            else:
                path = disk / f"{index:06d}{'-flip' if flip else ''}.pt"
                torch.save(latent, path)
                cache[(index, flip)] = path
            task.advance()
    return cache


def cached(cache: dict, key) -> torch.Tensor:
    value = cache[key]
    return torch.serialization.load(value) if isinstance(value, Path) else value  # see state.read_state
