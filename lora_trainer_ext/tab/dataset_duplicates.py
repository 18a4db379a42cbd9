"""Dataset > Duplicates: near-duplicate groups by perceptual hash (cached per file, so a new
threshold regroups at once), shown as thumbnails, and their non-keepers moved to the trash."""

from __future__ import annotations

import gradio as gr

from ..dataset import dedupe
from ..errors import LoraMakerError
from . import dataset_views as views
from .context import TabContext, shows_errors, unavailable

TRASH_LABEL = "Move duplicates to trash"


def build(ctx: TabContext, edited) -> None:
    missing = unavailable(("imagehash",), views.need_imagehash)
    with gr.Row(elem_classes="lora-maker-compact"):
        threshold = gr.Slider(0, dedupe.MAX_THRESHOLD, value=dedupe.DEFAULT_THRESHOLD, step=1,
                              label="Most bits apart (of 64): 0 = identical, 8 also catches resized and re-saved copies",
                              elem_id="lora_maker_dataset_dupe_threshold", scale=3)
        find = gr.Button("Find duplicates", elem_id="lora_maker_dataset_find_dupes", interactive=not missing,
                         scale=0, min_width=190)
        move = gr.Button(TRASH_LABEL, variant="stop", interactive=False, elem_id="lora_maker_dataset_trash_dupes",
                         scale=0, min_width=280)
    if missing:
        gr.Markdown(f"Unavailable: {missing}", elem_classes="lora-maker-error", elem_id="lora_maker_dataset_dupes_missing")
    groups_view = gr.HTML(elem_id="lora_maker_dataset_dupes")

    @shows_errors
    def find_groups(name, bits):
        project = ctx.open(name)
        groups, _ = ctx.studio.find_duplicates(project.name, int(bits))
        dupes = sum(len(g.duplicates) for g in groups)
        return views.duplicates_html(project, groups), gr.Button.update(
            value=f"{TRASH_LABEL} ({dupes})" if dupes else TRASH_LABEL, interactive=bool(dupes))

    @shows_errors
    def trash_groups(name, bits):
        groups, _ = ctx.studio.find_duplicates(name, int(bits))  # regrouped now: the dataset may have changed
        if not groups:
            raise LoraMakerError("no duplicates left at this threshold")
        moved = ctx.studio.trash_duplicates(name, groups)
        note = f"<p>Moved {views.counted(moved, 'duplicate')} to the trash (Review > Trash restores them).</p>"
        return note, gr.Button.update(value=TRASH_LABEL, interactive=False)

    def stale():
        return "", gr.Button.update(value=TRASH_LABEL, interactive=False)

    find.click(find_groups, [ctx.project, threshold], [groups_view, move], queue=False)
    threshold.release(lambda name, bits: find_groups(name, bits) if name and not missing else stale(),
                      [ctx.project, threshold], [groups_view, move], queue=False)
    move.click(trash_groups, [ctx.project, threshold], [groups_view, move], queue=False).success(
        lambda: views.edit_stamp("duplicates"), None, edited, queue=False)
    for event in (ctx.project.change, ctx.job_event.change):
        event(stale, None, [groups_view, move], queue=False)
