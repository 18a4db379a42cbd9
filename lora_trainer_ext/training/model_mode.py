"""Put the host's model into training shape and give it back exactly as it was.

The model belongs to the host (in the WebUI it renders images before and after training), so every
change is recorded and undone in `finally`: requires_grad, train/eval mode, and ldm/sgm's own
gradient-checkpoint flags. Those flags must be off while a LoRA trains: ldm's checkpoint function
recomputes with the block's own parameters only, so the LoRA weights patched into the block get no
gradient (webui-host.md). Checkpointing, when wanted, is torch's non-reentrant kind around whole
UNet blocks, which sees every parameter the block uses. The run's clip skip and moving the VAE off the
GPU once latents are cached follow the same rule.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from ..errors import LoraMakerError
from ..hosts.host import Host

_FLAGS = ("checkpoint", "use_checkpoint")  # ldm/sgm: BasicTransformerBlock.checkpoint, ResBlock.use_checkpoint


def _modules(host: Host) -> list[torch.nn.Module]:
    return [host.unet, *host.text_encoders]


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The ldm/sgm UNet's top-level blocks, the unit of our gradient checkpointing."""
    blocks = [*getattr(unet, "input_blocks", []), *getattr(unet, "output_blocks", [])]
    middle = getattr(unet, "middle_block", None)
    return blocks + ([middle] if middle is not None else [])


@contextlib.contextmanager
def prepared_for_training(host: Host, gradient_checkpointing: bool = False) -> Iterator[None]:
    """Freeze every host weight, turn off ldm/sgm's checkpoint flags, optionally checkpoint UNet
    blocks; on exit restore requires_grad, modes, flags and forwards, whatever happened."""
    params = [p for module in _modules(host) for p in module.parameters()]
    grads = [p.requires_grad for p in params]
    modes = [(m, m.training) for module in _modules(host) for m in module.modules()]
    flags = [
        (m, name, getattr(m, name))
        for module in _modules(host) for m in module.modules() for name in _FLAGS
        if isinstance(getattr(m, name, None), bool) and not isinstance(getattr(type(m), name, None), property)
    ]
    patched: list[torch.nn.Module] = []
    try:
        for p in params:
            p.requires_grad_(False)
        for m, name, _ in flags:
            setattr(m, name, False)
        for module in _modules(host):
            module.eval()  # no dropout in the frozen model; the LoRA modules train on their own
        if gradient_checkpointing:
            for block in _unet_blocks(host.unet):
                if "forward" not in block.__dict__:
                    block.forward = _checkpointed(block.forward)
                    patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward
        for m, name, value in flags:
            setattr(m, name, value)
        for m, training in modes:
            m.training = training
        for p, requires_grad in zip(params, grads):
            p.requires_grad_(requires_grad)


def parameter_fingerprint(host: Host) -> dict[str, str]:
    """sha256 of every host weight by name: equal before and after training, or something leaked."""
    import hashlib

    out = {}
    for label, module in (("unet", host.unet), *((f"te{i}", te) for i, te in enumerate(host.text_encoders))):
        for name, tensor in module.state_dict().items():
            data = tensor.detach().cpu().contiguous()
            out[f"{label}.{name}"] = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


@contextlib.contextmanager
def clip_skip_set(host: Host, clip_skip: int | None):
    """The run's clip skip on a host that lets us set it (the standalone one; the WebUI's follows its
    own setting, as its txt2img does), put back afterwards."""
    before = getattr(host, "clip_skip", None)
    if clip_skip is None or clip_skip == before:
        yield
        return
    try:
        host.clip_skip = clip_skip
    except AttributeError:  # the WebUI's model follows its own setting
        raise LoraMakerError(f"clip skip is {before} in the WebUI's settings: train with that (leave clip_skip unset) "
                             "or change it there") from None
    try:
        yield
    finally:
        host.clip_skip = before


@contextlib.contextmanager
def off_the_gpu(modules: list[torch.nn.Module]):
    """Parts the run no longer needs (the VAE once the latents are cached, the text encoders once their
    outputs are) moved off the GPU to free its memory for the training, as sd-scripts does, and put back
    where they were afterwards."""
    moved = []
    for module in modules:
        device = next((p.device for p in module.parameters()), None) if module is not None else None
        if device is not None and device.type == "cuda":
            moved.append((module, device))
    for module, _ in moved:
        module.to("cpu")
    if moved:
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if moved:
            import gc

            gc.collect()  # what an error left behind (the trainer frees an out-of-memory step's tensors first)
            torch.cuda.empty_cache()
        for module, device in moved:
            module.to(device)
