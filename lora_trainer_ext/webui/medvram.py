"""Training on a WebUI started with --medvram or --medvram-sdxl (webui-host.md: modules/lowvram.py).

In that mode the WebUI keeps one of its three big parts (text encoders, VAE, UNet) on the GPU at a time:
a forward pre-hook on each moves it in and the previous one out, and the VAE's encode/decode are
wrapped to do the same. A training step runs the UNet forward and backward with LoRA modules that stay
on the GPU, so for the run the hooks come off and the parts stay where training puts them (the UNet
resident, the VAE parked once latents are cached, the text encoders parked once their outputs are).
Afterwards every hook, wrapper and device is put back exactly as the WebUI had it. --lowvram (the UNet
swapped block by block) cannot train and stays refused (host.check_trainable).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SWAP_HOOK = "send_me_to_gpu"  # lowvram.setup_for_low_vram's hook


def swap_hooks(sd_model: torch.nn.Module) -> list[tuple[torch.nn.Module, int, object]]:
    """(module, key, hook) of every medvram swap hook on the model."""
    return [(module, key, hook) for module in sd_model.modules()
            for key, hook in list(module._forward_pre_hooks.items()) if getattr(hook, "__name__", "") == SWAP_HOOK]


def _parts(sd_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The parts the WebUI swaps: text encoders, VAE, UNet wrapper (those present, with weights)."""
    found = [getattr(sd_model, name, None) for name in ("conditioner", "cond_stage_model", "first_stage_model", "model")]
    return [part for part in found if isinstance(part, torch.nn.Module) and any(True for _ in part.parameters())]


@contextlib.contextmanager
def out_of_medvram(sd_model: torch.nn.Module) -> Iterator[None]:
    """The model out of medvram's swapping for a training run, every part on the training device; on exit
    the hooks, the VAE's wrappers, each part's device and the WebUI's record of the part on the GPU as before."""
    from modules import devices, lowvram

    if not getattr(sd_model, "lowvram", False):
        yield
        return
    hooks = swap_hooks(sd_model)
    vae = sd_model.first_stage_model
    wrappers = {name: vae.__dict__[name] for name in ("encode", "decode") if name in vae.__dict__}
    placed = [(part, next(part.parameters()).device) for part in _parts(sd_model)]
    in_gpu = lowvram.module_in_gpu
    for module, key, _ in hooks:
        del module._forward_pre_hooks[key]
    for name in wrappers:
        del vae.__dict__[name]
    sd_model.lowvram = False
    try:
        for part, _ in placed:
            part.to(devices.device)
        yield
    finally:
        for part, device in placed:
            part.to(device)
        for module, key, hook in hooks:
            module._forward_pre_hooks[key] = hook
        vae.__dict__.update(wrappers)
        lowvram.module_in_gpu = in_gpu
        sd_model.lowvram = True
