"""A checkpoint file loaded headless as a training `Host`: for the CLI, the benchmark and the tests.

The file is read in the layout the WebUI loads (ldm for SD 1.x/2.x, sgm for SDXL):
`model.diffusion_model.*` (the UNet, built as ldm's `UNetModel`; SDXL's sgm UNet has the same module
names, so the sgm-only options are assembled here from ldm's parts), `first_stage_model.*` (ldm's
`AutoencoderKL`) and the text encoders, which become HF `transformers` models: SD1
`cond_stage_model.transformer.*` and SDXL `conditioner.embedders.0.transformer.*` are already in HF's
layout; SD2 `cond_stage_model.model.*` and SDXL `conditioner.embedders.1.model.*` are OpenCLIP's and
are converted (`openclip_to_hf`).

The model config is the WebUI's yaml: the one given, else `<checkpoint>.yaml` beside the file, else the
standard config of the detected kind with the channel counts read from the weights. Keys used: ldm
`model.params.{unet_config, first_stage_config, cond_stage_config, parameterization, scale_factor,
linear_start, linear_end, timesteps, beta_schedule}` and sgm `model.params.{network_config,
first_stage_config, conditioner_config, denoiser_config, scale_factor}`. What the WebUI's yaml cannot say
sits in an extra top-level section the WebUI ignores:

    lora_maker:
      tokenizer: tokenizer          # folder with vocab.json + merges.txt, relative to the yaml
      text_encoders:                # per text encoder, in host order: HF CLIPTextConfig overrides
        - {num_attention_heads: 2}

Text-encoder sizes come from the weights; heads default to hidden/64 (every real SD encoder) and the
activation to quick_gelu for OpenAI CLIP, gelu for OpenCLIP. Without a `tokenizer` entry the folder
`tokenizer/` beside the checkpoint is used, else the HF cache's openai/clip-vit-large-patch14 (offline).
Without a yaml, an SD2 checkpoint's parameterization is guessed by running the UNet, as WebUI 1.10.1 does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LoraMakerError
from .host import SD1, SD2, SDXL, SizeInfo
from .prompt import ChunkedTokenizer, ClipReader

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_PREFIXES = {
    SD1: ["cond_stage_model.transformer."],
    SD2: ["cond_stage_model.model."],
    SDXL: ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}
KIND_NAMES = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}

_VAE_CONFIG = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    },
}
# The configs the WebUI uses for each kind (v1-inference, v2-inference, sd_xl_base), trimmed to what we read.
STANDARD_CONFIGS = {
    SD1: {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
            "use_checkpoint": False, "legacy": False}},
        "first_stage_config": {"params": _VAE_CONFIG},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}}}},
    SD2: {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "unet_config": {"params": {
            "use_checkpoint": True, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False}},
        "first_stage_config": {"params": _VAE_CONFIG},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                              "params": {"freeze": True, "layer": "penultimate"}}}}},
    SDXL: {"model": {"params": {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"params": {
            "adm_in_channels": 2816, "num_classes": "sequential", "use_checkpoint": True, "in_channels": 4,
            "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2,
            "channel_mult": [1, 2, 4], "num_head_channels": 64, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10], "context_dim": 2048,
            "spatial_transformer_attn_type": "softmax-xformers", "legacy": False}},
        "conditioner_config": {"params": {"emb_models": [
            {"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": 11}},
            {"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"layer": "penultimate", "always_return_pooled": True, "legacy": False}},
            {"input_key": "original_size_as_tuple", "params": {"outdim": 256}},
            {"input_key": "crop_coords_top_left", "params": {"outdim": 256}},
            {"input_key": "target_size_as_tuple", "params": {"outdim": 256}}]}},
        "first_stage_config": {"params": _VAE_CONFIG}}}},
}


# ----------------------------------------------------------------------------------------- reading

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors or .ckpt/.pt file (the latter unpickled weights-only), on the CPU."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable file
        hint = "" if path.suffix.lower() == ".safetensors" else " (convert it to .safetensors if it holds more)"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraMakerError(f"{path.name} is not a readable checkpoint{hint}: {reason}") from e
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise LoraMakerError(f"{path.name} holds no state dict of weights")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def detect_kind(keys, name: str = "checkpoint") -> str:
    """SD1, SD2 or SDXL from the state dict's keys, as the WebUI's sd_models_config guesses it."""
    keys = set(keys)
    if not any(k.startswith(UNET) for k in keys):
        raise LoraMakerError(f"{name} has no Stable Diffusion UNet weights ({UNET}*): "
                             f"not an SD 1.x/2.x/XL checkpoint")
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return SDXL
    if "conditioner.embedders.0.model.ln_final.weight" in keys:
        raise LoraMakerError(f"{name} is an SDXL refiner; train on an SDXL base model instead")
    if "cond_stage_model.model.ln_final.weight" in keys:
        return SD2
    if any(k.startswith(TEXT_PREFIXES[SD1][0]) for k in keys):
        return SD1
    raise LoraMakerError(f"{name} has no text encoder weights of SD 1.x, 2.x or XL: not a model LoRA Maker trains")


def _sub(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------ config

@dataclass
class TextSpec:
    """One text encoder: where its weights are, their layout, and which output is the conditioning."""

    prefix: str
    openclip: bool  # OpenCLIP layout (converted on load), else HF CLIPTextModel layout
    layer: int  # index into hidden_states
    final_norm: bool
    pad: int | None  # None: EOS
    pooled: bool = False
    overrides: dict = field(default_factory=dict)  # CLIPTextConfig keyword overrides


@dataclass
class ModelSpec:
    """What load_checkpoint reads from a WebUI model config (or the standard one)."""

    kind: str
    unet: dict
    vae: dict
    scale_factor: float
    parameterization: str | None  # None: the config does not say (no yaml)
    schedule: dict  # make_beta_schedule arguments
    text: list[TextSpec]
    size_embed_dim: int = 256
    tokenizer: Path | None = None


def read_config(path: Path) -> dict:
    """A WebUI model config yaml as plain dicts."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LoraMakerError(f"Cannot read the model config {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise LoraMakerError(f"{path} is not a Stable Diffusion model config (no `model:` section)")
    return data


def config_kind(config: dict) -> str:
    params = config["model"].get("params") or {}
    if "network_config" in params or "conditioner_config" in params:
        return SDXL
    target = str((params.get("cond_stage_config") or {}).get("target", ""))
    return SD2 if "OpenCLIP" in target else SD1


def _standard_config(kind: str, state: dict) -> dict:
    """The kind's standard config with the channel counts that the weights show."""
    import copy

    config = copy.deepcopy(STANDARD_CONFIGS[kind])
    params = config["model"]["params"]
    unet = params["network_config" if kind == SDXL else "unet_config"]["params"]
    first = state[UNET + "input_blocks.0.0.weight"]
    unet["model_channels"], unet["in_channels"] = first.shape[0], first.shape[1]
    unet["out_channels"] = state[UNET + "out.2.weight"].shape[0]
    to_k = next((v for k, v in state.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None:
        unet["context_dim"] = to_k.shape[1]
    if kind == SDXL and UNET + "label_emb.0.0.weight" in state:
        unet["adm_in_channels"] = state[UNET + "label_emb.0.0.weight"].shape[1]
    return config


def model_spec(kind: str, config: dict, base: Path) -> ModelSpec:
    """Interpret a WebUI (ldm or sgm) model config for `kind`."""
    params = config["model"].get("params") or {}
    extra = config.get("lora_maker") or {}
    overrides = list(extra.get("text_encoders") or [])
    tokenizer = base / extra["tokenizer"] if extra.get("tokenizer") else None
    try:
        vae = dict(params["first_stage_config"]["params"])
        if kind == SDXL:
            unet = dict(params["network_config"]["params"])
            denoiser = (params.get("denoiser_config") or {}).get("params") or {}
            scaling = str((denoiser.get("scaling_config") or {}).get("target", ""))
            discretization = (denoiser.get("discretization_config") or {}).get("params") or {}
            schedule = {"schedule": "linear", "n_timestep": int(discretization.get("num_timesteps", 1000)),
                        "linear_start": float(discretization.get("linear_start", 0.00085)),
                        "linear_end": float(discretization.get("linear_end", 0.012))}
            parameterization = "v" if scaling.endswith("VScaling") else "eps"
            embedders = params["conditioner_config"]["params"]["emb_models"]
            te1, te2 = (e.get("params") or {} for e in embedders[:2])
            sizes = [e for e in embedders[2:] if str(e.get("input_key", "")).endswith(("_as_tuple", "top_left"))]
            size_dim = int((sizes[0].get("params") or {}).get("outdim", 256)) if sizes else 256
            hidden = te1.get("layer", "last") == "hidden"
            text = [
                TextSpec(TEXT_PREFIXES[SDXL][0], False, int(te1.get("layer_idx", -1)) if hidden else -1,
                         not hidden, None),
                TextSpec(TEXT_PREFIXES[SDXL][1], True, -2 if te2.get("layer", "last") == "penultimate" else -1,
                         te2.get("layer", "last") == "last", 0, pooled=True),
            ]
        else:
            unet = dict(params["unet_config"]["params"])
            schedule = {"schedule": params.get("beta_schedule", "linear"),
                        "n_timestep": int(params.get("timesteps", 1000)),
                        "linear_start": float(params.get("linear_start", 1e-4)),
                        "linear_end": float(params.get("linear_end", 2e-2))}
            parameterization = params.get("parameterization")
            size_dim = 256
            if kind == SD2:
                layer = ((params.get("cond_stage_config") or {}).get("params") or {}).get("layer", "last")
                text = [TextSpec(TEXT_PREFIXES[SD2][0], True, -2 if layer == "penultimate" else -1, True, 0)]
            else:  # the layer follows the host's clip skip, as in the WebUI
                text = [TextSpec(TEXT_PREFIXES[SD1][0], False, -1, True, None)]
        scale_factor = float(params.get("scale_factor", 0.13025 if kind == SDXL else 0.18215))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LoraMakerError(f"The model config lacks or mangles {e} for a {KIND_NAMES[kind]} model") from e
    if parameterization not in (None, "eps", "v"):
        raise LoraMakerError(f"Unsupported parameterization {parameterization!r} in the model config (eps or v)")
    for spec, extra_config in zip(text, overrides):
        spec.overrides = dict(extra_config or {})
    return ModelSpec(kind, unet, vae, scale_factor, parameterization, schedule, text, size_dim, tokenizer)


# ---------------------------------------------------------------------------------------- building

@contextlib.contextmanager
def _quiet():
    """ldm prints a line per attention layer it builds."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _unet_levels(unet) -> list[tuple[torch.nn.Module, int]]:
    """(block, level) of every input and output block of an ldm UNetModel that may hold attention."""
    last = len(unet.channel_mult) - 1
    pairs, i = [], 1  # input_blocks[0] is the stem conv
    for level in range(last + 1):
        for _ in range(unet.num_res_blocks[level]):
            pairs.append((unet.input_blocks[i], level))
            i += 1
        i += level != last  # the downsample block
    outputs = [level for level in range(last, -1, -1) for _ in range(unet.num_res_blocks[level] + 1)]
    return pairs + list(zip(unet.output_blocks, outputs))


def _named_as(cls: type, base: type) -> type:
    """Our subclasses of ldm modules keep ldm's class name: LyCORIS and the WebUI pick modules by it."""
    cls.__name__, cls.__qualname__ = base.__name__, base.__qualname__
    return cls


@functools.lru_cache(maxsize=None)
def _deep_transformer_class():
    from ldm.modules.attention import SpatialTransformer

    class DeepSpatialTransformer(SpatialTransformer):
        """ldm's SpatialTransformer indexes the context per block, so more than one block fails with a
        single context; sgm's (SDXL's) gives every block the same context. Same modules and names."""

        def forward(self, x, context=None):
            if isinstance(context, list):
                context = context[0]
            b, c, h, w = x.shape
            x_in, x = x, self.norm(x)
            if not self.use_linear:
                x = self.proj_in(x)
            x = x.flatten(2).transpose(1, 2).contiguous()  # b c h w -> b (h w) c
            if self.use_linear:
                x = self.proj_in(x)
            for block in self.transformer_blocks:
                x = block(x, context=context)
            if self.use_linear:
                x = self.proj_out(x)
            x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
            if not self.use_linear:
                x = self.proj_out(x)
            return x + x_in

    return SpatialTransformer, _named_as(DeepSpatialTransformer, SpatialTransformer)


def _set_depth(block: torch.nn.Module, depth: int) -> None:
    """Rebuild the SpatialTransformer in `block` with `depth` transformer blocks (sgm's per-level depth)."""
    base, deep = _deep_transformer_class()
    for idx, layer in enumerate(block):
        if isinstance(layer, base) and len(layer.transformer_blocks) != depth:
            first = layer.transformer_blocks[0]
            heads = first.attn1.heads
            block[idx] = deep(
                layer.in_channels, heads, first.attn1.to_q.out_features // heads, depth=depth,
                context_dim=[first.attn2.to_k.in_features] * depth, disable_self_attn=first.disable_self_attn,
                use_linear=layer.use_linear, use_checkpoint=first.checkpoint)


def build_unet(params: dict) -> torch.nn.Module:
    """ldm's UNetModel from ldm or sgm `unet_config`/`network_config` params. sgm's extras (a
    "sequential" label embedding from `adm_in_channels`, per-level `transformer_depth`) are built from
    ldm's parts with sgm's module names, so SDXL weights load unchanged."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = dict(params)
    adm_in = params.pop("adm_in_channels", None)
    num_classes = params.pop("num_classes", None)
    depth = params.pop("transformer_depth", 1)
    depth_middle = params.pop("transformer_depth_middle", None)
    params.pop("spatial_transformer_attn_type", None)  # attention implementation, not architecture
    params["use_fp16"] = False  # the dtype is the host's, set after loading
    params.setdefault("image_size", 32)  # unused by the model; sgm's configs leave it out
    if num_classes is not None and num_classes != "sequential":
        raise LoraMakerError(f"Class-conditional UNets (num_classes={num_classes!r}) are not supported")
    for key in ("channel_mult", "attention_resolutions", "num_res_blocks"):
        if isinstance(params.get(key), (list, tuple)):
            params[key] = list(params[key])
    levels = len(params.get("channel_mult", (1, 2, 4, 8)))
    depths = list(depth) if isinstance(depth, (list, tuple)) else [int(depth)] * levels
    try:
        with _quiet():
            unet = UNetModel(**params, transformer_depth=1)
            for block, level in _unet_levels(unet):
                _set_depth(block, depths[level])
            _set_depth(unet.middle_block, depths[-1] if depth_middle is None else int(depth_middle))
    except (TypeError, AssertionError, ValueError, IndexError) as e:
        raise LoraMakerError(f"The model config's UNet parameters are not valid for ldm's UNetModel: {e}") from e
    if num_classes == "sequential":
        width = unet.time_embed[0].out_features
        unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Linear(int(adm_in), width), torch.nn.SiLU(), torch.nn.Linear(width, width)))
        unet.num_classes = "sequential"
    return unet


def build_vae(params: dict) -> torch.nn.Module:
    """ldm's AutoencoderKL from `first_stage_config.params`."""
    from ldm.models.autoencoder import AutoencoderKL

    try:
        with _quiet():
            return AutoencoderKL(ddconfig=dict(params["ddconfig"]), lossconfig={"target": "torch.nn.Identity"},
                                 embed_dim=int(params["embed_dim"]))
    except (KeyError, TypeError, AssertionError, ValueError) as e:
        raise LoraMakerError(f"The model config's first_stage_config does not fit ldm's AutoencoderKL: {e}") from e


def openclip_to_hf(state: dict[str, torch.Tensor], projection: bool) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's weights (token_embedding, positional_embedding, transformer.resblocks,
    ln_final, text_projection) in HF CLIPTextModel(WithProjection) names. The fused attention input
    projection is split into q, k, v; OpenCLIP's text_projection (x @ P) becomes a Linear weight (P.T)."""
    out: dict[str, torch.Tensor] = {}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")
    for key, value in state.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key == "logit_scale":
            continue
        elif (m := block.match(key)) is not None:
            layer, name, kind = m.groups()
            target = f"text_model.encoder.layers.{layer}."
            if name == "attn.in_proj":
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{target}self_attn.{part}.{kind}"] = chunk.contiguous()
            elif name in names:
                out[f"{target}{names[name]}.{kind}"] = value
            else:
                out[key] = value  # left unconverted: reported as unexpected by the loader
        else:
            out[key] = value
    return out


def _hf_text_state(state: dict, spec: TextSpec, projection: bool) -> dict[str, torch.Tensor]:
    sub = _sub(state, spec.prefix)
    if spec.openclip:
        return openclip_to_hf(sub, projection)
    # transformers < 4.x saved CLIPTextModel without the text_model. level (the WebUI fixes these keys too)
    return {("text_model." + k if k.split(".")[0] in ("embeddings", "encoder", "final_layer_norm") else k): v
            for k, v in sub.items()}


def text_config(state: dict[str, torch.Tensor], openclip: bool, overrides: dict, bos: int, eos: int):
    """CLIPTextConfig for HF-layout text weights: sizes from the shapes, heads of 64 channels, the
    activation of the family (OpenAI CLIP: quick_gelu, OpenCLIP: gelu), then `overrides`."""
    from transformers import CLIPTextConfig

    try:
        vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
        positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
        layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
        intermediate = state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise LoraMakerError(f"Incomplete text encoder weights (missing {e})") from e
    projection = state["text_projection.weight"].shape[0] if "text_projection.weight" in state else hidden
    values = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
              "max_position_embeddings": positions, "projection_dim": projection,
              "hidden_act": "gelu" if openclip else "quick_gelu", "layer_norm_eps": 1e-5,
              "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    values.update(overrides)
    return CLIPTextConfig(**values)


def _load(module: torch.nn.Module, state: dict, what: str, name: str, ignore: tuple[str, ...] = ()) -> None:
    """Put `state` into `module` (built on the meta device) by assignment; any missing or unexpected
    weight is a clear error rather than a silently random layer."""
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        shapes = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:3]
        raise LoraMakerError(f"{name}: the {what} weights do not fit the model config ({'; '.join(shapes) or e});"
                             f" put the model's own config yaml beside the checkpoint") from e
    missing = [k for k in result.missing_keys if not (ignore and k.endswith(ignore))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        detail = ", ".join([f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]])
        raise LoraMakerError(f"{name}: the {what} weights do not match the model config ({detail}); "
                             f"put the model's own config yaml beside the checkpoint")


def build_text_encoder(state: dict, spec: TextSpec, name: str, bos: int, eos: int) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hf = _hf_text_state(state, spec, projection=spec.pooled)
    hf.pop("text_model.embeddings.position_ids", None)  # rebuilt below: some merges saved it broken
    config = text_config(hf, spec.openclip, spec.overrides, bos, eos)
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if spec.pooled else CLIPTextModel)(config)
    _load(model, hf, "text encoder", name, ignore=("position_ids",))
    embeddings = model.text_model.embeddings
    embeddings.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))
    return model


