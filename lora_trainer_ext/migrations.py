"""A project's settings.json is versioned: each file says which version wrote it, and an older file is
migrated step by step on load, so a project made by any earlier release opens in this one (as in
OneTrainer's config). A stopped run's saved settings go through the same steps before resume compares
them. Add a step when a setting is renamed or changes meaning; a new setting with a default needs none.
"""

from __future__ import annotations

import copy

from .errors import LoraMakerError

VERSION = 5  # what this release writes; a file without "version" is version 1


def _rename(section: dict, old: str, new: str) -> None:
    if isinstance(section, dict) and old in section:
        value = section.pop(old)
        section.setdefault(new, value)


def _v1_to_v2(data: dict) -> None:
    """train.lr_restarts held the number of cosine cycles (3 cycles restart twice): it is lr_cycles,
    kohya's lr_scheduler_num_cycles."""
    _rename(data.get("train"), "lr_restarts", "lr_cycles")


def _v2_to_v3(data: dict) -> None:
    """keep_last_n_epochs defaulted to 10, which deleted epochs the default grid (every epoch) renders:
    the default is now 0 (keep all), and a file that holds the old default gets the new one."""
    train = data.get("train")
    if isinstance(train, dict) and train.get("keep_last_n_epochs") == 10:
        train["keep_last_n_epochs"] = 0


# The dataclass defaults of the releases before version 4, which wrote every setting to the file.
_V3_DEFAULTS = {
    "resolution": None, "buckets": True, "bucket_step": 64, "min_bucket": 256, "max_bucket": None,
    "bucket_no_upscale": False, "flip_aug": False, "shuffle_tags": True, "keep_tokens": None, "caption_dropout": 0.0,
    "tag_dropout": 0.0, "repeats": 10, "epochs": 10, "max_steps": None, "batch_size": 2, "save_every_n_epochs": 1,
    "keep_last_n_epochs": 0, "unet_lr": 5e-4, "text_encoder_lr": 1e-4, "lr_scheduler": "cosine_with_restarts",
    "lr_cycles": 3, "warmup_ratio": 0.05, "min_snr_gamma": 5.0, "noise_offset": 0.0, "seed": 42, "optimizer": "AdamW",
    "max_grad_norm": 1.0, "network": "lora", "dim": 16, "alpha": 8.0, "conv_dim": 8, "conv_alpha": 4.0,
    "mixed_precision": "fp16", "gradient_checkpointing": None, "cache_latents": "ram", "clip_skip": None,
}


def _v3_to_v4(data: dict) -> None:
    """A file now holds only what the user changed, over the loaded model family's defaults (SDXL's differ):
    values equal to the old defaults were never chosen (the old releases wrote every setting)."""
    train = data.get("train")
    if isinstance(train, dict):
        for key, value in list(train.items()):
            if key in _V3_DEFAULTS and value == _V3_DEFAULTS[key]:
                del train[key]


# The arguments each optimizer got before optimizer_args existed (pytorch-optimizer's names for prodigyopt's).
_V4_OPTIMIZER_ARGS = {"AdamW": "weight_decay=0.01", "AdamW8bit": "weight_decay=0.01",
                      "Prodigy": "weight_decay=0.01 safeguard_warmup=True bias_correction=True"}


def _v4_to_v5(data: dict) -> None:
    """optimizer_args is new, and unset it means the notebooks' recommended arguments (for SDXL's AdamW and for
    Prodigy not what version 4 used): an optimizer chosen in the file (always so in a stopped run's settings)
    keeps the arguments it had, so a stopped run resumes as it ran."""
    train = data.get("train")
    if isinstance(train, dict) and train.get("optimizer") in _V4_OPTIMIZER_ARGS and "optimizer_args" not in train:
        train["optimizer_args"] = _V4_OPTIMIZER_ARGS[train["optimizer"]]


STEPS = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4, 4: _v4_to_v5}  # version -> the step that brings a file of that version to the next


def migrate(data: dict, where: str = "settings.json") -> dict:
    """`data` (a whole settings.json) brought to VERSION, as a new dict."""
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise LoraMakerError(f"{where}: \"version\" must be a whole number from 1, got {version!r}")
    if version > VERSION:
        raise LoraMakerError(f"{where} was written by a newer LoRA Maker (settings version {version}; this one "
                             f"reads up to {VERSION}): update the extension")
    data = copy.deepcopy(data)
    for step in range(version, VERSION):
        STEPS[step](data)
    data["version"] = VERSION
    return data


def migrate_train(section: dict, version: int, where: str) -> dict:
    """One "train" section written at `version` (a stopped run's saved settings), brought to VERSION."""
    return migrate({"version": version, "train": section}, where)["train"]
