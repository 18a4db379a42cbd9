"""Training presets: by purpose (what the LoRA learns) and by VRAM tier (the card it trains on).

The purpose sets the learning knobs, from the seed guide and the kohya-colab trainers it walks through
(reference/seed-notebooks.md): LoRA 16/8 at 5e-4 / 1e-4 for characters; LoCon with conv 8/4 for
styles, at a lower rate and UNet only; a smaller LoRA for concepts; on SDXL the XL trainer's 8/4 at
3e-4 / 6e-5. Repeats and epochs aim at a number of steps inside the guide's
250-1000 ("few repeats and many epochs") once the dataset's size is known.

The tier sets the memory knobs: the largest batch (and no gradient checkpointing where possible)
whose `vram.estimate` stays under 90% of the card, AdamW8bit on small cards when bitsandbytes is
installed, 768 px for SDXL on 8 GB. Presets are named "character, 12 GB" (a WebUI setting's value).

An optimizer picked with the preset comes with the notebooks' "recommended values": its arguments, and
for Prodigy and D-Adaptation learning rates about 1 with alpha = dim (SD1.5's trainer also a constant
schedule with warmup); Lion a third of AdamW's rates. All of it lands in the form, to read and edit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LoraMakerError
from ..hosts.host import SD1, SD2, SDXL
from . import vram
from .optimizers import ADAPTIVE_LR, LION_LR_FACTOR, OPTIMIZER_TABLE, OPTIMIZERS, optimizer_available, recommended_args
from .plan import GUIDE_STEPS
from .settings import TrainSettings

PURPOSES = ("character", "style", "concept")
VRAM_TIERS = (8, 12, 16, 24)
BUDGET = vram.TIGHT  # share of the card a preset may plan to use

# Learning knobs by purpose; SDXL entries replace the SD1/SD2 ones they name.
_PURPOSE = {
    "character": dict(network="lora", dim=16, alpha=8.0, unet_lr=5e-4, text_encoder_lr=1e-4, flip_aug=False,
                      shuffle_tags=True, lr_scheduler="cosine_with_restarts", lr_cycles=3, epochs=10),
    "style": dict(network="locon", dim=16, alpha=8.0, conv_dim=8, conv_alpha=4.0, unet_lr=3e-4, text_encoder_lr=0.0,
                  flip_aug=True, shuffle_tags=True, lr_scheduler="cosine_with_restarts", lr_cycles=3, epochs=15),
    "concept": dict(network="lora", dim=8, alpha=4.0, unet_lr=5e-4, text_encoder_lr=1e-4, flip_aug=True,
                    shuffle_tags=True, lr_scheduler="cosine_with_restarts", lr_cycles=3, epochs=10),
}
_PURPOSE_SDXL = {
    "character": dict(dim=8, alpha=4.0, unet_lr=3e-4, text_encoder_lr=6e-5),
    "style": dict(conv_dim=16, conv_alpha=8.0, unet_lr=2e-4),
    "concept": dict(unet_lr=3e-4, text_encoder_lr=6e-5),
}
# Total steps each purpose aims at (SD1/SD2, SDXL): styles need more, XL about half the repeats.
_TARGET_STEPS = {"character": (600, 450), "style": (900, 700), "concept": (500, 400)}
_WHY = {
    "character": "character: LoRA {dim}/{alpha:g}, UNet {unet_lr:g} / text {text_encoder_lr:g}; no mirroring, so "
                 "asymmetric details (hair parting, emblems) stay on their side",
    "style": "style: LoCon {dim}/{alpha:g} + conv {conv_dim}/{conv_alpha:g} (the convolutions carry brushwork and "
             "texture), a lower UNet rate {unet_lr:g} over more epochs, UNet only; mirroring doubles the variety",
    "concept": "concept (a pose, outfit or object): a small LoRA {dim}/{alpha:g} learns the idea rather than the "
               "pictures; UNet {unet_lr:g} / text {text_encoder_lr:g}; mirroring on, the idea reads the same both ways",
}
_WHY_SDXL = " (SDXL: the XL trainer's lower rank and rates)"
# The largest batch each tier tries, by model family; SDXL keeps gradient checkpointing on.
_MAX_BATCH = {False: {8: 2, 12: 2, 16: 3, 24: 4}, True: {8: 1, 12: 1, 16: 2, 24: 4}}
_SMALL_CARD = {False: (8,), True: (8, 12)}  # tiers that use AdamW8bit when it is installed


@dataclass
class Applied:
    settings: TrainSettings
    notes: list[str] = field(default_factory=list)  # why, for the purpose and for the tier; then warnings


def preset_names() -> list[str]:
    return [preset_name(purpose, gb) for purpose in PURPOSES for gb in VRAM_TIERS]


def preset_name(purpose: str, vram_gb: int) -> str:
    return f"{purpose}, {vram_gb} GB"


def parse_preset_name(name: str) -> tuple[str, int]:
    """"character, 12 GB" -> ("character", 12)."""
    purpose, _, tier = (name or "").partition(",")
    purpose, tier = purpose.strip().lower(), tier.strip().upper().removesuffix("GB").strip()
    if purpose not in PURPOSES or not tier.isdigit() or int(tier) not in VRAM_TIERS:
        raise LoraMakerError(f"unknown training preset {name!r}: one of {', '.join(preset_names())}")
    return purpose, int(tier)


def tier_for_memory(total_gib: float) -> int:
    """The tier of a card with `total_gib` of memory (cards report a little under their size)."""
    fitting = [gb for gb in VRAM_TIERS if total_gib >= gb * 0.9]
    return fitting[-1] if fitting else VRAM_TIERS[0]


def apply_preset(settings: TrainSettings, purpose: str, vram_gb: int, kind: str, images: int | None = None,
                 optimizer: str | None = None) -> TrainSettings:
    """`settings` with the preset's knobs for a model of `kind`; with `images`, repeats and epochs
    aimed at the purpose's number of steps; with `optimizer`, that one and its recommended values
    (None: AdamW, or AdamW8bit on small cards). Everything the preset does not name is kept."""
    return apply_preset_with_notes(settings, purpose, vram_gb, kind, images, optimizer).settings


def apply_preset_with_notes(settings: TrainSettings, purpose: str, vram_gb: int, kind: str,
                            images: int | None = None, optimizer: str | None = None) -> Applied:
    """`apply_preset`, with a line on why for the purpose and for the tier, and any warning."""
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise LoraMakerError(f"unknown optimizer {optimizer!r}: one of {', '.join(OPTIMIZERS)}")
    if purpose not in PURPOSES:
        raise LoraMakerError(f"unknown purpose {purpose!r}: one of {', '.join(PURPOSES)}")
    if vram_gb not in VRAM_TIERS:
        raise LoraMakerError(f"unknown VRAM tier {vram_gb!r} GB: one of {', '.join(map(str, VRAM_TIERS))}")
    if kind not in (SD1, SD2, SDXL):
        raise LoraMakerError(f"unknown model kind {kind!r}")
    xl = kind == SDXL
    learning = {**_PURPOSE[purpose], **(_PURPOSE_SDXL[purpose] if xl else {}), "max_steps": None}
    s = settings.replace(**learning)
    why = _WHY[purpose].format(**s.to_dict()) + (_WHY_SDXL if xl else "")
    notes = []
    if optimizer:
        s = s.replace(**recommended_values(s, optimizer, kind))
        notes.append(_optimizer_note(s, optimizer))
    s, tier_note, warnings = _fit_tier(s, vram_gb, kind, keep_optimizer=bool(optimizer))
    if images:
        s = s.replace(**_repeats_and_epochs(images, s, _TARGET_STEPS[purpose][xl]))
    return Applied(s, [why, *notes, tier_note, *warnings])


def recommended_values(s: TrainSettings, optimizer: str, kind: str) -> dict:
    """The settings the notebooks' "recommended values" give `optimizer` on a model of `kind`, from the
    learning rates and ranks of `s`: its arguments; Prodigy and D-Adaptation rates about 1 (a text encoder
    that is not trained stays so) with alpha = dim; Lion a third of the rates."""
    values = dict(optimizer=optimizer, optimizer_args=recommended_args(optimizer, kind))
    if OPTIMIZER_TABLE[optimizer].adaptive:
        lr = ADAPTIVE_LR[kind if kind == SDXL else None]
        values.update(unet_lr=lr if s.unet_lr > 0 else 0.0, text_encoder_lr=lr if s.text_encoder_lr > 0 else 0.0,
                      alpha=float(s.dim), conv_alpha=float(s.conv_dim))
        if kind != SDXL:  # the SD1.5 trainer's override; the XL trainer keeps the chosen schedule
            values["lr_scheduler"] = "constant_with_warmup"
    elif optimizer == "Lion":
        values.update(unet_lr=s.unet_lr * LION_LR_FACTOR, text_encoder_lr=s.text_encoder_lr * LION_LR_FACTOR)
    return values


def _optimizer_note(s: TrainSettings, optimizer: str) -> str:
    note = f"{optimizer} with the notebooks' recommended values: {s.optimizer_args}"
    if OPTIMIZER_TABLE[optimizer].adaptive:
        note += (f"; it finds its own step size, so learning rates {s.unet_lr:g} / {s.text_encoder_lr:g} scale it, "
                 f"and alpha = dim ({s.alpha:g})")
    elif optimizer == "Lion":
        note += f"; Lion steps by a sign, so a third of AdamW's rates: {s.unet_lr:.2g} / {s.text_encoder_lr:.2g}"
    if not optimizer_available(optimizer):
        note += f" (pip install {OPTIMIZER_TABLE[optimizer].package} first)"
    return note


def _fit_tier(s: TrainSettings, vram_gb: int, kind: str, keep_optimizer: bool) -> tuple[TrainSettings, str, list[str]]:
    xl = kind == SDXL
    small = vram_gb in _SMALL_CARD[xl]
    memory = dict(mixed_precision="fp16" if s.mixed_precision == "no" else s.mixed_precision)
    if not keep_optimizer:
        eight_bit = small and optimizer_available("AdamW8bit")
        memory.update(optimizer="AdamW8bit" if eight_bit else "AdamW", optimizer_args=None)
    if xl:  # 1024 px, or 768 where nothing else could fit; buckets follow the resolution
        memory.update(resolution=768 if vram_gb == 8 else None, max_bucket=None, min_bucket=256)
    s = s.replace(**memory)
    budget = vram_gb * BUDGET
    most = _MAX_BATCH[xl][vram_gb]
    tries = ([] if xl else [(most, False)]) + [(batch, True) for batch in range(most, 0, -1)]
    for batch, checkpointing in tries:
        candidate = s.replace(batch_size=batch, gradient_checkpointing=checkpointing)
        need = vram.estimate(kind, candidate).total_gib
        if need <= budget:
            break
    tips = ["batch " + str(batch), "gradient checkpointing " + ("on (about 20% slower)" if checkpointing else "off")]
    if memory.get("optimizer") == "AdamW8bit":
        tips.append("AdamW8bit (8-bit optimizer states)")
    elif memory.get("optimizer") and small:
        tips.append("AdamW (pip install bitsandbytes for the leaner AdamW8bit)")
    if xl and vram_gb == 8:
        tips.append("768 px")
    note = f"{vram_gb} GB: {', '.join(tips)}; estimate about {need:.1f} GiB"
    warnings = []
    if need > budget:
        if xl and vram_gb == 8:
            warnings.append(
                "SDXL on an 8 GB card is not realistic: its UNet and two text encoders alone take about "
                f"{(vram.UNET_PARAMS[SDXL] + vram.TEXT_PARAMS[SDXL]) * 2 / vram.GIB:.1f} GiB, leaving too little "
                "to train; use an SD1.5 model, or a 12 GB or larger card"
            )
        else:
            warnings.append(f"even the leanest settings need about {need:.1f} GiB, more than a {vram_gb} GB card "
                            "holds: lower the resolution or the network's rank")
    return candidate, note, warnings


def _repeats_and_epochs(images: int, s: TrainSettings, target: int) -> dict:
    """Repeats that put images x repeats x epochs / batch near `target` steps (the guide's few
    repeats, many epochs); a dataset too big for that even at 1 repeat gets as many epochs as fit in
    the guide's 1000 steps (at least one)."""
    repeats = max(1, round(target * s.batch_size / (images * s.epochs)))
    per_epoch = math.ceil(images / s.batch_size)
    epochs = s.epochs if repeats > 1 else max(1, min(s.epochs, GUIDE_STEPS[1] // per_epoch))
    return {"repeats": repeats, "epochs": epochs}