def load_tokenizer(spec: ModelSpec, checkpoint: Path):
    """HF CLIPTokenizer from the config's folder, `tokenizer/` beside the checkpoint, or the HF cache."""
    from transformers import CLIPTokenizer

    folder = spec.tokenizer or checkpoint.parent / "tokenizer"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    elif spec.tokenizer:
        raise LoraMakerError(f"The model config's tokenizer folder {folder} lacks vocab.json or merges.txt")
    else:
        try:
            tokenizer = CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14", local_files_only=True)
        except (OSError, ValueError) as e:
            raise LoraMakerError(f"No CLIP tokenizer: put vocab.json and merges.txt in {folder} (or name a folder "
                                 f"in the model config's lora_maker.tokenizer)") from e
    tokenizer.model_max_length = 1 << 30  # we chunk long captions ourselves; no truncation warnings
    return tokenizer


# ------------------------------------------------------------------------------ module class swaps

@functools.lru_cache(maxsize=None)
def _swaps() -> dict[str, dict[type, type]]:
    """Subclasses of ldm modules with the same weights and results, swapped in after loading (the
    WebUI patches the same places): torch's fused attention, far less memory than ldm's einsum
    ("sdp"), and a GroupNorm that upcasts its weights too, so half-precision UNets also run where
    autocast leaves group_norm alone (CPU) ("norm")."""
    from ldm.modules.attention import CrossAttention
    from ldm.modules.diffusionmodules.model import AttnBlock
    from ldm.modules.diffusionmodules.util import GroupNorm32

    class SdpCrossAttention(CrossAttention):
        def forward(self, x, context=None, mask=None):
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
            b, n, _ = q.shape
            q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
            return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    class SdpAttnBlock(AttnBlock):
        def forward(self, x):
            h = self.norm(x)
            q, k, v = self.q(h), self.k(h), self.v(h)
            b, c, height, width = q.shape
            q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3) for t in (q, k, v))
            h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, height, width)
            return x + self.proj_out(h)

    class Fp32GroupNorm(GroupNorm32):
        def forward(self, x):
            weight, bias = (None if t is None else t.float() for t in (self.weight, self.bias))
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)

    return {"sdp": {CrossAttention: _named_as(SdpCrossAttention, CrossAttention),
                    AttnBlock: _named_as(SdpAttnBlock, AttnBlock)},
            "norm": {GroupNorm32: _named_as(Fp32GroupNorm, GroupNorm32)}}


