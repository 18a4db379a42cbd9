"""Test helpers: tiny real models, kohya-style LoRA state dicts for them, and the key matching of the
programs that load our LoRA files (the WebUI 1.10.1 Lora extension and ComfyUI, re-implemented here
from reading their source; diffusers is the real package).

Everything is built with random weights at tiny sizes so the checks run on a CPU in seconds.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import torch
from torch import nn

from lora_trainer_ext.hosts.host import SD1, SD2, SDXL
from lora_trainer_ext.training.lora_file import TE_PREFIXES, UNET_PREFIX, lora_name

CONTEXT_DIM = 32
TE_LAYERS = 2
TE_WIDTH = 32

# kohya's target containers (§1.2), with the ldm/sgm class names of the UNet the WebUI runs (§3.3).
UNET_LORA_CONTAINERS = ("SpatialTransformer",)
UNET_LOCON_CONTAINERS = ("SpatialTransformer", "ResBlock", "Downsample", "Upsample")
TE_CONTAINERS = ("CLIPAttention", "CLIPMLP")


# --- tiny models -----------------------------------------------------------------------------------


def tiny_ldm_unet(kind: str) -> nn.Module:
    """The ldm `UNetModel` with SD1/SD2/SDXL's block structure at toy width (SD1: four levels, attention
    on the first three, conv proj_in; SD2: the same with linear proj_in; SDXL: three levels, attention on
    the last two, depth 2, linear proj_in; its label_emb is left out: no LoRA targets it)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    common = dict(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, num_heads=2,
        use_spatial_transformer=True, context_dim=CONTEXT_DIM, legacy=False,
    )
    if kind == SDXL:
        # this ldm reads one context_dim per transformer block when depth > 1
        common["context_dim"] = [CONTEXT_DIM] * 2
        unet = UNetModel(channel_mult=(1, 2, 2), attention_resolutions=(2, 4), transformer_depth=2, use_linear_in_transformer=True, **common)
    else:
        unet = UNetModel(channel_mult=(1, 2, 2, 2), attention_resolutions=(1, 2, 4), transformer_depth=1, use_linear_in_transformer=kind == SD2, **common)
    with torch.no_grad():  # ldm zero-initialises the last conv of every block: the output would be 0
        g = torch.Generator().manual_seed(0)
        for p in unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet.eval()


def diffusers_unet(kind: str):
    """diffusers' `UNet2DConditionModel` with the same architecture as `tiny_ldm_unet(kind)` (SDXL with
    its "text_time" added conditioning)."""
    diffusers = import_diffusers()

    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=2, norm_num_groups=32,
    )
    if kind == SDXL:
        unet = diffusers.UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64), transformer_layers_per_block=2, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=CONTEXT_DIM + 6 * 8, **common,
        )
    else:
        unet = diffusers.UNet2DConditionModel(
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 64, 64, 64), use_linear_projection=kind == SD2, **common,
        )
    return unet.eval()


def diffusers_forward(unet, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 5, CONTEXT_DIM, generator=g)
    extra = {}
    if kind == SDXL:
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, CONTEXT_DIM, generator=g), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context, **extra).sample


def ldm_forward(unet, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=g)
    context = torch.randn(1, 5, CONTEXT_DIM, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context=context)


def tiny_clip(projection: bool = False) -> nn.Module:
    """An HF CLIP text encoder (the form every host trains on) at toy size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=TE_WIDTH, intermediate_size=64, num_hidden_layers=TE_LAYERS,
        num_attention_heads=2, max_position_embeddings=16, projection_dim=TE_WIDTH,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


class _OpenClipBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(), c_proj=nn.Linear(2 * width, width)))


class OpenClipLayout(nn.Module):
    """The module tree of the WebUI's OpenCLIP embedder (`FrozenOpenCLIPEmbedder[2]`, what `.wrapped` is
    for SD2 and SDXL's second encoder): open_clip itself does not import here (it needs torchvision),
    and only the layer names and types matter to the Lora extension's key matching."""

    def __init__(self, layers: int = TE_LAYERS, width: int = TE_WIDTH):
        super().__init__()
        self.model = nn.Module()
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList(_OpenClipBlock(width) for _ in range(layers))


