"""Tiny random-weight checkpoints in SD1, SD2(-v) and SDXL shapes, saved the way real ones are.

Built from the real classes (ldm `UNetModel` and `AutoencoderKL`, HF CLIP text models) at tiny sizes
and written in the original checkpoint layout: `model.diffusion_model.*`, `first_stage_model.*`,
SD1 `cond_stage_model.transformer.*`, SD2 `cond_stage_model.model.*` (OpenCLIP layout), SDXL
`conditioner.embedders.0.transformer.*` and `conditioner.embedders.1.model.*` (OpenCLIP layout), with
the WebUI-style yaml beside the file and a tiny CLIP BPE tokenizer in `tokenizer/`.

Sizes: 64px images -> VAE (4 levels, factor 8) -> 8x8x4 latents. UNet model_channels 32, two res blocks
per level like the real models (so block indices match real names): SD1 4 levels [1,1,2,2], attention
at 3 of them, conv proj, 2 heads; SD2 the same with linear proj and 16-channel heads (v-prediction when
asked); SDXL 3 levels [1,2,2], attention at 2 of them, transformer depth [1,1,2], sequential adm input
of pooled (48) + 6 x 16 size embedding = 144. Text encoders: 2 layers, hidden 32 (SD1, SD2, SDXL TE1)
and 48 (SDXL TE2, with projection), so SDXL's context is 32 + 48 = 80.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from lora_trainer_ext.host import SD1, SD2, SDXL
from lora_trainer_ext.standalone import TEXT_PREFIXES, build_unet, build_vae

WORDS = ("a photo of 1girl solo long short red blue black hair eyes smile looking at viewer cat dog "
         "outdoors sky the with and standing sitting dress shirt holding").split()
TE_HIDDEN = {SD1: [32], SD2: [32], SDXL: [32, 48]}
SIZE_EMBED = 16
VAE = {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}
UNETS = {
    SD1: {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
          "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 2, 2], "num_heads": 2,
          "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32, "use_checkpoint": False,
          "legacy": False},
    SD2: {"use_checkpoint": True, "use_fp16": True, "image_size": 8, "in_channels": 4, "out_channels": 4,
          "model_channels": 32, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 1, 2, 2],
          "num_head_channels": 16, "use_spatial_transformer": True, "use_linear_in_transformer": True,
          "transformer_depth": 1, "context_dim": 32, "legacy": False},
    SDXL: {"adm_in_channels": 48 + 6 * SIZE_EMBED, "num_classes": "sequential", "use_checkpoint": True,
           "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [4, 2],
           "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_head_channels": 16, "use_spatial_transformer": True,
           "use_linear_in_transformer": True, "transformer_depth": [1, 1, 2], "context_dim": 80,
           "spatial_transformer_attn_type": "softmax-xformers", "legacy": False},
}


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
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def vocab_size(folder: Path) -> int:
    return len(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))


def tiny_config(kind: str, v_prediction: bool = False, tokenizer: str = "tokenizer") -> dict:
    """The WebUI-style model config of a tiny checkpoint (ldm layout for SD1/2, sgm for SDXL)."""
    extra = {"tokenizer": tokenizer, "text_encoders": [{"num_attention_heads": 2} for _ in TE_HIDDEN[kind]]}
    if kind == SDXL:
        scaling = "VScaling" if v_prediction else "EpsScaling"
        params = {
            "scale_factor": 0.13025,
            "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
                "num_idx": 1000,
                "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                "discretization_config": {
                    "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNETS[SDXL]},
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
                {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                 "params": {"layer": "hidden", "layer_idx": 1}},
                {"is_trainable": False, "input_key": "txt",
                 "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                 "params": {"arch": "ViT-bigG-14", "freeze": True, "layer": "penultimate",
                            "always_return_pooled": True, "legacy": False}},
                *({"is_trainable": False, "input_key": key,
                   "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": SIZE_EMBED}}
                  for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"))]}},
            "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": VAE},
        }
        return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}, "lora_maker": extra}
    params = {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "conditioning_key": "crossattn", "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNETS[kind]},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": VAE},
        "cond_stage_config": ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                               "params": {"freeze": True, "layer": "penultimate"}} if kind == SD2 else
                              {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}),
    }
    if v_prediction:
        params["parameterization"] = "v"
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}, "lora_maker": extra}


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


def _randomize_zeros(module: torch.nn.Module) -> None:
    """ldm zero-initialises output convs and projections (so an untrained model predicts 0 and passes
    no gradient back); give those layers ordinary random weights so tiny hosts behave like trained ones."""
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.Tensor) and hasattr(m, "reset_parameters") and not weight.any():
            m.reset_parameters()


def _text_encoder(kind: str, index: int, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = TE_HIDDEN[kind][index]
    openclip = kind == SD2 or index == 1
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            hidden_act="gelu" if openclip else "quick_gelu", bos_token_id=vocab - 2,
                            eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return (CLIPTextModelWithProjection if kind == SDXL and index == 1 else CLIPTextModel)(config), openclip


def make_checkpoint(folder, kind: str, v_prediction: bool = False, seed: int = 0) -> Path:
    """Write a tiny `kind` checkpoint (+ yaml + tokenizer/) into `folder`; returns the .safetensors path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tokenizer = write_tokenizer(folder / "tokenizer")
    torch.manual_seed(seed)
    unet = build_unet(UNETS[kind])
    vae = build_vae(VAE)
    _randomize_zeros(unet)
    state = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    state.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    for index, prefix in enumerate(TEXT_PREFIXES[kind]):
        model, openclip = _text_encoder(kind, index, vocab_size(tokenizer))
        weights = model.state_dict()
        if openclip:
            weights = hf_to_openclip(weights)
        elif kind == SDXL:
            weights.pop("text_model.embeddings.position_ids", None)  # newer checkpoints lack it
        state.update({prefix + k: v for k, v in weights.items()})
    name = f"tiny-{kind}{'-v' if v_prediction else ''}"
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_config(kind, v_prediction), sort_keys=False),
                                         encoding="utf-8")
    return path
