"""The Dataset sub-tab, in workflow order: Scrape a booru, Review the images (marks, trash, caption
editor), remove Duplicates, Tag them, Curate the tags, Check for problems before training.

Each part refreshes itself when the project is picked (also on every page load), a job starts or ends (so a
finished scrape shows in Review without a click) or another part edits the dataset."""

from __future__ import annotations

from ..dataset.report import dataset_report
from .context import TabContext, shows_errors, unavailable


def build(ctx: TabContext) -> None:
    import gradio as gr

    from . import dataset_curate, dataset_duplicates, dataset_review, dataset_scrape, dataset_tag
    from . import dataset_views as views

    # A part that changes images or captions sets this to views.edit_stamp(part); the others refresh.
    edited = gr.Textbox(visible=False, elem_id="lora_maker_dataset_edited")
    with gr.Tabs(elem_id="lora_maker_dataset_tabs"):
        with gr.Tab("Scrape", elem_id="lora_maker_dataset_scrape_tab"):
            dataset_scrape.build(ctx)
        with gr.Tab("Review", elem_id="lora_maker_dataset_review_tab"):
            dataset_review.build(ctx, edited)
        with gr.Tab("Duplicates", elem_id="lora_maker_dataset_dupes_tab"):
            dataset_duplicates.build(ctx, edited)
        with gr.Tab("Tag", elem_id="lora_maker_dataset_tag_tab"):
            dataset_tag.build(ctx)
        with gr.Tab("Curate", elem_id="lora_maker_dataset_curate_tab"):
            dataset_curate.build(ctx, edited)
        with gr.Tab("Check", elem_id="lora_maker_dataset_check_tab"):
            missing = unavailable(("imagehash",), views.need_imagehash)  # the report decodes every image
            with gr.Row(elem_classes="lora-maker-compact"):
                check = gr.Button("Check the dataset", elem_id="lora_maker_dataset_check", interactive=not missing,
                                  scale=0, min_width=200)
                gr.Markdown("Images without captions, broken files, sizes and shapes: what would trip up training.")
            if missing:
                gr.Markdown(f"Unavailable: {missing}", elem_classes="lora-maker-error")
            report = gr.Textbox(label="Report", lines=8,
                                max_lines=30, interactive=False, elem_id="lora_maker_dataset_report")

    @shows_errors
    def run_check(name):
        return dataset_report(ctx.open(name)).render()

    check.click(run_check, ctx.project, report, queue=False)
    for event in (ctx.project.change, ctx.job_event.change, edited.change):
        event(lambda: "", None, report, queue=False)
