"""The Train sub-tab's settings form: one input per TrainSettings field, grouped as users think about
them, and the conversions between the inputs' values and a TrainSettings.

Inputs hand their raw values (numbers, None for an empty box) to `TrainSettings.from_dict`, so the
form and the settings file and the CLI's --set go through the same checks and messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.settings import CHOICES, FIELDS, TrainSettings

# Settings that are True, False or None ("by model"): a three-way choice in the form.
AUTO_ON_OFF = {"auto": None, "on": True, "off": False}
THREE_WAY = ("gradient_checkpointing", "zero_terminal_snr", "scale_v_pred_loss")
TEXT = ("network_weights", "optimizer_args")  # free text: a textbox
AUTO_CHOICES = ("prediction",)  # choices that may be None: "auto" in the form


@dataclass(frozen=True)
class Input:
    key: str  # the TrainSettings field
    label: str
    info: str = ""
    step: float = 1  # number inputs: the spinner's step
    optional: bool = False  # an empty number box means "auto" (None)


@dataclass(frozen=True)
class Group:
    title: str
    main: tuple[Input, ...]
    more: tuple[Input, ...] = ()  # rarely changed: in a closed accordion


GROUPS = (
    Group("Steps", (
        Input("repeats", "Repeats", "times each image is seen per epoch"),
        Input("epochs", "Epochs"),
        Input("batch_size", "Batch size"),
        Input("max_steps", "Max steps", "empty: count epochs", optional=True),
    ), (
        Input("gradient_accumulation_steps", "Gradient accumulation", "batches per step: batch x this in less memory"),
        Input("save_every_n_epochs", "Save every N epochs", "0: only the final LoRA"),
        Input("keep_last_n_epochs", "Keep last N epochs", "0: keep all"),
        Input("save_precision", "Save precision", "fp16 is what LoRAs are shared in"),
    )),
    Group("Learning", (
        Input("unet_lr", "UNet learning rate", step=1e-5),
        Input("text_encoder_lr", "Text encoder learning rate", "0: UNet only", step=1e-5),
        Input("optimizer", "Optimizer"),
        Input("lr_scheduler", "Scheduler"),
        Input("optimizer_args", "Optimizer arguments", "key=value ...; empty: the notebooks' recommended ones",
              optional=True),
    ), (
        Input("lr_cycles", "Cycles", "restarts of cosine_with_restarts and rex"),
        Input("lr_power", "Polynomial power", "the polynomial schedule's; 1 is linear", step=0.1),
        Input("warmup_ratio", "Warmup ratio", step=0.01),
        Input("min_snr_gamma", "Min-SNR gamma", "0: off", step=0.5),
        Input("noise_offset", "Noise offset", "0: off", step=0.01),
        Input("multires_noise_iterations", "Multires noise", "layers of coarser noise; 0: off (SDXL: 6)"),
        Input("multires_noise_discount", "Multires discount", step=0.05),
        Input("ip_noise_gamma", "Input perturbation", "0.05-0.1; 0: off", step=0.01),
        Input("prediction", "Prediction", "auto: the model's (its yaml, or NoobAI V-Pred's v_pred key)"),
        Input("zero_terminal_snr", "Zero terminal SNR", "auto: on for SDXL v-prediction (NoobAI V-Pred)"),
        Input("scale_v_pred_loss", "Scale v-pred loss", "like noise prediction; auto: as zero terminal SNR"),
        Input("max_grad_norm", "Max gradient norm", "0: no clipping", step=0.1),
        Input("seed", "Seed"),
    )),
    Group("Network", (
        Input("network", "Network", "LoCon also adapts convolutions (styles)"),
        Input("dim", "Dim (rank)"),
        Input("alpha", "Alpha", step=0.5),
        Input("conv_dim", "Conv dim", "LoCon only"),
        Input("conv_alpha", "Conv alpha", "LoCon only", step=0.5),
    ), (
        Input("network_weights", "Continue from LoRA file", "its path; same network and rank; empty: start fresh",
              optional=True),
    )),
    Group("Images & captions", (
        Input("resolution", "Resolution", "empty: 512, 1024 for SDXL", step=64, optional=True),
        Input("keep_tokens", "Keep tokens", "empty: the dataset's activation tags", optional=True),
        Input("shuffle_tags", "Shuffle tags"),
        Input("flip_aug", "Mirror images"),
    ), (
        Input("buckets", "Aspect-ratio buckets"),
        Input("bucket_no_upscale", "Don't upscale small images"),
        Input("bucket_step", "Bucket step", step=32),
        Input("min_bucket", "Min bucket side", step=64),
        Input("max_bucket", "Max bucket side", "empty: by resolution", step=64, optional=True),
        Input("caption_dropout", "Caption dropout", "chance of an empty caption", step=0.01),
        Input("tag_dropout", "Tag dropout", "chance of leaving out each tag", step=0.01),
    )),
    Group("Memory & speed", (
        Input("mixed_precision", "Mixed precision"),
        Input("gradient_checkpointing", "Gradient checkpointing", "auto: on for SDXL; saves memory, ~20% slower"),
        Input("cache_latents", "Cache latents in"),
        Input("cache_text_encoder_outputs", "Cache text-encoder outputs", "only without text-encoder training"),
        Input("clip_skip", "Clip skip", "empty: the WebUI's setting", optional=True),
    )),
)
INPUTS = tuple(i for g in GROUPS for i in (*g.main, *g.more))
assert sorted(i.key for i in INPUTS) == sorted(FIELDS), "every training setting needs exactly one input"
KEYS = tuple(i.key for i in INPUTS)
_DEFAULTS = TrainSettings()


def component(spec: Input):
    """The gradio input for one setting (elem_id lora_maker_train_<key>)."""
    import gradio as gr

    common = dict(label=spec.label, info=spec.info or None, elem_id=f"lora_maker_train_{spec.key}",
                  value=form_values(_DEFAULTS)[KEYS.index(spec.key)])
    if spec.key in THREE_WAY:
        return gr.Dropdown(list(AUTO_ON_OFF), **common)
    if spec.key in CHOICES:  # a choice that may be unset offers "auto"
        return gr.Dropdown(["auto"] * (spec.key in AUTO_CHOICES) + list(CHOICES[spec.key]), **common)
    if isinstance(getattr(_DEFAULTS, spec.key), bool):
        return gr.Checkbox(**{**common, "info": None}, elem_classes="lora-maker-train-check")
    if spec.key in TEXT:
        return gr.Textbox(lines=1, **{**common, "value": common["value"] or ""})
    return gr.Number(step=spec.step, min_width=120, **common)


def form_values(settings: TrainSettings) -> list:
    """The inputs' values for `settings`, in INPUTS order."""
    values = settings.to_dict()
    for key in THREE_WAY:
        values[key] = next(k for k, v in AUTO_ON_OFF.items() if v == values[key])
    for key in AUTO_CHOICES:
        values[key] = values[key] or "auto"
    return [values[key] for key in KEYS]


def settings_from(values) -> TrainSettings:
    """TrainSettings from the inputs' values (INPUTS order); LoraMakerError names a bad one."""
    given = dict(zip(KEYS, values))
    for key in THREE_WAY:
        given[key] = AUTO_ON_OFF.get(given[key])
    return TrainSettings.from_dict(given)
