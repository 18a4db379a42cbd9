"""Dataset > Scrape: count a booru query, look at the plan, then download it as a background job.

Download stays disabled until Count has run for exactly the inputs on screen, so what gets
downloaded is always what the preview said."""

from __future__ import annotations

import json

import gradio as gr

from ..dataset.boorus import BOORUS, normalise_query
from ..errors import LoraMakerError
from . import dataset_views as views
from .context import TabContext, shows_errors

DEFAULT_BOORU = "gelbooru"
DEFAULT_LIMIT = 100
COUNT_FIRST = "Download (press Count first)"


def signature(name, booru, tags, limit, api_url, api_key, user_id) -> str:
    """What a preview was made for; Download compares it with the inputs at the click."""
    query = " ".join(str(tags or "").split())
    return json.dumps([name, booru, query, int(limit or 0), (api_url or "").strip(), api_key or "", user_id or ""])


def build(ctx: TabContext) -> None:
    with gr.Row(elem_classes="lora-maker-compact"):
        booru = gr.Dropdown(list(BOORUS), value=DEFAULT_BOORU, label="Booru", elem_id="lora_maker_dataset_booru",
                            scale=1, min_width=130)
        tags = gr.Textbox(label="Tag query", placeholder="hatsune_miku solo -comic rating:general", lines=1,
                          elem_id="lora_maker_dataset_tags", scale=4)
        limit = gr.Number(value=DEFAULT_LIMIT, precision=0, minimum=1, label="Posts (at most)",
                          elem_id="lora_maker_dataset_limit", scale=1, min_width=110)
        save_tags = gr.Checkbox(value=True, label="Keep the post's tags as captions",
                                elem_id="lora_maker_dataset_save_tags", scale=1, min_width=150)
    with gr.Accordion("API URL and credentials (optional)", open=False, elem_id="lora_maker_dataset_advanced"):
        with gr.Row(elem_classes="lora-maker-compact"):
            api_url = gr.Textbox(label="API URL (a mirror; empty: the booru's own site)", lines=1,
                                 elem_id="lora_maker_dataset_api_url", scale=2)
            api_key = gr.Textbox(label="API key (empty: the one in Settings > LoRA Maker)", type="password",
                                 elem_id="lora_maker_dataset_api_key", scale=1)
            user_id = gr.Textbox(label="User id / login (empty: from Settings)", type="password",
                                 elem_id="lora_maker_dataset_user_id", scale=1)
    for secret in (api_key, user_id):
        secret.do_not_save_to_config = True  # the WebUI's Settings > Defaults must never write them to ui-config.json
    with gr.Row(elem_classes="lora-maker-compact"):
        count = gr.Button("Count", elem_id="lora_maker_dataset_count", scale=0, min_width=120)
        download = gr.Button(COUNT_FIRST, variant="primary", interactive=False, elem_id="lora_maker_dataset_download",
                             scale=0, min_width=260)
        message = gr.Markdown(elem_id="lora_maker_dataset_scrape_message")
    preview = gr.Textbox(label="What a download would do", lines=4, max_lines=12, interactive=False,
                         elem_id="lora_maker_dataset_preview")
    counted = gr.State("")  # signature() of the inputs the preview was made for

    inputs = [ctx.project, booru, tags, limit, api_url, api_key, user_id]
    not_counted = gr.Button.update(value=COUNT_FIRST, interactive=False)

    @shows_errors
    def run_count(name, booru, tags, limit, api_url, api_key, user_id):
        project = ctx.open(name)
        normalise_query(tags)  # an empty query is refused before any request
        plan = ctx.studio.preview_scrape(project.name, booru, tags, int(limit or 0), api_key=api_key or "",
                                         user_id=user_id or "", api_url=(api_url or "").strip() or None)
        matching = "an unknown number of" if plan.count is None else f"{plan.count:,}"
        n = len(plan.posts)
        button = gr.Button.update(value=f"Download {views.counted(n, 'image')}", interactive=n > 0)
        note = f"**{matching}** posts match; **{n}** to download" + ("" if n else " (nothing new)")
        return plan.preview(), note, button, signature(name, booru, tags, limit, api_url, api_key, user_id)

    @shows_errors
    def run_download(name, booru, tags, limit, api_url, api_key, user_id, save_tags, counted):
        if counted != signature(name, booru, tags, limit, api_url, api_key, user_id):
            raise LoraMakerError("the query changed since it was counted: press Count again, then Download")
        job = ctx.studio.start_scrape(ctx.open(name).name, booru, tags, int(limit or 0), save_tags=bool(save_tags),
                                      api_key=api_key or "", user_id=user_id or "",
                                      api_url=(api_url or "").strip() or None)
        return f"Started **{job.title}**: progress above; the images show in Review when it is done.", not_counted, ""

    count.click(run_count, inputs, [preview, message, download, counted], queue=False)
    tags.submit(run_count, inputs, [preview, message, download, counted], queue=False)
    download.click(run_download, inputs + [save_tags, counted], [message, download, counted], queue=False)
    # Any change to what was counted disables Download until the next Count.
    for component in (booru, limit, api_url, api_key, user_id, ctx.project):
        component.change(lambda: not_counted, None, download, queue=False)
    tags.input(lambda: not_counted, None, download, queue=False)
