"""Tiny random-weight checkpoints in SD1, SD2(-v) and SDXL shapes, saved the way real ones are: the
"tiny" preset of `lora_trainer_ext.dev.random_models` under the names the tests use.

Sizes: 64px images -> VAE (4 levels, factor 8) -> 8x8x4 latents. UNet model_channels 32, two res blocks
per level like the real models (so block indices match real names): SD1 4 levels [1,1,2,2], attention
at 3 of them, conv proj, 2 heads; SD2 the same with linear proj and 16-channel heads (v-prediction when
asked); SDXL 3 levels [1,2,2], attention at 2 of them, transformer depth [1,1,2], sequential adm input
of pooled (48) + 6 x 16 size embedding = 144. Text encoders: 2 layers, hidden 32 (SD1, SD2, SDXL TE1)
and 48 (SDXL TE2, with projection), so SDXL's context is 32 + 48 = 80.
"""

from __future__ import annotations

from pathlib import Path

from lora_trainer_ext.dev import random_models
from lora_trainer_ext.dev.random_models import WORDS, hf_to_openclip, vocab_size, write_tokenizer  # noqa: F401
from lora_trainer_ext.hosts.host import SD1, SD2, SDXL

TINY = random_models.PRESETS["tiny"]
TE_HIDDEN = {kind: list(shapes.text_hidden) for kind, shapes in TINY.items()}
SIZE_EMBED = TINY[SDXL].size_embed
VAE = TINY[SD1].vae
UNETS = {kind: shapes.unet for kind, shapes in TINY.items()}


def tiny_config(kind: str, v_prediction: bool = False, tokenizer: str = "tokenizer") -> dict:
    """The WebUI-style model config of a tiny checkpoint (ldm layout for SD1/2, sgm for SDXL)."""
    return random_models.model_config(kind, TINY[kind], v_prediction, tokenizer)


def make_checkpoint(folder, kind: str, v_prediction: bool = False, seed: int = 0) -> Path:
    """Write a tiny `kind` checkpoint (+ yaml + tokenizer/) into `folder`; returns the .safetensors path."""
    return random_models.preset_checkpoint(folder, "tiny", kind, v_prediction=v_prediction, seed=seed)


def checkpoints_of_every_kind(folder: Path) -> dict[str, Path]:
    """A tiny checkpoint of each kind under `folder`: SD1, SD2 (v-prediction, as SD2 768 is) and SDXL."""
    return {SD1: make_checkpoint(folder / "sd1", SD1), SD2: make_checkpoint(folder / "sd2v", SD2, v_prediction=True),
            SDXL: make_checkpoint(folder / "sdxl", SDXL)}
