"""What a run steps with: the optimizer the settings name, and the mixed precision (autocast and, for
fp16, loss scaling) on the host's device."""

from __future__ import annotations

import torch

from ..errors import LoraMakerError
from ..hosts.host import Host


def make_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    if name == "AdamW":
        # One fused kernel instead of a loop over hundreds of small tensors: on CUDA, and on the CPU
        # from torch 2.4 (the WebUI's torch 2.1 refuses it there).
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        fused = on_cuda or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 4)
        return torch.optim.AdamW(groups, weight_decay=1e-2, fused=fused)
    if name == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, weight_decay=1e-2)
    if name == "Prodigy":
        import prodigyopt

        return prodigyopt.Prodigy(groups, weight_decay=1e-2, safeguard_warmup=True, use_bias_correction=True)
    raise LoraMakerError(f"unknown optimizer {name!r}")


def precision_used(host: Host, precision: str) -> str:
    """What a run of `precision` computes in on the host: autocast exists on CUDA only ("no" elsewhere)."""
    return precision if host.device.type == "cuda" else "no"


def autocast_for(host: Host, precision: str):
    """Autocast on CUDA (fp16 with loss scaling, or bf16); plain fp32 maths on the CPU."""
    if precision_used(host, precision) == "no":
        return torch.autocast(host.device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = None
    if dtype == torch.float16:  # torch.amp.GradScaler from torch 2.3; the WebUI's 2.1 has the cuda one
        scaler = torch.amp.GradScaler("cuda") if hasattr(torch.amp, "GradScaler") else torch.cuda.amp.GradScaler()
    return torch.autocast("cuda", dtype=dtype), scaler
