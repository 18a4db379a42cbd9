"""Random-weight checkpoints in the real file layouts, for benchmarks and tests.

Built from the classes the standalone host loads (ldm `UNetModel` and `AutoencoderKL`, HF CLIP text
models) and written the way real checkpoints are: `model.diffusion_model.*`, `first_stage_model.*`,
SD1 `cond_stage_model.transformer.*`, SD2 `cond_stage_model.model.*` (OpenCLIP layout), SDXL
`conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*` (OpenCLIP layout), with
the WebUI-style yaml beside the file and a small CLIP BPE tokenizer in `tokenizer/`. The file then goes
through `standalone.load_checkpoint` like any user's checkpoint, so a benchmark or a test trains the
very host the CLI trains (no second way of assembling one).

Shape presets (`PRESETS[name][kind]`):
  tiny   what the tests use: 64px images -> 8x8x4 latents, UNet model_channels 32 with the real block
         structure (two res blocks per level, so block indices match real names), 2-layer text encoders
         of hidden 32 (SDXL's second: 48); seconds to build and train on a CPU.
  small  a CPU benchmark size: SD1's block structure at model_channels 128 (SD1.5: 320) with 4 heads of
         32..128 channels (SD1.5: 8 of 40..160), a 4-layer text encoder of hidden 256, a slim VAE; 256px.
  sd15   SD1.5's real UNet, VAE and CLIP ViT-L text encoder (768 hidden, 12 layers); 512px.
  sdxl   SDXL base's real UNet, VAE and text encoders (768 + 1280 hidden, 12 + 32 layers); 1024px.
sd15 and sdxl are GPU sizes (several GB); they are written in fp16 there, as real checkpoints are.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoraMakerError
from ..hosts.checkpoint import STANDARD_CONFIGS, TEXT_PREFIXES
from ..hosts.host import SD1, SD2, SDXL
from ..hosts.models import build_unet, build_vae

# Words the tokenizer spells whole (anything else still tokenizes, letter by letter).
WORDS = ("a photo of 1girl solo long short red blue black hair eyes smile looking at viewer cat dog "
         "outdoors sky the with and standing sitting dress shirt holding").split()
# Booru-style tags made of WORDS: captions of real length in tokens for benchmarks.
CAPTION_TAGS = ("1girl", "solo", "long hair", "short hair", "red hair", "blue hair", "black hair", "red eyes",
                "blue eyes", "black eyes", "smile", "looking at viewer", "cat", "dog", "outdoors", "sky",
                "standing", "sitting", "dress", "shirt", "holding", "red dress", "blue shirt", "black dress")


@dataclass(frozen=True)
class ModelShapes:
    """The sizes of one random model; lists of the text encoders are in host order."""

    unet: dict  # ldm `unet_config` / sgm `network_config` params
    vae: dict  # `first_stage_config` params
    text_hidden: tuple[int, ...]
    text_layers: tuple[int, ...]
    text_heads: tuple[int, ...]
    text_mlp: int = 4  # MLP width as a multiple of the hidden size (4 in every real CLIP)
    size_embed: int = 256  # SDXL: width of each size number's embedding
    resolution: int = 512  # the training side the model is meant for


def _standard(kind: str, section: str) -> dict:
    return copy.deepcopy(STANDARD_CONFIGS[kind]["model"]["params"][section]["params"])


_TINY_VAE = {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}
_TINY_SIZE_EMBED = 16
PRESETS: dict[str, dict[str, ModelShapes]] = {
    "tiny": {
        SD1: ModelShapes(
            {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 2, 2], "num_heads": 2,
             "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32, "use_checkpoint": False,
             "legacy": False},
            _TINY_VAE, (32,), (2,), (2,), text_mlp=2, size_embed=_TINY_SIZE_EMBED, resolution=64),
        SD2: ModelShapes(
            {"use_checkpoint": True, "use_fp16": True, "image_size": 8, "in_channels": 4, "out_channels": 4,
             "model_channels": 32, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
             "channel_mult": [1, 1, 2, 2], "num_head_channels": 16, "use_spatial_transformer": True,
             "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 32, "legacy": False},
            _TINY_VAE, (32,), (2,), (2,), text_mlp=2, size_embed=_TINY_SIZE_EMBED, resolution=64),
        SDXL: ModelShapes(
            {"adm_in_channels": 48 + 6 * _TINY_SIZE_EMBED, "num_classes": "sequential", "use_checkpoint": True,
             "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2],
             "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_head_channels": 16, "use_spatial_transformer": True,
             "use_linear_in_transformer": True, "transformer_depth": [1, 1, 2], "context_dim": 80,
             "spatial_transformer_attn_type": "softmax-xformers", "legacy": False},
            _TINY_VAE, (32, 48), (2, 2), (2, 2), text_mlp=2, size_embed=_TINY_SIZE_EMBED, resolution=64),
    },
    "small": {
        SD1: ModelShapes(
            {"in_channels": 4, "out_channels": 4, "model_channels": 128, "attention_resolutions": [4, 2, 1],
             "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 4, "use_spatial_transformer": True,
             "transformer_depth": 1, "context_dim": 256, "use_checkpoint": False, "legacy": False},
            {"embed_dim": 4, "ddconfig": {
                "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
            (256,), (4,), (4,), resolution=256),
    },
    "sd15": {SD1: ModelShapes(_standard(SD1, "unet_config"), _standard(SD1, "first_stage_config"),
                              (768,), (12,), (12,), resolution=512)},
    "sdxl": {SDXL: ModelShapes(_standard(SDXL, "network_config"), _standard(SDXL, "first_stage_config"),
                               (768, 1280), (12, 32), (12, 20), resolution=1024)},
}


def preset(name: str, kind: str | None = None) -> tuple[str, ModelShapes]:
    """(kind, shapes) of preset `name` ("tiny-sdxl": the tiny preset's SDXL); `kind` defaults to the
    preset's first (SD1 where it has one)."""
    if kind is None and "-" in name:
        name, kind = name.split("-", 1)
    kinds = PRESETS.get(name)
    if kinds is None:
        raise LoraMakerError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    kind = kind or next(iter(kinds))
    if kind not in kinds:
        raise LoraMakerError(f"preset {name!r} has no {kind} model (it has {', '.join(kinds)})")
    return kind, kinds[kind]


# ----------------------------------------------------------------------------------------- tokenizer

def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE vocabulary of every byte (so any text tokenizes, letter by letter if need be), merges
    that spell WORDS whole, then <|startoftext|> and <|endoftext|> as the last two ids, like CLIP's."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            if f"{parts[0]} {parts[1]}" not in merges:
                merges.append(f"{parts[0]} {parts[1]}")
                vocab.append(merged)
            parts = [merged] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def vocab_size(folder: Path) -> int:
    return len(json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------------------- config

def model_config(kind: str, shapes: ModelShapes, v_prediction: bool = False, tokenizer: str = "tokenizer") -> dict:
    """The WebUI-style model config of a random checkpoint (ldm layout for SD1/2, sgm for SDXL), with
    the `lora_maker` section naming the tokenizer folder and the text encoders' head counts."""
    extra = {"tokenizer": tokenizer, "text_encoders": [{"num_attention_heads": h} for h in shapes.text_heads]}
    if kind == SDXL:
        scaling = "VScaling" if v_prediction else "EpsScaling"
        params = {
            "scale_factor": 0.13025,
            "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
                "num_idx": 1000,
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": shapes.unet},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                 "params": {"layer": "hidden", "layer_idx": shapes.text_layers[0] - 1}},
                {"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": "ViT-bigG-14", "freeze": True, "layer": "penultimate",
                            "always_return_pooled": True, "legacy": False}},
                *({"is_trainable": False, "input_key": key,
                   "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                   "params": {"outdim": shapes.size_embed}}
                  for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"))]}},
            "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                                   "params": shapes.vae},
        }
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}, "lora_maker": extra}
    params = {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "conditioning_key": "crossattn", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": shapes.unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": shapes.vae},
        "cond_stage_config": ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                               "params": {"freeze": True, "layer": "penultimate"}} if kind == SD2 else
                              {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}),
    }
    if v_prediction:
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}, "lora_maker": extra}


