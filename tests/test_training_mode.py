"""The host model is prepared for training and given back exactly, on the real ldm UNet with its own
gradient-checkpoint flags on (as in the SD2 and SDXL configs)."""

from __future__ import annotations

import types

import pytest
import torch
from test_network import run_unet, tiny_clip, tiny_sd1_unet

from lora_trainer_ext.hosts.host import SD1
from lora_trainer_ext.training.model_mode import parameter_fingerprint, prepared_for_training
from lora_trainer_ext.training.network import Network, NetworkConfig


def checkpointing_host():
    unet = tiny_sd1_unet()
    for m in unet.modules():  # what use_checkpoint: True in an SD2/SDXL yaml gives
        for flag in ("checkpoint", "use_checkpoint"):
            if isinstance(getattr(m, flag, None), bool):
                setattr(m, flag, True)
    return types.SimpleNamespace(kind=SD1, unet=unet, text_encoders=[tiny_clip()], device=torch.device("cpu"))


def lora_grads(host, network, inside_transformer_blocks=False):
    for p in network.parameters():
        p.grad = None
    host.unet.train()
    run_unet(host.unet).square().mean().backward()
    return [p.grad for lora in network.unet.lycoris.loras for p in lora.parameters()
            if not inside_transformer_blocks or "transformer_blocks" in lora.lora_name]


def state(host):
    modules = [host.unet, *host.text_encoders]
    return ([p.requires_grad for m in modules for p in m.parameters()],
            [m.training for mod in modules for m in mod.modules()],
            [(n, getattr(m, f)) for mod in modules for n, m in mod.named_modules() for f in ("checkpoint", "use_checkpoint")
             if isinstance(getattr(m, f, None), bool)],
            {n: set(m.__dict__) for n, m in host.unet.named_modules()})


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_lora_gets_gradients_only_once_ldm_checkpointing_is_off(gradient_checkpointing):
    host = checkpointing_host()
    host.text_encoders[0].train()  # a mode that must come back as it was
    network = Network(host, NetworkConfig("lora", dim=4, alpha=4))
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.1)
    network.attach()
    # the trap: ldm's own checkpoint recomputes a transformer block without the patched-in LoRA weights
    assert all(g is None or not g.abs().sum() for g in lora_grads(host, network, inside_transformer_blocks=True))

    before = state(host)
    fingerprint = parameter_fingerprint(host)
    with prepared_for_training(host, gradient_checkpointing=gradient_checkpointing):
        assert not any(p.requires_grad for p in host.unet.parameters())
        grads = lora_grads(host, network)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert state(host) == before
    network.detach()
    assert parameter_fingerprint(host) == fingerprint


def test_checkpointed_blocks_give_the_same_gradients():
    host = checkpointing_host()
    network = Network(host, NetworkConfig("locon", dim=4, alpha=4, conv_dim=4, conv_alpha=4))
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.1)
    network.attach()
    with prepared_for_training(host):
        plain = lora_grads(host, network)
    with prepared_for_training(host, gradient_checkpointing=True):
        checkpointed = lora_grads(host, network)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_restored_after_an_error():
    host = checkpointing_host()
    before = state(host)
    with pytest.raises(RuntimeError, match="out of memory"):
        with prepared_for_training(host, gradient_checkpointing=True):
            raise RuntimeError("CUDA out of memory")
    assert state(host) == before
