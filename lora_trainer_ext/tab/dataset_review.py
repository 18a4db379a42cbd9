"""Dataset > Review: every image as a paged gallery of cached thumbnails, marking images for the
trash, the per-image caption editor, and the trash itself (restorable).

The marks live in the page (a multiselect the user can also edit), not on the server, so two
browser tabs never share half-made selections."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from ..dataset import trash
from ..errors import LoraMakerError
from . import dataset_views as views
from .context import TabContext, shows_errors

CLICK_MARKS, CLICK_EDITS = "mark / unmark for the trash", "open in the caption editor"
# While a click empties and refills the gallery, its box keeps its height, so the page doesn't jump.
HOLD_HEIGHT = """(...args) => {
    const box = gradioApp().querySelector("#lora_maker_dataset_gallery");
    if (box) box.style.minHeight = box.offsetHeight + "px";
    return args;
}"""
RELEASE_HEIGHT = """() => {
    const box = gradioApp().querySelector("#lora_maker_dataset_gallery");
    if (box) box.style.minHeight = "";
}"""


def build(ctx: TabContext, edited) -> None:
    ui = SimpleNamespace()
    _gallery_layout(ui)
    _editor_layout(ui)
    pages = _Pages(ctx, ui)
    announce = {"fn": lambda: views.edit_stamp("review"), "inputs": None, "outputs": edited, "queue": False}
    _wire_gallery(ctx, ui, pages, edited)
    _wire_edits(ctx, ui, pages, announce)


def _gallery_layout(ui) -> None:
    with gr.Row(elem_classes="lora-maker-compact"):
        ui.with_tags = gr.Textbox(label="Show only images tagged (comma-separated; empty: all)", lines=1, scale=3,
                                  elem_id="lora_maker_dataset_show_tags")
        ui.click = gr.Radio([CLICK_MARKS, CLICK_EDITS], value=CLICK_MARKS, label="Click on an image to",
                            elem_id="lora_maker_dataset_click", scale=2)
    ui.gallery = gr.Gallery(show_label=False, columns=8, allow_preview=False, object_fit="cover", height="auto",
                            elem_id="lora_maker_dataset_gallery")
    with gr.Row(elem_classes="lora-maker-pager"):
        ui.prev = gr.Button("◀ Previous", elem_id="lora_maker_dataset_prev", scale=0, min_width=110, size="sm")
        ui.page = gr.Number(value=1, precision=0, show_label=False, container=False,
                            elem_id="lora_maker_dataset_page", scale=0, min_width=70)
        ui.following = gr.Button("Next ▶", elem_id="lora_maker_dataset_next", scale=0, min_width=110, size="sm")
        ui.note = gr.Markdown(elem_id="lora_maker_dataset_page_note")
    with gr.Row(elem_classes="lora-maker-compact"):
        ui.marked = gr.Dropdown([], value=[], multiselect=True, label="Marked for the trash (× unmarks)",
                                elem_id="lora_maker_dataset_marked", scale=4)
        ui.mark_page = gr.Button("Mark this page", elem_id="lora_maker_dataset_mark_page", scale=0, min_width=140,
                                 size="sm")
        ui.clear = gr.Button("Clear marks", elem_id="lora_maker_dataset_clear_marks", scale=0, min_width=120,
                             size="sm")
        ui.move = gr.Button("Move marked to trash", variant="stop", elem_id="lora_maker_dataset_move_marked",
                            scale=0, min_width=190, size="sm")
    ui.message = gr.Markdown(elem_id="lora_maker_dataset_review_message")
    ui.shown = gr.State([])  # names on the gallery's page, in order: what a click's index points at


def _editor_layout(ui) -> None:
    with gr.Accordion("Caption editor", open=True, elem_id="lora_maker_dataset_editor"):
        with gr.Row():
            with gr.Column(scale=2, min_width=240):
                ui.image_name = gr.Dropdown([], label="Image", elem_id="lora_maker_dataset_image")
                ui.preview = gr.Image(show_label=False, interactive=False, height=256,
                                      elem_id="lora_maker_dataset_image_preview")
            with gr.Column(scale=3):
                ui.caption = gr.Textbox(label="Caption", lines=6, elem_id="lora_maker_dataset_caption")
                with gr.Row(elem_classes="lora-maker-compact"):
                    ui.save = gr.Button("Save caption", variant="primary", elem_id="lora_maker_dataset_save_caption",
                                        size="sm")
                    ui.mark_one = gr.Button("Mark / unmark for the trash", elem_id="lora_maker_dataset_mark_one",
                                            size="sm")
                    ui.undo = gr.Button("Undo last edit", elem_id="lora_maker_dataset_review_undo", size="sm")
    with gr.Accordion("Trash", open=False, elem_id="lora_maker_dataset_trash"):
        ui.trash_view = gr.HTML(elem_id="lora_maker_dataset_trash_list")
        with gr.Row(elem_classes="lora-maker-compact"):
            ui.restore_pick = gr.Dropdown([], value=[], multiselect=True, label="Restore these", scale=4,
                                          elem_id="lora_maker_dataset_restore_pick")
            ui.restore = gr.Button("Restore", elem_id="lora_maker_dataset_restore", scale=0, min_width=100,
                                   size="sm")
            ui.restore_all = gr.Button("Restore all", elem_id="lora_maker_dataset_restore_all", scale=0,
                                       min_width=120, size="sm")


class _Pages:
    """What the review shows, as the tuples of updates the handlers return."""

    def __init__(self, ctx: TabContext, ui):
        self.ctx = ctx
        self.page_outputs = [ui.gallery, ui.page, ui.note, ui.shown]
        self.all_outputs = self.page_outputs + [ui.marked, ui.image_name, ui.trash_view, ui.restore_pick]
        self.view_inputs = [ctx.project, ui.with_tags, ui.page, ui.marked]

    def page(self, project, with_tags, page_number, marks):
        images = views.shown_images(project, with_tags)
        number = views.clamp_page(page_number, len(images))
        on_page = views.page_of(images, number)
        return (views.gallery_items(project, on_page, marks), number, views.page_note(number, len(images)),
                [p.name for p in on_page])

    def everything(self, project, with_tags, page_number, marks, keep_image=True):
        names = [p.name for p in project.images()]
        marks = [m for m in marks or [] if m in names]
        entries = trash.list_trash(project)
        image_choices = (gr.Dropdown.update(choices=names) if keep_image else
                         gr.Dropdown.update(choices=names, value=None))
        return (*self.page(project, with_tags, page_number, marks), gr.Dropdown.update(choices=marks, value=marks),
                image_choices, views.trash_html(entries),
                gr.Dropdown.update(choices=[e.name for e in entries], value=[]))

    @staticmethod
    def nothing():
        return ([], 1, "", [], gr.Dropdown.update(choices=[], value=[]), gr.Dropdown.update(choices=[], value=None),
                "", gr.Dropdown.update(choices=[], value=[]))

    def refresh(self, name, with_tags, page_number, marks):
        return self.everything(self.ctx.open(name), with_tags, page_number, marks) if name else self.nothing()

    def editor(self, project, image_name):
        image = project.dataset_dir / image_name
        if image not in project.images():
            raise LoraMakerError(f"{image_name} is no longer in the dataset")
        return image_name, str(views.thumbnail(project, image, views.PREVIEW_SIDE)), views.caption_text(image)

    def remark(self, name, with_tags, page_number, marks):
        """The marks and the page redrawn with them."""
        marks = marks or []
        return (gr.Dropdown.update(choices=marks, value=marks),
                self.page(self.ctx.open(name), with_tags, page_number, marks)[0])


def _wire_gallery(ctx: TabContext, ui, pages: _Pages, edited) -> None:
    """Paging, filtering, clicking and marking."""
    remark = shows_errors(pages.remark)

    @shows_errors
    def switch_project(name, with_tags):
        """Another project (or the page loaded): its first page, no marks, an empty editor."""
        shown = pages.everything(ctx.open(name), with_tags, 1, [], keep_image=False) if name else pages.nothing()
        return (*shown, None, "")

    @shows_errors
    def turn(name, with_tags, page_number, marks, step):
        return pages.page(ctx.open(name), with_tags, int(page_number or 1) + step, marks)

    @shows_errors
    def clicked(evt: gr.SelectData, name, with_tags, page_number, names, marks, mode):
        project = ctx.open(name)
        if not 0 <= evt.index < len(names or []):
            raise LoraMakerError("the gallery changed meanwhile: click the image again")
        image_name = names[evt.index]
        # The gallery is emptied, then refilled by remark(): that clears its selection, or a second
        # click on the same image would send no event.
        if mode == CLICK_EDITS:
            return (gr.update(), [], *pages.editor(project, image_name))
        marks = views.toggled(marks or [], image_name)
        return (gr.Dropdown.update(choices=marks, value=marks), [], gr.update(), gr.update(), gr.update())

    @shows_errors
    def elsewhere(stamp, names, *view):
        """Another part changed the dataset: show it (the page's State passes through otherwise)."""
        if views.edited_elsewhere(stamp, "review"):
            return pages.refresh(*view)
        return tuple(names if output is ui.shown else gr.update() for output in pages.all_outputs)

    view_inputs, all_outputs, marks_out = pages.view_inputs, pages.all_outputs, [ui.marked, ui.gallery]
    refresh = shows_errors(pages.refresh)
    ctx.project.change(switch_project, [ctx.project, ui.with_tags], all_outputs + [ui.preview, ui.caption],
                       queue=False)
    ctx.job_event.change(refresh, view_inputs, all_outputs, queue=False)
    for event in (ui.with_tags.submit, ui.page.submit):
        event(refresh, view_inputs, all_outputs, queue=False)
    ui.prev.click(lambda *a: turn(*a, -1), view_inputs, pages.page_outputs, queue=False)
    ui.following.click(lambda *a: turn(*a, +1), view_inputs, pages.page_outputs, queue=False)
    ui.gallery.select(clicked, [ctx.project, ui.with_tags, ui.page, ui.shown, ui.marked, ui.click],
                      marks_out + [ui.image_name, ui.preview, ui.caption], queue=False, _js=HOLD_HEIGHT,
                      show_progress="hidden").then(
        remark, view_inputs, marks_out, queue=False, show_progress="hidden").then(
        None, None, None, queue=False, _js=RELEASE_HEIGHT)
    ui.marked.input(remark, view_inputs, marks_out, queue=False)
    ui.mark_one.click(lambda name, w, p, marks, one: remark(name, w, p, views.toggled(marks or [], one) if one
                                                            else marks), view_inputs + [ui.image_name], marks_out,
                      queue=False)
    ui.mark_page.click(lambda name, w, p, marks, names: remark(name, w, p, list(dict.fromkeys((marks or []) + names))),
                       view_inputs + [ui.shown], marks_out, queue=False)
    ui.clear.click(lambda name, w, p: remark(name, w, p, []), view_inputs[:3], marks_out, queue=False)
    edited.change(elsewhere, [edited, ui.shown] + view_inputs, all_outputs, queue=False)


def _wire_edits(ctx: TabContext, ui, pages: _Pages, announce: dict) -> None:
    """The caption editor, the trash and their undo: each through the Studio, which refuses them while
    a job works on the project."""
    studio, remark = ctx.studio, shows_errors(pages.remark)

    @shows_errors
    def open_image(name, image_name):
        return pages.editor(ctx.open(name), image_name) if image_name else (None, None, "")

    @shows_errors
    def save_caption(name, image_name, text):
        if not image_name:
            raise LoraMakerError("pick an image first (click it in the gallery or choose it above)")
        changed = studio.set_caption(ctx.open(name).name, image_name, text or "")
        return f"Saved the caption of {image_name} (Undo takes it back)." if changed else "The caption is unchanged."

    @shows_errors
    def move_marked(name, with_tags, page_number, marks):
        project = ctx.open(name)
        if not marks:
            raise LoraMakerError("mark images first: click them in the gallery (or use Mark this page)")
        moved = studio.trash_images(project.name, marks, views.TRASH_REASON)
        return (*pages.everything(project, with_tags, page_number, []),
                f"Moved {views.counted(len(moved), 'image')} to the trash.")

    @shows_errors
    def restore_from_trash(name, with_tags, page_number, marks, picked):
        project = ctx.open(name)
        if picked is not None and not picked:
            raise LoraMakerError("choose what to restore first (or use Restore all)")
        restored = studio.restore_trash(project.name, picked)
        return (*pages.everything(project, with_tags, page_number, marks),
                f"Restored {views.counted(len(restored), 'image')}.")

    @shows_errors
    def undo_edit(name, image_name):
        project = ctx.open(name)
        done = views.undo_message(studio.undo_edit(project.name))
        text = views.caption_text(project.dataset_dir / image_name) if image_name else ""
        return done, text

    view_inputs, all_outputs, marks_out = pages.view_inputs, pages.all_outputs, [ui.marked, ui.gallery]
    ui.image_name.input(open_image, [ctx.project, ui.image_name], [ui.image_name, ui.preview, ui.caption], queue=False)
    ui.save.click(save_caption, [ctx.project, ui.image_name, ui.caption], ui.message, queue=False).success(
        remark, view_inputs, marks_out, queue=False).success(**announce)
    ui.undo.click(undo_edit, [ctx.project, ui.image_name], [ui.message, ui.caption], queue=False).success(
        remark, view_inputs, marks_out, queue=False).success(**announce)
    ui.move.click(move_marked, view_inputs, all_outputs + [ui.message], queue=False).success(**announce)
    ui.restore.click(restore_from_trash, view_inputs + [ui.restore_pick], all_outputs + [ui.message],
                     queue=False).success(**announce)
    ui.restore_all.click(lambda *a: restore_from_trash(*a, None), view_inputs, all_outputs + [ui.message],
                         queue=False).success(**announce)