# ------------------------------------------------------------------------------------------- weights

def hf_to_openclip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel(WithProjection) weights in OpenCLIP's text-tower names (what SD2 and SDXL's
    second encoder store): q/k/v fused into in_proj, text_projection as the (width, dim) matrix."""
    out: dict[str, torch.Tensor] = {}
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        src = f"text_model.encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            for hf, oc in rename.items():
                out[f"{dst}{oc}.{kind}"] = state[f"{src}{hf}.{kind}"]
    out["token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out["ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def randomize_zeros(module: torch.nn.Module) -> None:
    """ldm zero-initialises output convs and projections (so an untrained model predicts 0 and passes
    no gradient back); give those layers ordinary random weights so random models behave like trained ones."""
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(m, "reset_parameters") and not weight.any():
            m.reset_parameters()


def random_text_encoder(kind: str, index: int, shapes: ModelShapes, vocab: int):
    """(HF text model, whether it is stored in OpenCLIP's layout) for text encoder `index` of `kind`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = shapes.text_hidden[index]
    openclip = kind == SD2 or index == 1
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=shapes.text_mlp * hidden,
                            num_hidden_layers=shapes.text_layers[index], num_attention_heads=shapes.text_heads[index],
                            max_position_embeddings=77, projection_dim=hidden,
                            hidden_act="gelu" if openclip else "quick_gelu", bos_token_id=vocab - 2,
                            eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if kind == SDXL and index == 1 else CLIPTextModel)(config), openclip