def webui_text_modules(kind: str) -> list[nn.Module]:
    """The WebUI's `.wrapped` text embedders for `kind`, in order (SDXL: CLIP-L, then OpenCLIP bigG)."""
    clip_l = nn.Module()
    clip_l.transformer = tiny_clip()  # ldm/sgm FrozenCLIPEmbedder keeps the HF model as `.transformer`
    if kind == SD1:
        return [clip_l]
    if kind == SD2:
        return [OpenClipLayout()]
    return [clip_l, OpenClipLayout()]


# --- kohya-style LoRA state dicts ------------------------------------------------------------------


def lora_targets(model: nn.Module, containers: tuple[str, ...], conv: bool) -> dict[str, nn.Module]:
    """{dotted path: layer} that kohya's LoRANetwork wraps: every `Linear`/`Conv2d` (exact class name)
    inside a container of the given class names; k×k convolutions only with `conv` (LoCon)."""
    found = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in containers:
            continue
        for child_name, child in module.named_modules():
            kind = type(child).__name__
            if kind == "Linear" or (kind == "Conv2d" and (conv or child.kernel_size == (1, 1))):
                found[f"{name}.{child_name}" if name else child_name] = child
    return found


def random_lora(targets: dict[str, nn.Module], prefix: str, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0, seed: int = 0):
    """A trained-looking kohya LoRA for `targets` (random, non-zero up): (state dict in the network's
    ldm naming, {module name: dotted path})."""
    g = torch.Generator().manual_seed(seed)
    state, paths = {}, {}
    for path, layer in targets.items():
        name = lora_name(prefix, path)
        paths[name] = path
        if isinstance(layer, nn.Linear):
            rank, a = dim, alpha
            down = torch.randn(rank, layer.in_features, generator=g)
            up = torch.randn(layer.out_features, rank, generator=g)
        else:
            k = layer.kernel_size
            rank, a = (dim, alpha) if k == (1, 1) else (conv_dim, conv_alpha)
            down = torch.randn(rank, layer.in_channels, *k, generator=g)
            up = torch.randn(layer.out_channels, rank, 1, 1, generator=g)
        state[f"{name}.lora_down.weight"] = down * 0.1
        state[f"{name}.lora_up.weight"] = up * 0.1
        state[f"{name}.alpha"] = torch.tensor(float(a))
    return state, paths


def network_lora(kind: str, unet: nn.Module, text_encoders: list[nn.Module], locon: bool, seed: int = 0):
    """What the network hands over for `kind`: the state dict (ldm names) and {module name: path}."""
    containers = UNET_LOCON_CONTAINERS if locon else UNET_LORA_CONTAINERS
    state, paths = random_lora(lora_targets(unet, containers, conv=locon), UNET_PREFIX, 4, 2.0, 2 if locon else 0, 1.0, seed)
    for i, (prefix, te) in enumerate(zip(TE_PREFIXES[kind], text_encoders)):
        s, p = random_lora(lora_targets(te, TE_CONTAINERS, conv=False), prefix, 4, 2.0, seed=seed + 1 + i)
        state.update(s)
        paths.update(p)
    return state, paths


def delta_weight(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ΔW of one kohya module (§1.4), in the wrapped layer's weight shape."""
    down, up = down.float(), up.float()
    scale = float(alpha) / down.shape[0]
    if down.dim() == 2:
        return up @ down * scale
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], 1, 1) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def modules_of(state_dict) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        name, _, param = key.partition(".")
        out.setdefault(name, {})[param] = tensor
    return out


# --- diffusers -------------------------------------------------------------------------------------


