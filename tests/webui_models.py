"""Run in a real WebUI 1.10.x's Python (tests/webui_env.py does, once per test session): writes the tiny
SD1, SD2-v and SDXL checkpoints the real-WebUI tests load, and the offline Hugging Face hub cache the
WebUI builds their text encoders from.

    python webui_models.py REPO OUT CLIP_FILES_TARBALL

OUT/models/lora-maker-test-{sd1,sd2v,sdxl}.safetensors (+ .yaml, + tokenizer/ for LoRA Maker's own
loader) and OUT/hf (an HF_HOME). UNets and VAEs come from LoRA Maker's random model generator (preset
"tiny": 64px images, 8x8 latents); the text encoders keep CLIP's real 49,408-token vocabulary (the WebUI
tokenizes with the real BPE), and every LayerNorm gets a random affine: with weight 1 and bias 0 a
text encoder's output is exactly zero-mean and the WebUI's emphasis step divides by that mean (NaN).

The WebUI builds each text encoder from the yaml before it loads the weights, so the hub cache holds:
- openai/clip-vit-large-patch14 and lora-maker/clip-text-tiny: the tokenizer files of
  ../shared/clip-tokenizer (no weights: the WebUI loads none from there);
- lora-maker/open-clip-text-tiny-w<width>: open_clip's config of a tiny OpenCLIP text tower (with a
  1-layer vision tower that the WebUI's embedders drop) and its weights, which open_clip loads for any
  "hf-hub:" architecture, strictly; the same text weights are in the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

VOCAB, CONTEXT = 49408, 77
CLIP_TINY = "lora-maker/clip-text-tiny"  # hidden 32, 2 layers, 2 heads, MLP 64, quick_gelu
TINY_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
KINDS = {"sd1": ("sd1", False), "sd2v": ("sd2", True), "sdxl": ("sdxl", False)}  # file -> (kind, v-prediction)


def hub_entry(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """An offline hub cache entry: refs/main naming a snapshot folder that holds `files`."""
    revision = hashlib.sha1(b"".join(hashlib.sha1(files[name]).digest() for name in sorted(files))).hexdigest()
    entry = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (entry / "snapshots" / revision).mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        (entry / "snapshots" / revision / name).write_bytes(data)
    (entry / "refs" / "main").write_text(revision)
    (hf_home / "hub" / "version.txt").write_text("1")  # transformers 4.30 warns of an old layout without it


def clip_files(tarball: Path) -> dict[str, dict[str, bytes]]:
    """{folder: {file: bytes}} of ../shared/clip-tokenizer/clip-files.tar.gz."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            if member.isfile():
                folder, name = member.name.split("/", 1)
                out.setdefault(folder, {})[name] = tar.extractfile(member).read()
    return out


def random_layer_norms(state: dict, seed: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if ("layer_norm" in key or ".ln_" in key or key.startswith("ln_")) and value.is_floating_point():
            noise = torch.randn(value.shape, generator=generator) * 0.1
            state[key] = (1 + noise) if key.endswith("weight") else noise
    return state


def clip_l(seed: int) -> tuple[object, dict]:
    """The tiny CLIP-L-style encoder of SD1 and SDXL's first: the config the WebUI reads from the cache."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(CLIP_TINY, local_files_only=True)
    torch.manual_seed(seed)
    state = random_layer_norms(CLIPTextModel(config).state_dict(), seed + 1)
    state["text_model.embeddings.position_ids"] = torch.arange(CONTEXT).unsqueeze(0)  # transformers 4.30 has it
    return config, state


def open_clip_tower(rm, width: int, layers: int, heads: int, seed: int) -> dict:
    """OpenCLIP text-tower weights (SD2's encoder, SDXL's second): MLP 4x, as open_clip 2.20 builds it."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=heads, max_position_embeddings=CONTEXT, projection_dim=width,
                            hidden_act="gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0)
    torch.manual_seed(seed)
    state = random_layer_norms(CLIPTextModelWithProjection(config).state_dict(), seed + 1)
    state.pop("text_model.embeddings.position_ids", None)
    return rm.hf_to_openclip(state)


def open_clip_arch(hf_home: Path, width: int, layers: int, heads: int, text: dict) -> str:
    """The hub entry of that tower's architecture; returns the yaml's `arch` ("hf-hub:...")."""
    import open_clip
    import torch

    model_cfg = {"embed_dim": width, "vision_cfg": dict(TINY_VISION),
                 "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": width, "heads": heads,
                              "layers": layers}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**copy.deepcopy(model_cfg))
    model.load_state_dict({**model.state_dict(), **text}, strict=True)
    weights = io.BytesIO()
    torch.save(model.state_dict(), weights)
    repo_id = f"lora-maker/open-clip-text-tiny-w{width}"
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                                         "std": [0.26862954, 0.26130258, 0.27577711]}}
    hub_entry(hf_home, repo_id, {"open_clip_config.json": json.dumps(config).encode(),
                                 "open_clip_pytorch_model.bin": weights.getvalue()})
    return f"hf-hub:{repo_id}"


