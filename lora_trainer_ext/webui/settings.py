"""LoRA Maker's section of the WebUI's Settings page. The keys are the ones `paths.py`, `studio.py` and
`boorus.credentials` read from config.json, so the CLI run in a WebUI folder honours them too."""

from __future__ import annotations

import functools

from ..paths import (
    OPT_DEFAULT_PRESET,
    OPT_DEFAULT_TAGGER,
    OPT_MODEL_CACHE,
    OPT_PROJECTS_ROOT,
    OPT_TAG_CHARACTER_THRESHOLD,
    OPT_TAG_THRESHOLD,
)

SECTION = ("lora_maker", "LoRA Maker", "training")


def preset_choices() -> list[str]:
    """"" (no default) and the training presets; just "" when the presets can't be loaded, so a
    broken module costs the dropdown its choices, not the WebUI its Settings page."""
    try:
        from ..training.presets import preset_names

        return ["", *preset_names()]
    except Exception as e:
        print(f"LoRA Maker: no training presets for Settings ({type(e).__name__}: {e})")
        return [""]


def add_settings() -> None:
    import gradio as gr
    from modules import shared

    from ..dataset.tagger import DEFAULT_MODEL, WD_MODELS, TagOptions

    tag_defaults = TagOptions()
    masked = (gr.Textbox, {"type": "password"})

    def threshold(default: float, label: str):
        return shared.OptionInfo(default, label, gr.Slider, {"minimum": 0.0, "maximum": 1.0, "step": 0.01})

    options = {
        OPT_PROJECTS_ROOT: shared.OptionInfo("", "Projects folder (empty: lora-maker/ in the WebUI folder)"),
        OPT_MODEL_CACHE: shared.OptionInfo("", "Tagger and captioner model cache (empty: models/lora-maker/)"),
        # allow_custom_value goes to the constructor: component_args also reach gr.update() when the page
        # loads the values, and gradio 3.41's Dropdown.update() refuses it (no setting would load).
        OPT_DEFAULT_TAGGER: shared.OptionInfo(
            DEFAULT_MODEL, "Default tagger", functools.partial(gr.Dropdown, allow_custom_value=True),
            {"choices": list(WD_MODELS)},
        ).info("a Hugging Face repo id, or a folder with model.onnx and selected_tags.csv"),
        OPT_TAG_THRESHOLD: threshold(tag_defaults.threshold, "Tagger threshold for general tags"),
        OPT_TAG_CHARACTER_THRESHOLD: threshold(
            tag_defaults.character_threshold, "Tagger threshold for character tags",
        ).info("higher than general: a wrong character name poisons a LoRA"),
        OPT_DEFAULT_PRESET: shared.OptionInfo(
            "", "Default training preset", gr.Dropdown, lambda: {"choices": preset_choices()},
        ),
        "lora_maker_gelbooru_user_id": shared.OptionInfo(
            "", "Gelbooru user id (Gelbooru's API needs an account since 2025)"),
        "lora_maker_gelbooru_api_key": shared.OptionInfo("", "Gelbooru API key", *masked),
        "lora_maker_danbooru_user_id": shared.OptionInfo(
            "", "Danbooru login (optional: lifts the 2-tag search limit)"),
        "lora_maker_danbooru_api_key": shared.OptionInfo("", "Danbooru API key", *masked),
    }
    for key, info in shared.options_section(SECTION, options).items():
        shared.opts.add_option(key, info)
