"""Training settings: every knob of a LoRA run with the seed guide's defaults, by the names the
project's settings.json (section "train") and the CLI's `--set key=value` use, and their checks.
The step arithmetic they lead to is plan.py's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass

from ..errors import LoraMakerError
from ..hosts.host import SD1, SD2, SDXL
from ..project import Project
from .optimizers import ADAPTIVE_LR, OPTIMIZER_TABLE, OPTIMIZERS, optimizer_available, parse_args, recommended_args
from .schedules import SCHEDULERS

# Where SDXL-family models (Illustrious, Pony, NoobAI, Animagine) differ from the SD1.5 trainer's defaults
# (the dataclass's): the XL trainer's (seed-notebooks.md §4-5). A project's settings.json holds only what the
# user changed from its model's defaults.
FAMILY_DEFAULTS = {
    SDXL: dict(repeats=2, batch_size=4, unet_lr=3e-4, text_encoder_lr=6e-5, dim=8, alpha=4.0, conv_dim=16,
               conv_alpha=8.0, min_snr_gamma=8.0, multires_noise_iterations=6, multires_noise_discount=0.3,
               max_bucket=4096),
}

NETWORKS = ("lora", "locon")
PRECISIONS = ("fp16", "bf16", "no")
LATENT_CACHES = ("ram", "disk")
TEXT_CACHES = ("no", "ram", "disk")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
PREDICTIONS = ("eps", "v")
CHOICES = {
    "save_precision": SAVE_PRECISIONS,
    "lr_scheduler": SCHEDULERS,
    "network": NETWORKS,
    "optimizer": OPTIMIZERS,
    "mixed_precision": PRECISIONS,
    "cache_latents": LATENT_CACHES,
    "cache_text_encoder_outputs": TEXT_CACHES,
    "prediction": PREDICTIONS,
}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"", "none", "null", "auto"}


@dataclass
class TrainSettings:
    # -- images --
    resolution: int | None = None  # training side in pixels (area = side²); None: 512, or 1024 for SDXL
    buckets: bool = True  # aspect-ratio buckets; off: every image is centre-cropped to a square
    bucket_step: int = 64  # bucket sides are multiples of this
    min_bucket: int = 256  # shortest bucket side
    max_bucket: int | None = None  # longest bucket side; None: 1024, or twice the resolution above 512
    bucket_no_upscale: bool = False  # small images keep their size (floored to bucket_step) instead of being enlarged
    flip_aug: bool = False  # mirror images at random; balances poses but may confuse left and right
    # -- captions --
    shuffle_tags: bool = True  # shuffle the tags of each caption every time it is seen (turn off for sentences)
    keep_tokens: int | None = None  # leading tags kept in place (activation tags); None: the dataset's keep_tokens
    caption_dropout: float = 0.0  # chance of training an image with an empty caption
    tag_dropout: float = 0.0  # chance of leaving out each shuffled tag
    # -- steps --
    repeats: int = 10  # times each image is seen per epoch
    epochs: int = 10  # passes over the repeated dataset (ignored when max_steps is set)
    max_steps: int | None = None  # train exactly this many steps instead of a number of epochs
    batch_size: int = 2  # images per step (all of one bucket)
    gradient_accumulation_steps: int = 1  # batches whose gradients make one step (a bigger batch in less memory)
    save_every_n_epochs: int = 1  # save an epoch's LoRA every N epochs to compare them later; 0: only the final one
    keep_last_n_epochs: int = 0  # keep only the newest N epoch files; 0: keep all (the grid compares every epoch)
    save_precision: str = "fp16"  # the LoRA files' dtype: fp16 (what everyone shares), bf16 or fp32
    # -- learning --
    unet_lr: float = 5e-4  # UNet learning rate (1e-4 to 2e-4 to "cook slowly")
    text_encoder_lr: float = 1e-4  # text encoder learning rate, 1/2 to 1/5 of the UNet's; 0: UNet only
    lr_scheduler: str = "cosine_with_restarts"  # constant(_with_warmup), cosine(_with_restarts), linear or polynomial
    lr_cycles: int = 3  # cosine cycles of cosine_with_restarts (kohya's lr_scheduler_num_cycles)
    lr_power: float = 1.0  # the polynomial schedule's power (kohya's lr_scheduler_power; 1 is linear)
    warmup_ratio: float = 0.05  # share of the steps spent ramping the learning rate up (not for constant)
    min_snr_gamma: float = 5.0  # min-SNR loss weighting gamma; 0: off
    noise_offset: float = 0.0  # extra per-channel noise that lets the LoRA learn very dark/bright images; 0: off
    multires_noise_iterations: int = 0  # multi-resolution noise: layers of coarser noise added (XL trainer: 6); 0: off
    multires_noise_discount: float = 0.3  # weight of each coarser layer, to the power of its depth
    ip_noise_gamma: float = 0.0  # input perturbation: extra noise in the noisy latents only (0.05-0.1); 0: off
    zero_terminal_snr: bool | None = None  # rescale the schedule to reach pure noise; None: on for SDXL v-prediction
    scale_v_pred_loss: bool | None = None  # weigh a v-prediction loss like eps's (SNR / (SNR+1)); None: as above
    prediction: str | None = None  # eps or v; None: the model's (its yaml, or NoobAI V-Pred's v_pred key)
    seed: int = 42  # seed of shuffles, augmentations, noise and the network's initial weights
    optimizer: str = "AdamW"  # AdamW, AdamW8bit (bitsandbytes), Prodigy or DAdaptAdam (lr about 1), Lion, Adafactor, CAME
    optimizer_args: str | None = None  # "weight_decay=0.1 betas=0.9,0.99"; None: the notebooks' recommended ones
    max_grad_norm: float = 1.0  # gradient norm clipping; 0: off
    # -- network --
    network: str = "lora"  # lora, or locon to also adapt the convolutions (good for styles)
    dim: int = 16  # rank of the attention/linear layers (16 is about 18 MB on SD1.5)
    alpha: float = 8.0  # scale = alpha / dim
    conv_dim: int = 8  # rank of the convolution layers (locon only)
    conv_alpha: float = 4.0  # conv scale = conv_alpha / conv_dim (locon only)
    network_weights: str | None = None  # continue from this LoRA file (same model, network type and rank)
    # -- memory and speed --
    mixed_precision: str = "fp16"  # autocast dtype: fp16 (with loss scaling), bf16, or no
    gradient_checkpointing: bool | None = None  # recompute activations to save memory; None: on for SDXL only
    cache_latents: str = "ram"  # encode every image once and keep the latents in ram, or on disk for big sets
    # encode every caption once (ram or disk) when the text encoders are not trained: faster, and the run
    # needs no text encoder; tags are then not shuffled and nothing is dropped
    cache_text_encoder_outputs: str = "no"
    clip_skip: int | None = None  # text encoder layer from the end; None: the host's own setting (the WebUI's)

    # ---- conversion ----

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        """Settings from a settings.json section or parsed --set pairs (values converted and checked
        by field type; unknown names are an error naming the closest ones)."""
        if not isinstance(values, dict):
            raise LoraMakerError(f"training settings must be a mapping of name to value, got {type(values).__name__}")
        return cls(**{key: _convert(key, value) for key, value in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainSettings":
        return TrainSettings.from_dict({**self.to_dict(), **changes})

    def resolved(self, kind: str, project: Project | None = None) -> "TrainSettings":
        """A copy with every "by model"/"by dataset" value filled in for a model of `kind`."""
        if kind not in (SD1, SD2, SDXL):
            raise LoraMakerError(f"unknown model kind {kind!r}")
        resolution = self.resolution or (1024 if kind == SDXL else 512)
        keep_tokens = self.keep_tokens
        if keep_tokens is None:
            keep_tokens = int((project.settings().get("dataset", {}) if project else {}).get("keep_tokens", 0) or 0)
        fixed_captions = {} if self.cache_text_encoder_outputs == "no" else dict(
            shuffle_tags=False, tag_dropout=0.0, caption_dropout=0.0)  # what a cached caption cannot vary
        return dataclasses.replace(
            self,
            **fixed_captions,
            resolution=resolution,
            max_bucket=self.max_bucket or (1024 if resolution <= 512 else 2 * resolution),
            keep_tokens=keep_tokens,
            optimizer_args=recommended_args(self.optimizer, kind) if self.optimizer_args is None else self.optimizer_args,
            gradient_checkpointing=(kind == SDXL) if self.gradient_checkpointing is None else self.gradient_checkpointing,
        )

    # ---- checks ----

    def validate(self, kind: str | None = None) -> list[str]:
        """Raise LoraMakerError listing every impossible value (resolution and bucket sides checked
        against `kind`'s multiple once known); return advice about legal but unusual values."""
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for name in ("repeats", "batch_size", "dim", "lr_cycles", "bucket_step", "min_bucket",
                     "gradient_accumulation_steps"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("max_steps", "resolution", "max_bucket", "clip_skip"):
            value = getattr(self, name)
            need(value is None or value >= 1, f"{name} must be at least 1 (got {value})")
        need(self.max_steps is not None or self.epochs >= 1, f"epochs must be at least 1 (got {self.epochs})")
        for name in ("unet_lr", "text_encoder_lr", "min_snr_gamma", "noise_offset", "max_grad_norm",
                     "save_every_n_epochs", "keep_last_n_epochs", "keep_tokens", "multires_noise_iterations",
                     "ip_noise_gamma"):  # fmt: skip
            value = getattr(self, name)
            need(value is None or value >= 0, f"{name} must not be negative (got {value})")
        need(self.unet_lr > 0 or self.text_encoder_lr > 0, "unet_lr and text_encoder_lr are both 0: nothing would train")
        need(self.cache_text_encoder_outputs == "no" or self.text_encoder_lr == 0,
             "cache_text_encoder_outputs needs text_encoder_lr 0: a text encoder whose outputs are cached cannot learn")
        need(self.alpha > 0, f"alpha must be above 0 (got {self.alpha})")
        if self.network == "locon":
            need(self.conv_dim >= 1, f"conv_dim must be at least 1 for locon (got {self.conv_dim})")
            need(self.conv_alpha > 0, f"conv_alpha must be above 0 (got {self.conv_alpha})")
        for name in ("caption_dropout", "tag_dropout"):
            need(0 <= getattr(self, name) <= 1, f"{name} is a chance between 0 and 1 (got {getattr(self, name)})")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio must be from 0 to below 1 (got {self.warmup_ratio})")
        need(self.lr_power > 0, f"lr_power must be above 0 (got {self.lr_power})")
        need(0 < self.multires_noise_discount <= 1,
             f"multires_noise_discount must be above 0 and at most 1 (got {self.multires_noise_discount})")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            need(value in allowed or (value is None and _base_type(name)[1]),
                 f"{name} must be one of {', '.join(allowed)} (got {value!r})")

        # The UNet halves the latents 3 (SD1/2) or 2 (SDXL) times: sides must divide evenly.
        multiples = {"resolution": 32 if kind == SDXL else 64} if kind else {}
        multiples["bucket_step"] = multiples.get("resolution")
        if self.bucket_step >= 1:
            multiples.update(min_bucket=self.bucket_step, max_bucket=self.bucket_step)
        for name, multiple in multiples.items():
            value = getattr(self, name)
            of = f"{multiple} for {kind}" if name in ("resolution", "bucket_step") else f"bucket_step {multiple}"
            need(not multiple or not value or value % multiple == 0, f"{name} must be a multiple of {of} (got {value})")
        low, high, side = self.min_bucket, self.max_bucket, self.resolution
        if high and low > high:
            problems.append(f"min_bucket {low} is above max_bucket {high}")
        elif side and high and not low <= side <= high:
            problems.append(f"resolution {side} must lie between min_bucket {low} and max_bucket {high}")

        try:
            parse_args(self.optimizer_args)
        except LoraMakerError as e:
            problems.append(str(e))
        if self.optimizer in OPTIMIZERS and not optimizer_available(self.optimizer):
            package = OPTIMIZER_TABLE[self.optimizer].package
            problems.append(
                f"optimizer {self.optimizer} needs the {package} package: pip install {package} into the WebUI's "
                "Python, or --set optimizer=AdamW"
            )
        if problems:
            raise LoraMakerError("bad training settings: " + "; ".join(problems))

        advice = []
        if self.cache_text_encoder_outputs != "no" and (self.shuffle_tags or self.tag_dropout or self.caption_dropout):
            advice.append("with cached text-encoder outputs every caption is used as written: tags are not shuffled "
                          "and no tag or caption is dropped")
        if self.optimizer in OPTIMIZERS and OPTIMIZER_TABLE[self.optimizer].adaptive and max(self.unet_lr, self.text_encoder_lr) <= 0.1:
            advice.append(f"{self.optimizer} finds its own step size: set unet_lr (and text_encoder_lr) to about "
                          f"{ADAPTIVE_LR[kind if kind == SDXL else None]:g}, as the notebooks do")
        if self.text_encoder_lr > self.unet_lr > 0:
            advice.append("text_encoder_lr above unet_lr: the guide uses 1/2 to 1/5 of the UNet's")
        return advice


# ---- --set and the settings file ----

_HINTS = typing.get_type_hints(TrainSettings)
FIELDS = tuple(f.name for f in dataclasses.fields(TrainSettings))


def _base_type(name: str) -> tuple[type, bool]:
    """(the field's value type, whether None is allowed)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), type(None) in typing.get_args(hint)


def _unknown(key: str) -> LoraMakerError:
    close = difflib.get_close_matches(key, FIELDS, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known settings: {', '.join(FIELDS)}"
    return LoraMakerError(f"unknown training setting {key!r}: {hint}")


def _convert(key: str, value):
    """`value` (text from --set, or JSON from the settings file) as setting `key`'s type."""
    if key not in FIELDS:
        raise _unknown(key)
    kind, optional = _base_type(key)
    text = value.strip() if isinstance(value, str) else None
    if value is None or (optional and text is not None and text.lower() in _NONE):
        if optional:
            return None
        raise LoraMakerError(f"setting {key} needs a value")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            word = str(value).strip().lower()
            if word in _TRUE | _FALSE:
                return word in _TRUE
            raise ValueError
        if kind is int:
            number = float(text) if text is not None else value
            if isinstance(number, bool) or number != int(number):
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(text if text is not None else value)
            if not math.isfinite(number):
                raise ValueError
            return number
        word = str(value).strip()
        allowed = CHOICES.get(key)
        if allowed:  # choices are matched without regard to case: adamw8bit -> AdamW8bit
            match = next((c for c in allowed if c.lower() == word.lower()), None)
            if match is None:
                raise LoraMakerError(f"setting {key} must be one of {', '.join(allowed)}, got {word!r}")
            return match
        return word
    except (TypeError, ValueError, OverflowError):
        expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
        raise LoraMakerError(f"setting {key} must be {expected}{' or none' if optional else ''}, got {value!r}") from None


def parse_set(pairs: list[str]) -> dict:
    """`["epochs=4", "network=locon"]` -> {"epochs": 4, "network": "locon"}, converted by field type."""
    values = {}
    for pair in pairs:
        if "=" not in pair:
            raise LoraMakerError(f"--set needs key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        values[key] = _convert(key, value)
    return values


def family_note(kind: str | None) -> str:
    """What differs in `kind`'s defaults, for the plan ("" for SD1/SD2: the SD1.5 trainer's)."""
    changes = FAMILY_DEFAULTS.get(kind)
    if not changes:
        return ""
    listed = ", ".join(f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}" for key, value in changes.items())
    return f"SDXL-family defaults (the XL trainer's) for what the project has not changed: {listed}"


def defaults(kind: str | None) -> TrainSettings:
    """The defaults for a model of `kind` (None: none loaded, SD1.5's)."""
    return TrainSettings(**FAMILY_DEFAULTS.get(kind, {}))


def load(project: Project, kind: str | None = None) -> TrainSettings:
    """The project's training settings for a model of `kind`: what the user changed, over `kind`'s defaults."""
    section = project.settings().get("train", {})
    try:
        return defaults(kind).replace(**section)
    except LoraMakerError as e:
        raise LoraMakerError(f"{project.settings_path}: {e} (fix or remove it in the \"train\" section)") from None


def save(project: Project, settings: TrainSettings, kind: str | None = None) -> None:
    """Keep what differs from `kind`'s defaults (the rest follows the model the next run trains on)."""
    base = defaults(kind).to_dict()
    project.replace_settings(train={k: v for k, v in settings.to_dict().items() if v != base[k]})
