"""LoRA Maker's section of the WebUI's Settings page. The keys are the ones `paths.py` and
`boorus.credentials` read from config.json, so the CLI run in a WebUI folder honours them too."""

from __future__ import annotations

from ..paths import OPT_MODEL_CACHE, OPT_PROJECTS_ROOT


def add_settings() -> None:
    import gradio as gr
    from modules import shared

    def add(key: str, label: str, **kw) -> None:
        info = shared.OptionInfo("", label, section=("lora_maker", "LoRA Maker"), category_id="training", **kw)
        shared.opts.add_option(key, info)

    masked = {"component": gr.Textbox, "component_args": {"type": "password"}}
    add(OPT_PROJECTS_ROOT, "Projects folder (empty: lora-maker/ in the WebUI folder)")
    add(OPT_MODEL_CACHE, "Tagger and captioner model cache (empty: models/lora-maker/)")
    add("lora_maker_gelbooru_user_id", "Gelbooru user id (Gelbooru's API needs an account since 2025)")
    add("lora_maker_gelbooru_api_key", "Gelbooru API key", **masked)
    add("lora_maker_danbooru_user_id", "Danbooru login (optional: lifts the 2-tag search limit)")
    add("lora_maker_danbooru_api_key", "Danbooru API key", **masked)