def unet_and_vae(rm, kind: str, shapes, v_prediction: bool, seed: int) -> dict:
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        state = load_file(str(rm.make_checkpoint(tmp, kind, shapes, v_prediction=v_prediction, seed=seed)))
    return {k: v for k, v in state.items() if k.startswith(("model.diffusion_model.", "first_stage_model."))}


def webui_ready(config: dict, kind: str, shapes) -> dict:
    """What the WebUI's ldm/sgm classes need beyond the generator's yaml (as in the WebUI's own configs)."""
    params = config["model"]["params"]
    params["first_stage_config"]["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    if kind == "sdxl":
        params["disable_first_stage_autocast"] = True
        params["denoiser_config"]["params"]["weighting_config"] = {
            "target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"}
    else:
        params.update({"num_timesteps_cond": 1, "log_every_t": 200, "first_stage_key": "jpg", "cond_stage_key": "txt",
                       "image_size": shapes.unet["image_size"], "channels": 4, "cond_stage_trainable": False,
                       "monitor": "val/loss_simple_ema"})
    return config


def make(rm, name: str, folder: Path, hf_home: Path, seed: int) -> Path:
    import yaml
    from safetensors.torch import save_file

    kind, v_prediction = KINDS[name]
    shapes = rm.PRESETS["tiny"][kind]
    state: dict = {}
    if kind in ("sd1", "sdxl"):
        te_config, clip = clip_l(seed + 10)
        state.update({("cond_stage_model.transformer." if kind == "sd1" else "conditioner.embedders.0.transformer.")
                      + k: v for k, v in clip.items()})
    if kind in ("sd2", "sdxl"):
        width = shapes.text_hidden[-1]
        layers, heads = 2, 2
        tower = open_clip_tower(rm, width, layers, heads, seed + 20)
        state.update({("cond_stage_model.model." if kind == "sd2" else "conditioner.embedders.1.model.")
                      + k: v for k, v in tower.items()})
        arch = open_clip_arch(hf_home, width, layers, heads, tower)
    shapes = dataclasses.replace(shapes, text_heads=(2,) * len(shapes.text_hidden))
    if kind == "sdxl":
        shapes = dataclasses.replace(shapes, unet={**shapes.unet, "context_dim": te_config.hidden_size + width,
                                                   "adm_in_channels": width + 6 * shapes.size_embed})
    state.update(unet_and_vae(rm, kind, shapes, v_prediction, seed))
    config = webui_ready(rm.model_config(kind, shapes, v_prediction), kind, shapes)
    params = config["model"]["params"]
    if kind == "sd1":
        params["cond_stage_config"]["params"] = {"version": CLIP_TINY}
    elif kind == "sd2":
        params["cond_stage_config"]["params"].update({"arch": arch, "version": None})
    else:
        embedders = params["conditioner_config"]["params"]["emb_models"]
        embedders[0]["params"].update({"version": CLIP_TINY, "layer_idx": te_config.num_hidden_layers - 1})
        embedders[1]["params"].update({"arch": arch, "version": None})  # None: no pretrained tag, even on a retry
    path = folder / f"lora-maker-test-{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def main(repo: str, out: str, tarball: str) -> None:
    import os

    out_dir, hf_home = Path(out), Path(out) / "hf"
    files = clip_files(Path(tarball))
    hub_entry(hf_home, "openai/clip-vit-large-patch14", files["clip-vit-large-patch14"])
    hub_entry(hf_home, CLIP_TINY, files["clip-text-tiny"])
    os.environ.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # before transformers loads
    sys.path.insert(0, repo)
    sys.path.insert(0, "repositories/stable-diffusion-stability-ai")  # ldm, as the WebUI puts it on its path
    sys.path.insert(0, "repositories/generative-models")
    from lora_trainer_ext.dev import random_models as rm

    models = out_dir / "models"
    (models / "tokenizer").mkdir(parents=True, exist_ok=True)  # the real vocabulary, for LoRA Maker's loader
    for name in ("vocab.json", "merges.txt"):
        (models / "tokenizer" / name).write_bytes(files["clip-text-tiny"][name])
    for seed, name in enumerate(KINDS):
        print(make(rm, name, models, hf_home, seed))


if __name__ == "__main__":
    main(*sys.argv[1:4])