def import_diffusers():
    """diffusers 0.26 is the last release whose models load LoRA without peft (its backend needs
    transformers >= 4.34; the WebUI pins 4.30.2). It imports huggingface_hub's `cached_download`,
    removed in hub 0.26, only to fetch remote community pipelines, which the tests never do: alias it
    before the import."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "cached_download"):
        huggingface_hub.cached_download = huggingface_hub.hf_hub_download
    import diffusers

    return diffusers


# --- the WebUI 1.10.1 Lora extension (extensions-builtin/Lora/networks.py) -------------------------

_RESNET_TO_LDM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _webui_compvis_name(name: str, is_sd2: bool) -> str:
    """The WebUI's rewrite of a diffusers-style kohya name to its layer-table name (SD1 layout)."""
    m = re.match(r"lora_unet_conv_in(.*)", name)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", name)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        level, j, rest = int(m[2]), int(m[4]), m[5]
        if m[3] == "resnets":
            rest = _RESNET_TO_LDM.get(rest, rest)
        sub = 1 if m[3] == "attentions" else 0
        block = 1 + 3 * level + j if m[1] == "down" else 3 * level + j
        side = "input" if m[1] == "down" else "output"
        return f"diffusion_model_{side}_blocks_{block}_{sub}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", name)
    if m:
        rest = m[3] if m[1] == "attentions" else _RESNET_TO_LDM.get(m[3], m[3])
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name)
    if m:
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name)
    if m:
        level = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * level}_{2 if level > 0 else 1}_conv"
    m = re.match(r"lora_te(2?)_text_model_encoder_layers_(\d+)_(.+)", name)
    if m and (m[1] or is_sd2):
        rest = m[3].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"{'1_' if m[1] else ''}model_transformer_resblocks_{m[2]}_{rest}"
    if m:
        return f"transformer_text_model_encoder_layers_{m[2]}_{m[3]}"
    return name


def webui_layer_table(unet: nn.Module, text_embedders: list[nn.Module], kind: str) -> dict[str, nn.Module]:
    """The WebUI's `network_layer_mapping`: every module of the UNet (under `diffusion_model`) and of
    the `.wrapped` text embedders (SDXL: prefixed with the embedder's index)."""
    table = {}
    for i, embedder in enumerate(text_embedders):
        for name, module in embedder.named_modules():
            table[(f"{i}_{name}" if kind == SDXL else name).replace(".", "_")] = module
    for name, module in unet.named_modules():
        table[f"diffusion_model_{name}".rstrip("_").replace(".", "_")] = module
    return table


def webui_key_map(file_keys, table: dict[str, nn.Module]) -> tuple[dict[str, str], list[str]]:
    """Which WebUI layer each file key lands on, as `networks.load_network` decides it:
    ({file module name: layer name}, [file keys that match no layer])."""
    is_sd2 = "model_transformer_resblocks" in table
    matched, unmatched = {}, []
    for key in file_keys:
        name, _, _ = key.partition(".")
        layer = _webui_compvis_name(name, is_sd2)
        if layer not in table:
            m = re.match(r"(.*)_([qkv]_proj)$", layer)  # q/k/v of a fused MultiheadAttention
            if m and m[1] in table:
                layer = m[1]
        if layer not in table and "lora_unet" in name:
            layer = name.replace("lora_unet", "diffusion_model")
        elif layer not in table and "lora_te1_text_model" in name:
            layer = name.replace("lora_te1_text_model", "0_transformer_text_model")
            if layer not in table:
                layer = name.replace("lora_te1_text_model", "transformer_text_model")
        if layer in table:
            matched[name] = layer
        else:
            unmatched.append(key)
    return matched, unmatched


# --- ComfyUI (comfy/lora.py model_lora_keys_unet/clip, comfy/utils.py unet_to_diffusers) ------------

