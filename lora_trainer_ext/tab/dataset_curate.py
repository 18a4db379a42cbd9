"""Dataset > Curate: the tag frequency table of the filtered images, a batch edit of exactly those
images (one undoable step), Undo and the recent edits."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..dataset.captions import join_tags, split_tags
from ..dataset.curate import activation_tags, load_captions
from ..dataset.history import History
from ..project import Project
from . import dataset_views as views
from .context import TabContext, shows_errors

CLICK_TARGETS = ("remove", "filter: with", "filter: without", "add")


def build(ctx: TabContext, edited) -> None:
    ui = SimpleNamespace()
    _layout(ui)
    _wire(ctx, ui, edited)


def _layout(ui) -> None:
    with gr.Row(elem_classes="lora-maker-compact"):
        ui.include = gr.Textbox(label="Filter: images with tags", placeholder="1girl, red hair", lines=1, scale=3,
                                elem_id="lora_maker_dataset_filter_include")
        ui.match = gr.Radio(["all", "any"], value="all", label="having", elem_id="lora_maker_dataset_filter_match",
                            scale=1, min_width=120)
        ui.exclude = gr.Textbox(label="and none of", placeholder="comic, monochrome", lines=1, scale=3,
                                elem_id="lora_maker_dataset_filter_exclude")
        ui.apply_filter = gr.Button("Filter", elem_id="lora_maker_dataset_filter", scale=0, min_width=90)
    ui.selected_note = gr.Markdown(elem_id="lora_maker_dataset_filter_note")
    with gr.Row():
        with gr.Column(scale=2, min_width=260):
            ui.table = gr.Dataframe(headers=["tag", "images"], datatype=["str", "number"], interactive=False,
                                    height=440, elem_id="lora_maker_dataset_tag_table",
                                    label="Tags of the filtered images (click a header to sort)")
            ui.click_to = gr.Radio(list(CLICK_TARGETS), value="remove", label="Clicking a tag adds it to",
                                   elem_id="lora_maker_dataset_tag_click")
        with gr.Column(scale=3):
            ui.activation = gr.Textbox(label="Activation tags: first in every caption (keep_tokens follows them)",
                                       lines=1, elem_id="lora_maker_dataset_activation")
            ui.remove = gr.Textbox(label="Remove tags", lines=1, elem_id="lora_maker_dataset_remove")
            ui.replace = gr.Textbox(label="Replace, one rule a line: old, older => new (nothing after => removes)",
                                    lines=2, elem_id="lora_maker_dataset_replace")
            ui.add = gr.Textbox(label="Add tags (at the end)", lines=1, elem_id="lora_maker_dataset_add")
            with gr.Row(elem_classes="lora-maker-compact"):
                ui.dedupe = gr.Checkbox(False, label="Drop repeated tags", elem_id="lora_maker_dataset_dedupe")
                ui.sort = gr.Checkbox(False, label="Sort tags A-Z (activation tags stay first)",
                                      elem_id="lora_maker_dataset_sort")
            with gr.Row(elem_classes="lora-maker-compact"):
                ui.apply = gr.Button("Apply to the filtered images", variant="primary",
                                     elem_id="lora_maker_dataset_apply")
                ui.undo = gr.Button("Undo last edit", elem_id="lora_maker_dataset_undo")
            ui.message = gr.Markdown(elem_id="lora_maker_dataset_curate_message")
            ui.history = gr.HTML(elem_id="lora_maker_dataset_history", label="Recent edits")


def _wire(ctx: TabContext, ui, edited) -> None:
    def views_of(project: Project, include, exclude, match):
        found, selected = views.frequency_rows(load_captions(project), views.make_filter(include, exclude, match))
        total = len(project.images())
        filtered = bool(split_tags(include) or split_tags(exclude))
        images = views.counted(total, "image")
        note = f"{selected} of {images} selected" if filtered else f"all {images}"
        note += f" · {views.counted(len(found), 'different tag')}"
        return found, note, views.history_html(History(project).edits())

    outputs = [ui.table, ui.selected_note, ui.history]

    @shows_errors
    def show(name, include, exclude, match):
        return views_of(ctx.open(name), include, exclude, match) if name else ([], "", "")

    @shows_errors
    def reload(name, include, exclude, match):
        """Also the saved activation tags (a filter change keeps what is being typed there)."""
        return (*show(name, include, exclude, match), join_tags(activation_tags(ctx.open(name))) if name else "")

    @shows_errors
    def apply_edits(name, include, exclude, match, activation, remove, replace, add, dedupe, sort):
        project = ctx.open(name)
        edits = views.make_edits(activation, remove, replace, add, dedupe, sort)
        changed = ctx.studio.edit_tags(project.name, edits, views.make_filter(include, exclude, match))
        done = f"Changed {views.counted(changed, 'caption')} ({edits.describe() or 'no edit'}); Undo takes it back."
        return (*views_of(project, include, exclude, match), done, "", "", "")

    @shows_errors
    def undo_edit(name, include, exclude, match):
        project = ctx.open(name)
        done = views.undo_message(ctx.studio.undo_edit(project.name))
        return (*views_of(project, include, exclude, match), join_tags(activation_tags(project)), done)

    def clicked(evt: gr.SelectData, target, include, exclude, remove, add):
        """A click on a tag (the value shown, also after sorting by a header) adds it to the target field."""
        if evt.index[1] != 0 or not evt.value:
            return include, exclude, remove, add
        fields = dict(zip(CLICK_TARGETS, (remove, include, exclude, add)))
        tags = split_tags(fields[target])
        fields[target] = join_tags(tags if evt.value in tags else tags + [evt.value])
        return fields["filter: with"], fields["filter: without"], fields["remove"], fields["add"]

    filter_inputs = [ctx.project, ui.include, ui.exclude, ui.match]
    for event in (ctx.project.change, ctx.job_event.change):
        event(reload, filter_inputs, outputs + [ui.activation], queue=False)
    for event in (ui.apply_filter.click, ui.include.submit, ui.exclude.submit, ui.match.change):
        event(show, filter_inputs, outputs, queue=False)
    announce = {"fn": lambda: views.edit_stamp("curate"), "inputs": None, "outputs": edited, "queue": False}
    ui.apply.click(apply_edits, filter_inputs + [ui.activation, ui.remove, ui.replace, ui.add, ui.dedupe, ui.sort],
                   outputs + [ui.message, ui.remove, ui.replace, ui.add], queue=False).success(**announce)
    ui.undo.click(undo_edit, filter_inputs, outputs + [ui.activation, ui.message], queue=False).success(**announce)
    edited.change(lambda stamp, *shown: show(*shown) if views.edited_elsewhere(stamp, "curate") else
                  (gr.update(),) * len(outputs), [edited] + filter_inputs, outputs, queue=False)
    ui.table.select(clicked, [ui.click_to, ui.include, ui.exclude, ui.remove, ui.add],
                    [ui.include, ui.exclude, ui.remove, ui.add], queue=False)
