"""How much GPU memory a LoRA run will need: an estimate, shown before training, with its parts.

What lives on the GPU while LoRA Maker trains on the WebUI's model (trainer.py):
  - the frozen UNet and text encoder(s), in the host's half precision (fp32 with mixed_precision "no");
  - the VAE only while the latents are cached, alone (the UNet and text encoders wait off the GPU); it
    then leaves for the whole training, so it counts toward the caching phase's peak, not the training's;
    the same for the text encoders when their outputs are cached;
  - the LoRA weights and their gradients in fp32, and the optimizer's states (optimizers.py's table:
    AdamW two fp32 states per weight, AdamW8bit two 1-byte states, Prodigy four fp32 states, ...);
  - activations kept for the backward pass: per image, proportional to the image area, far fewer
    with gradient checkpointing (only UNet block inputs are kept, one block is recomputed at a time);
  - the CUDA context and cuBLAS/cuDNN workspaces, plus the caching allocator's slack.

Parameter counts are exact: the frozen sizes were counted from the ldm/HF classes of the reference
architectures, the LoRA sizes from our network module on them (tests/test_vram.py recounts both).
The activation sizes cannot be counted without a GPU; they are calibrated so the totals match what
trainers report (GiB as nvidia-smi shows them):
  - kohya sd-scripts docs/train_network_README-ja.md: SD1 LoRA at 512 px "barely runs on 8 GB"
    (batch 1, no checkpointing); bmaltais/kohya_ss#1480: SD1.5 LoRAs train on an 8 GB RTX 2060.
    Community figures: SD1.5 512 px batch 1-2, fp16, dim 16-32, AdamW, about 6-8 GB without
    gradient checkpointing and 4-5 GB with it.
  - kohya sd-scripts docs/train_SDXL-en.md: an SDXL LoRA "can be done with 8GB GPU memory (10GB
    recommended)" with U-Net only, gradient checkpointing, cached text-encoder outputs, an 8-bit
    optimizer and dim 4-8 (we keep the text encoders on the GPU: about 1.5 GiB more).
  - huggingface/diffusers#4470: SDXL LoRA at 1024 px under 16 GB with gradient checkpointing and
    8-bit Adam; above 16 GB without checkpointing.
  - kohya-ss/sd-scripts#648: SDXL LoRA 1024 px, batch 2, checkpointing, fp16, AdamW8bit, dim 16
    runs out of memory on a 12 GB card (11.76 GiB).
  - bmaltais/kohya_ss#2315: SDXL LoRA 1280 px, batch 3 "around 13GB" (older sd-scripts, text
    encoder outputs cached; we come out about 15% higher, on the safe side).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LoraMakerError
from ..hosts.host import SD1, SD2, SDXL
from .optimizers import OPTIMIZER_TABLE, optimizer_available
from .settings import TrainSettings

GIB = 2**30
KIND_NAMES = {SD1: "SD1", SD2: "SD2", SDXL: "SDXL"}

# Frozen parameters of the reference architectures (SD1.5, SD2.x, SDXL base).
UNET_PARAMS = {SD1: 859_520_964, SD2: 865_910_724, SDXL: 2_567_463_684}
_CLIP_L = 123_060_480  # OpenAI CLIP ViT-L/14 text model
_OPENCLIP_H = 354_032_641  # OpenCLIP ViT-H/14 text tower (SD2), projection included
_OPENCLIP_BIGG = 694_659_840  # OpenCLIP ViT-bigG/14 text tower with projection (SDXL's second)
TEXT_PARAMS = {SD1: _CLIP_L, SD2: _OPENCLIP_H, SDXL: _CLIP_L + _OPENCLIP_BIGG}
VAE_PARAMS = 83_653_863

# LoRA parameters per unit of rank: a LoRA module on a layer with n inputs and m outputs has
# dim * (n + m) weights (conv: conv_dim * (n * k * k + m)), summed over the layers network.py wraps.
UNET_LORA_PER_DIM = {
    (SD1, "lora"): 423_936, (SD1, "locon"): 506_816,
    (SD2, "lora"): 432_128, (SD2, "locon"): 515_008,
    (SDXL, "lora"): 2_659_840, (SDXL, "locon"): 2_718_400,
}
UNET_LORA_PER_CONV_DIM = {SD1: 544_000, SD2: 544_000, SDXL: 355_840}  # 3x3 convolutions (LoCon)
# Text-encoder LoRA (CLIP attention q/k/v/out and MLP fc1/fc2, kohya's set, OpenCLIP's as its HF twin):
# CLIP-L, OpenCLIP-H (23 of its 24 layers: SD2 reads the penultimate), and SDXL's CLIP-L + OpenCLIP-bigG.
TEXT_LORA_PER_DIM = {SD1: 165_888, SD2: 423_936, SDXL: 165_888 + 737_280}


# Activations kept for the backward pass, GiB per image at the kind's base side in 16-bit autocast:
# (without, with gradient checkpointing). Calibrated on the reports in the module docstring.
BASE_SIDE = {SD1: 512, SD2: 512, SDXL: 1024}
ACTIVATIONS_GIB = {SD1: (2.2, 0.8), SD2: (2.2, 0.8), SDXL: (7.0, 1.5)}
# The VAE encoding one image while latents are cached (no gradients), GiB at 512 px in 16-bit.
VAE_ENCODE_GIB = 0.25
CUDA_CONTEXT_GIB = 0.75  # CUDA context, cuBLAS/cuDNN workspaces
ALLOCATOR_SLACK = 0.10  # PyTorch's caching allocator holds some memory it is not using


@dataclass
class Part:
    name: str
    gib: float
    note: str = ""


@dataclass
class Estimate:
    kind: str
    total_gib: float  # the higher of the two peaks: what the card must hold
    training_gib: float  # peak while training
    caching_gib: float  # peak while caching latents (VAE on the GPU, no LoRA yet)
    lora_params: int
    parts: list[Part] = field(default_factory=list)  # the training peak's parts, then the VAE's

    def summary(self) -> str:
        phase = "while caching latents" if self.caching_gib > self.training_gib else "while training"
        return f"about {self.total_gib:.1f} GiB of GPU memory (estimate, peak {phase})"


def lora_parameters(kind: str, settings: TrainSettings) -> tuple[int, int]:
    """(UNet, text encoder) LoRA parameter counts for `settings` on a model of `kind`."""
    _check_kind(kind)
    unet = settings.dim * UNET_LORA_PER_DIM[(kind, settings.network)]
    if settings.network == "locon":
        unet += settings.conv_dim * UNET_LORA_PER_CONV_DIM[kind]
    text = settings.dim * TEXT_LORA_PER_DIM[kind] if settings.text_encoder_lr > 0 and kind in TEXT_LORA_PER_DIM else 0
    return unet, text


def estimate(kind: str, settings: TrainSettings) -> Estimate:
    """The GPU memory a run of `settings` needs on a model of `kind` (sd1, sd2, sdxl)."""
    _check_kind(kind)
    s = settings.resolved(kind)
    half = s.mixed_precision != "no"
    weight_bytes = 2 if half else 4
    precision = s.mixed_precision if half else "fp32"

    unet, text = lora_parameters(kind, s)
    lora = unet + text
    scale = (s.resolution / BASE_SIDE[kind]) ** 2
    full, checkpointed = ACTIVATIONS_GIB[kind]
    per_image = (checkpointed if s.gradient_checkpointing else full) * scale * (1 if half else 2)
    optimizer = OPTIMIZER_TABLE.get(s.optimizer, OPTIMIZER_TABLE["AdamW"])

    cached_text = s.cache_text_encoder_outputs != "no" and not text
    text_weights = Part("text encoder weights", TEXT_PARAMS[kind] * weight_bytes / GIB,
                        f"{TEXT_PARAMS[kind] / 1e6:,.0f}M in {precision}, " + (
                            "moved off the GPU once their outputs are cached" if cached_text
                            else "kept on the GPU for the captions"))
    frozen = [Part("UNet weights", UNET_PARAMS[kind] * weight_bytes / GIB, f"{UNET_PARAMS[kind] / 1e6:,.0f}M in {precision}")]
    if not cached_text:
        frozen.append(text_weights)
    trained = [
        Part("LoRA weights and gradients", lora * 8 / GIB,
             f"{lora / 1e6:.1f}M in fp32" + (" (UNet and text encoder)" if text else " (UNet only)")),
        Part("optimizer states", lora * optimizer.bytes_per_weight(s.dim) / GIB, f"{optimizer.name}: {optimizer.states}"),
        Part("activations", per_image * s.batch_size,
             f"batch {s.batch_size} at {s.resolution} px, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}"),
    ]
    # SDXL's VAE overflows in fp16, so the host encodes in fp32 (webui/host.py).
    vae_bytes = 4 if kind == SDXL or not half else 2
    vae_scale = (s.resolution / 512) ** 2 * vae_bytes / 2
    vae = Part("VAE (caching latents only)", (VAE_PARAMS * vae_bytes / GIB) + VAE_ENCODE_GIB * vae_scale,
               "moved off the GPU once the latents are cached: counts only toward that phase's peak")

    frozen_gib = sum(p.gib for p in frozen)
    training = _with_overheads(frozen_gib + sum(p.gib for p in trained))
    # The trainer caches with only the part it needs on the GPU (the VAE, then the text encoders).
    caching = _with_overheads(max(vae.gib, text_weights.gib if cached_text else 0))
    slack = Part("allocator slack", (frozen_gib + sum(p.gib for p in trained)) * ALLOCATOR_SLACK,
                 f"{ALLOCATOR_SLACK:.0%}: memory PyTorch keeps reserved")
    context = Part("CUDA context and workspaces", CUDA_CONTEXT_GIB)
    parked = [vae, *([text_weights] if cached_text else [])]
    return Estimate(kind, max(training, caching), training, caching, lora, [*frozen, *trained, slack, context, *parked])


def _with_overheads(gib: float) -> float:
    return gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB


def _check_kind(kind: str) -> None:
    if kind not in UNET_PARAMS:
        raise LoraMakerError(f"unknown model kind {kind!r}: one of {', '.join(UNET_PARAMS)}")


TIGHT = 0.9  # above this share of the card, other programs and fragmentation can tip it over


def fits(estimate: Estimate, gib: float, settings: TrainSettings | None = None) -> str:
    """A one-line verdict on `estimate` against `gib` of GPU memory, starting with "fits", "tight"
    or "too big"; with `settings`, what to change when it does not fit."""
    need = estimate.total_gib
    if need <= gib * TIGHT:
        return f"fits: about {need:.1f} of {gib:.1f} GiB"
    advice = _advice(estimate.kind, settings) if settings is not None else ""
    if need <= gib:
        return f"tight: about {need:.1f} of {gib:.1f} GiB; close other programs using the GPU{advice and ', or ' + advice}"
    return f"too big: about {need:.1f} GiB needed, {gib:.1f} GiB available{advice and '; try ' + advice}"


def fitting_settings(kind: str, settings: TrainSettings, gib: float) -> tuple[TrainSettings, list[str]] | None:
    """The cheapest settings that fit `gib` of GPU memory (within TIGHT), from `settings`, and what changed:
    first what costs only time (gradient checkpointing, cached text-encoder outputs when the text encoders
    are not trained, an 8-bit optimizer, half the batch with twice the accumulation, which trains the same),
    then, last, a lower resolution. ([] when it fits already; None when nothing here makes it fit.)"""
    s = settings.resolved(kind)
    steps = [
        (not s.gradient_checkpointing, dict(gradient_checkpointing=True), "gradient checkpointing on (about 20% slower)"),
        (s.cache_text_encoder_outputs == "no" and s.text_encoder_lr == 0, dict(cache_text_encoder_outputs="ram"),
         "text-encoder outputs cached (their weights leave the GPU)"),
        (s.optimizer == "AdamW" and optimizer_available("AdamW8bit"), dict(optimizer="AdamW8bit"),
         "optimizer AdamW8bit"),
    ]
    batch, accumulation = s.batch_size, s.gradient_accumulation_steps
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        steps.append((True, dict(batch_size=batch, gradient_accumulation_steps=accumulation),
                      f"batch {batch} x {accumulation} accumulated (the same images per step, less memory)"))
    lowest = 768 if kind == SDXL else 384
    side = s.resolution
    while side - 128 >= lowest:
        side -= 128
        steps.append((True, dict(resolution=side), f"resolution {side} (changes what is learned: the last resort)"))
    current, changes = settings, []
    if estimate(kind, current).total_gib <= gib * TIGHT:
        return current, changes
    for wanted, values, why in steps:
        if not wanted:
            continue
        current = current.replace(**values)
        changes = [c for c in changes if not c.startswith(why.split(" ")[0])] + [why]
        if estimate(kind, current).total_gib <= gib * TIGHT:
            return current, changes
    return None


def sysmem_fallback_note(estimate: Estimate, total_gib: float) -> str:
    """What a run near the card's size risks on Windows: the driver spilling into system memory."""
    if estimate.total_gib < total_gib * 0.85:
        return ""
    return ("near the card's size: on Windows, NVIDIA drivers from 536.40 move what does not fit into system memory "
            "instead of failing, and training then runs 5-20x slower. NVIDIA Control Panel > Manage 3D settings > "
            "CUDA - Sysmem Fallback Policy: Prefer No Sysmem Fallback makes it fail fast instead")


def _advice(kind: str, settings: TrainSettings) -> str:
    s = settings.resolved(kind)
    tips = []
    if not s.gradient_checkpointing:
        tips.append("gradient checkpointing on")
    if s.batch_size > 1:
        tips.append(f"batch size {max(1, s.batch_size // 2)}")
    if s.optimizer != "AdamW8bit":
        tips.append("optimizer AdamW8bit" + ("" if optimizer_available("AdamW8bit") else " (pip install bitsandbytes)"))
    if s.mixed_precision == "no":
        tips.append("mixed precision fp16")
    if s.resolution > (768 if kind == SDXL else BASE_SIDE[kind]):
        tips.append(f"resolution {s.resolution - (256 if kind == SDXL else 128)}")
    return ", ".join(tips)