_COMFY_CLIP_LAYERS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
_COMFY_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_COMFY_ATTN = ("proj_in", "proj_out")
_COMFY_TRANSFORMER = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def _comfy_diffusers_to_ldm(unet: nn.Module) -> dict[str, str]:
    """ComfyUI's diffusers -> ldm map of weight-bearing layers, built from the UNet's layout the way
    `unet_to_diffusers` builds it from its config (res blocks, channel_mult, transformer depths)."""

    def depth(block) -> int:
        st = [m for m in block if type(m).__name__ == "SpatialTransformer"]
        return len(st[0].transformer_blocks) if st else 0

    res = list(unet.num_res_blocks)
    levels = len(unet.channel_mult)
    out = {}
    n = 1
    for x in range(levels):
        for i in range(res[x]):
            for ldm, dif in _COMFY_RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{dif}"] = f"input_blocks.{n}.0.{ldm}"
            d = depth(unet.input_blocks[n])
            if d:
                for p in _COMFY_ATTN:
                    out[f"down_blocks.{x}.attentions.{i}.{p}"] = f"input_blocks.{n}.1.{p}"
                for t in range(d):
                    for p in _COMFY_TRANSFORMER:
                        out[f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{p}"] = f"input_blocks.{n}.1.transformer_blocks.{t}.{p}"
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
        n += 1
    mid = depth(unet.middle_block)
    for p in _COMFY_ATTN:
        out[f"mid_block.attentions.0.{p}"] = f"middle_block.1.{p}"
    for t in range(mid):
        for p in _COMFY_TRANSFORMER:
            out[f"mid_block.attentions.0.transformer_blocks.{t}.{p}"] = f"middle_block.1.transformer_blocks.{t}.{p}"
    for i, n in enumerate((0, 2)):
        for ldm, dif in _COMFY_RESNET.items():
            out[f"mid_block.resnets.{i}.{dif}"] = f"middle_block.{n}.{ldm}"
    n = 0
    for x, r in enumerate(reversed(res)):
        for i in range(r + 1):
            for ldm, dif in _COMFY_RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{dif}"] = f"output_blocks.{n}.0.{ldm}"
            c = 1
            d = depth(unet.output_blocks[n])
            if d:
                c += 1
                for p in _COMFY_ATTN:
                    out[f"up_blocks.{x}.attentions.{i}.{p}"] = f"output_blocks.{n}.1.{p}"
                for t in range(d):
                    for p in _COMFY_TRANSFORMER:
                        out[f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}.{p}"] = f"output_blocks.{n}.1.transformer_blocks.{t}.{p}"
            if i == r:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"})
    return out


def comfy_key_map(file_keys, unet: nn.Module, kind: str) -> tuple[dict[str, str], list[str]]:
    """Which ComfyUI weight each file module patches: ({file module name: model weight key},
    [file keys ComfyUI reports as "lora key not loaded"]). Comfy keeps every text encoder in HF
    layout (clip_l, clip_h for SD2, clip_l + clip_g for SDXL)."""
    weights = {k for k in unet.state_dict() if k.endswith(".weight")}
    key_map = {}
    for k in weights:
        key_map[lora_name(UNET_PREFIX, k[: -len(".weight")])] = f"diffusion_model.{k}"
    for dif, ldm in _comfy_diffusers_to_ldm(unet).items():
        if f"{ldm}.weight" in weights:
            key_map[lora_name(UNET_PREFIX, dif)] = f"diffusion_model.{ldm}.weight"
    encoders = {SD1: [("clip_l", ("lora_te", "lora_te1"))], SD2: [("clip_h", ("lora_te", "lora_te1"))], SDXL: [("clip_l", ("lora_te", "lora_te1")), ("clip_g", ("lora_te2",))]}[kind]
    for clip, prefixes in encoders:
        for b in range(TE_LAYERS):
            for layer in _COMFY_CLIP_LAYERS:
                for prefix in prefixes:
                    key_map[lora_name(prefix, f"text_model.encoder.layers.{b}.{layer}")] = f"{clip}.transformer.text_model.encoder.layers.{b}.{layer}.weight"
    loaded, matched = set(), {}
    keys = set(file_keys)
    for name, target in key_map.items():
        up, down, alpha = f"{name}.lora_up.weight", f"{name}.lora_down.weight", f"{name}.alpha"
        if up in keys:
            loaded.update((up, down))
            matched[name] = target
            if alpha in keys:
                loaded.add(alpha)
    return matched, sorted(keys - loaded)