def make_checkpoint(folder, kind: str, shapes: ModelShapes, *, v_prediction: bool = False, seed: int = 0,
                    name: str | None = None, dtype: torch.dtype = torch.float32, device="cpu") -> Path:
    """Write a random `kind` checkpoint of `shapes` (+ yaml + tokenizer/) into `folder`; returns the
    .safetensors path. Weights are drawn on `device` (a GPU draws multi-GB models in seconds) and saved
    in `dtype`; the same seed, shapes and device give the same file."""
    import yaml
    from safetensors.torch import save_file

    if len(TEXT_PREFIXES[kind]) != len(shapes.text_hidden):
        raise ValueError(f"{kind} has {len(TEXT_PREFIXES[kind])} text encoders, the shapes {len(shapes.text_hidden)}")
    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def keep(prefix: str, weights: dict[str, torch.Tensor]) -> None:
        for key, value in weights.items():  # moved off the device as we go: one model in memory at a time
            value = value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype)
            state[prefix + key] = value.contiguous()

    with torch.device(device):
        unet = build_unet(shapes.unet)
        vae = build_vae(shapes.vae)
        randomize_zeros(unet)
        keep("model.diffusion_model.", unet.state_dict())
        keep("first_stage_model.", vae.state_dict())
        del unet, vae
        for index, prefix in enumerate(TEXT_PREFIXES[kind]):
            model, openclip = random_text_encoder(kind, index, shapes, vocab_size(tokenizer))
            weights = model.state_dict()
            if openclip:
                weights = hf_to_openclip(weights)
            elif kind == SDXL:
                weights.pop("text_model.embeddings.position_ids", None)  # newer checkpoints lack it
            keep(prefix, weights)
            del model, weights
    name = name or f"random-{kind}{'-v' if v_prediction else ''}"
    path = folder / f"{name}.safetensors"
    save_file(state, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(model_config(kind, shapes, v_prediction), sort_keys=False),
                                         encoding="utf-8")
    return path


def preset_checkpoint(folder, name: str, kind: str | None = None, **options) -> Path:
    """`make_checkpoint` of preset `name` (see PRESETS), named `<preset>-<kind>[-v].safetensors`;
    `options` as for make_checkpoint (v_prediction, seed, dtype, device)."""
    kind, shapes = preset(name, kind)
    v = "-v" if options.get("v_prediction") else ""
    stem = name.split("-")[0]
    return make_checkpoint(folder, kind, shapes, name=options.pop("name", None) or f"{stem}-{kind}{v}", **options)