def swap_classes(module: torch.nn.Module, which: str) -> None:
    swaps = _swaps()[which]
    for m in module.modules():
        if type(m) in swaps:
            m.__class__ = swaps[type(m)]


# ---------------------------------------------------------------------------------------- the host

def make_alphas_cumprod(schedule: dict) -> torch.Tensor:
    """ᾱ_t as ldm's register_schedule computes it (float64 cumulative product, then float32)."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = torch.as_tensor(make_beta_schedule(**schedule), dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


def size_embedding(sizes: list[SizeInfo], dim: int) -> torch.Tensor:
    """SDXL's size vector: original (h, w), crop (top, left), target (h, w), each int as a `dim`-wide
    sinusoidal timestep embedding, concatenated in that order -> [B, 6*dim] (sgm ConcatTimestepEmbedderND)."""
    from ldm.modules.diffusionmodules.util import timestep_embedding

    values = torch.tensor([[*s.original, *s.crop_top_left, *s.target] for s in sizes], dtype=torch.float32)
    return timestep_embedding(values.flatten(), dim).reshape(len(sizes), 6 * dim)


class StandaloneHost:
    """A checkpoint's models as a training `Host` (see host.py). All weights are frozen (requires_grad
    False) and in eval mode, as a loaded WebUI model is used for inference; the trainer records and
    restores whatever it changes. `clip_skip` (SD1 only, as in the WebUI) may be set at any time."""

    def __init__(self, *, kind, parameterization, path: Path, unet, vae, text_encoders, readers, tokenizer,
                 alphas_cumprod, scale_factor, size_embed_dim, device, dtype, clip_skip=1, config_path=None):
        self.kind = kind
        self.parameterization = parameterization
        self.path = path
        self.config_path = config_path
        self.model_name = path.name
        self.unet, self.vae, self.text_encoders = unet, vae, text_encoders
        self.readers = readers
        self.tokenizer = tokenizer  # ChunkedTokenizer
        self.alphas_cumprod = alphas_cumprod
        self.scale_factor = scale_factor
        self.size_embed_dim = size_embed_dim
        self.device, self.dtype = device, dtype
        self.vae_dtype = next(vae.parameters()).dtype
        self.clip_skip = clip_skip
        self._hash: str | None = None

    @property
    def model_hash(self) -> str:
        """The WebUI's short hash: the first 10 hex digits of the file's sha256 (computed once, on demand)."""
        if self._hash is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            self._hash = digest.hexdigest()[:10]
        return self._hash

    def _autocast(self):
        """Frozen weights in half precision run under autocast, as the WebUI runs its model."""
        if self.dtype == torch.float32 or torch.is_autocast_enabled():
            return contextlib.nullcontext()  # the trainer's autocast (fp16 or bf16) decides
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):  # the VAE keeps its own (fp32) precision
            posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
            return (posterior.sample() * self.scale_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (unclamped, float32) of scaled latents: the inverse of `encode_images`,
        as the WebUI's `decode_first_stage` (for rendering grids headless)."""
        with torch.autocast(self.device.type, enabled=False):
            return self.vae.decode(latents.to(self.device, self.vae_dtype) / self.scale_factor).float()

    def conditioning(self, captions: list[str], sizes: list[SizeInfo] | None = None) -> Any:
        if self.kind == SD1:
            layers = self.text_encoders[0].config.num_hidden_layers
            if not 1 <= int(self.clip_skip) <= layers:
                raise LoraMakerError(f"clip skip must be 1 to {layers} for this model, not {self.clip_skip}")
            self.readers[0].layer = -int(self.clip_skip)
        captions = list(captions)
        chunks = self.tokenizer.chunks(captions)
        eos = self.tokenizer.eos
        with self._autocast():
            outputs = [reader.encode(self.tokenizer.ids(chunks, reader.pad_id(eos), self.device), eos)
                       for reader in self.readers]
        if self.kind != SDXL:
            return outputs[0][0]
        if sizes is None:  # the WebUI's default for a prompt without a size: 1024x1024, no crop
            sizes = [SizeInfo((1024, 1024), (0, 0), (1024, 1024))] * len(captions)
        if len(sizes) != len(captions):
            raise ValueError(f"{len(sizes)} sizes for {len(captions)} captions")
        pooled = outputs[1][1]
        crossattn = torch.cat([outputs[0][0], outputs[1][0].to(outputs[0][0].dtype)], dim=-1)
        sizes_vector = size_embedding(sizes, self.size_embed_dim).to(pooled.device, pooled.dtype)
        vector = torch.cat([pooled, sizes_vector], dim=1)
        return {"crossattn": crossattn, "vector": vector}

    def apply_model(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        with self._autocast():
            x = latents.to(self.dtype)
            if self.kind == SDXL:
                context, y = cond["crossattn"].to(self.dtype), cond["vector"].to(self.dtype)
                return self.unet(x, timesteps, context=context, y=y)
            return self.unet(x, timesteps, context=cond.to(self.dtype))


@torch.no_grad()
def guess_v_prediction(unet: torch.nn.Module, last_timestep: int = 999) -> bool:
    """WebUI 1.10.1's test for an SD2 checkpoint without a yaml: at the last timestep, a v model's output
    for a flat 0.5 input sits far below the input, an eps model's near it."""
    param = next(unet.parameters())
    context_dim = next(m.in_features for n, m in unet.named_modules() if n.endswith("attn2.to_k"))
    x = torch.full((1, unet.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
    context = torch.full((1, 2, context_dim), 0.5, device=param.device, dtype=param.dtype)
    out = unet(x, torch.tensor([last_timestep], device=param.device), context=context)
    return (out.float() - x.float()).mean().item() < -1


def require_ldm() -> None:
    """Make the WebUI's `ldm` package importable: in a WebUI folder it sits in repositories/ (the
    WebUI adds that to sys.path when it starts; the CLI does it here)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("ldm") is not None:
        return
    from ..paths import webui_root

    root = webui_root()
    repository = root / "repositories" / "stable-diffusion-stability-ai" if root else None
    if repository is not None and (repository / "ldm").is_dir():
        sys.path.insert(0, str(repository))
        return
    raise LoraMakerError(
        "training needs the WebUI's `ldm` model classes: run the CLI with the WebUI's Python from its folder "
        "(after the WebUI has started once), or install them: pip install --no-deps stable-diffusion-sdkit"
    )


def load_checkpoint(path, config=None, device="cpu", dtype=torch.float32, *, clip_skip: int = 1,
                    attention: str = "sdp") -> StandaloneHost:
    """Load an SD 1.x/2.x/XL checkpoint (.safetensors, or .ckpt weights-only) as a StandaloneHost.

    `config`: the WebUI model config yaml (default: `<checkpoint>.yaml` beside it, else the standard
    config of the detected kind). UNet and text encoders are put in `dtype` on `device`; the VAE stays
    float32. `attention`: "sdp" (torch's fused attention) or "ldm" (ldm's own einsum attention)."""
    if attention not in ("sdp", "ldm"):
        raise ValueError(f"attention must be 'sdp' or 'ldm', not {attention!r}")
    require_ldm()
    path = Path(path)
    if path.is_dir():
        raise LoraMakerError(f"{path} is a folder: give a checkpoint file (.safetensors or .ckpt) in the WebUI's "
                             f"layout; diffusers folders are not supported")
    if not path.is_file():
        raise LoraMakerError(f"Checkpoint not found: {path}")
    device, name = torch.device(device), path.name
    state = read_state_dict(path)
    kind = detect_kind(state.keys(), name)
    config_path = Path(config) if config else path.with_suffix(".yaml")
    if config and not config_path.is_file():
        raise LoraMakerError(f"Model config not found: {config_path}")
    if config_path.is_file():
        raw = read_config(config_path)
        if config_kind(raw) != kind:
            raise LoraMakerError(f"{config_path.name} is a {KIND_NAMES[config_kind(raw)]} config but {name} "
                                 f"is a {KIND_NAMES[kind]} checkpoint")
        spec = model_spec(kind, raw, config_path.parent)
    else:
        config_path = None
        spec = model_spec(kind, _standard_config(kind, state), path.parent)
    if int(spec.unet.get("in_channels", 4)) != 4:
        raise LoraMakerError(f"{name} is an inpainting or instruct model (UNet input of "
                             f"{spec.unet['in_channels']} channels); train on a base model instead")
    tokenizer = ChunkedTokenizer(load_tokenizer(spec, path))

    with torch.device("meta"):
        unet = build_unet(spec.unet)
        vae = build_vae(spec.vae)
    _load(unet, _sub(state, UNET), "UNet", name)
    # some converted checkpoints store the VAE's 1x1 attention convs as linear weights
    vae_state = {k: (v[..., None, None] if v.ndim == 2 and ".attn_1." in k else v)
                 for k, v in _sub(state, VAE).items() if not k.startswith("loss.")}
    _load(vae, vae_state, "VAE", name)
    encoders = [build_text_encoder(state, s, name, tokenizer.bos, tokenizer.eos) for s in spec.text]
    del state

    swap_classes(unet, "norm")
    if attention == "sdp":
        swap_classes(unet, "sdp")
        swap_classes(vae, "sdp")
    for module, module_dtype in [(unet, dtype), (vae, torch.float32)] + [(te, dtype) for te in encoders]:
        module.to(device=device, dtype=module_dtype).eval().requires_grad_(False)
    unet.dtype = dtype  # ldm's UNet casts its input to this
    readers = [ClipReader(te, s.layer, s.final_norm, s.pad, s.pooled) for te, s in zip(encoders, spec.text)]
    host = StandaloneHost(kind=kind, parameterization=spec.parameterization or "eps", path=path, unet=unet,
                          vae=vae, text_encoders=encoders, readers=readers, tokenizer=tokenizer,
                          alphas_cumprod=make_alphas_cumprod(spec.schedule), scale_factor=spec.scale_factor,
                          size_embed_dim=spec.size_embed_dim, device=device, dtype=dtype, clip_skip=clip_skip,
                          config_path=config_path)
    if spec.parameterization is None and kind == SD2:
        with host._autocast():
            if guess_v_prediction(unet, len(host.alphas_cumprod) - 1):
                host.parameterization = "v"
    return host
