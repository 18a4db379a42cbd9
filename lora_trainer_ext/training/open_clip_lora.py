"""LoRA on an OpenCLIP text tower as the WebUI holds it (SD2's text encoder, SDXL's second), named the
way kohya names the same layers of the HF CLIP model sd-scripts trains (`lora_te2_text_model_encoder_
layers_0_self_attn_q_proj`, ...), so every consumer loads the file as it loads sd-scripts'.

OpenCLIP fuses q, k and v into one `nn.MultiheadAttention.in_proj_weight`, which torch's attention
reads directly (as it does `out_proj.weight`): there is no layer whose forward a LoRA could wrap. So
each trained weight gets a parametrization for the run: weight + up @ down * alpha / dim, with q, k and
v each adding to their third of `in_proj_weight`. Detaching removes the parametrizations and leaves
the original tensors in place, exactly as they were. The MLP's c_fc / c_proj are kohya's fc1 / fc2.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils import parametrize

# (OpenCLIP weight inside a resblock, how many layers share its rows, the HF CLIP layer kohya names);
# the layers sharing a weight take its rows in this order (q, k, v).
_TARGETS = (
    ("attn.in_proj_weight", 3, "self_attn.q_proj"),
    ("attn.in_proj_weight", 3, "self_attn.k_proj"),
    ("attn.in_proj_weight", 3, "self_attn.v_proj"),
    ("attn.out_proj.weight", 1, "self_attn.out_proj"),
    ("mlp.c_fc.weight", 1, "mlp.fc1"),
    ("mlp.c_proj.weight", 1, "mlp.fc2"),
)


def is_open_clip(encoder: torch.nn.Module) -> bool:
    """An OpenCLIP model or text tower (what the WebUI's SD2 and SDXL embedders hold), not HF CLIP."""
    return hasattr(getattr(encoder, "transformer", None), "resblocks")


class LoraPair(torch.nn.Module):
    """down [rank, in], up [out, rank], alpha: the tensors of one kohya LoRA module."""

    def __init__(self, lora_name: str, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = rank
        self.lora_down = torch.nn.Linear(in_features, rank, bias=False)
        self.lora_up = torch.nn.Linear(rank, out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # as kohya and lycoris start
        torch.nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def delta(self) -> torch.Tensor:
        return self.lora_up.weight @ self.lora_down.weight * (self.alpha / self.lora_dim)

    def custom_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight, "alpha": self.alpha}


class _Added(torch.nn.Module):
    """The parametrization of one weight: the original plus its LoRA deltas (stacked by rows for in_proj)."""

    def __init__(self, pairs: list[LoraPair]):
        super().__init__()
        self.pairs = pairs  # a plain list: the pairs belong to the network, not to the host's model

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.cat([pair.delta() for pair in self.pairs])
        return weight + delta.to(weight.dtype)


class OpenClipLoras(torch.nn.Module):
    """The LoRA modules of one OpenCLIP text tower (lycoris' network interface: `loras`, `apply_to`,
    `restore`), for `network._Part`'s place."""

    def __init__(self, prefix: str, tower: torch.nn.Module, rank: int, alpha: float, unused_last_blocks: int = 0):
        super().__init__()
        self.loras: list[LoraPair] = []
        self.paths: dict[str, str] = {}
        self._weights: list[tuple[torch.nn.Module, str, list[LoraPair]]] = []
        blocks = list(tower.transformer.resblocks)
        for i, block in enumerate(blocks[: len(blocks) - unused_last_blocks]):
            by_weight: dict[str, list[LoraPair]] = {}
            for weight_path, sharing, hf_layer in _TARGETS:
                weight = block.get_parameter(weight_path)
                out_features = weight.shape[0] // sharing
                path = f"text_model.encoder.layers.{i}.{hf_layer}"
                pair = LoraPair(f"{prefix}_{path}".replace(".", "_"), weight.shape[1], out_features, rank, alpha)
                self.add_module(pair.lora_name, pair)
                self.loras.append(pair)
                self.paths[pair.lora_name] = path
                by_weight.setdefault(weight_path, []).append(pair)
            for weight_path, pairs in by_weight.items():
                owner, _, name = weight_path.rpartition(".")
                self._weights.append((block.get_submodule(owner), name, pairs))

    def apply_to(self) -> None:
        for module, name, pairs in self._weights:
            parametrize.register_parametrization(module, name, _Added(pairs), unsafe=True)

    def restore(self) -> None:
        for module, name, _ in self._weights:
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
