"""A checkpoint file and its config, read the way the WebUI reads them (ldm for SD 1.x/2.x, sgm for SDXL):
the weights, the model kind, and the `ModelSpec` the modules are built from (`models.py`).

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
activation to quick_gelu for OpenAI CLIP, gelu for OpenCLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LoraMakerError
from .host import SD1, SD2, SDXL

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


# NoobAI V-Pred's checkpoints carry an empty `v_pred` tensor (and `ztsnr`) saying what a yaml would: ComfyUI
# and Forge read it; WebUI 1.10.1 does not (without a yaml it samples them as eps).
V_PRED_MARKER = "v_pred"


def marks_v_prediction(path) -> bool:
    """Whether a .safetensors checkpoint carries the v-prediction marker key (reads only its header)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return V_PRED_MARKER in f.keys()
    except Exception:  # a .ckpt, or a file that is gone: no marker to read
        return False


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


def substate(state: dict, prefix: str) -> dict[str, torch.Tensor]:
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


def standard_config(kind: str, state: dict) -> dict:
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
