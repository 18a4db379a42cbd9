"""Dataset > Tag: caption the images with a WD tagger (anime tags) or BLIP (a sentence, for photos),
each as a background job. A missing optional package disables only the button that needs it."""

from __future__ import annotations

import gradio as gr

from ..dataset import captioner, tagger
from ..dataset.captions import join_tags, split_tags
from ..dataset.tagger import EXISTING_MODES, WD_MODELS, TagOptions
from .context import TabContext, shows_errors, unavailable


def build(ctx: TabContext) -> None:
    defaults = ctx.studio.default_tag_options()
    no_tagger = unavailable(("onnxruntime",), tagger._onnxruntime)
    no_blip = unavailable(("torch", "transformers"), captioner._blip_modules)
    with gr.Row(elem_classes="lora-maker-compact"):
        model = gr.Dropdown(list(WD_MODELS), value=ctx.studio.default_tagger(), allow_custom_value=True, scale=3,
                            label="WD tagger: a known model, another Hugging Face repo id, or a local folder "
                                  "(model.onnx + selected_tags.csv)",
                            elem_id="lora_maker_dataset_tagger")
        existing = gr.Radio(list(EXISTING_MODES), value=defaults.existing, label="Images that already have a caption",
                            elem_id="lora_maker_dataset_existing", scale=2)
    with gr.Row(elem_classes="lora-maker-compact"):
        threshold = gr.Slider(0, 1, value=defaults.threshold, step=0.01, label="General tags: confidence above",
                              elem_id="lora_maker_dataset_threshold")
        character = gr.Slider(0, 1, value=defaults.character_threshold, step=0.01,
                              label="Character tags: confidence above (higher: a wrong name hurts a LoRA)",
                              elem_id="lora_maker_dataset_character_threshold")
    for from_settings in (model, threshold, character):
        from_settings.do_not_save_to_config = True  # Settings > LoRA Maker holds these defaults, not ui-config.json
    with gr.Row():
        blacklist = gr.Textbox(join_tags(defaults.blacklist), label="Never write these tags", lines=3, scale=4,
                               elem_id="lora_maker_dataset_blacklist")
        with gr.Column(scale=1, min_width=200):
            ratings = gr.Checkbox(defaults.include_ratings, label="Add the rating tag (general, sensitive, ...)",
                                  elem_id="lora_maker_dataset_ratings")
            spaces = gr.Checkbox(defaults.underscores_to_spaces, label="Underscores to spaces",
                                 elem_id="lora_maker_dataset_underscores")
            escape = gr.Checkbox(defaults.escape_parentheses, label=r"Escape parentheses: name \(series\)",
                                 elem_id="lora_maker_dataset_escape")
    with gr.Row(elem_classes="lora-maker-compact"):
        tag = gr.Button("Tag images", variant="primary", interactive=not no_tagger, elem_id="lora_maker_dataset_tag",
                        scale=0, min_width=160)
        blip = gr.Button("Caption with BLIP (photos)", interactive=not no_blip, elem_id="lora_maker_dataset_blip",
                         scale=0, min_width=300)
        message = gr.Markdown(elem_id="lora_maker_dataset_tag_message")
    for feature, why in (("Tag images", no_tagger), ("Caption with BLIP", no_blip)):
        if why:
            gr.Markdown(f"{feature} is unavailable: {why}", elem_classes="lora-maker-error")

    @shows_errors
    def start_tagging(name, model, existing, threshold, character, blacklist, ratings, spaces, escape):
        options = TagOptions(threshold=float(threshold), character_threshold=float(character),
                             include_ratings=bool(ratings), underscores_to_spaces=bool(spaces),
                             escape_parentheses=bool(escape), blacklist=split_tags(blacklist), existing=existing)
        job = ctx.studio.start_tagging(ctx.open(name).name, (model or "").strip() or None, options)
        return f"Started **{job.title}** with {model or ctx.studio.default_tagger()}: progress above."

    @shows_errors
    def start_captioning(name, existing):
        job = ctx.studio.start_captioning(ctx.open(name).name, existing=existing)
        return f"Started **{job.title}** with BLIP: progress above."

    tag.click(start_tagging, [ctx.project, model, existing, threshold, character, blacklist, ratings, spaces, escape],
              message, queue=False)
    blip.click(start_captioning, [ctx.project, existing], message, queue=False)
